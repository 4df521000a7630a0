"""Text for continued pretraining: JSON Lines of `{"text": "..."}` (one document per
line), or a plain `.txt` file (one document). Documents are joined into one token stream,
each opened by <|endoftext|>, and trained on in windows of the stage's length; nothing
is truncated (a window may span documents, as in pretraining)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from training.datasets.errors import DataError, describe
from training.datasets.render import Counts
from training.datasets.rows import read_rows


@dataclass
class Document:
    path: str
    line: int
    text: str


@dataclass
class TextData:
    path: str
    documents: list[Document]
    counts: Counts = field(default_factory=Counts)


def read_text(path: str | Path) -> list[Document]:
    path = Path(path)
    if path.suffix == ".txt":
        if not path.is_file():
            raise DataError(path, 0, "file", "a readable text file", "no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise DataError(path, text_line(path, err.start), "text", "UTF-8 text", "an invalid byte") from None
        if not text.strip():
            raise DataError(path, 1, "file", "some text", "an empty file")
        return [Document(str(path), 1, text)]
    docs = []
    for row in read_rows(path):
        text = row.data.get("text")
        if not isinstance(text, str) or not text.strip():
            raise row.error("text", "a non-empty string", "nothing" if text is None else describe(text))
        docs.append(Document(row.path, row.line, text))
    return docs


def text_line(path: Path, offset: int) -> int:
    return path.read_bytes()[:offset].count(b"\n") + 1


def load_text(path: str | Path) -> TextData:
    docs = read_text(path)
    return TextData(str(path), docs, Counts(rows=len(docs)))
