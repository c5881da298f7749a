"""Reusable building blocks of sage.common (embedding methods, ...)."""
