"""Generated stubs of sol.v1 (see proto/generate.py)."""
