"""Unit tests for sage.common (a package so test module basenames cannot clash)."""
