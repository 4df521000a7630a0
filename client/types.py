"""Typed results of the client library, converted from the wire messages, and the
one exception type it raises."""

from __future__ import annotations

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
class Choice:
    index: int
    text: str
    finish_reason: str
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)


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
            choices.append(Choice(c.index, text, c.finish_reason, c.completion_tokens, _lps(c.logprobs)))
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
        deltas = [ChunkDelta(d.index, d.content, list(d.token_ids), d.finish_reason, _lps(d.logprobs))
                  for d in c.choices]
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


def messages_pb(messages) -> list[pb.ChatMessage]:
    out = []
    for m in messages:
        if isinstance(m, dict):
            out.append(pb.ChatMessage(role=m["role"], content=m["content"]))
        elif isinstance(m, tuple | list):
            out.append(pb.ChatMessage(role=m[0], content=m[1]))
        else:
            out.append(pb.ChatMessage(role=m.role, content=m.content))
    return out
