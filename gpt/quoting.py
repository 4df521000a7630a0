"""Quoting a caller's value inside an error message: `repr` of at most a short prefix,
marked when cut. Every message that echoes input goes through `quote`, so a 100,000-
character model name costs a few dozen characters in the reply, never the whole value
(a gRPC status message travels in a header, which has a size limit of its own)."""

from __future__ import annotations

# Long enough for any valid name (model names and aliases are at most 64 characters).
QUOTE_CHARS = 64


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """`repr(value)` for short strings; for longer ones, the repr of the first `limit`
    characters, an ellipsis and the full length: `'aaaa…' (100000 characters)`."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text)} characters)"
