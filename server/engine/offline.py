"""Offline generation: run the engine in-process over a list of prompts and wait for all
of them (evaluation, scripts, tests)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from gpt.chat import Message, chat_prompt_ids, chat_stop_ids
from gpt.model import GPT
from gpt.tokenizer import SolTokenizer
from server.engine.api import (
    ChoiceFinished,
    EngineRequest,
    RequestFinished,
    SamplingParams,
    TextDelta,
    Usage,
)
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.grammar import GrammarCompiler
from server.engine.output import OutputProcessor, TokenTexts


@dataclass
class ChoiceOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class GenerationOutput:
    request_id: str
    prompt_ids: list[int]
    choices: list[ChoiceOutput]
    usage: Usage

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.choices[0].token_ids


def collect(stream, processor: OutputProcessor, prompt_ids: list[int], n: int) -> GenerationOutput:
    """Drain a RequestStream through its output processor into a GenerationOutput (blocking)."""
    choices = [ChoiceOutput(index=i) for i in range(n)]
    usage = Usage()
    for event in (e for raw in stream for e in processor.process([raw])):
        if isinstance(event, TextDelta):
            c = choices[event.index]
            c.text += event.text
            c.token_ids += event.token_ids
            c.logprobs += [lp.logprob for lp in event.logprobs]
        elif isinstance(event, ChoiceFinished):
            choices[event.index].finish_reason = event.finish_reason
        elif isinstance(event, RequestFinished):
            usage = event.usage
    return GenerationOutput(request_id=stream.request_id, prompt_ids=prompt_ids, choices=choices, usage=usage)


Prompt = str | list[int] | list[dict] | list[Message]


def _prompt_ids(tokenizer: SolTokenizer, prompt: Prompt) -> tuple[list[int], bool]:
    """Token ids, and whether the prompt was a chat (messages rendered by the template)."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt), False
    if prompt and isinstance(prompt[0], dict | Message):
        return chat_prompt_ids(tokenizer, prompt), True  # type: ignore[arg-type]
    return list(prompt), False  # type: ignore[arg-type]


def generate(model: GPT, tokenizer: SolTokenizer, prompts: list[Prompt],
             params: SamplingParams | list[SamplingParams] | None = None,
             eos_token_ids: list[int] | None = None, config: EngineConfig | None = None,
             engine: Engine | None = None, grammars: GrammarCompiler | None = None) -> list[GenerationOutput]:
    """Generate for every prompt (text, token ids, or chat messages rendered by the chat
    template, which then stop at the end of the assistant turn) with continuous batching;
    outputs in prompt order. Pass `engine` to reuse a running one (it is left running).
    Parameters with a response_format are compiled here, on the caller's thread, by
    `grammars` (default: a compiler for this tokenizer, made on first need)."""
    params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
    if len(params_list) != len(prompts):
        raise ValueError("give one SamplingParams per prompt, or one for all")
    own = engine is None
    engine = engine or Engine(model, config)
    texts = TokenTexts(tokenizer.decode_bytes)
    try:
        submitted = []
        for prompt, sp in zip(prompts, params_list, strict=True):
            ids, is_chat = _prompt_ids(tokenizer, prompt)
            grammar = None
            if sp.response_format is not None and sp.response_format.constrained:
                grammars = grammars or GrammarCompiler.for_tokenizer(tokenizer, engine.vocab_size)
                grammar = grammars.compile(sp.response_format)
            request = EngineRequest(
                request_id=f"gen-{uuid.uuid4().hex[:12]}", prompt_ids=ids, params=sp,
                eos_token_ids=list(eos_token_ids if eos_token_ids is not None
                                   else chat_stop_ids(tokenizer) if is_chat else []), grammar=grammar)
            stream = engine.submit(request)
            submitted.append((stream, OutputProcessor(request, texts, stream.abort_choice), ids, sp.n))
        return [collect(*s) for s in submitted]
    finally:
        if own:
            engine.shutdown()
