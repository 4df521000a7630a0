"""The Engine: one thread, one step loop, requests in and token events out.

Callers (the gRPC servicer, evaluation, training rollouts) `submit` a request from any
thread or asyncio loop and read its RequestStream. Submissions and aborts go through an
inbox that the step loop drains between steps, so every piece of scheduling state is
touched by the engine thread only and needs no lock.
"""

from __future__ import annotations

import copy
import logging
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch

from gpt.model import GPT
from gpt.tokenizer import SolTokenizer
from server.engine.api import (
    ChoiceFinished,
    Delta,
    EngineOverloaded,
    EngineRequest,
    EngineStats,
    Event,
    FinishReason,
    RequestFinished,
    RequestRejected,
    RequestTimings,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from server.engine.block_manager import BlockManager
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.kv_cache import PagedKVCache, kv_bytes_per_block
from server.engine.runner import ModelRunner
from server.engine.sampler import SamplingTensors, derive_seed, sample
from server.engine.scheduler import Scheduler, SchedulerConfig
from server.engine.sequence import RequestState, SeqStatus, Sequence
from server.engine.stream import RequestStream

log = logging.getLogger(__name__)

DEFAULT_KV_BUDGET_BYTES = 256 << 20


@dataclass
class EngineConfig:
    block_size: int = 16
    num_blocks: int | None = None          # KV pool size in blocks; or
    kv_cache_bytes: int | None = None      # a memory budget (default: 256 MiB, capped at what
                                           # max_num_seqs full-context sequences need)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_waiting: int = 4096                # beyond this, submit raises EngineOverloaded
    enable_prefix_caching: bool = True
    device: str | None = None              # default: gpt.device.default_device()
    dtype: torch.dtype | None = None       # default: bf16 on CUDA, fp32 on CPU


def resolve_device_dtype(config: EngineConfig) -> tuple[torch.device, torch.dtype]:
    """The engine's device and dtype: as configured, else CUDA + bf16 when present."""
    from gpt.device import default_device, default_dtype

    device = torch.device(config.device) if config.device else default_device()
    return device, config.dtype or default_dtype(device)


def kv_pool_blocks(mc, config: EngineConfig, dtype: torch.dtype) -> int:
    """Blocks in the KV pool: `num_blocks`, else `kv_cache_bytes` worth, else the default
    budget capped at what `max_num_seqs` full-context sequences can use."""
    if config.num_blocks is not None:
        return config.num_blocks
    per_block = kv_bytes_per_block(mc, config.block_size, dtype)
    if config.kv_cache_bytes is not None:
        return max(1, config.kv_cache_bytes // per_block)
    full = config.max_num_seqs * -(-mc.max_seq_len // config.block_size)
    return max(1, min(DEFAULT_KV_BUDGET_BYTES // per_block, full))


class Engine:
    def __init__(self, model: GPT, tokenizer: SolTokenizer, config: EngineConfig | None = None,
                 start: bool = True) -> None:
        self.config = config = config or EngineConfig()
        self.tokenizer = tokenizer
        self.device, self.dtype = resolve_device_dtype(config)
        param = next(model.parameters())
        if param.device != self.device or param.dtype != self.dtype:
            # Convert a copy: the caller's model (a training policy, say) stays as it was.
            model = copy.deepcopy(model).to(device=self.device, dtype=self.dtype)
        self.model = model.eval()
        mc = model.config
        self.max_seq_len = mc.max_seq_len
        num_blocks = kv_pool_blocks(mc, config, self.dtype)
        self.cache = PagedKVCache(mc, num_blocks, config.block_size, self.device, self.dtype)
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens),
                                   self.blocks)
        self.runner = ModelRunner(self.model, self.cache)
        self._token_bytes_cache: dict[int, bytes] = {}
        self._requests: dict[str, RequestState] = {}
        self._streams: dict[str, RequestStream] = {}
        self._inbox: deque[tuple[str, object]] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._num_waiting_hint = 0
        self.steps = 0
        self.thread: threading.Thread | None = None
        if start:
            self.start()

    # --- public API (any thread) ----------------------------------------------------------
    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._loop, name="sol-engine", daemon=True)
            self.thread.start()

    def submit(self, request: EngineRequest) -> RequestStream:
        """Queue a request; its events arrive on the returned stream. Raises ValueError
        for bad parameters, RequestRejected when it can never fit, EngineOverloaded when
        the queue is full."""
        self._check(request)
        stream = RequestStream(request.request_id, self.abort)
        with self._cond:
            if self._stopping:
                raise EngineOverloaded("the engine is shutting down")
            if request.request_id in self._streams:
                raise ValueError(f"request id {request.request_id!r} is already in flight")
            if self._num_waiting_hint >= self.config.max_waiting:
                raise EngineOverloaded(f"{self._num_waiting_hint} requests are waiting; retry later")
            self._num_waiting_hint += 1
            self._streams[request.request_id] = stream
            self._inbox.append(("submit", (request, time.monotonic())))
            self._cond.notify()
        return stream

    def abort(self, request_id: str) -> None:
        """Stop a request; its blocks are freed before the next step runs."""
        with self._cond:
            self._inbox.append(("abort", request_id))
            self._cond.notify()

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=self._num_waiting_hint,
            kv_blocks_total=self.blocks.num_blocks,
            kv_blocks_used=self.blocks.num_used,
            prefix_cache_queries=self.blocks.queries,
            prefix_cache_hits=self.blocks.hits,
            preemptions=self.scheduler.num_preemptions,
        )

    def shutdown(self, timeout: float = 30.0) -> None:
        """Abort what is in flight, stop the loop and wait for the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self.thread is not None:
            self.thread.join(timeout)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_block(self.model.config, 1, self.dtype)

    def _check(self, request: EngineRequest) -> None:
        params = request.params
        params.validate()
        if not request.request_id:
            raise ValueError("request_id must not be empty")
        prompt = request.prompt_ids
        if not prompt:
            raise ValueError("the prompt is empty")
        vocab = self.model.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        bad_ids = [t for t in [*params.stop_token_ids, *request.eos_token_ids] if not 0 <= t < vocab]
        if bad_ids:
            raise ValueError(f"stop/eos token ids must be in [0, {vocab}) (got {bad_ids[:4]})")
        total = len(prompt) + params.max_tokens
        if total > self.max_seq_len:
            raise RequestRejected(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds the "
                f"model's context of {self.max_seq_len} tokens; shorten the prompt or lower max_tokens")
        if self.blocks.blocks_for(total) > self.blocks.num_blocks:
            cap = self.blocks.num_blocks * self.blocks.block_size
            raise RequestRejected(
                f"prompt + max_tokens = {total} tokens exceeds the whole KV cache ({cap} tokens); "
                "shorten the prompt or lower max_tokens")

    # --- the step loop (engine thread) ----------------------------------------------------
    def run_until_idle(self) -> None:
        """Synchronous mode (an engine made with start=False, e.g. for training rollouts
        and evaluation): run steps on the calling thread until every submitted request
        has finished. Streams are then complete and can be read without blocking."""
        if self.thread is not None:
            raise RuntimeError("run_until_idle is for an engine without its own thread (start=False)")
        while True:
            with self._cond:
                inbox = list(self._inbox)
                self._inbox.clear()
            self._apply(inbox)
            if not self.scheduler.has_work():
                return
            self.step()

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix block: call it after the model's weights changed in
        place (a training step), since cached keys/values were computed by the old ones."""
        self.blocks.reset_prefix_cache()

    def _apply(self, inbox: list[tuple[str, object]]) -> None:
        for kind, payload in inbox:
            if kind == "submit":
                self._admit(*payload)  # type: ignore[misc]
            else:
                self._abort_now(payload)  # type: ignore[arg-type]

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._inbox and not self._stopping and not self.scheduler.has_work():
                    self._cond.wait()
                inbox = list(self._inbox)
                self._inbox.clear()
                stopping = self._stopping
            self._apply(inbox)
            if stopping:
                for request_id in list(self._requests):
                    self._abort_now(request_id)
                return
            if self.scheduler.has_work():
                try:
                    self.step()
                except Exception:
                    # A failed step must not take the engine down: fail what was in flight
                    # and keep serving new requests.
                    log.exception("engine step failed; aborting in-flight requests")
                    for request_id in list(self._requests):
                        self._abort_now(request_id)
            # Requests still in the inbox are counted too, so the overload check sees them.
            with self._cond:
                self._num_waiting_hint = len(self.scheduler.waiting) + len(self._inbox) + sum(
                    len(s.held_choices) for s in self._requests.values())

    def _admit(self, request: EngineRequest, arrival: float) -> None:
        params = request.params
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(request.eos_token_ids)
        state = RequestState(request=request, timings=RequestTimings(arrival=arrival),
                             stop_ids=frozenset(stop_ids))
        base_seed = params.seed if params.seed is not None else secrets.randbits(62)
        for index in range(params.n):
            seq = Sequence(
                request=state, index=index, token_ids=list(request.prompt_ids),
                num_prompt_tokens=len(request.prompt_ids), seed=derive_seed(base_seed, index),
                detok=IncrementalDetokenizer(self._token_bytes, params.stop))
            state.sequences.append(seq)
        self._requests[request.request_id] = state
        self.scheduler.add(state.sequences[0])
        # The other choices wait until the first has computed the prompt, then find its
        # full blocks in the prefix cache instead of computing them again.
        state.held_choices = state.sequences[1:]

    def _abort_now(self, request_id: str) -> None:
        state = self._requests.get(request_id)
        if state is None:
            return
        events: list[Event] = []
        state.held_choices = []
        for seq in state.sequences:
            if not seq.is_finished:
                self.scheduler.finish(seq)
                seq.finish_reason = "abort"
                events.append(ChoiceFinished(request_id, seq.index, "abort"))
        self._finish_request(state, events)

    def step(self) -> None:
        """One iteration: schedule, run the model, sample, emit events."""
        batch = self.scheduler.schedule()
        if not batch:
            return
        now = time.monotonic()
        for seq, _ in batch:
            if seq.request.timings.first_scheduled is None:
                seq.request.timings.first_scheduled = now
                if not seq.request.cached_recorded:
                    seq.request.cached_tokens = seq.num_computed
                    seq.request.cached_recorded = True
        logits, sampling_idx = self.runner.execute(batch)
        for seq, n in batch:
            seq.num_computed += n
            if self.config.enable_prefix_caching:
                self.blocks.register_full_blocks(seq)
        self.steps += 1
        if not sampling_idx:
            return
        seqs = [batch[i][0] for i in sampling_idx]
        out = self._sample(logits, seqs)
        self._emit(seqs, out)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]):
        params = [s.params for s in seqs]
        tensors = SamplingTensors.from_params(params, logits.device)
        needs_history = tensors.any_output_penalty or tensors.any_repetition
        banned_rows: list[int] = []
        banned_ids: list[int] = []
        for row, s in enumerate(seqs):
            if s.num_output_tokens < s.params.min_tokens and s.request.stop_ids:
                banned_rows.extend([row] * len(s.request.stop_ids))
                banned_ids.extend(s.request.stop_ids)
        banned = (torch.tensor(banned_rows, dtype=torch.int64), torch.tensor(banned_ids, dtype=torch.int64)) \
            if banned_rows else None
        return sample(
            logits, tensors,
            seeds=[s.seed for s in seqs],
            steps=[s.num_output_tokens for s in seqs],
            output_ids=[s.output_ids for s in seqs] if needs_history else None,
            prompt_ids=[s.token_ids[:s.num_prompt_tokens] for s in seqs] if tensors.any_repetition else None,
            banned=banned,
            num_logprobs=max(p.logprobs for p in params),
        )

    def _emit(self, seqs: list[Sequence], out) -> None:
        token_ids = out.token_ids.tolist()
        chosen_lp = out.logprobs.tolist() if any(s.params.logprobs for s in seqs) else None
        top_ids = out.top_ids.tolist() if out.top_ids is not None else None
        top_lp = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        now = time.monotonic()
        per_request: dict[str, list[Event]] = {}
        for row, (seq, token) in enumerate(zip(seqs, token_ids, strict=True)):
            state = seq.request
            params = seq.params
            first = seq.num_output_tokens == 0
            seq.token_ids.append(token)
            produced = seq.num_output_tokens
            is_stop_token = token in state.stop_ids
            reason: FinishReason | None = None
            text = seq.detok.add(token, hide=is_stop_token, check_stop=produced >= params.min_tokens)
            if is_stop_token or seq.detok.stopped:
                reason = "stop"
            elif produced >= params.max_tokens or seq.num_tokens >= self.max_seq_len:
                reason = "length"
            if reason is not None:
                text += seq.detok.flush()
            logprobs = []
            if params.logprobs and chosen_lp is not None:
                n_top = params.logprobs
                logprobs.append(TokenLogprob(
                    token_id=token, text=self._token_text(token), logprob=chosen_lp[row],
                    top=[TopLogprob(t, self._token_text(t), lp)
                         for t, lp in zip(top_ids[row][:n_top], top_lp[row][:n_top], strict=True)
                         if lp != float("-inf")]))
            events = per_request.setdefault(state.request_id, [])
            events.append(Delta(state.request_id, seq.index, [token], text, logprobs))
            if state.timings.first_token is None:
                state.timings.first_token = now
            if reason is not None:
                seq.finish_reason = reason
                self.scheduler.finish(seq)
                events.append(ChoiceFinished(state.request_id, seq.index, reason))
            if first and seq.index == 0 and state.held_choices:
                for held in reversed(state.held_choices):
                    self.scheduler.add(held, front=True)
                state.held_choices = []
        for request_id, events in per_request.items():
            state = self._requests[request_id]
            if state.all_finished:
                self._finish_request(state, events)
            else:
                self._streams[request_id].push(events)

    def _finish_request(self, state: RequestState, events: list[Event]) -> None:
        state.timings.finished = time.monotonic()
        usage = Usage(
            prompt_tokens=len(state.request.prompt_ids),
            completion_tokens=sum(s.num_output_tokens for s in state.sequences),
            cached_tokens=state.cached_tokens,
        )
        events.append(RequestFinished(state.request_id, usage, state.timings))
        del self._requests[state.request_id]
        with self._cond:
            stream = self._streams.pop(state.request_id)
        stream.push(events)

    def _token_bytes(self, token_id: int) -> bytes:
        b = self._token_bytes_cache.get(token_id)
        if b is None:
            b = self._token_bytes_cache[token_id] = self.tokenizer.decode_bytes([token_id])
        return b

    def _token_text(self, token_id: int) -> str:
        return self._token_bytes(token_id).decode("utf-8", errors="replace")


__all__ = ["Engine", "EngineConfig", "RequestStream", "SeqStatus"]
