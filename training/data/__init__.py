"""Local training data: a text corpus from what Python installations ship, and synthetic
verifiable chat tasks. Nothing is downloaded."""
