"""The engine's public contract: what a request carries and the events it produces.

The service layer (gRPC, accounting) and the training rollouts code against these types
only; the scheduler, KV cache and runner behind them may change freely.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from server.engine.adapter_slots import AdapterRef
    from server.engine.grammar import CompiledGrammar

FinishReason = Literal["stop", "length", "abort"]

MAX_STOP_STRINGS = 8
MAX_STOP_STRING_CHARS = 64
MAX_STOP_TOKEN_IDS = 16
MAX_LOGPROBS = 20
MAX_CHOICES = 8
MAX_LOGIT_BIAS = 300                  # entries, as OpenAI allows
LOGIT_BIAS_RANGE = 100.0              # each bias in [-100, 100]
MAX_CONSTRAINT_CHARS = 65536          # a response_format's schema, regex or grammar text
MAX_SCHEMA_DEPTH = 64                 # nesting of a JSON schema's objects and arrays
RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema", "regex", "grammar")
_SCHEMA_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


class RequestRejected(ValueError):
    """The request can never be served as asked (e.g. prompt + max_tokens beyond the
    context or the whole KV cache). The message says what to change."""


class EngineOverloaded(RuntimeError):
    """The waiting queue is full; retry later."""


class TenantOverloaded(EngineOverloaded):
    """One tenant has EngineConfig.max_waiting_per_tenant requests waiting; that tenant
    retries later, others are unaffected."""


def schema_depth(value: Any, limit: int = MAX_SCHEMA_DEPTH) -> int:
    """How deeply `value` nests lists and dicts, counted without recursion (a schema 1,000
    levels deep would overflow Python's stack in json or in close_objects); stops
    counting past `limit`."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, dict | list):
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


@dataclass
class JsonSchema:
    """OpenAI's `response_format.json_schema`: a JSON Schema the output must satisfy."""

    name: str = ""                     # optional; letters, digits, '_' and '-', up to 64
    schema: dict[str, Any] | str = field(default_factory=dict)   # the schema (an object, or its JSON text)
    strict: bool = False               # objects take no properties beyond those the schema names

    def schema_object(self) -> dict[str, Any]:
        """The schema as a dict (the API sends JSON text); ValueError when it is not a
        JSON object."""
        schema = self.schema
        too_deep = (f"response_format.json_schema.schema nests objects and arrays more than {MAX_SCHEMA_DEPTH} "
                    "levels deep; flatten it (or use $defs and $ref)")
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except RecursionError:
                # The parser's own stack ran out (thousands of levels): too deep, whatever it says.
                raise ValueError(too_deep) from None
            except ValueError as err:
                raise ValueError(f"response_format.json_schema.schema is not valid JSON: {err}") from None
        if not isinstance(schema, dict):
            raise ValueError("response_format.json_schema.schema must be a JSON object (a JSON Schema), "
                             f"got {type(schema).__name__}")
        if schema_depth(schema) > MAX_SCHEMA_DEPTH:
            raise ValueError(too_deep)
        return schema


@dataclass
class ResponseFormat:
    """What shape the output must take, in OpenAI's form plus two extensions:
    `{"type": "text"}` (free text), `{"type": "json_object"}` (any JSON object),
    `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`,
    `{"type": "regex", "regex": "..."}` (the whole output matches) and
    `{"type": "grammar", "grammar": "..."}` (a Lark grammar, llguidance's dialect). The
    engine enforces it with a token mask per step (server/engine/grammar.py)."""

    type: str = "text"
    json_schema: JsonSchema | None = None
    regex: str = ""
    grammar: str = ""

    @property
    def constrained(self) -> bool:
        return self.type != "text"

    def problems(self) -> list[str]:
        """What is wrong with the format's shape (the grammar library judges the schema,
        regex or grammar itself when it compiles them)."""
        if self.type not in RESPONSE_FORMAT_TYPES:
            return [f"response_format.type must be one of {', '.join(RESPONSE_FORMAT_TYPES)} (got {self.type!r})"]
        problems = []
        given = {"json_schema": self.json_schema is not None, "regex": bool(self.regex), "grammar": bool(self.grammar)}
        extra = [name for name, is_set in given.items() if is_set and name != self.type]
        if extra:
            problems.append(f"response_format of type {self.type!r} takes no {', '.join(extra)}")
        if self.type in given and not given[self.type]:
            what = "a json_schema with a schema" if self.type == "json_schema" else f"a non-empty {self.type}"
            problems.append(f"response_format of type {self.type!r} needs {what}")
        if self.type == "json_schema" and self.json_schema is not None:
            js = self.json_schema
            if js.name and not _SCHEMA_NAME_RE.fullmatch(js.name):
                problems.append("response_format.json_schema.name must be 1-64 characters of A-Z, a-z, 0-9, '_', "
                                f"'-' (got {js.name[:40]!r})")
            # (Depth first: json.dumps recurses, and a dict from a JSON body may nest deeply.)
            deep = not isinstance(js.schema, str) and schema_depth(js.schema) > MAX_SCHEMA_DEPTH
            text = js.schema if isinstance(js.schema, str) or deep else json.dumps(js.schema)
            if deep:
                problems.append(f"response_format.json_schema.schema nests objects and arrays more than "
                                f"{MAX_SCHEMA_DEPTH} levels deep; flatten it (or use $defs and $ref)")
            elif len(text) > MAX_CONSTRAINT_CHARS:
                problems.append(f"response_format.json_schema.schema is {len(text)} characters long "
                                f"(at most {MAX_CONSTRAINT_CHARS})")
            else:
                try:
                    js.schema_object()
                except ValueError as err:
                    problems.append(str(err))
        for name in ("regex", "grammar"):
            if len(getattr(self, name)) > MAX_CONSTRAINT_CHARS:
                problems.append(f"response_format.{name} is {len(getattr(self, name))} characters long "
                                f"(at most {MAX_CONSTRAINT_CHARS})")
        return problems


@dataclass(frozen=True)
class Range:
    """A numeric parameter's limits: the one statement of them, read by `validate` and
    written into the HTTP API's schema (server/http/schemas.py) and its docs."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False               # (lo, ... rather than [lo, ...
    hi_open: bool = False

    def contains(self, value: float) -> bool:
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    def text(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        return f"{'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


def param(default: Any = None, *, doc: str, range: Range | None = None, factory: Any = None) -> Any:
    """A SamplingParams field with its documentation and, for numbers, its range."""
    metadata = {"doc": doc, "range": range}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


DEFAULT_MAX_TOKENS = 256               # an engine request that leaves max_tokens unset


@dataclass
class SamplingParams:
    """Everything a request may ask of the sampler: the one definition of each sampling
    parameter, its default, its documentation and its limits. The API's SamplingParams
    message has a field of the same name for each of these (the gRPC adapter maps them by
    name), and the OpenAI HTTP schema generates its fields from these (server/http/
    schemas.py), so a new parameter is added here, in the proto, in the sampler and in
    their tests."""

    max_tokens: int | None = param(
        None, range=Range(1),
        doc="tokens to generate at most; unset: the server's default, capped by the context")
    min_tokens: int = param(0, doc="no end of turn or stop before this many tokens; in [0, max_tokens]")
    temperature: float = param(1.0, range=Range(0.0, 2.0), doc="0 = greedy")
    top_p: float = param(1.0, range=Range(0.0, 1.0, lo_open=True), doc="nucleus sampling: the smallest set of "
                         "likeliest tokens whose probabilities add up to top_p")
    top_k: int = param(0, range=Range(0), doc="sample from the k likeliest tokens; 0 = off")
    min_p: float = param(0.0, range=Range(0.0, 1.0, hi_open=True),
                         doc="drop tokens less likely than min_p times the likeliest")
    top_n_sigma: float = param(0.0, range=Range(0.0, 100.0),
                               doc="keep the tokens whose logit is within top_n_sigma standard deviations of the "
                                   "largest logit (after temperature); 0 = off")
    seed: int | None = param(None, doc="the same seed gives the same output, whatever the batch")
    stop: list[str] = param(factory=list, doc=f"up to {MAX_STOP_STRINGS} strings of 1-{MAX_STOP_STRING_CHARS} "
                                              "characters that end a choice; not output")
    stop_token_ids: list[int] = param(factory=list, doc=f"up to {MAX_STOP_TOKEN_IDS} token ids that end a choice")
    ignore_eos: bool = param(False, doc="keep generating past the end of turn")
    presence_penalty: float = param(0.0, range=Range(-2.0, 2.0), doc="subtracted once from every token seen")
    frequency_penalty: float = param(0.0, range=Range(-2.0, 2.0), doc="subtracted per occurrence of a token seen")
    repetition_penalty: float = param(1.0, range=Range(0.0, 2.0, lo_open=True),
                                      doc="divides positive and multiplies negative logits of tokens seen; 1 = off")
    logprobs: int = param(0, range=Range(0, MAX_LOGPROBS), doc="top-N alternatives per token; 0 = none")
    n: int = param(1, range=Range(1, MAX_CHOICES), doc="choices to generate; they share the prompt's KV blocks")
    logit_bias: dict[int, float] = param(
        factory=dict, doc=f"token id -> bias in [-{LOGIT_BIAS_RANGE:g}, {LOGIT_BIAS_RANGE:g}] added to its logit; "
                          f"up to {MAX_LOGIT_BIAS} entries")
    skip_special_tokens: bool = param(
        True, doc="leave special tokens (role markers, BOS...) out of the output text; stop tokens are never "
                  "shown, and token ids and log-probs carry them either way")
    # The output's shape (JSON, JSON schema, regex, grammar); None = free text. The engine
    # needs it compiled (EngineRequest.grammar), which happens off its thread.
    response_format: ResponseFormat | None = param(
        None, doc="constrain the output: json_object, json_schema, regex or grammar")

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ValueError naming every field out of its range, with the range. Token
        ids are checked against `vocab_size` when given. The only place that knows the
        limits: the service calls it once per request."""
        problems = []
        if self.max_tokens is not None and not isinstance(self.max_tokens, int):
            problems.append(f"max_tokens must be an integer (got {self.max_tokens!r})")
        for f in fields(self):
            limits, value = f.metadata.get("range"), getattr(self, f.name)
            if limits is not None and isinstance(value, int | float) and not limits.contains(value):
                in_or_at = "in " if limits.hi is not None else ""
                problems.append(f"{f.name} must be {in_or_at}{limits.text()} (got {value})")
        if self.min_tokens < 0 or (isinstance(self.max_tokens, int) and self.min_tokens > self.max_tokens):
            problems.append(f"min_tokens must be in [0, max_tokens] (got {self.min_tokens})")
        if len(self.stop) > MAX_STOP_STRINGS:
            problems.append(f"at most {MAX_STOP_STRINGS} stop strings (got {len(self.stop)})")
        if any(not s or len(s) > MAX_STOP_STRING_CHARS for s in self.stop):
            problems.append(f"stop strings must be 1-{MAX_STOP_STRING_CHARS} characters")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            problems.append(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids (got {len(self.stop_token_ids)})")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            problems.append(f"at most {MAX_LOGIT_BIAS} logit_bias entries (got {len(self.logit_bias)})")
        bad_bias = [v for v in self.logit_bias.values() if not -LOGIT_BIAS_RANGE <= v <= LOGIT_BIAS_RANGE]
        if bad_bias:
            problems.append(f"logit_bias values must be in [-{LOGIT_BIAS_RANGE:g}, {LOGIT_BIAS_RANGE:g}] "
                            f"(got {bad_bias[:3]})")
        if vocab_size is not None:
            for name, ids in (("stop_token_ids", self.stop_token_ids), ("logit_bias token ids", self.logit_bias)):
                bad_ids = [t for t in ids if not 0 <= t < vocab_size]
                if bad_ids:
                    problems.append(f"{name} must be in [0, {vocab_size}) (got {bad_ids[:3]})")
        if self.response_format is not None:
            problems.extend(self.response_format.problems())
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class EngineRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    # Token ids that end the turn unless ignore_eos (e.g. <|end|> for chat models).
    eos_token_ids: list[int] = field(default_factory=list)
    # Backpressure: the most tokens per choice generated ahead of the reader before the
    # request pauses; None = unbounded (an in-process reader that collects everything).
    max_buffered_tokens: int | None = None
    # Tokens per wake-up of the stream's reader (server.engine.stream): 1 shows each step's
    # token at once; more makes fewer, larger messages. The first token, finishes and
    # pauses are shown at once whatever the interval.
    stream_interval: int = 1
    # params.response_format compiled for this model (server.engine.grammar.GrammarCompiler),
    # done before submission so that no compile ever runs on the engine's thread.
    grammar: CompiledGrammar | None = None
    # Fair share (server/engine/fair_policy.py): who the request is for and what it costs.
    # The tenant is an opaque id (the service passes the API key id); "" is one shared
    # tenant. `tenant_weight` is the tenant's share (2 = twice the service of a weight-1
    # tenant when both are backlogged); `tenant_band` orders tenants before shares
    # (BAND_INTERACTIVE before BAND_BATCH). `priority` orders a tenant's own requests
    # (lower first). `input_cost`/`output_cost`: a prompt / generated token's charge
    # against the tenant's share. The FCFS policy ignores all of them.
    tenant: str = ""
    tenant_weight: float = 1.0
    tenant_band: int = 0
    priority: int = 0
    input_cost: float = 1.0
    output_cost: float = 2.0
    # A LoRA adapter over the engine's model (None = the base model alone): the request
    # waits for one of the engine's adapter slots, and its prefix-cache blocks are its own.
    adapter: AdapterRef | None = None


# The key-level priority bands (EngineRequest.tenant_band): interactive tenants are served
# before batch tenants; a batch tenant still runs whenever no interactive tenant is
# backlogged, and one that has waited past EngineConfig.band_aging_s counts as interactive.
BAND_INTERACTIVE = 0
BAND_BATCH = 1
BANDS = {"interactive": BAND_INTERACTIVE, "batch": BAND_BATCH}


@dataclass
class TopLogprob:
    token_id: int
    logprob: float
    text: str = ""                   # filled in by the output processor


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[TopLogprob] = field(default_factory=list)
    text: str = ""                   # filled in by the output processor


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0       # summed over the n choices
    cached_tokens: int = 0           # prompt tokens served from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class RequestTimings:
    """Monotonic seconds (time.monotonic())."""

    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None


@dataclass
class Delta:
    """New tokens of one choice, as the engine core produced them (ids and log-probs,
    no text: turning them into text is the output processor's job)."""

    request_id: str
    index: int
    token_ids: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class TextDelta:
    """New output of one choice after the output processor: the text its tokens complete
    (stop strings and incomplete UTF-8 held back until resolved), log-probs with text."""

    request_id: str
    index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class ChoiceFinished:
    request_id: str
    index: int
    finish_reason: FinishReason


@dataclass
class RequestFinished:
    """Always the last event of a request, also after an abort."""

    request_id: str
    usage: Usage
    timings: RequestTimings
    # Set when the engine ended the request because of its own input (a structured
    # output whose mask ran past the grammar limits): what to tell the caller.
    error: str = ""


Event = Delta | ChoiceFinished | RequestFinished
OutputEvent = TextDelta | ChoiceFinished | RequestFinished


def stop_token_ids(request: EngineRequest) -> frozenset[int]:
    """The token ids that end a choice of `request` (and whose text is not output)."""
    ids = set(request.params.stop_token_ids)
    if not request.params.ignore_eos:
        ids.update(request.eos_token_ids)
    return frozenset(ids)


@dataclass
class TenantStats:
    tenant: str
    running: int                     # sequences in the running batch
    waiting: int                     # sequences waiting for admission (or paused)
    counter: float                   # its virtual token counter (service / weight)
    weight: float


@dataclass
class EngineStats:
    running: int
    waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    prefix_cache_queries: int        # prompt tokens looked up in the prefix cache (cumulative)
    prefix_cache_hits: int           # of those, tokens found (cumulative)
    preemptions: int
    paused: int = 0                  # sequences paused because their reader lags
    # The scheduling policy ("fcfs" or "fair") and, under fair share, the tenants with
    # the most work in the engine (at most EngineStats' caller's top-k; see
    # Engine.stats).
    policy: str = "fcfs"
    tenants: list[TenantStats] = field(default_factory=list)
    # LoRA: the adapter names with sequences admitted (holding a slot) and queued, and the
    # slots per step (--max-loras), as vLLM's lora_requests_info reports them.
    running_adapters: list[str] = field(default_factory=list)
    waiting_adapters: list[str] = field(default_factory=list)
    max_loras: int = 0
