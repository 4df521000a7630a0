"""Request validation, before anything reaches the engine: every refusal is
INVALID_ARGUMENT with a message naming the field, the limit and the value."""

from __future__ import annotations

import re

from gpt.chat import ROLES, Message, chat_prompt_ids
from gpt.tokenizer import SolTokenizer
from proto.sol.v1 import sol_pb2 as pb
from server.engine.api import MAX_CHOICES, SamplingParams
from server.errors import invalid

REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
MAX_STOP_TOKEN_IDS = 16


def _opt(msg, name: str, default):
    return getattr(msg, name) if msg.HasField(name) else default


def sampling_params(p: pb.SamplingParams, vocab_size: int) -> tuple[SamplingParams, bool]:
    """The engine's parameters from the request; returns (params, max_tokens_given).
    max_tokens is resolved against the context later, once the prompt is counted."""
    params = SamplingParams(
        max_tokens=_opt(p, "max_tokens", 1),
        min_tokens=_opt(p, "min_tokens", 0),
        temperature=_opt(p, "temperature", 1.0),
        top_p=_opt(p, "top_p", 1.0),
        top_k=_opt(p, "top_k", 0),
        min_p=_opt(p, "min_p", 0.0),
        seed=_opt(p, "seed", None),
        stop=list(p.stop),
        stop_token_ids=list(p.stop_token_ids),
        ignore_eos=_opt(p, "ignore_eos", False),
        presence_penalty=_opt(p, "presence_penalty", 0.0),
        frequency_penalty=_opt(p, "frequency_penalty", 0.0),
        repetition_penalty=_opt(p, "repetition_penalty", 1.0),
        logprobs=_opt(p, "logprobs", 0),
        n=_opt(p, "n", 1),
    )
    problems = []
    try:
        params.validate()
    except ValueError as err:
        problems.append(str(err))
    if params.min_tokens and not p.HasField("max_tokens"):
        problems = [x for x in problems if not x.startswith("min_tokens")]
    if len(params.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        problems.append(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids (got {len(params.stop_token_ids)})")
    bad_ids = [t for t in params.stop_token_ids if not 0 <= t < vocab_size]
    if bad_ids:
        problems.append(f"stop_token_ids must be in [0, {vocab_size}) (got {bad_ids[:3]})")
    if problems:
        raise invalid("; ".join(problems))
    return params, p.HasField("max_tokens")


def messages(msgs, max_messages: int, max_chars: int) -> list[Message]:
    if not msgs:
        raise invalid("messages is empty: send at least one message, e.g. {role: \"user\", content: \"...\"}")
    if len(msgs) > max_messages:
        raise invalid(f"too many messages: {len(msgs)} (at most {max_messages}); drop older turns")
    out, total = [], 0
    for i, m in enumerate(msgs):
        if m.role not in ROLES:
            raise invalid(f"messages[{i}].role {m.role!r} is unknown; use one of {sorted(ROLES)}")
        total += len(m.content)
        out.append(Message(m.role, m.content))
    if total > max_chars:
        raise invalid(f"messages are {total} characters long (at most {max_chars}); shorten the conversation")
    return out


def chat_prompt(tokenizer: SolTokenizer, msgs: list[Message]) -> list[int]:
    return chat_prompt_ids(tokenizer, msgs)


def raw_prompt(tokenizer: SolTokenizer, prompt: str, max_chars: int) -> list[int]:
    if not prompt:
        raise invalid("prompt is empty: send the text to continue")
    if len(prompt) > max_chars:
        raise invalid(f"prompt is {len(prompt)} characters long (at most {max_chars}); shorten it")
    return tokenizer.encode(prompt)


def fit_context(params: SamplingParams, max_tokens_given: bool, prompt_len: int, max_context: int,
                default_max_tokens: int) -> SamplingParams:
    """Resolve max_tokens against the model's context: prompt + max_tokens must fit."""
    room = max_context - prompt_len
    if room < 1:
        raise invalid(f"the prompt is {prompt_len} tokens but the model's context is {max_context} tokens; "
                      "shorten the conversation or the prompt")
    if max_tokens_given:
        if params.max_tokens > room:
            raise invalid(f"prompt ({prompt_len} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
                          f"context of {max_context} tokens; lower max_tokens to at most {room}")
    else:
        params.max_tokens = min(default_max_tokens, room)
        if params.min_tokens > params.max_tokens:
            raise invalid(f"min_tokens ({params.min_tokens}) is more than the {params.max_tokens} tokens left in "
                          "the context; lower min_tokens")
    return params


def request_id(value: str) -> str:
    if not REQUEST_ID_RE.fullmatch(value):
        raise invalid("request_id must be 1-128 characters of A-Z, a-z, 0-9, '.', '_', ':', '-' "
                      f"(got {value[:40]!r}); leave it empty to let the server make one")
    return value


__all__ = ["MAX_CHOICES", "chat_prompt", "fit_context", "messages", "raw_prompt", "request_id", "sampling_params"]
