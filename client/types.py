"""Typed results of the client library, converted from the wire messages, and the
one exception type it raises."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc

from proto.sol.v1 import sol_pb2 as pb

DEFAULT_TARGET = "localhost:50051"


def default_target() -> str:
    return os.environ.get("SOL_TARGET") or DEFAULT_TARGET


class SolError(Exception):
    """A failed call: the gRPC status code, the server's message, and how long to wait
    before retrying when the server said so."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s

    @classmethod
    def from_rpc(cls, err: grpc.RpcError) -> SolError:
        retry = None
        trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
        for k, v in trailers or ():
            if k == "retry-after-ms":
                retry = int(v) / 1000.0
        return cls(err.code(), err.details() or "", retry)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    total_tokens: int = 0
    cost: float = 0.0

    @classmethod
    def from_pb(cls, u: pb.Usage) -> Usage:
        return cls(u.prompt_tokens, u.completion_tokens, u.cached_tokens, u.total_tokens, u.cost)


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)


def _lps(items) -> list[TokenLogprob]:
    return [TokenLogprob(x.token_id, x.token, x.logprob, [(t.token_id, t.token, t.logprob) for t in x.top])
            for x in items]


@dataclass
class ToolCall:
    """A function call the model made: its id, the function and the arguments as JSON text."""

    id: str
    name: str
    arguments: str


def _calls(items) -> list[ToolCall]:
    return [ToolCall(c.id, c.name, c.arguments) for c in items]


@dataclass
class Choice:
    index: int
    text: str
    finish_reason: str              # stop | length | abort | tool_calls
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass
class Completion:
    """A whole answer (ChatCompletion or Completion)."""

    id: str
    model: str
    version: int
    choices: list[Choice]
    usage: Usage
    created: int = 0

    @property
    def text(self) -> str:
        return self.choices[0].text if self.choices else ""

    @classmethod
    def from_pb(cls, r) -> Completion:
        choices = []
        for c in r.choices:
            text = c.message.content if hasattr(c, "message") else c.text
            calls = _calls(c.message.tool_calls) if hasattr(c, "message") else []
            choices.append(Choice(c.index, text, c.finish_reason, c.completion_tokens, _lps(c.logprobs), calls))
        return cls(r.id, r.model, r.version, choices, Usage.from_pb(r.usage), r.created)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ChunkDelta:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)   # calls complete in this delta


@dataclass
class Chunk:
    """One streamed message: new text per choice; the final one carries usage."""

    id: str
    model: str
    version: int
    deltas: list[ChunkDelta]
    usage: Usage | None = None
    final: bool = False

    @property
    def text(self) -> str:
        return "".join(d.text for d in self.deltas if d.index == 0)

    @classmethod
    def from_pb(cls, c) -> Chunk:
        deltas = [ChunkDelta(d.index, d.content, list(d.token_ids), d.finish_reason, _lps(d.logprobs),
                             _calls(d.tool_calls)) for d in c.choices]
        return cls(c.id, c.model, c.version, deltas, Usage.from_pb(c.usage) if c.final else None, c.final)


@dataclass
class ModelInfo:
    name: str
    version: int
    aliases: list[str]
    stage: str
    parent: str
    max_context: int
    num_parameters: int
    eval_metrics: dict[str, float]
    loaded_at: str
    scheduling: str = ""             # the engine's policy: fair or fcfs

    @classmethod
    def from_pb(cls, m: pb.ModelInfo) -> ModelInfo:
        return cls(m.name, m.version, list(m.aliases), m.stage, m.parent, m.max_context, m.num_parameters,
                   dict(m.eval_metrics), m.loaded_at, m.scheduling)


@dataclass
class KeyInfo:
    key_id: str
    name: str
    prefix: str
    created: int
    revoked: bool
    token_budget: int | None
    rpm: int | None
    tpm: int | None
    tokens_used: int
    share: float = 1.0
    band: str = "interactive"

    @classmethod
    def from_pb(cls, k: pb.ApiKey) -> KeyInfo:
        opt = lambda f: getattr(k, f) if k.HasField(f) else None  # noqa: E731
        return cls(k.key_id, k.name, k.prefix, k.created, k.revoked, opt("token_budget"), opt("rpm"), opt("tpm"),
                   k.tokens_used, k.share or 1.0, k.band or "interactive")


@dataclass
class UsageRow:
    key_id: str
    model: str
    day: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    total_tokens: int
    cost: float

    @classmethod
    def from_pb(cls, r: pb.UsageRow) -> UsageRow:
        return cls(r.key_id, r.model, r.day, r.requests, r.prompt_tokens, r.completion_tokens, r.cached_tokens,
                   r.total_tokens, r.cost)


@dataclass
class UsageReport:
    rows: list[UsageRow]
    total: UsageRow
    spooled_records: int


def _call_pb(c: dict[str, Any]) -> pb.ToolCall:
    """A call in OpenAI's shape ({"id", "function": {"name", "arguments"}}) or flat."""
    f = c.get("function", c)
    args = f.get("arguments", "{}")
    return pb.ToolCall(id=c.get("id", ""), name=f["name"], arguments=args if isinstance(args, str) else json.dumps(args))


def tool_fields(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the sampling parameters, the request's tool fields): `tools` as OpenAI's tool
    objects (or their functions), `tool_choice` none / auto / required / a function's name
    or OpenAI's {"type": "function", "function": {"name"}}, `parallel_tool_calls`."""
    params = dict(params)
    tools, choice = params.pop("tools", None), params.pop("tool_choice", None)
    parallel = params.pop("parallel_tool_calls", None)
    out: dict[str, Any] = {}
    if tools:
        out["tools"] = [pb.Tool(name=f["name"], description=f.get("description", ""),
                                parameters=json.dumps(f.get("parameters") or {}))
                        for f in (t.get("function", t) for t in tools)]
    if isinstance(choice, dict):
        out["tool_choice"], out["tool_choice_function"] = "function", choice["function"]["name"]
    elif choice in (None, "none", "auto", "required"):
        out["tool_choice"] = choice or ""
    else:
        out["tool_choice"], out["tool_choice_function"] = "function", choice
    if parallel is not None:
        out["parallel_tool_calls"] = bool(parallel)
    return params, out


def messages_pb(messages) -> list[pb.ChatMessage]:
    out = []
    for m in messages:
        if isinstance(m, dict):
            out.append(pb.ChatMessage(role=m["role"], content=m.get("content") or "",
                                      tool_calls=[_call_pb(c) for c in m.get("tool_calls") or ()],
                                      tool_call_id=m.get("tool_call_id") or ""))
        elif isinstance(m, tuple | list):
            out.append(pb.ChatMessage(role=m[0], content=m[1]))
        else:
            out.append(pb.ChatMessage(role=m.role, content=m.content))
    return out
