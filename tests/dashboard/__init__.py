"""Browser tests of the edge's /dashboard."""
