"""Reading a JSON Lines file: one object per non-blank line, each kept with its 1-based
line number so that every later check can name FILE:LINE."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.datasets.errors import DataError, describe


@dataclass(frozen=True)
class Row:
    path: str
    line: int
    data: dict[str, Any]

    def error(self, field: str, expected: str, got: str | None = None) -> DataError:
        return DataError(self.path, self.line, field, expected, got)


def read_rows(path: str | Path) -> list[Row]:
    """Every object of a JSON Lines file. Blank lines are skipped; anything else that is
    not one JSON object, and a file with no rows, is an error."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, 0, "file", "a readable JSON Lines file", "no such file")
    rows: list[Row] = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(path, number, "line", "UTF-8 text", f"invalid byte at column {err.start + 1}") from None
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(path, number, "line", "one JSON object per line",
                                f"malformed JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(value, dict):
                raise DataError(path, number, "line", "a JSON object", describe(value))
            rows.append(Row(str(path), number, value))
    if not rows:
        raise DataError(path, 1, "file", "at least one row", "an empty file")
    return rows
