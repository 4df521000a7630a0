"""Reward functions for RL on users' own prompts, and the built-in tasks' checker as one.

The contract (README "Train on your own data"): `--reward python:MODULE:FUNCTION` names

    fn(prompt_messages: list[dict], completion: str, row: dict) -> float

called once per sampled reply with the prompt's messages, the reply's text and the whole
prompt row (its extra fields: answers, tests, metadata). A return that is not a finite
number, an exception, or a call that takes longer than the timeout stops the stage with
an error naming the prompt's FILE:LINE. The function is loaded and called on the first
prompt before any training, so that a broken one fails in seconds.
"""

from __future__ import annotations

import importlib
import math
import numbers
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from training.data.tasks import FAMILIES, Problem

RewardFn = Callable[[list[dict], str, dict], float]
DEFAULT_TIMEOUT_S = 10.0
PYTHON_PREFIX = "python:"
RM_PREFIX = "rm:"


class RewardError(ValueError):
    """A reward function that cannot be used (or failed on a row)."""


def load_reward_function(spec: str) -> RewardFn:
    """`python:MODULE:FUNCTION` (or `MODULE:FUNCTION`) -> the callable."""
    target = spec[len(PYTHON_PREFIX):] if spec.startswith(PYTHON_PREFIX) else spec
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise RewardError(f"reward {spec!r}: expected python:MODULE:FUNCTION, e.g. "
                          "python:training.rewards:builtin_tasks")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:     # any import-time failure of the user's module
        raise RewardError(f"reward {spec!r}: module {module_name!r} does not import: "
                          f"{type(err).__name__}: {err}") from err
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise RewardError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise RewardError(f"reward {spec!r}: {attr!r} is a {type(fn).__name__}, expected a function "
                          "fn(prompt_messages, completion, row) -> float")
    return fn


class _CallTimedOut(Exception):
    """The call outlived its timeout (not a TimeoutError the function itself raised)."""


class _Worker:
    """One daemon thread that runs the reward calls. A call past its timeout cannot be
    stopped, so its worker is abandoned (a daemon thread does not hold up the process's
    exit) and the next call gets a new one."""

    def __init__(self) -> None:
        self.jobs: queue.Queue = queue.Queue()
        self.results: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, name="reward", daemon=True).start()

    def _run(self) -> None:
        while True:
            fn, args = self.jobs.get()
            try:
                self.results.put((True, fn(*args)))
            except Exception as err:     # handed to the caller, which names the row
                self.results.put((False, err))

    def call(self, fn: Callable, args: tuple, timeout_s: float) -> Any:
        """fn(*args), or raises _CallTimedOut / what fn raised."""
        self.jobs.put((fn, args))
        try:
            ok, value = self.results.get(timeout=timeout_s)
        except queue.Empty:
            raise _CallTimedOut from None
        if not ok:
            raise value
        return value


@dataclass
class RewardFunction:
    """A loaded reward function called under the contract's checks."""

    spec: str
    fn: RewardFn
    timeout_s: float = DEFAULT_TIMEOUT_S
    calls: int = 0
    seconds: float = 0.0
    _worker: _Worker | None = field(default=None, repr=False)

    @classmethod
    def load(cls, spec: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> RewardFunction:
        return cls(spec, load_reward_function(spec), timeout_s)

    def __call__(self, messages: list[dict], completion: str, row: dict[str, Any], where: str) -> float:
        began = time.perf_counter()
        if self._worker is None:
            self._worker = _Worker()
        try:
            value = self._worker.call(self.fn, (messages, completion, row), self.timeout_s)
        except _CallTimedOut:
            self._worker = None
            raise RewardError(f"{where}: reward {self.spec} took longer than {self.timeout_s:g} s") from None
        except Exception as err:
            raise RewardError(f"{where}: reward {self.spec} raised {type(err).__name__}: {err}") from err
        finally:
            self.calls += 1
            self.seconds += time.perf_counter() - began
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise RewardError(f"{where}: reward {self.spec} returned {value!r} ({type(value).__name__}), "
                              "expected a float")
        value = float(value)
        if not math.isfinite(value):
            raise RewardError(f"{where}: reward {self.spec} returned {value}, expected a finite number")
        return value


def problem_row(problem: Problem) -> dict[str, Any]:
    """A built-in task problem as an RL prompt row: what `builtin_tasks` checks against."""
    return {"messages": [{"role": "user", "content": problem.prompt}], "family": problem.family,
            "key": problem.key, "answer": problem.answer}


def builtin_tasks(prompt_messages: list[dict], completion: str, row: dict) -> float:
    """1.0 when the completion solves the built-in task problem the row names (its
    `family`, `key` and `answer` fields, as `sol data export-demo` writes them), else 0.0."""
    family = row.get("family")
    if family not in FAMILIES:
        raise KeyError(f"row field 'family' must be one of {sorted(FAMILIES)}, got {family!r}")
    problem = Problem(family, str(row.get("key", "")), prompt_messages[-1]["content"], str(row["answer"]))
    return 1.0 if problem.check(completion) else 0.0
