"""A text corpus built from text every Python installation has: docstrings of the
standard library (read with `ast`, never imported), the `pydoc_data` help topics, and
the descriptions and licence texts that installed packages ship.

Documents are split into train / held-out by a stable hash of their source, so the
split does not depend on the order files are found in, and the corpus carries a
fingerprint of its contents.
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HELDOUT_BUCKETS = 20        # 1 document in 20 is held out
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "lib2to3", "turtledemo"}


@dataclass
class Document:
    source: str
    text: str

    @property
    def heldout(self) -> bool:
        return int(hashlib.sha256(self.source.encode()).hexdigest(), 16) % HELDOUT_BUCKETS == 0


@dataclass
class Corpus:
    train: list[str] = field(default_factory=list)
    heldout: list[str] = field(default_factory=list)
    fingerprint: str = ""

    @property
    def train_bytes(self) -> int:
        return sum(len(t.encode()) for t in self.train)


def _stdlib_docstrings() -> Iterator[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if _SKIP_DIRS & set(path.relative_to(root).parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        parts = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 40:
                    parts.append(doc)
        if parts:
            yield Document(f"stdlib:{path.relative_to(root)}", "\n\n".join(parts))


def _pydoc_topics() -> Iterator[Document]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return
    for key in sorted(topics):
        yield Document(f"pydoc:{key}", topics[key])


def _package_texts() -> Iterator[Document]:
    site = Path(sysconfig.get_paths()["purelib"])
    for info in sorted(site.glob("*.dist-info")):
        for name in ("METADATA", "LICENSE", "LICENSE.txt", "LICENSE.md", "licenses/LICENSE"):
            path = info / name
            if path.is_file():
                text = path.read_text(encoding="utf-8", errors="replace")
                if name == "METADATA":
                    # Keep the long description, not the header fields.
                    text = text.partition("\n\n")[2]
                if len(text) >= 200:
                    yield Document(f"pkg:{info.name}/{name}", text)


def iter_documents() -> Iterator[Document]:
    yield from _pydoc_topics()
    yield from _stdlib_docstrings()
    yield from _package_texts()


def build_corpus(max_bytes: int = 8 << 20) -> Corpus:
    """Collect documents until `max_bytes` of training text; deterministic for a given
    Python installation."""
    corpus = Corpus()
    digest = hashlib.sha256()
    size = 0
    for doc in iter_documents():
        text = doc.text.replace("\r\n", "\n").strip()
        if not text:
            continue
        digest.update(doc.source.encode() + b"\0" + text.encode() + b"\0")
        if doc.heldout:
            corpus.heldout.append(text)
        else:
            corpus.train.append(text)
            size += len(text.encode())
            if size >= max_bytes:
                break
    corpus.fingerprint = digest.hexdigest()[:16]
    return corpus
