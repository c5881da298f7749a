"""Unit tests for the scheduler service (a package so test module basenames cannot clash)."""
