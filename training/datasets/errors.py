"""The one error every data check raises: where (FILE:LINE), which field, what was
expected and what was found, so that a user can fix the file without reading code."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """A row (or file) that a stage cannot train on. A ValueError, so that the CLI prints
    it as one line and exits non-zero."""

    def __init__(self, path: str | Path, line: int, field: str, expected: str, got: str | None = None) -> None:
        self.path, self.line, self.field, self.expected, self.got = str(path), line, field, expected, got
        message = f"{self.path}:{line}: {field}: expected {expected}"
        super().__init__(message + (f", got {got}" if got is not None else ""))


def json_type(value: object) -> str:
    """JSON's name for a value's type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "an array", str: "a string"}.get(type(value), "a number")


def describe(value: object) -> str:
    """A short rendering of a JSON value for an error message: its type and text."""
    import json

    text = json.dumps(value, ensure_ascii=False)
    return f"{json_type(value)} {text if len(text) <= 60 else text[:57] + '...'}"
