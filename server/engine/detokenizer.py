"""Incremental detokenization with stop strings.

Tokens arrive one at a time; text leaves in deltas that are always valid UTF-8 (a
character split across tokens is held until its last byte arrives) and never contain a
stop string or the beginning of one that the next tokens might complete. When a stop
string appears, possibly spread over several tokens, the text before it is the final
output and the stop string itself is dropped. Without a stop, the deltas joined equal
the full decode of the tokens that were not hidden, for every tokenizer kind (tested).

Two ways to make text, by what the tokenizer allows:

- bytes (`token_bytes`): each token's bytes through an incremental UTF-8 decoder. Exact
  where the text is the concatenation of the tokens' bytes (sol's BPE, byte-level BPE),
  and the cheapest: one cached lookup per token.
- a decode window (`decode`): for decoders that look at neighbours (metaspace drops the
  first token's leading space, byte-fallback pieces <0xE2><0x82><0xAC> make one
  character). The text new tokens add is decode(ids[prefix:]) minus
  decode(ids[prefix:read]), where `read` is where the text was last complete and
  `prefix` the token before that point's window, so each step decodes a few tokens;
  text ending in U+FFFD (an unfinished character) waits for the next token. A run of
  byte-fallback pieces is decoded as a whole (one invalid byte turns every byte of the
  run into U+FFFD), so its text waits until a token that is no byte piece follows.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable


class _DecodeWindow:
    """Text from a token stream through `decode` over a short window (see above)."""

    def __init__(self, decode: Callable[[list[int]], str], byte_pieces: frozenset[int]) -> None:
        self._decode = decode
        self._byte_pieces = byte_pieces
        self._ids: list[int] = []
        self._prefix = 0          # window start
        self._read = 0            # tokens whose text has been handed out
        self._prefix_text = ""    # decode(ids[prefix:read])

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        if token_id in self._byte_pieces:
            return ""
        text = self._decode(self._ids[self._prefix:])
        if len(text) <= len(self._prefix_text) or text.endswith("\ufffd"):
            return ""
        return self._advance(text)

    def flush(self) -> str:
        if self._read == len(self._ids):
            return ""
        return self._advance(self._decode(self._ids[self._prefix:]))

    def _advance(self, text: str) -> str:
        delta = text[len(self._prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix:self._read])
        return delta


class IncrementalDetokenizer:
    def __init__(self, token_bytes: Callable[[int], bytes] | None = None, stop: list[str] | None = None, *,
                 decode: Callable[[list[int]], str] | None = None, byte_pieces: frozenset[int] = frozenset()) -> None:
        """Text by `token_bytes`, or by a `decode` window when given (see the module);
        `byte_pieces` are the tokenizer's byte-fallback ids (<0xNN>)."""
        if (token_bytes is None) == (decode is None):
            raise ValueError("give token_bytes or decode")
        self._token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._window = _DecodeWindow(decode, byte_pieces) if decode is not None else None
        self.stop = [s for s in (stop or []) if s]
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self.text = ""            # all decoded text so far (after a stop: truncated before it)
        self.emitted = 0          # characters of `text` already handed out
        self.stopped = False

    def add(self, token_id: int, hide: bool = False, check_stop: bool = True) -> str:
        """Feed one token; return the text that is now safe to emit. `hide` drops the
        token's text (a stop token such as EOS); `check_stop` is False while min_tokens is
        not yet reached."""
        if self.stopped:
            return ""
        if not hide:
            if self._window is not None:
                self.text += self._window.add(token_id)
            else:
                self.text += self._utf8.decode(self._token_bytes(token_id))
        if not self.stop:
            return self._release(len(self.text))
        if check_stop:
            # Everything before `emitted` was released because no stop string could
            # start there, so a match can only start in the held-back tail or later.
            found = [i for i in (self.text.find(s, self.emitted) for s in self.stop) if i >= 0]
            if found:
                self.text = self.text[:min(found)]
                self.stopped = True
                return self._release(len(self.text))
        return self._release(len(self.text) - self._held_back())

    def _held_back(self) -> int:
        """Length of the longest tail of the text that could begin a stop string."""
        tail_max = min(self._max_stop - 1, len(self.text) - self.emitted)
        for k in range(tail_max, 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

    def flush(self) -> str:
        """At the end of the output: the held-back text (and any dangling partial UTF-8
        character, as a replacement character)."""
        if not self.stopped:
            self.text += self._window.flush() if self._window is not None else self._utf8.decode(b"", final=True)
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        out = self.text[self.emitted:upto]
        self.emitted = upto
        return out
