"""Reward functions the own-data tests name as python:tests.training.own_data_rewards:NAME."""

from __future__ import annotations

import time

NOT_CALLABLE = 3


def short_reply(prompt_messages: list[dict], completion: str, row: dict) -> float:
    """Easy for a tiny model to learn whatever the prompt: 1 for an empty reply, falling
    linearly to 0 at 24 characters."""
    return max(0.0, 1.0 - len(completion) / 24)


def uses_row(prompt_messages: list[dict], completion: str, row: dict) -> float:
    return float(row["bonus"]) + (1.0 if prompt_messages[-1]["role"] == "user" else 0.0)


def raises(prompt_messages: list[dict], completion: str, row: dict) -> float:
    raise RuntimeError("reward backend unavailable")


def returns_nan(prompt_messages: list[dict], completion: str, row: dict) -> float:
    return float("nan")


def returns_text(prompt_messages: list[dict], completion: str, row: dict) -> str:
    return "good"


def slow(prompt_messages: list[dict], completion: str, row: dict) -> float:
    time.sleep(2.0)
    return 0.0


def has_digit_seven(prompt_messages: list[dict], completion: str, row: dict) -> float:
    """1 when the reply holds a 7: learnable by a tiny model on any prompt."""
    return 1.0 if "7" in completion else 0.0

