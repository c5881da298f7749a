"""Utilities shared by every process: structured logging and small helpers."""
