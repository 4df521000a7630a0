"""A tool request's answers read for calls, for both adapters: each choice's text split
by its template family's parser (gpt/tool_calls) into content and calls, with call ids,
and `finish_reason` "tool_calls" where a choice that ended normally made calls. A stream
reads each choice as it goes (`ToolStreams`): content as soon as it cannot be part of a
call, each call once complete."""

from __future__ import annotations

from dataclasses import dataclass, field

from gpt.tool_calls import CallStart, StreamParser, new_call_id, parse
from server.inference import ChoiceUpdate, Job


@dataclass
class ChoiceAnswer:
    content: str | None
    calls: list[CallStart] = field(default_factory=list)
    finish_reason: str | None = None


def finish_reason(reason: str | None, made_calls: bool) -> str | None:
    return "tool_calls" if made_calls and reason == "stop" else reason


def reads_calls(job: Job) -> bool:
    return job.tools is not None and job.tools.parsed and bool(job.tool_family)


def answer(job: Job, index: int) -> ChoiceAnswer:
    """Choice `index` of a finished job: its text as content and calls."""
    result = job.choices[index]
    reason = result.finish
    if not reads_calls(job):
        return ChoiceAnswer(result.text, [], reason)
    parsed = parse(job.tool_family, result.text, job.tools.limit)
    calls = [CallStart(i, new_call_id(), c.name, c.arguments) for i, c in enumerate(parsed.calls)]
    return ChoiceAnswer(parsed.content if calls else result.text, calls, finish_reason(reason, bool(calls)))


class ToolStreams:
    """The stream of each choice of a job read for calls."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.active = reads_calls(job)
        self._parsers: dict[int, StreamParser] = {}
        self._made: set[int] = set()

    def update(self, u: ChoiceUpdate) -> ChoiceAnswer:
        """What choice u.index adds: content, complete calls, and its finish reason."""
        if not self.active:
            return ChoiceAnswer(u.text, [], u.finish_reason)
        parser = self._parsers.setdefault(u.index, StreamParser(self.job.tool_family, self.job.tools.limit))
        content, calls = parser.feed(u.text, final=u.finish_reason is not None)
        if calls:
            self._made.add(u.index)
        return ChoiceAnswer(content, calls, finish_reason(u.finish_reason, u.index in self._made))
