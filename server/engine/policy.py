"""The scheduling policy seam: who waits in which order, and who gives way when memory or
the batch is full. The scheduler (server/engine/scheduler.py) owns the mechanics (the
token budget, blocks, chunked prefill, pauses); a policy owns only the waiting queue and
the choice of victims, so first come first served and fair share are two small classes.

Every method runs on the stepping thread. The scheduler calls `charge` only for a policy
that sets `charges` (FCFS does not, so its steps pay nothing for the seam): once for the
running rows, then once for each sequence it admits, so that every admission choice sees
the counters with the step's work so far. It calls `admission_victim` only for a policy
that sets `preempts_to_admit`, and `first_seat` only for one that sets `shields_newcomers`.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections import deque

from server.engine.api import TenantStats
from server.engine.config import EngineConfig
from server.engine.sequence import Sequence

SCHEDULING_POLICIES = ("fcfs", "fair")


class SchedulingPolicy(ABC):
    """The waiting queue and the victims. Subclasses implement every abstract method."""

    name = ""
    charges = False            # call charge(batch) every step
    preempts_to_admit = False  # call admission_victim when the batch is full
    shields_newcomers = False  # a step that seats a tenant's first sequence seats only such ones

    @abstractmethod
    def add(self, seq: Sequence, front: bool = False) -> None:
        """Queue `seq`: new (front False) or back from a preemption, a pause or a held
        choice (front True: it goes before its peers)."""

    @abstractmethod
    def remove(self, seq: Sequence) -> None:
        """Take a waiting `seq` out of the queue (paused or finished); no error if absent."""

    @abstractmethod
    def peek(self) -> Sequence | None:
        """The sequence to admit next, or None when none waits."""

    @abstractmethod
    def pop(self) -> Sequence:
        """Take the sequence `peek` names out of the queue."""

    @abstractmethod
    def __len__(self) -> int:
        """How many sequences wait."""

    @abstractmethod
    def victim(self, running: list[Sequence]) -> Sequence:
        """The running sequence to preempt when a running one needs a block and none is free."""

    def admission_victim(self, candidate: Sequence, running: list[Sequence]) -> Sequence | None:
        """A running sequence to preempt so that `candidate` can be admitted into a full
        batch, or None to let it wait."""
        return None

    def charge(self, batch: list[tuple[Sequence, int]], more: bool = False) -> None:
        """Rows of the step about to be computed (called when `charges`): the running rows
        (more False: a new step), then each admitted row (more True). FCFS keeps no account."""
        return None

    def first_seat(self, seq: Sequence) -> bool:
        """Whether admitting `seq` (the next in line) gives its tenant its first seat in this
        step's batch (called when `shields_newcomers`)."""
        return False

    def finished(self, seq: Sequence) -> None:
        """`seq` left the scheduler for good (finished or aborted), wherever it was."""
        return None

    def tenant_stats(self, top_k: int) -> list[TenantStats]:
        return []


class FcfsPolicy(SchedulingPolicy):
    """Arrival order: a deque, the newest running sequence gives way."""

    name = "fcfs"

    def __init__(self) -> None:
        self.queue: deque[Sequence] = deque()

    def add(self, seq: Sequence, front: bool = False) -> None:
        if front:
            self.queue.appendleft(seq)
        else:
            self.queue.append(seq)

    def remove(self, seq: Sequence) -> None:
        with contextlib.suppress(ValueError):
            self.queue.remove(seq)

    def peek(self) -> Sequence | None:
        return self.queue[0] if self.queue else None

    def pop(self) -> Sequence:
        return self.queue.popleft()

    def __len__(self) -> int:
        return len(self.queue)

    def victim(self, running: list[Sequence]) -> Sequence:
        return running[-1]


def make_policy(config: EngineConfig) -> SchedulingPolicy:
    if config.scheduling == "fcfs":
        return FcfsPolicy()
    if config.scheduling == "fair":
        from server.engine.fair_policy import VtcPolicy

        return VtcPolicy(config)
    raise ValueError(f"scheduling must be one of {', '.join(SCHEDULING_POLICIES)} (got {config.scheduling!r})")
