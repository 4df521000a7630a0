"""The Engine core: one step loop, requests in and token events out.

Callers (the service, evaluation, training rollouts) `submit` a request from any thread
or asyncio loop and read its RequestStream. Submissions and aborts go through an inbox
that the step loop drains between steps, so every piece of scheduling state is touched
by the stepping thread only and needs no lock. The loop runs on the engine's own thread
(serving) or on the caller's thread through `run_until_idle` (training, evaluation).

The core works in token ids: text (detokenisation, stop strings, log-prob text) is the
output processor's job, on the reader's side (`server.engine.output`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import secrets
import sys
import threading
import time
from collections import deque

import torch

from gpt import fused_ops
from gpt.allocator import keep_freed_memory
from gpt.lora_batch import LoraStack
from gpt.model import GPT
from gpt.openmp import release_thread_pool
from server.engine.adapter_slots import AdapterSlots
from server.engine.api import (
    DEFAULT_MAX_TOKENS,
    ChoiceFinished,
    Delta,
    EngineOverloaded,
    EngineRequest,
    EngineStats,
    Event,
    RequestFinished,
    RequestRejected,
    RequestTimings,
    TenantOverloaded,
    TokenLogprob,
    TopLogprob,
    Usage,
    stop_token_ids,
)
from server.engine.block_manager import BlockManager
from server.engine.config import EngineConfig, kv_pool_blocks, resolve_device_dtype
from server.engine.kv_cache import PagedKVCache
from server.engine.paged_attention import use_in_place
from server.engine.runner import ModelRunner
from server.engine.sampler import SampleOutput, derive_seed
from server.engine.sampling_batch import SamplingBatch
from server.engine.scheduler import Scheduler
from server.engine.sequence import RequestState, Sequence
from server.engine.stream import RequestStream, Wakeups

log = logging.getLogger(__name__)

# A threaded engine shares the GIL with its readers (an event loop answering a step's
# streams in one burst). With CPython's default 5 ms switch interval the stepping thread,
# between two torch ops, waited up to that long for it. Measured (`small` fp32, 32
# streaming clients, 2 cores): decode steps 39 ms plus ~5 ms waiting between steps at
# 5 ms; 38.5 ms and 0.2 ms at 1 ms; 580 -> 640 tok/s.
READER_GIL_SWITCH_INTERVAL_S = 0.001


class Engine:
    def __init__(self, model: GPT, config: EngineConfig | None = None, start: bool = True) -> None:
        self.config = config = config or EngineConfig()
        keep_freed_memory()
        self.device, self.dtype = resolve_device_dtype(config)
        param = next(model.parameters())
        if param.device != self.device or param.dtype != self.dtype:
            # Convert a copy: the caller's model (a training policy, say) stays as it was.
            model = copy.deepcopy(model).to(device=self.device, dtype=self.dtype)
        # On the same device and dtype the engine runs the caller's module itself: a
        # training policy updated in place is what the next rollout samples from.
        self.model = model.eval()
        mc = model.config
        self.max_seq_len = mc.max_seq_len
        self.vocab_size = mc.vocab_size
        num_blocks = kv_pool_blocks(mc, config, self.dtype)
        in_place = use_in_place(config.attention, self.device, config.kernel_arch)
        if self.device.type == "cpu":
            # The model's fused elementwise kernels, built for the same target as attention's
            # (the model would otherwise build them for this machine on its first forward).
            fused_ops.available(config.kernel_arch)
        log.debug("attention over the KV pool: %s", "in-place kernel" if in_place else "gathered copies + SDPA")
        self.cache = PagedKVCache(mc, num_blocks, config.block_size, self.device, self.dtype, in_place=in_place)
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(config, self.blocks, self.max_seq_len)
        self.runner = ModelRunner(self.model, self.cache)
        self._requests: dict[str, RequestState] = {}
        # Requests with n > 1, whose held choices count as waiting (a set, not a pass over
        # every request each step).
        self._multi_choice: set[str] = set()
        self._streams: dict[str, RequestStream] = {}
        self._inbox: deque[tuple[str, object]] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._num_waiting_hint = 0
        # Requests per tenant submitted and not yet scheduled (max_waiting_per_tenant).
        self._tenant_waiting: dict[str, int] = {}
        self._sampling: SamplingBatch | None = None    # the last batch's sampling inputs
        # Asyncio readers woken once per loop after each step's pushes (see stream.py).
        self._wakeups = Wakeups()
        self.thread: threading.Thread | None = None
        if start:
            self.start()

    # --- public API (any thread) ----------------------------------------------------------
    def start(self) -> None:
        if self.thread is None:
            # From here on the stepping thread does the CPU work: the OpenMP workers that
            # this thread kept from loading and converting the model would only make
            # libgomp put the stepping thread's own workers to sleep between ops.
            release_thread_pool()
            sys.setswitchinterval(min(sys.getswitchinterval(), READER_GIL_SWITCH_INTERVAL_S))
            self.thread = threading.Thread(target=self._loop, name="sol-engine", daemon=True)
            self.thread.start()

    def submit(self, request: EngineRequest) -> RequestStream:
        """Queue a request; its events arrive on the returned stream. Parameters are the
        service's to validate; the engine refuses only what it alone can judge: ValueError
        for a prompt its model cannot read, RequestRejected when the request can never fit,
        EngineOverloaded when the queue is full."""
        return self.submit_many([request])[0]

    def submit_many(self, requests: list[EngineRequest]) -> list[RequestStream]:
        """Queue requests together, all or none (refused as `submit` refuses): the next
        step sees every one of them. Submitted one by one, a stepping thread woken by the
        first may start a step with only the first few, and the rest wait a whole prefill
        for theirs."""
        for request in requests:
            self._check(request)
        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("request ids must differ within one submission")
        streams = [RequestStream(r.request_id, self.abort,
                                 r.max_buffered_tokens * r.params.n if r.max_buffered_tokens else None, self.resume,
                                 r.stream_interval)
                   for r in requests]
        with self._cond:
            if self._stopping:
                raise EngineOverloaded("the engine is shutting down")
            for request_id in ids:
                if request_id in self._streams:
                    raise ValueError(f"request id {request_id!r} is already in flight")
            if self._num_waiting_hint + len(requests) > self.config.max_waiting:
                raise EngineOverloaded(f"{self._num_waiting_hint} requests are waiting; retry later")
            if self.config.max_waiting_per_tenant:
                self._count_tenant_waiting(requests)
            self._num_waiting_hint += len(requests)
            now = time.monotonic()
            for request, stream in zip(requests, streams, strict=True):
                self._streams[request.request_id] = stream
                self._inbox.append(("submit", (request, now)))
            self._cond.notify()
        return streams

    def _count_tenant_waiting(self, requests: list[EngineRequest]) -> None:
        """(Under self._cond.) Refuse the submission when it would take a tenant past
        max_waiting_per_tenant requests not yet scheduled; else count them."""
        bound = self.config.max_waiting_per_tenant
        adding: dict[str, int] = {}
        for r in requests:
            adding[r.tenant] = adding.get(r.tenant, 0) + 1
        for tenant, n in adding.items():
            have = self._tenant_waiting.get(tenant, 0)
            if have + n > bound:
                raise TenantOverloaded(f"tenant {tenant or '(default)'} has {have} requests waiting (at most {bound} "
                                       "per tenant); retry when some have started")
        for tenant, n in adding.items():
            self._tenant_waiting[tenant] = self._tenant_waiting.get(tenant, 0) + n

    def _tenants_started(self, tenants: list[str]) -> None:
        """Requests of these tenants left the waiting count (scheduled, or finished unscheduled)."""
        with self._cond:
            for tenant in tenants:
                left = self._tenant_waiting.get(tenant, 0) - 1
                if left > 0:
                    self._tenant_waiting[tenant] = left
                else:
                    self._tenant_waiting.pop(tenant, None)

    def abort(self, request_id: str, index: int | None = None) -> None:
        """Stop a request, or one choice of it; blocks are freed before the next step."""
        with self._cond:
            self._inbox.append(("abort", (request_id, index)))
            self._cond.notify()

    def resume(self, request_id: str) -> None:
        """The reader caught up with a paused request: schedule it again."""
        with self._cond:
            self._inbox.append(("resume", (request_id,)))
            self._cond.notify()

    def run_until_idle(self) -> None:
        """Synchronous mode (an engine made with start=False, e.g. for training rollouts
        and evaluation): run steps on the calling thread until every submitted request
        has finished. Streams are then complete and can be read without blocking."""
        while self.run_step():
            pass

    def run_step(self) -> bool:
        """One iteration of the synchronous mode: take what was submitted or aborted, run
        one step, wake the readers. False, with nothing run, once every submitted request
        has finished."""
        if self.thread is not None:
            raise RuntimeError("run_until_idle and run_step are for an engine without its own thread (start=False)")
        with self._cond:
            inbox = list(self._inbox)
            self._inbox.clear()
        self._apply(inbox)
        self._wakeups.flush()
        if not self.scheduler.has_work():
            with self._cond:
                # The thread's loop keeps this count; here nothing waits once idle.
                self._num_waiting_hint = len(self._inbox)
            return False
        try:
            self.step()
        finally:
            self._wakeups.flush()
        return True

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix block: call it, while idle, after the model's weights
        changed in place (a training step), since cached keys/values came from the old ones."""
        self.blocks.reset_prefix_cache()

    def stats(self, top_tenants: int = 0) -> EngineStats:
        """Counts for gauges (any thread; a reading of state the stepping thread moves,
        so figures may be a step apart), with the `top_tenants` tenants that have the
        most sequences in the engine under fair share."""
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=self._num_waiting_hint,
            kv_blocks_total=self.blocks.num_blocks,
            kv_blocks_used=self.blocks.num_used,
            prefix_cache_queries=self.blocks.queries,
            prefix_cache_hits=self.blocks.hits,
            preemptions=self.scheduler.num_preemptions,
            paused=len(self.scheduler.paused),
            policy=self.scheduler.policy.name,
            tenants=self.scheduler.policy.tenant_stats(top_tenants) if top_tenants > 0 else [],
            running_adapters=self.scheduler.adapters.running() if self.scheduler.adapters is not None else [],
            waiting_adapters=self.scheduler.waiting_adapters(),
            max_loras=self.config.max_loras,
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

    def _check(self, request: EngineRequest) -> None:
        if not request.request_id:
            raise ValueError("request_id must not be empty")
        if request.stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1 (got {request.stream_interval})")
        if not request.tenant_weight > 0 or request.input_cost < 0 or request.output_cost < 0:
            raise ValueError(f"tenant_weight must be > 0 (got {request.tenant_weight}) and token costs >= 0 "
                             f"(got {request.input_cost}, {request.output_cost})")
        prompt = request.prompt_ids
        if not prompt:
            raise ValueError("the prompt is empty")
        # An id outside the embedding would fail the whole step, and every request in it.
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        if request.params.max_tokens is None:
            # Unset: the engine's default, capped by the room the context leaves (the
            # service resolves it against its own default before it submits).
            room = max(1, self.max_seq_len - len(prompt))
            request.params = dataclasses.replace(request.params, max_tokens=min(DEFAULT_MAX_TOKENS, room))
        total = len(prompt) + request.params.max_tokens
        if total > self.max_seq_len:
            raise RequestRejected(
                f"prompt ({len(prompt)} tokens) + max_tokens ({request.params.max_tokens}) = {total} exceeds "
                f"the model's context of {self.max_seq_len} tokens; shorten the prompt or lower max_tokens")
        if request.adapter is not None:
            spec = request.adapter.weights.spec
            if spec.rank > self.config.max_lora_rank:
                raise ValueError(f"adapter {request.adapter.name} has rank {spec.rank}, above this engine's "
                                 f"max_lora_rank of {self.config.max_lora_rank} (--max-lora-rank)")
        fmt = request.params.response_format
        if fmt is not None and fmt.constrained and request.grammar is None:
            raise ValueError("response_format needs its grammar compiled first (EngineRequest.grammar, from "
                             "server.engine.grammar.GrammarCompiler)")
        if request.grammar is not None and request.grammar.vocab_size != self.vocab_size:
            raise ValueError(f"the grammar was compiled for a vocabulary of {request.grammar.vocab_size} tokens; "
                             f"this model has {self.vocab_size}")
        if self.blocks.blocks_for(total) > self.blocks.num_blocks:
            cap = self.blocks.num_blocks * self.blocks.block_size
            raise RequestRejected(
                f"prompt + max_tokens = {total} tokens exceeds the whole KV cache ({cap} tokens); "
                "shorten the prompt or lower max_tokens")

    # --- the step loop (stepping thread) --------------------------------------------------
    def _apply(self, inbox: list[tuple[str, object]]) -> None:
        for kind, payload in inbox:
            if kind == "submit":
                self._admit(*payload)  # type: ignore[misc]
            elif kind == "abort":
                self._abort_now(*payload)  # type: ignore[misc]
            else:
                self._resume_now(*payload)  # type: ignore[misc]

    def _loop(self) -> None:
        if self.config.threads > 0 and self.device.type == "cpu":
            # The stepping thread's own OpenMP team size (a per-thread setting in libgomp).
            torch.set_num_threads(self.config.threads)
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
                self._wakeups.flush()
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
            self._wakeups.flush()
            # Requests still in the inbox are counted too, so the overload check sees them.
            held = sum(len(self._requests[r].held_choices) for r in self._multi_choice)
            with self._cond:
                self._num_waiting_hint = len(self.scheduler.waiting) + len(self._inbox) + held

    def _admit(self, request: EngineRequest, arrival: float) -> None:
        state = RequestState(request=request, timings=RequestTimings(arrival=arrival),
                             stop_ids=stop_token_ids(request))
        base_seed = request.params.seed if request.params.seed is not None else secrets.randbits(62)
        salt = None
        if request.adapter is not None:
            self._ensure_adapter_slots()
            salt = request.adapter.cache_salt
        for index in range(request.params.n):
            state.sequences.append(Sequence(
                request=state, index=index, token_ids=list(request.prompt_ids),
                num_prompt_tokens=len(request.prompt_ids), seed=derive_seed(base_seed, index),
                grammar=request.grammar.matcher(state.stop_ids) if request.grammar is not None else None,
                cache_salt=salt))
        self._requests[request.request_id] = state
        if request.params.n > 1:
            self._multi_choice.add(request.request_id)
        self.scheduler.add(state.sequences[0])
        # The other choices wait until the first has computed the prompt, then find its
        # full blocks in the prefix cache instead of computing them again.
        state.held_choices = state.sequences[1:]

    def _ensure_adapter_slots(self) -> None:
        """The LoRA stack and its slots, made on the first adapter request: a model never
        asked for an adapter keeps that memory (max_loras slots of every projection's A
        and B at max_lora_rank)."""
        if self.scheduler.adapters is None:
            stack = LoraStack(self.model.config, self.config.max_loras, self.config.max_lora_rank, self.dtype,
                              self.device)
            self.scheduler.adapters = AdapterSlots(stack)
            self.runner.lora_stack = stack
            log.info("LoRA stack made: %d slots of rank %d, %.1f MiB", stack.slots, stack.max_rank,
                     stack.nbytes_per_slot * stack.slots / 2**20)

    def _abort_now(self, request_id: str, index: int | None = None) -> None:
        state = self._requests.get(request_id)
        if state is None:
            return
        events: list[Event] = []
        for seq in state.sequences:
            if (index is None or seq.index == index) and not seq.is_finished:
                if seq in state.held_choices:
                    state.held_choices.remove(seq)
                self.scheduler.finish(seq)
                seq.finish_reason = "abort"
                events.append(ChoiceFinished(request_id, seq.index, "abort"))
        if state.all_finished:
            self._finish_request(state, events)
        elif events:
            self._streams[request_id].push(events, self._wakeups)

    def _resume_now(self, request_id: str) -> None:
        state = self._requests.get(request_id)
        if state is not None:
            for seq in state.sequences:
                self.scheduler.resume(seq)

    def step(self) -> None:
        """One iteration: schedule, run the model, sample, emit token events."""
        plan = self.scheduler.schedule()
        batch = plan.batch
        if not batch:
            return
        if plan.admitted:
            now = time.monotonic()
            started: list[str] = []
            for seq in plan.admitted:
                if seq.request.timings.first_scheduled is None:
                    seq.request.timings.first_scheduled = now
                    started.append(seq.request.request.tenant)
                    if not seq.request.cached_recorded:
                        seq.request.cached_tokens = seq.num_computed
                        seq.request.cached_recorded = True
            if started and self.config.max_waiting_per_tenant:
                self._tenants_started(started)
        logits, sampling_idx = self.runner.execute(batch, plan.decode_only)
        caching, block_size = self.config.enable_prefix_caching, self.blocks.block_size
        for seq, n in batch:
            seq.num_computed += n
            if caching and seq.num_computed // block_size > seq.num_hashed_blocks:
                self.blocks.register_full_blocks(seq)
        if not sampling_idx:
            return
        seqs = [batch[i][0] for i in sampling_idx]
        sampling = self._sampling
        if sampling is None or not sampling.matches(seqs):
            # A decode batch is usually the last step's batch: its sampling inputs are kept.
            sampling = self._sampling = SamplingBatch(seqs, self.vocab_size, logits.device)
        self._emit(seqs, sampling.sample(logits), sampling.want_logprobs)

    def _emit(self, seqs: list[Sequence], out: SampleOutput, want_logprobs: bool) -> None:
        token_ids = out.token_ids.tolist()
        reasons = self.scheduler.postprocess(seqs, token_ids)
        entries = _logprob_entries(seqs, token_ids, out) if want_logprobs else None
        now = time.monotonic()
        # A request of several choices gets one push with all of its rows' events; a
        # single-choice request (most) is delivered from its row.
        per_request: dict[str, list[Event]] = {}
        ended: set[str] = set()       # those with a choice finished in this step
        for row, seq in enumerate(seqs):
            state = seq.request
            request_id = state.request_id
            if state.timings.first_token is None:
                state.timings.first_token = now
            reason = reasons[row]
            delta = Delta(request_id, seq.index, [token_ids[row]], entries[row] if entries else [])
            events: list[Event] = [delta] if reason is None else [delta, ChoiceFinished(request_id, seq.index, reason)]
            if len(state.sequences) == 1:
                self._deliver(state, events, reason is not None)
                continue
            per_request.setdefault(request_id, []).extend(events)
            if reason is not None:
                ended.add(request_id)
        for request_id, events in per_request.items():
            self._deliver(self._requests[request_id], events, request_id in ended)

    def _deliver(self, state: RequestState, events: list[Event], choice_ended: bool) -> None:
        """Push a step's events to the request's stream, or finish the request with them.
        A request still here had a choice running, so it can only end in a step that
        finished one of its choices."""
        if choice_ended and state.all_finished:
            self._finish_request(state, events)
        elif self._streams[state.request_id].push(events, self._wakeups):
            # The reader is a bound behind: stop generating until it catches up.
            for seq in state.sequences:
                if not seq.is_finished and seq not in state.held_choices:
                    self.scheduler.pause(seq)

    def _finish_request(self, state: RequestState, events: list[Event]) -> None:
        state.timings.finished = time.monotonic()
        if state.timings.first_scheduled is None and self.config.max_waiting_per_tenant:
            self._tenants_started([state.request.tenant])
        usage = Usage(
            prompt_tokens=len(state.request.prompt_ids),
            completion_tokens=sum(s.num_output_tokens for s in state.sequences),
            cached_tokens=state.cached_tokens,
        )
        events.append(RequestFinished(state.request_id, usage, state.timings, state.error))
        del self._requests[state.request_id]
        self._multi_choice.discard(state.request_id)
        with self._cond:
            stream = self._streams.pop(state.request_id)
        stream.push(events, self._wakeups)


def _logprob_entries(seqs: list[Sequence], token_ids: list[int], out: SampleOutput) -> list[list[TokenLogprob]]:
    """Each row's chosen-token log-prob with its top alternatives ([] for rows that asked
    for none)."""
    chosen = out.logprobs.tolist()
    top_ids = out.top_ids.tolist() if out.top_ids is not None else None
    top_lp = out.top_logprobs.tolist() if out.top_logprobs is not None else None
    entries: list[list[TokenLogprob]] = []
    for row, seq in enumerate(seqs):
        n_top = seq.params.logprobs
        if not n_top:
            entries.append([])
            continue
        top = [] if top_ids is None or top_lp is None else [
            TopLogprob(t, lp) for t, lp in zip(top_ids[row][:n_top], top_lp[row][:n_top], strict=True)
            if lp != float("-inf")]
        entries.append([TokenLogprob(token_id=token_ids[row], logprob=chosen[row], top=top)])
    return entries


__all__ = ["Engine"]
