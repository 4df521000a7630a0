"""Structured outputs: a request's ResponseFormat as a token grammar, one matcher per choice.

    request path (any thread but the engine's)        engine (its own thread)
    GrammarCompiler.compile(format) ── cached ──►  EngineRequest.grammar
                                                      │ admission: CompiledGrammar.matcher() per choice
                                                      ▼
                                     each step: token_bitmask(matchers) ─► sampler masks those rows
                                                      │ scheduler: matcher.accept(token); the choice
                                                      ▼ finishes ("stop") when the grammar must end

The grammar library is llguidance. Measured on sol's 4096-token BPE (this repository's
2-core machine, a nested JSON schema walked token by token), against xgrammar 0.2.9:
a warm mask takes 4.5 us (xgrammar 2.2 us) and a cold compile 0.6 ms (xgrammar 1.8 ms),
both far below one model step. It was chosen for what it refuses and what it weighs:
llguidance refuses JSON Schema keywords it cannot enforce (`not`, `uniqueItems`,
`if`/`then`...) where xgrammar silently ignores them, so a "valid" answer could break the
schema; its grammars are Lark, which tests can check with the independent `lark` parser;
and it is one 44 MB wheel with no dependencies, where xgrammar pulls triton and
transformers (a 2.2 GB environment, 6 s to import).

End of output: the model's own stop tokens (the request's eos and stop_token_ids) are
allowed exactly where the grammar may end, and nowhere else; special tokens are never
grammar text. When the grammar can go no further (a JSON object closed, a finite regex
complete), the choice finishes at once with "stop", with no extra step for an eos.

Bounded work (a response_format is caller input: `{"regex": "a{9000000}"}` made llguidance
build ~90 MB of lexer state in the engine's first mask, `(a{1001}){1000}` stalled every
row of the model for seconds): GrammarLimits passes llguidance's own ParserLimits, and a
compile *warms* the grammar where the request path runs it (a worker thread, under the
compile timeout): the template computes its first mask and walks one token, so the lexer
construction a bomb needs happens there, past the limits it is refused (GrammarError,
naming the limit), and a copy made for a choice starts from the warmed, shared lexer. In
the engine each mask is bounded by the step limits (`step_lexer_fuel`, `step_max_items`);
a matcher that runs out of them is in error, and its choice ends with that error
(GrammarMatcher.failure) while the other rows go on. The compile cache is bounded by
bytes (each entry's heap use measured at compile, see `_heap_in_use`), not entries.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import llguidance as llg
import llguidance.numpy as llg_numpy
import numpy as np
import torch

from gpt.tokenizer import SolTokenizer
from server.engine.api import ResponseFormat

log = logging.getLogger(__name__)

# JSON is written the way json.dumps writes it (", " and ": "), with no other whitespace: a
# small model allowed free whitespace may pad forever, and one fixed layout is what the
# training data shows.
JSON_LAYOUT: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# A schema may carry llguidance options ("x-guidance"); "lenient" would turn refusing an
# unsupported keyword into ignoring it, so it is pinned off.
JSON_OVERRIDES: dict[str, Any] = {"lenient": False}
# Keywords whose values are subschemas (or maps/lists of them): where `strict` looks for objects.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalProperties", "additionalItems", "contains", "propertyNames", "not")


class GrammarError(ValueError):
    """The response_format cannot be enforced: an invalid schema, regex or grammar, a
    schema feature the library does not support, or a constraint past GrammarLimits. The
    message says which."""


@dataclass(frozen=True)
class GrammarLimits:
    """What one constraint may cost, passed to llguidance as its ParserLimits (1.9's
    names). Chosen from measurements on this repository's 2-core machine with a 512-token
    BPE (tests/engine/test_grammar_limits.py keeps the cases): the schemas, regexes and
    Lark grammars of the tests and a 60-field schema with patterns and enums need at most
    ~9,400 units of initial lexer fuel (a plain JSON object ~520), so 100,000 leaves
    10x; at that fuel `a{9000000}` and `(a{1001}){1000}` are refused in ~0.1 s instead of
    taking 1-7 s and 90-180 MB. llguidance's defaults are in parentheses."""

    initial_lexer_fuel: int = 100_000     # building the lexer's first states (1,000,000; ~50k/ms)
    step_lexer_fuel: int = 100_000        # lexer work of one mask (200,000; ~14k/ms: ~7 ms)
    step_max_items: int = 20_000          # Earley items of one mask (50,000; ~20k/ms: ~1 ms)
    max_items_in_row: int = 2_000         # branching of one grammar row (2,000)
    max_lexer_states: int = 20_000        # lexer states, ~1-2 kB each (250,000)
    max_grammar_size: int = 100_000       # grammar symbols (500,000)
    cache_bytes: int = 64 << 20           # the compile cache of one model version

    def parser_limits(self) -> llg.LLParserLimits:
        return llg.LLParserLimits(initial_lexer_fuel=self.initial_lexer_fuel, step_lexer_fuel=self.step_lexer_fuel,
                                  step_max_items=self.step_max_items, max_items_in_row=self.max_items_in_row,
                                  max_lexer_states=self.max_lexer_states, max_grammar_size=self.max_grammar_size,
                                  verbose_errors=False)

    def name_limit(self, error: str) -> str:
        """llguidance's message with the limit it ran into, named with sol's value."""
        lowered = error.lower()
        for needles, names in ((("grammar size",), ("max_grammar_size",)),
                               (("too many items",), ("step_max_items",)),
                               (("items; max is",), ("max_items_in_row",)),
                               (("too many states",), ("max_lexer_states",)),
                               (("too many expressions", "fuel", "too big"),
                                ("initial_lexer_fuel", "step_lexer_fuel", "max_lexer_states"))):
            if any(n in lowered for n in needles):
                limits = ", ".join(f"{n}={getattr(self, n)}" for n in names)
                return f"{error} (past the server's limit: {limits}); simplify it: smaller repetition counts, " \
                       "fewer alternatives or a smaller schema"
        return error


