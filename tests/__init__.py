"""The test suite: `python -m pytest -q` (all of it, as CI runs it), `-m "not slow"` (the fast part)."""
