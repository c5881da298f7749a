"""Tests of the `sage llm` command line (sage.llm.cli and friends)."""
