"""Engine programs this project ships itself (started by lifecycle like any other engine)."""
