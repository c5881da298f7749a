"""Unit tests for the edge service (a package so test module basenames cannot clash)."""
