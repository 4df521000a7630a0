"""Per-request and per-choice state.

A request with n choices owns n sequences. Each sequence holds its tokens (prompt then
output), how many of them have keys/values in the cache, and its block table. After a
preemption the sequence keeps its tokens and recomputes their keys/values later.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from server.engine.api import EngineRequest, FinishReason, RequestTimings, SamplingParams

if TYPE_CHECKING:
    from server.engine.grammar import GrammarMatcher

_seq_ids = itertools.count()


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PAUSED = "paused"                       # its reader lags (backpressure); not scheduled
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request: RequestState
    index: int                              # choice index within the request
    token_ids: list[int]
    num_prompt_tokens: int
    seed: int
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    status: SeqStatus = SeqStatus.WAITING
    num_computed: int = 0                   # tokens whose keys/values are in the cache
    block_table: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0              # leading blocks already registered for reuse
    finish_reason: FinishReason | None = None
    paused_at: float = 0.0                  # monotonic time of the last pause
    # Structured outputs: where this choice stands in its grammar. It advances with every
    # sampled token, and output tokens survive preemption, so it stays valid across one.
    grammar: GrammarMatcher | None = None
    # The root of the prefix cache's hash chain: the adapter version the sequence runs
    # under (None = the base model), so cached blocks are shared only under the same one.
    cache_salt: int | None = None
    # The adapter slot this sequence pins while it holds KV blocks (None = none pinned).
    lora_slot: int | None = None
    # Fair share's bookkeeping (server/engine/fair_policy.py), unused under FCFS: the
    # tenant's state, how many prompt positions have been charged (recomputes are free),
    # and the request's costs per prompt / generated token over the tenant's weight.
    tenant: Any = None
    charged: int = 0
    cost_in: float = 0.0
    cost_out: float = 0.0

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED


@dataclass(eq=False)
class RequestState:
    request: EngineRequest
    timings: RequestTimings
    stop_ids: frozenset[int]                 # eos (unless ignore_eos) + stop_token_ids
    sequences: list[Sequence] = field(default_factory=list)
    cached_tokens: int = 0                   # prefix-cache hit of the first admission
    cached_recorded: bool = False
    # Choices 1..n-1 wait until choice 0 has computed the prompt, then reuse its blocks.
    held_choices: list[Sequence] = field(default_factory=list)
    # Why the request failed in the engine (a structured-output mask past its limits), for
    # RequestFinished.error; "" when it did not.
    error: str = ""

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def all_finished(self) -> bool:
        return not self.held_choices and all(s.is_finished for s in self.sequences)