def constraint_key(fmt: ResponseFormat) -> str:
    """A hash of what the format constrains (the schema canonicalised): the cache key."""
    schema: Any = None
    if fmt.type == "json_schema" and fmt.json_schema is not None:
        try:
            schema = fmt.json_schema.schema_object()
        except ValueError:
            schema = fmt.json_schema.schema
    strict = bool(fmt.json_schema.strict) if fmt.json_schema is not None else False
    canonical = json.dumps([fmt.type, schema, strict, fmt.regex, fmt.grammar], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def close_objects(schema: Any) -> Any:
    """`strict`: a copy of the schema in which every object that does not say otherwise
    takes no properties beyond the ones it names (additionalProperties: false), as
    OpenAI's strict mode requires of its schemas."""
    if isinstance(schema, list):
        return [close_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: close_objects(sub) for name, sub in out[key].items()}
    for key in _SCHEMA_LISTS + _SCHEMA_ONE:
        if key in out:
            out[key] = close_objects(out[key])
    is_object = out.get("type") == "object" or (isinstance(out.get("type"), list) and "object" in out["type"]) \
        or "properties" in out
    if is_object and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


def grammar_source(fmt: ResponseFormat) -> str:
    """The llguidance grammar (its JSON form) of a constrained format."""
    try:
        if fmt.type == "json_object":
            return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_LAYOUT,
                                                          overrides=JSON_OVERRIDES)
        if fmt.type == "json_schema":
            assert fmt.json_schema is not None
            schema = fmt.json_schema.schema_object()
            if fmt.json_schema.strict:
                schema = close_objects(schema)
            return llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT, overrides=JSON_OVERRIDES)
        if fmt.type == "regex":
            return llg.LLMatcher.grammar_from_regex(fmt.regex)
        if fmt.type == "grammar":
            return llg.LLMatcher.grammar_from_lark(fmt.grammar)
    except (ValueError, TypeError) as err:
        raise GrammarError(f"response_format {fmt.type}: {err}") from None
    raise GrammarError(f"response_format type {fmt.type!r} has no grammar")


