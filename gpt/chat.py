"""Messages -> token ids (+ loss mask): the one entry point serving and training call.

Two layouts, chosen by the tokenizer:

- sol's own models (a SolTokenizer): <|endoftext|> then, per message,
  <|role|> content <|end|>; the generation prompt appends <|assistant|>. The mask is 1 on
  assistant content and its <|end|> only: the tokens a chat model is trained to produce.
  Message content is encoded as ordinary text, so a user cannot forge role markers by
  typing them. `JINJA_TEMPLATE` is the same layout for Hugging Face (exported).
- a model's own Jinja template (an imported Hugging Face checkpoint): rendered and encoded
  by gpt/chat_template.py, with the same ids as transformers' `apply_chat_template`, and
  the same guarantee that content cannot forge a special token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gpt.chat_template import ChatTemplateError, TemplateChat, compile_template
from gpt.tokenizer import ASSISTANT, END_OF_TURN, ENDOFTEXT, SOL_CHAT_TEMPLATE, SYSTEM, USER, SolTokenizer
from gpt.tokenizers.base import Tokenizer
from gpt.tool_calls.sol_layout import assistant_text, tool_result_text, tools_text

ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
# Roles a conversation may hold: a tool's result too (sol's layout writes it as a user turn).
CHAT_ROLES = frozenset({*ROLES, "tool"})
JINJA_TEMPLATE = SOL_CHAT_TEMPLATE
__all__ = ["ROLES", "CHAT_ROLES", "JINJA_TEMPLATE", "ChatTemplateError", "Message", "RenderedChat", "render_chat",
           "chat_prompt_ids", "chat_stop_ids"]


@dataclass(frozen=True)
class Message:
    """One turn. An assistant turn may carry tool calls (each {"id", "name", "arguments"},
    the arguments as JSON text), a tool turn names the call it answers."""

    role: str
    content: str
    tool_calls: tuple[dict[str, str], ...] = ()
    tool_call_id: str = ""


@dataclass
class RenderedChat:
    ids: list[int]
    mask: list[int]


def _as_message(m: Message | dict) -> Message:
    return m if isinstance(m, Message) else Message(role=m["role"], content=m["content"],
                                                    tool_calls=tuple(m.get("tool_calls", ())),
                                                    tool_call_id=m.get("tool_call_id", ""))


def _template_call(call: dict[str, str]) -> dict[str, Any]:
    """A call as Hugging Face templates read it: OpenAI's shape with the arguments as an
    object (templates `tojson` them)."""
    return {"id": call["id"], "type": "function",
            "function": {"name": call["name"], "arguments": json.loads(call["arguments"] or "{}")}}


def _as_dict(m: Message | dict) -> dict[str, Any]:
    if not isinstance(m, Message):
        return dict(m)
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [_template_call(c) for c in m.tool_calls]
    if m.role == "tool":
        out["tool_call_id"] = m.tool_call_id
    return out


def _sol_layout(messages: list[Message], tools: list[dict] | None) -> list[Message]:
    """The conversation in sol's three roles: tools at the end of the system turn, calls
    written after the assistant's text, tool results as user turns (gpt/tool_calls/sol_layout.py)."""
    out = [Message(m.role, assistant_text(m.content, list(m.tool_calls))) if m.tool_calls else
           Message("user", tool_result_text(m.content)) if m.role == "tool" else m for m in messages]
    if tools:
        listed = tools_text([t.get("function", t) for t in tools])
        if out and out[0].role == "system":
            out[0] = Message("system", f"{out[0].content}\n\n{listed}" if out[0].content else listed)
        else:
            out.insert(0, Message("system", listed))
    return out


def _template_chat(tokenizer: Tokenizer) -> TemplateChat:
    source = tokenizer.chat_template
    if not source:
        raise ChatTemplateError("this model has no chat template (no chat_template in tokenizer_config.json and no "
                                "chat_template.jinja): send a prompt to complete instead of messages")
    origin = getattr(getattr(tokenizer, "settings", None), "chat_template_origin", "")
    return TemplateChat(tokenizer, compile_template(source, origin))


def render_chat(tokenizer: Tokenizer, messages: list[Message | dict], add_generation_prompt: bool = False, *,
                with_mask: bool = True, tools: list[dict] | None = None, documents: list[dict] | None = None,
                **template_vars: Any) -> RenderedChat:
    """Messages -> (ids, mask). Raises ValueError on an unknown role (sol's layout) and
    ChatTemplateError (a ValueError) when a model's template refuses or fails.
    `with_mask=False` skips the mask work (serving); `tools` (OpenAI's tool objects),
    `documents` and other keywords reach a model's own template (sol's layout takes tools
    only, into its system turn)."""
    if not isinstance(tokenizer, SolTokenizer):
        chat = _template_chat(tokenizer)
        ids, mask = chat.ids([_as_dict(m) for m in messages], add_generation_prompt, with_mask,
                             chat.variables(tools, documents, template_vars))
        return RenderedChat(ids=ids, mask=mask)
    if documents or template_vars:
        raise ValueError("sol's chat layout takes no documents or template variables")
    ids = [tokenizer.special(ENDOFTEXT)]
    mask = [0]
    end = tokenizer.special(END_OF_TURN)
    for message in _sol_layout([_as_message(m) for m in messages], tools):
        if message.role not in ROLES:
            raise ValueError(f"unknown role {message.role!r}; use one of {sorted(ROLES)}")
        content = tokenizer.encode(message.content)
        trained = 1 if message.role == "assistant" else 0
        ids += [tokenizer.special(ROLES[message.role]), *content, end]
        mask += [0] + [trained] * (len(content) + 1)
    if add_generation_prompt:
        ids.append(tokenizer.special(ASSISTANT))
        mask.append(0)
    return RenderedChat(ids=ids, mask=mask)


def chat_prompt_ids(tokenizer: Tokenizer, messages: list[Message | dict], **template_vars: Any) -> list[int]:
    """What the server feeds the model: the conversation plus the generation prompt."""
    return render_chat(tokenizer, messages, add_generation_prompt=True, with_mask=False, **template_vars).ids


def chat_stop_ids(tokenizer: Tokenizer) -> list[int]:
    """Tokens that end an assistant turn: the end-of-turn/eos ids, then every special token
    that starts a role's turn, so a chat model that starts a new turn is stopped. For a
    model's own template these are the special tokens it puts around messages' contents
    (found by rendering a probe conversation), after the eos ids."""
    if isinstance(tokenizer, SolTokenizer):
        return [tokenizer.special(END_OF_TURN), tokenizer.special(ENDOFTEXT),
                *(tokenizer.special(t) for t in ROLES.values())]
    stops = list(tokenizer.eos_ids)
    try:
        chat = _template_chat(tokenizer)
        structural = chat.structural_specials(chat.variables(None, None, {}))
    except ChatTemplateError:
        structural = []
    return stops + [i for i in structural if i not in stops]
