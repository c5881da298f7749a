"""Tests of sage.common.components.sage_embedding."""
