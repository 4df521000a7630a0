"""GPT-2's byte-level alphabet: every byte has a printable stand-in character, so a
byte-level BPE vocabulary is text. Used to read a vocabulary entry back as its bytes."""

from __future__ import annotations

import functools


@functools.cache
def byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte -> printable-unicode table used by byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def piece_bytes(piece: str) -> bytes | None:
    """A byte-level vocabulary entry as bytes; None when it is not in the alphabet."""
    table = byte_decoder()
    try:
        return bytes(table[ch] for ch in piece)
    except KeyError:
        return None
