"""Offline decoding on the engine: the one place outside the server that builds engines,
and one helper that submits token-id prompts and collects what came back (token ids,
finish reasons, chosen-token logprobs, usage). Evaluation, reward-model sampling, RLHF
rollouts, scripts and tests all decode through it, so the engine is the only decode
path in the repository.

Only token ids and numbers are read from the events, never text: callers that want
text decode the ids with their tokenizer.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from gpt.model import GPT
from server.engine.adapter_slots import AdapterRef
from server.engine.api import (
    ChoiceFinished,
    Delta,
    EngineRequest,
    FinishReason,
    RequestFinished,
    SamplingParams,
    TokenLogprob,
    Usage,
)
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.grammar import GrammarCompiler
from server.engine.stream import RequestStream


@dataclass
class ChoiceOutput:
    index: int
    token_ids: list[int] = field(default_factory=list)   # the stop token included when one ended it
    logprobs: list[float] = field(default_factory=list)  # one per token when params.logprobs >= 1
    finish_reason: FinishReason | None = None

    @property
    def stopped(self) -> bool:
        """Ended by a stop/eos token (not by max_tokens, the context or an abort)."""
        return self.finish_reason == "stop"


@dataclass
class GenerationOutput:
    request_id: str
    prompt_ids: list[int]
    choices: list[ChoiceOutput]
    usage: Usage

    @property
    def token_ids(self) -> list[int]:
        return self.choices[0].token_ids


def build_engine(model: GPT, config: EngineConfig | None = None, *, start: bool = True) -> Engine:
    """Every engine is made here (the server's through `EngineBuilder`, which sizes its KV
    pool from the server's budget; training's through `training_engine`, sized for its
    prompts), so that a change to the engine's constructor is one edit. `start=False`
    gives a synchronous engine: `generate` then runs its steps on the caller's thread
    (training, evaluation)."""
    return Engine(model, config, start=start)


def live_config(model: nn.Module, **overrides: object) -> EngineConfig:
    """An engine config on the model's own device and dtype, so that the engine decodes
    with the model's live weights instead of a converted copy: a training step is then
    seen by the next `generate` (after `engine.reset_prefix_cache()`)."""
    param = next(model.parameters())
    return EngineConfig(device=str(param.device), dtype=param.dtype, **overrides)  # type: ignore[arg-type]


def chosen_logprob(entry: TokenLogprob) -> float:
    """The log-probability of the sampled token in one logprob entry of a Delta: the
    only place that knows the entry's shape."""
    return entry.logprob


def collect(stream: RequestStream, prompt_ids: list[int], n: int) -> GenerationOutput:
    """Drain a request's stream (blocking until it ends) into a GenerationOutput."""
    choices = [ChoiceOutput(index=i) for i in range(n)]
    usage = Usage()
    for event in stream:
        if isinstance(event, Delta):
            choice = choices[event.index]
            choice.token_ids += event.token_ids
            choice.logprobs += [chosen_logprob(lp) for lp in event.logprobs]
        elif isinstance(event, ChoiceFinished):
            choices[event.index].finish_reason = event.finish_reason
        elif isinstance(event, RequestFinished):
            usage = event.usage
    return GenerationOutput(request_id=stream.request_id, prompt_ids=prompt_ids, choices=choices, usage=usage)


def _compiled(params: SamplingParams, grammars: GrammarCompiler | None):
    fmt = params.response_format
    if fmt is None or not fmt.constrained:
        return None
    if grammars is None:
        raise ValueError("a response_format that constrains the output needs a GrammarCompiler (grammars=...)")
    return grammars.compile(fmt)


def generate(engine: Engine, prompts: Sequence[Sequence[int]],
             params: SamplingParams | Sequence[SamplingParams],
             eos_token_ids: Sequence[int] = (), grammars: GrammarCompiler | None = None,
             adapters: Sequence[AdapterRef | None] | None = None) -> list[GenerationOutput]:
    """Decode every prompt (token ids) on `engine` with continuous batching; outputs in
    prompt order. A synchronous engine (built with start=False) is stepped here until
    idle; a threaded one is waited on. `params` is one SamplingParams for all prompts or
    one per prompt (e.g. a seed per row: each choice's draws depend only on its seed
    and position, whatever else is in the batch). Parameters with a constraining
    response_format are compiled by `grammars`, here on the caller's thread. `adapters`:
    one LoRA adapter (or None, the base model) per prompt; rows on different adapters
    share the batch."""
    per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if len(per_prompt) != len(prompts):
        raise ValueError(f"give one SamplingParams per prompt ({len(prompts)}), or one for all "
                         f"(got {len(per_prompt)})")
    per_adapter = [None] * len(prompts) if adapters is None else list(adapters)
    if len(per_adapter) != len(prompts):
        raise ValueError(f"give one adapter (or None) per prompt ({len(prompts)}), got {len(per_adapter)}")
    synchronous = engine.thread is None
    # A synchronous engine holds every submitted request until it is stepped, so submit
    # no more at once than its waiting queue takes.
    chunk = engine.config.max_waiting if synchronous else max(1, len(prompts))
    outputs: list[GenerationOutput] = []
    for start in range(0, len(prompts), chunk):
        batch = [(list(p), sp) for p, sp in zip(prompts[start:start + chunk], per_prompt[start:start + chunk],
                                                 strict=True)]
        batch_adapters = per_adapter[start:start + chunk]
        # Together, so that a threaded engine's first step sees the whole batch.
        streams = engine.submit_many([EngineRequest(request_id=f"gen-{uuid.uuid4().hex[:16]}", prompt_ids=p,
                                                    params=sp, eos_token_ids=list(eos_token_ids),
                                                    grammar=_compiled(sp, grammars), adapter=ad)
                                      for (p, sp), ad in zip(batch, batch_adapters, strict=True)])
        if synchronous:
            engine.run_until_idle()
        outputs += [collect(s, p, sp.n) for s, (p, sp) in zip(streams, batch, strict=True)]
    return outputs
