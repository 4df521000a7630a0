"""OpenAI's response shapes, built from the service's types (Job, ChoiceUpdate,
BilledUsage) as plain dicts: one json.dumps per stream chunk, no model validation on the
hot path.

- `model` names the version that served (`name@version`), as OpenAI answers a bare
  model name with the dated snapshot that served it.
- `usage` always carries `prompt_tokens_details.cached_tokens`.
- sol's additions travel in one clearly named field, `sol`: the cost (in the price unit
  of `sol prices set`) and the model version.
- finish_reason is `stop` or `length`, or `abort` for a request that was cancelled or cut
  short (OpenAI has no such value; clients that do not know it treat it as a string).
"""

from __future__ import annotations

import json
from typing import Any

from server.engine.api import TokenLogprob
from server.inference import BilledUsage, ChoiceUpdate, Job
from server.tool_output import ToolStreams, answer

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + _dumps(obj).encode("utf-8") + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def served_model(job: Job) -> str:
    """The model an answer names: the adapter (NAME@VERSION) when the request named one,
    as vLLM answers with the LoRA's name, else the base version that served it."""
    if job.adapter is not None:
        return f"{job.adapter.name}@{job.adapter.version}"
    return job.model.ref


def usage(billed: BilledUsage) -> dict[str, Any]:
    u = billed.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens, "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


def sol_extra(job: Job, billed: BilledUsage) -> dict[str, Any]:
    return {"cost": billed.cost, "version": job.model.version, "request_id": job.request_id}


def _token(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(logprobs: list[TokenLogprob], top_n: int) -> dict[str, Any]:
    return {"content": [{**_token(lp.text, lp.logprob),
                         "top_logprobs": [_token(t.text, t.logprob) for t in lp.top[:top_n]]} for lp in logprobs]}


def completion_logprobs(logprobs: list[TokenLogprob], top_n: int, offset: int = 0) -> dict[str, Any]:
    """The legacy completions shape: parallel lists, offsets into the choice's text."""
    offsets = []
    for lp in logprobs:
        offsets.append(offset)
        offset += len(lp.text)
    return {"tokens": [lp.text for lp in logprobs], "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{t.text: t.logprob for t in lp.top[:top_n]} for lp in logprobs],
            "text_offset": offsets}


def tool_call(call) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _chat_choice(job: Job, i: int, top_n: int | None) -> dict[str, Any]:
    said = answer(job, i)
    message: dict[str, Any] = {"role": "assistant", "content": said.content}
    if said.calls:
        message["tool_calls"] = [tool_call(c) for c in said.calls]
    return {"index": i, "message": message,
            "logprobs": chat_logprobs(job.choices[i].logprobs, top_n) if top_n is not None else None,
            "finish_reason": said.finish_reason}


def chat_completion(job: Job, billed: BilledUsage, top_n: int | None) -> dict[str, Any]:
    choices = [_chat_choice(job, i, top_n) for i in range(job.params.n)]
    return {"id": job.request_id, "object": "chat.completion", "created": job.created, "model": served_model(job),
            "choices": choices, "usage": usage(billed), "sol": sol_extra(job, billed)}


def completion(job: Job, billed: BilledUsage, top_n: int | None) -> dict[str, Any]:
    choices = [{"index": i, "text": c.text,
                "logprobs": completion_logprobs(c.logprobs, top_n) if top_n is not None else None,
                "finish_reason": c.finish} for i, c in enumerate(job.choices)]
    return {"id": job.request_id, "object": "text_completion", "created": job.created, "model": served_model(job),
            "choices": choices, "usage": usage(billed), "sol": sol_extra(job, billed)}


class ChunkMaker:
    """Stream chunks of one request: the role goes in each choice's first delta (as
    OpenAI sends it) and completion log-prob offsets run on across chunks."""

    def __init__(self, job: Job, chat: bool, top_n: int | None, token_ids: bool = False) -> None:
        self.job = job
        self.chat = chat
        self.top_n = top_n
        self.token_ids = token_ids
        self.head = {"id": job.request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": job.created, "model": served_model(job)}
        self._started: set[int] = set()
        self._offsets: dict[int, int] = {}
        self._tools = ToolStreams(job) if chat else None

    def choices(self, updates: list[ChoiceUpdate]) -> bytes | None:
        """The chunks for the updates that say something (text held back by the output
        processor, e.g. half a UTF-8 character, or by the tool-call parser, leaves an
        update with nothing to send). Usually one chunk; a choice that completed tool
        calls sends a second, with their arguments (and its finish reason)."""
        waves: list[list[dict[str, Any]]] = [[], []]
        for u in updates:
            if not (u.text or u.finish_reason or u.index not in self._started
                    or (u.logprobs and self.top_n is not None) or (self.token_ids and u.token_ids)):
                continue
            for k, choice in enumerate(self._choice(u)):
                if choice is not None:
                    waves[k].append(choice)
        if self.token_ids:
            by_index = {u.index: u.token_ids for u in updates}
            for c in waves[0]:
                c["token_ids"] = by_index[c["index"]]
        return b"".join(sse({**self.head, "choices": wave}) for wave in waves if wave) or None

    def _choice(self, u: ChoiceUpdate) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        if self.chat:
            said = self._tools.update(u)
            lp = chat_logprobs(u.logprobs, self.top_n) if self.top_n is not None and u.logprobs else None
            if self._tools.active and not (said.content or said.calls or said.finish_reason or lp
                                           or u.index not in self._started or (self.token_ids and u.token_ids)):
                return None, None            # all of it held back by the tool-call parser
            delta: dict[str, Any] = {"content": said.content}
            if u.index not in self._started:
                self._started.add(u.index)
                delta = {"role": "assistant", **delta}
            if not said.calls:
                return {"index": u.index, "delta": delta, "logprobs": lp, "finish_reason": said.finish_reason}, None
            # OpenAI's shape: a call's first delta has its index, id, type and name with
            # arguments "", then its arguments follow.
            delta["tool_calls"] = [{"index": c.index, "id": c.id, "type": "function",
                                    "function": {"name": c.name, "arguments": ""}} for c in said.calls]
            arguments = {"tool_calls": [{"index": c.index, "function": {"arguments": c.arguments}}
                                        for c in said.calls]}
            return ({"index": u.index, "delta": delta, "logprobs": lp, "finish_reason": None},
                    {"index": u.index, "delta": arguments, "logprobs": None, "finish_reason": said.finish_reason})
        self._started.add(u.index)
        lp = None
        if self.top_n is not None and u.logprobs:
            offset = self._offsets.get(u.index, 0)
            lp = completion_logprobs(u.logprobs, self.top_n, offset)
        self._offsets[u.index] = self._offsets.get(u.index, 0) + len(u.text)
        return {"index": u.index, "text": u.text, "logprobs": lp, "finish_reason": u.finish_reason}, None

    def usage(self, billed: BilledUsage) -> bytes:
        return sse({**self.head, "choices": [], "usage": usage(billed), "sol": sol_extra(self.job, billed)})
