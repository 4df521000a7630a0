"""Incremental detokenization with stop strings.

Tokens arrive one at a time; text leaves in deltas that are always valid UTF-8 (a
character split across tokens is held until its last byte arrives) and never contain a
stop string or the beginning of one that the next tokens might complete. When a stop
string appears, possibly spread over several tokens, the text before it is the final
output and the stop string itself is dropped.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable


class IncrementalDetokenizer:
    def __init__(self, token_bytes: Callable[[int], bytes], stop: list[str] | None = None) -> None:
        self._token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
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
            self.text += self._utf8.decode(b"", final=True)
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        out = self.text[self.emitted:upto]
        self.emitted = upto
        return out