class GrammarMatcher:
    """One choice's position in its grammar. Advanced only by the engine's thread."""

    __slots__ = ("compiled", "keep_words", "end_words", "failure", "_matcher")

    def __init__(self, compiled: CompiledGrammar, matcher: llg.LLMatcher, keep_words: np.ndarray,
                 end_words: np.ndarray) -> None:
        self.compiled = compiled
        self._matcher = matcher
        # Per 32-token word of the bitmask: which bits the grammar may set (special tokens
        # and the request's stop tokens cleared), and the stop tokens, set where it may end.
        self.keep_words = keep_words
        self.end_words = end_words
        # Set by token_bitmask when computing this row's mask failed (a step limit ran
        # out): the choice ends with this error instead of a token.
        self.failure: str | None = None

    def accept(self, token_id: int) -> bool:
        """Advance by a sampled token; False if the grammar does not allow it (the
        matcher is then in its error state for good)."""
        return self._matcher.consume_token(token_id)

    def is_accepting(self) -> bool:
        """The output so far is complete: the grammar may end here."""
        return self._matcher.is_accepting()

    def is_stopped(self) -> bool:
        """The grammar must end here (or the matcher failed): no token can follow."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str:
        return self._matcher.get_error()


def _words(ids: Iterable[int], vocab_size: int) -> np.ndarray:
    """A (ceil(V/32),) uint32 bitmask with the bits of `ids` set."""
    bits = np.zeros(((vocab_size + 31) // 32) * 32, dtype=np.uint8)
    bits[np.fromiter(ids, dtype=np.int64)] = 1
    return np.packbits(bits, bitorder="little").view(np.uint32)


class CompiledGrammar:
    """A compiled constraint for one vocabulary: a template matcher, copied per choice.
    `nbytes` is what the compile cache charges for it (see GrammarCompiler.compile)."""

    def __init__(self, kind: str, key: str, template: llg.LLMatcher, vocab_size: int,
                 special_ids: np.ndarray, limits: GrammarLimits | None = None, nbytes: int = 0) -> None:
        self.kind = kind
        self.key = key
        self.vocab_size = vocab_size
        self.special_ids = special_ids
        self.limits = limits or GrammarLimits()
        self.nbytes = nbytes
        self._template = template
        self._words: dict[frozenset[int], tuple[np.ndarray, np.ndarray]] = {}

    def matcher(self, end_ids: Iterable[int] = ()) -> GrammarMatcher:
        end = frozenset(end_ids)
        words = self._words.get(end)
        if words is None:
            # The same for every choice of a request (and most requests): computed once.
            words = (~_words([*self.special_ids.tolist(), *end], self.vocab_size), _words(end, self.vocab_size))
            self._words[end] = words
        # deep_copy shares the compiled grammar and copies the parser state (under 1 us).
        return GrammarMatcher(self, self._template.deep_copy(), *words)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _load_mallinfo2() -> Callable[[], _MallInfo2] | None:
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).mallinfo2 if name else None
    except (OSError, AttributeError):
        return None
    if fn is not None:
        fn.restype = _MallInfo2
    return fn


_mallinfo2 = _load_mallinfo2()


def _heap_in_use() -> int | None:
    """Bytes the C heap has handed out and not taken back (glibc's mallinfo2: arena
    chunks in use plus mmapped blocks), or None where it cannot be read. llguidance
    allocates through malloc, so the difference around a compile is what the grammar
    keeps; other threads allocating or freeing at the same time blur it (an estimate)."""
    if _mallinfo2 is None:
        return None
    info = _mallinfo2()
    return int(info.uordblks + info.hblkhd)


# What an entry costs at least, when the heap cannot be read or the measurement is
# blurred below it: the grammar's text (llguidance keeps it parsed, several times its
# size) and the per-matcher tables.
_ENTRY_FLOOR_BYTES = 64 << 10


class GrammarCompiler:
    """Compiles response formats for one model's vocabulary, with an LRU cache of the
    compiled grammars keyed by a hash of the constraint and bounded by bytes
    (`limits.cache_bytes`). Thread-safe; call it off the engine's thread (a compile can
    take milliseconds, one at the limits about a tenth of a second)."""

    def __init__(self, token_bytes: Sequence[bytes], special_ids: Iterable[int], vocab_size: int,
                 encode: Callable[[str], list[int]], eos_id: int, limits: GrammarLimits | None = None) -> None:
        specials = sorted(set(special_ids))
        tokens = list(token_bytes) + [b""] * (vocab_size - len(token_bytes))
        for i in specials:
            # llguidance's convention for special tokens: 0xff then the name; never text.
            tokens[i] = b"\xff" + (tokens[i] or f"<|special_{i}|>".encode())
        self.vocab_size = vocab_size
        self.special_ids = np.asarray(specials, dtype=np.int64)
        self._tokenizer = llg.LLTokenizer(llg.TokenizerWrapper(_Vocab(tokens, specials, encode, eos_id)),
                                          n_vocab=vocab_size)
        self.limits = limits or GrammarLimits()
        # Bounded work per grammar and per step, and error messages without internal state.
        self._limits = self.limits.parser_limits()
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self.cache_bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @classmethod
    def for_tokenizer(cls, tokenizer: SolTokenizer, vocab_size: int | None = None,
                      limits: GrammarLimits | None = None) -> GrammarCompiler:
        """From a sol tokenizer's token bytes; `vocab_size` is the model's (it may pad the
        tokenizer's vocabulary: padding ids are never allowed)."""
        specials = set(tokenizer.special_ids.values())
        names = {i: name.encode() for name, i in tokenizer.special_ids.items()}
        token_bytes = [names[i] if i in specials else tokenizer.decode_bytes([i]) for i in range(tokenizer.vocab_size)]
        return cls(token_bytes, specials, vocab_size or tokenizer.vocab_size, tokenizer.encode,
                   tokenizer.end_of_turn_id, limits)

    def cached(self, fmt: ResponseFormat) -> CompiledGrammar | None:
        """The compiled grammar if the cache has it (cheap: no compile)."""
        key = constraint_key(fmt)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.hits += 1
            return hit

    def compile(self, fmt: ResponseFormat | None) -> CompiledGrammar | None:
        """The compiled grammar of `fmt` (None for free text); GrammarError says what is
        wrong with an invalid or unsupported constraint, or which limit it is past."""
        if fmt is None or not fmt.constrained:
            return None
        hit = self.cached(fmt)
        if hit is not None:
            return hit
        key = constraint_key(fmt)
        source = grammar_source(fmt)
        before = _heap_in_use()
        started = time.monotonic()
        # Builds the lexer and parser tables (llguidance drops the GIL meanwhile).
        template = llg.LLMatcher(self._tokenizer, source, log_level=0, limits=self._limits)
        if not template.is_error():
            self._warm(template)
        if template.is_error():
            raise GrammarError(f"response_format {fmt.type}: {self.limits.name_limit(_clean(template.get_error()))}")
        after = _heap_in_use()
        measured = after - before if before is not None and after is not None else 0
        nbytes = max(measured, len(source) * 4 + _ENTRY_FLOOR_BYTES)
        compiled = CompiledGrammar(fmt.type, key, template, self.vocab_size, self.special_ids, self.limits, nbytes)
        log.debug("compiled %s grammar in %.1f ms, ~%d KiB", fmt.type, (time.monotonic() - started) * 1e3,
                  nbytes >> 10)
        self._insert(compiled)
        return compiled

    def _warm(self, template: llg.LLMatcher) -> None:
        """Do here, off the engine, the lexer construction that the first steps would do:
        the template's first mask (the lexer's initial states, shared by every copy), and
        one token further on a copy (a huge repetition builds its derivatives there). A
        grammar past the limits ends in error; the copy is dropped."""
        mask = np.frombuffer(template.compute_bitmask(), dtype=np.uint8)
        if template.is_error():
            return
        allowed = np.flatnonzero(np.unpackbits(mask, bitorder="little")[:self.vocab_size])
        allowed = allowed[~np.isin(allowed, self.special_ids)]
        if allowed.size == 0:
            return
        probe = template.deep_copy()
        if probe.consume_token(int(allowed[0])):
            probe.compute_bitmask()
        if probe.is_error():
            # A token the mask allowed can only fail on a limit: a grammar that runs out of
            # them at its first token would fail every request that uses it.
            raise GrammarError(self.limits.name_limit(_clean(probe.get_error())))

    def _insert(self, compiled: CompiledGrammar) -> None:
        with self._lock:
            self.misses += 1
            if compiled.nbytes > self.limits.cache_bytes:
                return                       # served, not kept: it alone would fill the cache
            old = self._cache.pop(compiled.key, None)
            if old is not None:
                self.cache_bytes -= old.nbytes
            self._cache[compiled.key] = compiled
            self.cache_bytes += compiled.nbytes
            while self.cache_bytes > self.limits.cache_bytes:
                _, evicted = self._cache.popitem(last=False)
                self.cache_bytes -= evicted.nbytes

    def __len__(self) -> int:
        return len(self._cache)


class _Vocab:
    """What llguidance's TokenizerWrapper reads: every token's bytes, the special ids, an
    eos, and an encoder (used only to tokenize forced text, never at mask time)."""

    def __init__(self, tokens: list[bytes], specials: list[int], encode: Callable[[str], list[int]],
                 eos_id: int) -> None:
        self.tokens = tokens
        self.special_token_ids = specials
        self.eos_token_id = eos_id
        self.bos_token_id = None
        self._encode = encode

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._encode(text)


def _clean(error: str) -> str:
    """llguidance's message, shortened to what names the problem."""
    # (verbose_errors=False leaves a marker where the parser state would be.)
    error = error.replace("<non-verbose/>", "").strip()
    return error if len(error) <= 600 else error[:600] + "..."


_executor: llg.LLExecutor | None = None
_executor_lock = threading.Lock()


def _mask_executor() -> llg.LLExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = llg.LLExecutor()
        return _executor


def token_bitmask(matchers: Sequence[GrammarMatcher], vocab_size: int) -> torch.Tensor:
    """(R, ceil(V/32)) int32 bitmask, bit t of row r set when token t is allowed next for
    matchers[r]: the grammar's tokens, less special tokens, plus the row's stop tokens
    exactly when the grammar may end there."""
    words = (vocab_size + 31) // 32
    mask = np.zeros((len(matchers), words), dtype=np.int32)
    # One call for every row; llguidance computes them off the GIL.
    llg_numpy.fill_next_token_bitmask_par(_mask_executor(), [(m._matcher, i) for i, m in enumerate(matchers)], mask)
    bits = mask.view(np.uint32)
    bits &= np.stack([m.keep_words for m in matchers])
    ends = np.stack([m.end_words for m in matchers])
    accepting = np.fromiter((m.is_accepting() for m in matchers), dtype=bool, count=len(matchers))
    bits[accepting] |= ends[accepting]
    failed = np.fromiter((m._matcher.is_error() for m in matchers), dtype=bool, count=len(matchers))
    if failed.any():
        # A mask past the step limits (or a matcher broken earlier): that choice ends with
        # the error (the scheduler reads `failure`); the other rows are unaffected.
        for row in np.flatnonzero(failed):
            m = matchers[row]
            if m.failure is None:
                m.failure = "structured output stopped: " + m.compiled.limits.name_limit(_clean(m.error))
                log.warning("grammar mask failed for one row: %s", m.failure)
    empty = ~bits.any(axis=1)
    if empty.any():
        # Nothing left (a grammar that could only go on with special tokens, or a failed
        # row): let the choice end rather than draw from an empty distribution.
        if (empty & ~failed).any():
            log.warning("grammar mask is empty for %d row(s); allowing only the stop tokens",
                        int((empty & ~failed).sum()))
        bits[empty] |= ends[empty]
        still = failed & ~bits.any(axis=1)
        if still.any():
            # No stop token to draw either: any text token will do, the failure ends it.
            bits[still] = np.stack([matchers[row].keep_words for row in np.flatnonzero(still)])
    return torch.from_numpy(mask)


__all__ = ["CompiledGrammar", "GrammarCompiler", "GrammarError", "GrammarMatcher", "close_objects",
           "constraint_key", "grammar_source", "token_bitmask"]
