"""The chat template: the one function that turns messages into token ids and a loss mask.

Layout: <|endoftext|> then, per message, <|role|> content <|end|>; the generation prompt
appends <|assistant|>. The mask is 1 on assistant content and its <|end|> only: the
tokens a chat model is trained to produce. Message content is encoded as ordinary text,
so a user cannot forge role markers by typing them.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpt.tokenizer import ASSISTANT, END_OF_TURN, ENDOFTEXT, SYSTEM, USER, SolTokenizer

ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

# The same template for Hugging Face `apply_chat_template` (exported with checkpoints).
JINJA_TEMPLATE = (
    "{{ '" + ENDOFTEXT + "' }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '" + END_OF_TURN + "' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + ASSISTANT + "' }}{% endif %}"
)


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass
class RenderedChat:
    ids: list[int]
    mask: list[int]


def _as_message(m: Message | dict) -> Message:
    return m if isinstance(m, Message) else Message(role=m["role"], content=m["content"])


def render_chat(tokenizer: SolTokenizer, messages: list[Message | dict],
                add_generation_prompt: bool = False) -> RenderedChat:
    """Messages -> (ids, mask). Raises ValueError on an unknown role."""
    ids = [tokenizer.special(ENDOFTEXT)]
    mask = [0]
    end = tokenizer.special(END_OF_TURN)
    for raw in messages:
        message = _as_message(raw)
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


def chat_prompt_ids(tokenizer: SolTokenizer, messages: list[Message | dict]) -> list[int]:
    """What the server feeds the model: the conversation plus the generation prompt."""
    return render_chat(tokenizer, messages, add_generation_prompt=True).ids


def chat_stop_ids(tokenizer: SolTokenizer) -> list[int]:
    """Tokens that end an assistant turn."""
    return [tokenizer.special(END_OF_TURN), tokenizer.special(ENDOFTEXT)]
