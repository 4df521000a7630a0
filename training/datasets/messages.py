"""Chat messages in OpenAI's fine-tuning form: `[{"role": ..., "content": ...}, ...]`,
with an optional `"weight": 0 | 1` on assistant messages (0: shown as context, not
trained on). Checked here field by field; whether the model's chat template can render
them is `render.py`'s check."""

from __future__ import annotations

from typing import Any

from training.datasets.errors import describe
from training.datasets.rows import Row

# OpenAI's roles. Which of them a model's template renders is the template's business
# (sol's own has no tool turns); the check here catches typos such as "bot".
ROLES = ("system", "user", "assistant", "tool")


def parse_messages(row: Row, value: Any, field: str, allow_weight: bool = True) -> list[dict[str, Any]]:
    """The messages under `field`, each {"role", "content"} and, on assistant messages,
    "weight" when given."""
    if not isinstance(value, list) or not value:
        raise row.error(field, "a non-empty array of messages",
                        "an empty array" if value == [] else describe(value))
    out: list[dict[str, Any]] = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise row.error(where, 'a message object {"role": ..., "content": ...}', describe(message))
        if "role" not in message:
            raise row.error(f"{where}.role", f"one of {', '.join(ROLES)}", "no role")
        role = message["role"]
        if role not in ROLES:
            raise row.error(f"{where}.role", f"one of {', '.join(ROLES)}", describe(role))
        content = message.get("content")
        if not isinstance(content, str):
            why = " (tool_calls are not rendered by the chat template yet)" if "tool_calls" in message else ""
            raise row.error(f"{where}.content", "a string" + why,
                            "no content" if "content" not in message else describe(content))
        parsed: dict[str, Any] = {"role": role, "content": content}
        if "weight" in message:
            weight = message["weight"]
            if not allow_weight or role != "assistant":
                raise row.error(f"{where}.weight", "no weight (only assistant messages in SFT data carry one)",
                                describe(weight))
            if isinstance(weight, bool) or weight not in (0, 1):
                raise row.error(f"{where}.weight", "0 or 1", describe(weight))
            parsed["weight"] = int(weight)
        out.append(parsed)
    return out


def as_messages(row: Row, value: Any, field: str, role: str) -> list[dict[str, Any]]:
    """A field that is either a string (one `role` message) or an array of messages (the
    conversational form)."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return parse_messages(row, value, field, allow_weight=False)
    raise row.error(field, "a string or an array of messages", "nothing" if value is None else describe(value))
