"""A model's own chat template: its Jinja source rendered as transformers renders it, the
text encoded to ids, and the assistant-only loss mask.

Rendering: jinja2's ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks, the
loopcontrols extension and a `{% generation %}...{% endgeneration %}` block; globals
`raise_exception(message)` and `strftime_now(format)`; a `tojson` filter that keeps
non-ASCII text and takes indent/separators/sort_keys; variables `messages`, `tools`,
`documents`, `add_generation_prompt`, the special tokens by name (`bos_token`,
`eos_token`, ...) and any extra keyword a caller passes (e.g. `enable_thinking`).

Encoding: the rendered text is encoded with special-token strings read as special
tokens, as `apply_chat_template(..., tokenize=True)` does, so the ids equal
transformers' (tested). One difference, on purpose: a special-token string that a
*message's content* holds (a user typing "<|im_start|>system") is encoded as ordinary
text, so content can never forge a role. The contents that hold one are rendered between
private markers (Unicode noncharacters) to find where they land in the text; the text is
then encoded in pieces cut only at the template's own special tokens, each piece with
special-token strings as text (Hugging Face also cuts the text at every special token
and encodes the pieces alone, so the pieces' ids are its ids). Where the template
transforms such a content so that it cannot be found (or the marked rendering differs
from the plain one), the request is refused with ChatTemplateError rather than guessed.
Only message contents are guarded: `tools` and `documents` come from the calling
application, and non-special added tokens (Qwen's <think>) are read as tokens, as
Hugging Face reads them.

Assistant mask (training): 1 on the tokens that overlap a `{% generation %}` block when
the template has one. Otherwise it is derived by rendering prefixes: for each assistant
message i, P = render(messages[:i], add_generation_prompt=True) and
F = render(messages[:i+1]); the tokens overlapping F[lcp(P, F):] with F's trailing
whitespace left out are the assistant's (its content and the end-of-turn token it is
trained to produce; the generation prompt and the separator after the turn are not).
F must be a prefix of the whole conversation's rendering, or ChatTemplateError says to
add generation markers.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Private markers (Unicode noncharacters): content spans and generation blocks.
CONTENT_OPEN, CONTENT_CLOSE, GEN_OPEN, GEN_CLOSE = "\ufdd0", "\ufdd1", "\ufdd2", "\ufdd3"
_MARKERS = CONTENT_OPEN + CONTENT_CLOSE + GEN_OPEN + GEN_CLOSE
_MARKER_RE = re.compile(f"[{_MARKERS}]")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class ChatTemplateError(ValueError):
    """The template does not compile, refused the conversation, or failed on it."""


class _TemplateRaised(Exception):
    """raise_exception() called by a template."""


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}`: marks what the assistant generates."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_wrap"), [], [], body).set_lineno(lineno)

    def _wrap(self, caller: Any) -> str:
        return GEN_OPEN + caller() + GEN_CLOSE


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(str(message))


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML, which changes what the model reads.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@dataclass(frozen=True)
class RenderedText:
    text: str                                   # markers removed
    content: list[tuple[int, int]]              # spans of the marked contents, in order
    generation: list[tuple[int, int]]           # spans of {% generation %} blocks


class CompiledTemplate:
    def __init__(self, source: str, origin: str) -> None:
        self.source = source
        self.origin = origin or "the chat template"
        self.has_generation_blocks = bool(_GENERATION_TAG.search(source))
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as err:
            raise ChatTemplateError(f"{self.origin}: the chat template does not compile: {err.message} "
                                    f"(template line {err.lineno})") from None

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool,
               variables: dict[str, Any]) -> RenderedText:
        try:
            raw = self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                        **variables)
        except _TemplateRaised as err:
            raise ChatTemplateError(f"the model's chat template refused the conversation: {err}") from None
        except Exception as err:  # noqa: BLE001 - any failure inside a user-supplied template
            raise ChatTemplateError(f"the model's chat template ({self.origin}) failed on this conversation: "
                                    f"{type(err).__name__}: {err}") from None
        return _unmark(raw)


@functools.lru_cache(maxsize=32)
def compile_template(source: str, origin: str = "") -> CompiledTemplate:
    """The compiled template (cached by its source). ChatTemplateError on a syntax error."""
    return CompiledTemplate(source, origin)


def _unmark(raw: str) -> RenderedText:
    """Remove the markers; the spans they enclosed, in the unmarked text."""
    out: list[str] = []
    spans: dict[str, list[tuple[int, int]]] = {CONTENT_OPEN: [], GEN_OPEN: []}
    open_at: dict[str, int | None] = {CONTENT_OPEN: None, GEN_OPEN: None}
    closes = {CONTENT_CLOSE: CONTENT_OPEN, GEN_CLOSE: GEN_OPEN}
    length, last = 0, 0
    balanced = True
    for m in _MARKER_RE.finditer(raw):
        out.append(raw[last:m.start()])
        length += m.start() - last
        last = m.end()
        mark = m.group()
        if mark in open_at:
            balanced &= open_at[mark] is None
            open_at[mark] = length
        else:
            opener = closes[mark]
            start = open_at[opener]
            if start is None:
                balanced = False
                continue
            spans[opener].append((start, length))
            open_at[opener] = None
    out.append(raw[last:])
    if not balanced or any(v is not None for v in open_at.values()):
        spans[CONTENT_OPEN] = [(-1, -1)]     # the caller sees the markers were not kept whole
    return RenderedText("".join(out), spans[CONTENT_OPEN], spans[GEN_OPEN])


def _marked(content: str) -> str:
    core = content.strip()
    lead = content[:len(content) - len(content.lstrip())]
    trail = content[len(content.rstrip()):]
    # Whitespace outside the markers: a template that trims content still trims it.
    return lead + CONTENT_OPEN + core + CONTENT_CLOSE + trail


@functools.lru_cache(maxsize=64)
def _specials_re(specials: tuple[str, ...]) -> re.Pattern[str] | None:
    if not specials:
        return None
    return re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))


def _overlaps(span: tuple[int, int], spans: list[tuple[int, int]]) -> bool:
    a, b = span
    if a == b:
        return any(s <= a < e for s, e in spans)
    return any(a < e and b > s for s, e in spans)


class TemplateChat:
    """Messages -> ids (+ mask) through `tokenizer`'s own template (an HFTokenizer)."""

    def __init__(self, tokenizer: Any, template: CompiledTemplate) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self._specials = _specials_re(tuple(tokenizer.special_ids))

    def variables(self, tools: list[dict] | None, documents: list[dict] | None,
                  extra: dict[str, Any]) -> dict[str, Any]:
        return {**self.tokenizer.settings.template_tokens(), "tools": tools, "documents": documents, **extra}

    def _forging(self, messages: list[dict[str, Any]]) -> set[int]:
        """Indices of messages whose content holds a special-token string."""
        if self._specials is None:
            return set()
        return {i for i, m in enumerate(messages)
                if isinstance(m.get("content"), str) and self._specials.search(m["content"])}

    def render_text(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                    variables: dict[str, Any], guard: set[int] = frozenset()) -> RenderedText:
        if guard:
            marked = [dict(m, content=_marked(m["content"])) if i in guard else m for i, m in enumerate(messages)]
            rendered = self.template.render(marked, add_generation_prompt, variables)
            plain = self.template.render(messages, add_generation_prompt, variables)
            if rendered.text != plain.text or len(rendered.content) != len(guard):
                first = min(guard)
                found = self._specials.search(messages[first]["content"]) if self._specials else None
                token = f" {found.group()!r}" if found else ""
                raise ChatTemplateError(
                    f"messages[{first}].content holds the special token{token}, which this model's chat "
                    "template rewrites in a way sol cannot keep as plain text; remove it from the message")
            return rendered
        return self.template.render(messages, add_generation_prompt, variables)

    def encode(self, rendered: RenderedText) -> tuple[list[int], list[tuple[int, int]]]:
        """The rendered text's ids and character spans; special-token strings inside the
        marked contents are text (see the module docstring)."""
        tok = self.tokenizer
        ids, offsets = tok.encode_marked(rendered.text)
        forged = [k for k, (i, span) in enumerate(zip(ids, offsets, strict=True))
                  if tok.is_special(i) and _overlaps(span, rendered.content)]
        if not forged:
            return ids, offsets
        forged_set = set(forged)
        genuine = [k for k, i in enumerate(ids) if tok.is_special(i) and k not in forged_set]
        out_ids: list[int] = []
        out_offsets: list[tuple[int, int]] = []
        text, pos = rendered.text, 0
        for k in [*genuine, None]:
            start, end = offsets[k] if k is not None else (len(text), len(text))
            if start > pos:
                piece_ids, piece_offsets = tok.encode_piece(text[pos:start], at_start=pos == 0)
                out_ids += piece_ids
                out_offsets += [(a + pos, b + pos) for a, b in piece_offsets]
            if k is not None:
                out_ids.append(ids[k])
                out_offsets.append((start, end))
            pos = max(pos, end)
        return out_ids, out_offsets

    def ids(self, messages: list[dict[str, Any]], add_generation_prompt: bool, with_mask: bool,
            variables: dict[str, Any]) -> tuple[list[int], list[int]]:
        for i, m in enumerate(messages):
            if isinstance(m.get("content"), str) and _MARKER_RE.search(m["content"]):
                raise ChatTemplateError(f"messages[{i}].content holds a Unicode noncharacter (U+FDD0-U+FDD3), "
                                        "which sol reserves; remove it")
        rendered = self.render_text(messages, add_generation_prompt, variables, self._forging(messages))
        ids, offsets = self.encode(rendered)
        if not with_mask:
            return ids, [0] * len(ids)
        spans = rendered.generation if self.template.has_generation_blocks else \
            self._assistant_spans(messages, rendered.text, variables)
        return ids, [1 if _overlaps(o, spans) else 0 for o in offsets]

    def _assistant_spans(self, messages: list[dict[str, Any]], text: str,
                         variables: dict[str, Any]) -> list[tuple[int, int]]:
        spans = []
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            prompt = self.template.render(messages[:i], True, variables).text
            full = self.template.render(messages[:i + 1], False, variables).text
            if not text.startswith(full):
                raise ChatTemplateError(
                    f"cannot derive the assistant mask: the model's chat template ({self.template.origin}) renders "
                    f"messages[:{i + 1}] differently inside the whole conversation; mark the assistant's text "
                    "with {% generation %}...{% endgeneration %} in the template")
            start = 0
            for a, b in zip(prompt, full, strict=False):
                if a != b:
                    break
                start += 1
            end = len(full.rstrip())
            if end > start:
                spans.append((start, end))
        return spans

    def structural_specials(self, variables: dict[str, Any]) -> list[int]:
        """The special tokens the template puts around messages (turn ends and headers),
        found by rendering a probe conversation; a chat model that emits one has ended
        its turn."""
        probe = [{"role": "system", "content": "sol probe zero"}, {"role": "user", "content": "sol probe one"},
                 {"role": "assistant", "content": "sol probe two"}, {"role": "user", "content": "sol probe three"}]
        for messages in (probe, probe[1:]):
            try:
                rendered = self.render_text(messages, True, variables, guard=set(range(len(messages))))
                break
            except ChatTemplateError:
                continue
        else:
            return []
        ids, offsets = self.tokenizer.encode_marked(rendered.text)
        found: list[int] = []
        for i, span in zip(ids, offsets, strict=True):
            if self.tokenizer.is_special(i) and not _overlaps(span, rendered.content) and i not in found:
                found.append(i)
        return found
