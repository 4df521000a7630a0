"""Request validation, before anything reaches the engine: every refusal is
INVALID_ARGUMENT with a message naming the field, the limit and the value."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import types
import typing
from typing import Any

from gpt.chat import CHAT_ROLES, Message
from gpt.quoting import quote
from gpt.tokenizers.base import Tokenizer
from proto.sol.v1 import sol_pb2 as pb
from server.engine.api import SamplingParams
from server.errors import invalid

REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
# A problem of SamplingParams.validate names its field first ("temperature must be ...",
# "at most 8 stop strings", "response_format.json_schema.name must ..."): the leftmost
# field name in it is the one at fault. tests/service/test_error_param.py checks every
# limit maps to its field.
_FIELD_RE = re.compile(r"\b(response_format(?:\.[a-z_]+)*|"
                       + "|".join(sorted((f.name for f in dataclasses.fields(SamplingParams)), key=len, reverse=True))
                       + r")\b")


def _dataclass_of(hint) -> type:
    """The dataclass a field's type names (`X | None` -> X)."""
    candidates = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is \
        typing.Union else (hint,)
    return next(c for c in candidates if dataclasses.is_dataclass(c))


def _field_value(msg, desc, hint):
    """A field of a request message as the engine's dataclass holds it, or None when the
    request left it unset (the dataclass default applies). A message-typed field becomes
    the dataclass its hint names, mapped the same way."""
    if desc.message_type is not None and desc.message_type.GetOptions().map_entry:
        return dict(getattr(msg, desc.name)) or None
    if desc.is_repeated:
        return list(getattr(msg, desc.name)) or None
    if not msg.HasField(desc.name):
        return None
    value = getattr(msg, desc.name)
    return to_dataclass(value, _dataclass_of(hint)) if desc.message_type is not None else value


def to_dataclass(msg, cls: type):
    """`cls` from `msg`, field by field of the same name (the proto and the dataclasses are
    the one definition; tests/service/test_sampling_params.py checks they list the same
    fields)."""
    fields = msg.DESCRIPTOR.fields_by_name
    values = {}
    for name, hint in _field_hints(cls):
        value = _field_value(msg, fields[name], hint)
        if value is not None:
            values[name] = value
    return cls(**values)


@functools.cache
def _field_hints(cls: type) -> tuple[tuple[str, Any], ...]:
    # Resolving the annotations (typing.get_type_hints) was 4% of the serving loop's busy
    # time under 32 streaming clients with short outputs: once per class is enough.
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls))


def sampling_params(p: pb.SamplingParams) -> SamplingParams:
    """The engine's parameters from the request (an unset max_tokens stays None until the
    prompt is counted: `fit_context`), then `check` validates."""
    return to_dataclass(p, SamplingParams)


def check(params: SamplingParams, vocab_size: int) -> SamplingParams:
    """Every limit of every parameter, once: INVALID_ARGUMENT naming each bad field."""
    try:
        params.validate(vocab_size)
    except ValueError as err:
        raise invalid(str(err), param_of(str(err))) from None
    return params


def param_of(message: str) -> str | None:
    """The one field a refusal of SamplingParams.validate is about, or None when its
    problems (joined by "; ") name several fields, or none."""
    fields = {m.group(1) if (m := _FIELD_RE.search(problem)) else None for problem in message.split("; ")}
    return fields.pop() if len(fields) == 1 else None


def messages(msgs, max_messages: int, max_chars: int) -> list[Message]:
    if not msgs:
        raise invalid("messages is empty: send at least one message, e.g. {role: \"user\", content: \"...\"}",
                      "messages")
    if len(msgs) > max_messages:
        raise invalid(f"too many messages: {len(msgs)} (at most {max_messages}); drop older turns", "messages")
    out, total = [], 0
    for i, m in enumerate(msgs):
        if m.role not in CHAT_ROLES:
            raise invalid(f"messages[{i}].role {quote(m.role)} is unknown; use one of {sorted(CHAT_ROLES)}",
                          f"messages[{i}].role")
        if m.tool_calls and m.role != "assistant":
            raise invalid(f"messages[{i}] is a {m.role} message with tool_calls; only assistant messages make "
                          "tool calls", f"messages[{i}].tool_calls")
        if m.role == "tool" and not m.tool_call_id:
            raise invalid(f"messages[{i}] is a tool message without tool_call_id; name the call it answers",
                          f"messages[{i}].tool_call_id")
        for j, c in enumerate(m.tool_calls):
            tool_call_arguments(c["arguments"], f"messages[{i}].tool_calls[{j}].function.arguments")
        total += len(m.content) + sum(len(c["arguments"]) for c in m.tool_calls)
        out.append(Message(m.role, m.content, tuple(m.tool_calls), m.tool_call_id))
    if total > max_chars:
        raise invalid(f"messages are {total} characters long (at most {max_chars}); shorten the conversation",
                      "messages")
    return out


def tool_call_arguments(text: str, param: str) -> dict[str, Any]:
    """A call's arguments: JSON text of an object (OpenAI sends them as a string)."""
    try:
        value = json.loads(text or "{}")
    except ValueError as err:
        raise invalid(f"{param} is not JSON ({err}); send the arguments object as JSON text", param) from None
    if not isinstance(value, dict):
        raise invalid(f"{param} must be a JSON object (got {quote(text)})", param)
    return value


def raw_prompt(tokenizer: Tokenizer, prompt: str, max_chars: int) -> list[int]:
    if not prompt:
        raise invalid("prompt is empty: send the text to continue", "prompt")
    if len(prompt) > max_chars:
        raise invalid(f"prompt is {len(prompt)} characters long (at most {max_chars}); shorten it", "prompt")
    return tokenizer.encode_prompt(prompt)


def fit_context(params: SamplingParams, prompt_len: int, max_context: int, default_max_tokens: int,
                prompt_field: str = "messages") -> SamplingParams:
    """Resolve max_tokens against the model's context: prompt + max_tokens must fit; an
    unset max_tokens becomes the server's default, capped by the room left.
    `prompt_field` names the prompt's field in refusals (messages or prompt)."""
    room = max_context - prompt_len
    if room < 1:
        raise invalid(f"the prompt is {prompt_len} tokens but the model's context is {max_context} tokens; "
                      "shorten the conversation or the prompt", prompt_field)
    if params.max_tokens is None:
        params.max_tokens = min(default_max_tokens, room)
    elif params.max_tokens > room:
        raise invalid(f"prompt ({prompt_len} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
                      f"context of {max_context} tokens; lower max_tokens to at most {room}", "max_tokens")
    return params


def request_id(value: str) -> str:
    if not REQUEST_ID_RE.fullmatch(value):
        raise invalid("request_id must be 1-128 characters of A-Z, a-z, 0-9, '.', '_', ':', '-' "
                      f"(got {quote(value)}); leave it empty to let the server make one")
    return value


