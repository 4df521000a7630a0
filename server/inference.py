"""The one request path behind every protocol adapter (the gRPC servicer; an HTTP route
speaks through the same calls):

    model -> validation -> chat template + tokenizer -> idempotency -> quota -> engine
          -> output processor -> choices (+ usage) -> ledger and metrics

Every request the engine accepted is billed exactly once with the usage the output kept,
whether it finished, was cancelled (CancelRequest: the stream then ends normally with
usage), lost its client (disconnect, deadline: the engine request is aborted and
billed in the background), or was ended by the server (its key revoked, the drain's
grace period over: billed, then the ServiceError that says why ends the call). A
streaming request's usage so far is written ahead (checkpointed) every
`metering_tokens` tokens or `metering_interval_s` seconds, before those tokens go out,
so a crash leaves fewer than `metering_tokens` delivered tokens per request unbilled.
Errors are ServiceErrors: a status and a message that says what to change; adapters
translate them to their protocol.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from gpt.chat import ChatTemplateError, Message, chat_prompt_ids, render_chat
from gpt.lora import AdapterError
from gpt.quoting import quote
from gpt.registry import ModelNotFound, RegistryError
from server import validation
from server.accounting.accountant import Accountant
from server.accounting.ledger import KeyInfo, Price, StoreUnavailable, UsageRecord, utc_day
from server.accounting.pricing import PriceBook
from server.accounting.quota import QuotaGate
from server.compile_slots import CompileSlots
from server.config import ServerConfig
from server.engine.adapter_slots import AdapterRef
from server.engine.api import (
    BAND_INTERACTIVE,
    BANDS,
    ChoiceFinished,
    EngineOverloaded,
    EngineRequest,
    OutputEvent,
    RequestFinished,
    RequestRejected,
    SamplingParams,
    TenantOverloaded,
    TextDelta,
    TokenLogprob,
    Usage,
)
from server.engine.grammar import CompiledGrammar, GrammarError, constraint_key
from server.engine.output import OutputProcessor
from server.engine.stream import RequestStream
from server.errors import ServiceError, exhausted, invalid, not_found, unavailable
from server.metrics import ServiceMetrics
from server.models.manager import LoadedModel, ModelManager
from server.tools import ToolRequest, call_format, family_of

log = logging.getLogger("sol.inference")



# Fair share's charge per prompt / generated token when the model has no prices: a
# generated token costs a forward step of its own, a prompt token a share of a batched one.
DEFAULT_TOKEN_COSTS = (1.0, 2.0)


def token_costs(price: Price) -> tuple[float, float]:
    """(input, output) cost of a token against the key's share: the model's price ratio
    when both prices are set (prompt = 1), else DEFAULT_TOKEN_COSTS."""
    if price.prompt_per_1k > 0 and price.completion_per_1k > 0:
        return 1.0, price.completion_per_1k / price.prompt_per_1k
    return DEFAULT_TOKEN_COSTS


@dataclass
class ChoiceUpdate:
    """What one batch of output added to one choice."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class BilledUsage:
    usage: Usage
    cost: float


@dataclass
class ChoiceResult:
    """What one choice of a request has produced so far."""

    pieces: list[str] = field(default_factory=list)          # its text, as it came
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None                         # None while it runs

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def finish(self) -> str:
        """Its finish reason, "abort" for a choice the request ended before it finished."""
        return self.finish_reason or "abort"


@dataclass
class Job:
    """One admitted request on its way through the engine."""

    key: KeyInfo
    model: LoadedModel
    request_id: str                  # the client's id: unique per key, the ledger's key (engine ids differ)
    prompt_ids: list[int]
    params: SamplingParams
    chat: bool
    grammar: CompiledGrammar | None = None
    streaming: bool = True           # the client reads the output as it comes (else all at the end)
    adapter: AdapterRef | None = None  # a LoRA adapter over `model` (the request named the adapter)
    priority: int = 0                # order among the key's own requests (lower first)
    tools: ToolRequest | None = None  # the request's tools: its answers are read for calls
    tool_family: str = ""            # the template family whose call format they are read in
    created: int = field(default_factory=lambda: int(time.time()))
    stream: RequestStream | None = None
    processor: OutputProcessor | None = None
    billed: bool = False
    choices: list[ChoiceResult] = field(default_factory=list)   # params.n of them, by index
    token_times: list[tuple[float, int]] = field(default_factory=list)   # (arrival, tokens) of choice 0's messages
    attempt: str = ""                # this run of the request id, in the ledger
    ended_by: ServiceError | None = None   # the server stopped it (revoked key, drain): the call ends with it
    metered: int = 0                 # output tokens written ahead to the ledger so far
    metered_at: float = field(default_factory=time.monotonic)

    @property
    def billed_model(self) -> str:
        """The name usage, prices and metrics go under: the adapter's when one was named."""
        return self.adapter.name if self.adapter is not None else self.model.name

    def __post_init__(self) -> None:
        if not self.choices:
            self.choices = [ChoiceResult() for _ in range(self.params.n)]

    @property
    def output_tokens(self) -> int:
        return sum(c.tokens for c in self.choices)


class Inflight:
    """Requests running on this server, by (key id, request id): for idempotency,
    cancellation, and the drain on shutdown."""

    def __init__(self) -> None:
        self.jobs: dict[tuple[str, str], Job] = {}
        self.empty = asyncio.Event()
        self.empty.set()

    def add(self, job: Job) -> bool:
        k = (job.key.key_id, job.request_id)
        if k in self.jobs:
            return False
        self.jobs[k] = job
        self.empty.clear()
        return True

    def remove(self, job: Job) -> None:
        if self.jobs.get((job.key.key_id, job.request_id)) is job:
            del self.jobs[(job.key.key_id, job.request_id)]
        if not self.jobs:
            self.empty.set()


class InferenceService:
    def __init__(self, config: ServerConfig, models: ModelManager, quota: QuotaGate, accountant: Accountant,
                 prices: PriceBook, metrics: ServiceMetrics) -> None:
        self.config = config
        self.models = models
        self.quota = quota
        self.accountant = accountant
        self.prices = prices
        self.metrics = metrics
        self.inflight = Inflight()
        self.draining = False
        # Billing of requests whose client went away; awaited before shutdown.
        self.background: set[asyncio.Task] = set()
        # Structured-output compiles run here, never on the event loop or the engine's thread.
        self.grammar_pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="sol-grammar")
        self.compile_slots = CompileSlots(config.grammar_compiles_per_key)
        # Compiles running, by (model version, constraint): a second request for the same
        # constraint waits for the first's compile instead of starting another.
        self._compiling: dict[tuple[str, str], asyncio.Future] = {}

    # --- lookups ------------------------------------------------------------------------------
    def resolve(self, ref: str, checkout: bool = False) -> LoadedModel:
        """The loaded version `ref` names; with `checkout`, counted as in use (hot-load
        retires a version only after its last user released it)."""
        if not ref:
            raise invalid("model is empty: name one, e.g. NAME, NAME:ALIAS or NAME@VERSION "
                          "(ListModels shows what is served)", "model")
        try:
            return self.models.checkout(ref) if checkout else self.models.resolve(ref)
        except ModelNotFound as err:
            raise not_found(str(err), "model") from None
        except RegistryError as err:
            raise invalid(str(err), "model") from None

    def resolve_served(self, ref: str) -> tuple[LoadedModel, AdapterRef | None]:
        """`resolve(ref, checkout=True)`, or a LoRA adapter entry's base with the adapter."""
        if not ref:
            return self.resolve(ref), None
        try:
            return self.models.checkout_served(ref)
        except ModelNotFound as err:
            raise not_found(str(err), "model") from None
        except AdapterError as err:
            raise invalid(f"adapter {quote(ref)} cannot be served: {err}", "model") from None
        except RegistryError as err:
            raise invalid(str(err), "model") from None

    def prompt_ids(self, model: LoadedModel, messages: list[Message] | None, prompt: str | None,
                   add_generation_prompt: bool = True, tools: list[dict] | None = None) -> list[int]:
        """The prompt's token ids: messages through the chat template (with the assistant's
        turn opened unless `add_generation_prompt` is False) and `tools` (OpenAI's tool
        objects) given to the template, or raw text."""
        if messages is not None:
            msgs = validation.messages(messages, self.config.max_messages, self.config.max_prompt_chars)
            extra = {"tools": tools} if tools else {}
            try:
                if add_generation_prompt:
                    return chat_prompt_ids(model.tokenizer, msgs, **extra)
                return render_chat(model.tokenizer, msgs, add_generation_prompt=False, **extra).ids
            except ChatTemplateError as err:
                raise invalid(str(err), "messages") from None
        if prompt is not None:
            return validation.raw_prompt(model.tokenizer, prompt, self.config.max_prompt_chars)
        raise invalid("send messages (rendered with the chat template) or a prompt")

    def tokenize(self, model_ref: str, messages: list[Message] | None = None, prompt: str | None = None,
                 add_generation_prompt: bool = True, labels: dict | None = None,
                 tools: list[dict] | None = None) -> tuple[LoadedModel, list[int]]:
        """(the model, the token ids it would be given): the same template, tokenizer and
        limits as a request's prompt, without running or billing anything."""
        model = self.resolve(model_ref)
        if labels is not None:
            labels["model"] = model.name
        return model, self.prompt_ids(model, messages, prompt, add_generation_prompt, tools)

    def detokenize(self, model_ref: str, tokens: list[int], labels: dict | None = None) -> tuple[LoadedModel, str]:
        """(the model, the text its tokenizer makes of `tokens`); INVALID_ARGUMENT names the
        first id outside the tokenizer's vocabulary."""
        model = self.resolve(model_ref)
        if labels is not None:
            labels["model"] = model.name
        vocab = model.tokenizer.vocab_size
        for i, t in enumerate(tokens):
            if not 0 <= t < vocab:
                raise invalid(f"tokens[{i}] = {t} is not a token id of {model.ref} (its vocabulary is [0, {vocab}))",
                              "tokens")
        return model, model.tokenizer.decode(tokens)

    def token_texts(self, model: LoadedModel, ids: list[int]) -> list[str]:
        """Each token's own text (bytes that are not whole UTF-8 characters become U+FFFD)."""
        return [model.tokenizer.decode_bytes([t]).decode("utf-8", "replace") for t in ids]

    def job(self, key: KeyInfo, request_id: str) -> Job | None:
        return self.inflight.jobs.get((key.key_id, request_id))

    def cancel(self, key: KeyInfo, request_id: str) -> bool:
        """Stop one of this key's running requests; it still ends with its usage."""
        job = self.job(key, request_id)
        if job is None or job.stream is None:
            return False
        job.stream.abort()
        return True

    def end(self, error: ServiceError, key_id: str | None = None) -> int:
        """Stop running requests (one key's, or all) on the server's behalf: each is
        billed for what it generated, then its call ends with `error`. Returns how many."""
        stopped = 0
        for job in list(self.inflight.jobs.values()):
            if (key_id is None or job.key.key_id == key_id) and job.stream is not None and not job.billed \
                    and job.ended_by is None:
                job.ended_by = error
                job.stream.abort()
                stopped += 1
        return stopped

    def end_revoked(self, key_id: str) -> int:
        return self.end(ServiceError(grpc.StatusCode.UNAUTHENTICATED,
                                     f"API key {key_id} was revoked while this request ran: it was stopped and "
                                     "billed for the tokens generated so far; use another key"), key_id)

    async def watch_revocations(self, revoked, interval_s: float) -> None:
        """Every `interval_s`, ask the store (`revoked(key ids)`, fresh, not cached) whether
        a key with running requests here was revoked on another replica, and end them."""
        while True:
            await asyncio.sleep(interval_s)
            key_ids = {job.key.key_id for job in self.inflight.jobs.values() if job.stream is not None}
            if not key_ids:
                continue
            try:
                for key_id in await revoked(key_ids):
                    self.end_revoked(key_id)
            except StoreUnavailable:
                continue
            except Exception:  # noqa: BLE001 - the watch must outlive any store trouble
                log.exception("checking running requests' keys for revocation failed")

    # --- the request path ---------------------------------------------------------------------
    async def admit(self, key: KeyInfo, model_ref: str, params: SamplingParams,
                    messages: list[Message] | None = None, prompt: str | None = None, request_id: str = "",
                    labels: dict | None = None, streaming: bool = True, priority: int = 0,
                    tools: ToolRequest | None = None) -> Job:
        """Everything before the first token: a job running in the engine, or a
        ServiceError. `messages` make a chat request, `prompt` a completion; `streaming`
        False for a client that takes the whole output at the end; `tools` a chat
        request's tools (a forced call becomes the request's grammar)."""
        if self.draining:
            raise unavailable("this server is shutting down and takes no new requests; retry (another "
                              "replica will answer)")
        model, adapter = self.resolve_served(model_ref)
        if labels is not None:
            labels["model"] = adapter.name if adapter is not None else model.name
        admitting = claimed = False
        job: Job | None = None
        try:
            family = ""
            if tools is not None:
                params, family = self._tool_params(model, params, tools)
            ids = self.prompt_ids(model, messages, prompt, tools=tools.template_tools() if tools else None)
            max_tokens_given = params.max_tokens is not None    # else the server chooses, and says so
            params = validation.fit_context(params, len(ids), model.max_context, self.config.default_max_tokens,
                                            "messages" if messages is not None else "prompt")
            validation.check(params, model.vocab_size)
            grammar = await self.compile_grammar(model, params, key.key_id,
                                                 "tools" if tools is not None and tools.forced else "response_format")
            request_id = validation.request_id(request_id) if request_id else uuid.uuid4().hex
            job = Job(key=key, model=model, request_id=request_id, prompt_ids=ids, params=params,
                      chat=messages is not None, grammar=grammar, streaming=streaming, priority=priority,
                      adapter=adapter, tools=tools, tool_family=family)
            if not self.inflight.add(job):
                job = None
                raise ServiceError(grpc.StatusCode.ALREADY_EXISTS, f"request_id {quote(request_id)} is already running; "
                                                                   "wait for it or send a new request_id")
            claim = await self.accountant.claim(key.key_id, request_id)
            if claim == "billed":
                raise ServiceError(grpc.StatusCode.ALREADY_EXISTS,
                                   f"request_id {quote(request_id)} was already served and billed; send a new "
                                   "request_id to generate again")
            if claim == "running":
                raise ServiceError(grpc.StatusCode.ALREADY_EXISTS, f"request_id {quote(request_id)} is already running "
                                                                   "(on another replica); wait for it or send a "
                                                                   "new request_id")
            claimed = True
            job.attempt = self.accountant.new_attempt()
            estimate = len(ids) + params.max_tokens * params.n
            admitting = True
            admission = await self.quota.admit(key, request_id, estimate, max_tokens=params.max_tokens,
                                               n=params.n, max_tokens_given=max_tokens_given)
            if not admission.admitted:
                admitting = False
                raise exhausted(admission.reason, admission.retry_after_s)
            self._submit(job)
        except BaseException:
            model.release()
            if job is not None:
                self.inflight.remove(job)
            if admitting:
                # Admitted (or possibly admitted: the caller left mid-call) but never run:
                # give the budget reservation back, off this cancelled task.
                self._spawn(self.quota.release(key, job.request_id))
            if claimed:
                self._spawn(self.accountant.unclaim(key.key_id, job.request_id))
            raise
        return job

    def _tool_params(self, model: LoadedModel, params: SamplingParams,
                     tools: ToolRequest) -> tuple[SamplingParams, str]:
        """(the parameters, with a forced call's grammar as their response_format; the
        template family the calls are written in: the model's, or --tool-parser's).
        INVALID_ARGUMENT when the model's template has no call format, or a forced call
        meets a response_format."""
        chosen = self.config.tool_parser
        family = family_of(model.tokenizer) if chosen == "auto" else chosen
        if family is None:
            if tools.parsed:
                raise invalid(f"model {model.ref}'s chat template has no tool-call format sol can read "
                              "(Hermes <tool_call>, Llama 3 JSON or Mistral [TOOL_CALLS]); send tool_choice "
                              "\"none\" or no tools", "tools")
            return params, ""
        if tools.forced:
            if params.response_format is not None and params.response_format.constrained:
                raise invalid(f"tool_choice {tools.choice if tools.choice != 'function' else tools.function!r} "
                              "forces a tool call, which cannot also follow response_format; drop one",
                              "response_format")
            params.response_format = call_format(tools, family)
        return params, family

    async def compile_grammar(self, model: LoadedModel, params: SamplingParams,
                              key_id: str = "", param: str = "response_format") -> CompiledGrammar | None:
        """The request's response_format compiled for the model: from the model's cache at
        once, else in the grammar pool within the compile timeout, within the key's share
        of the pool (RESOURCE_EXHAUSTED beyond it). INVALID_ARGUMENT names what is wrong
        with a schema, regex or grammar, the limit it is past, or says the compile took
        too long."""
        fmt = params.response_format
        if fmt is None or not fmt.constrained:
            return None
        hit = model.cached_grammar(fmt)
        if hit is not None:
            return hit
        running = (model.ref, constraint_key(fmt))
        compiling = self._compiling.get(running)
        if compiling is None:
            if not self.compile_slots.take(key_id):
                raise exhausted(f"this API key already has {self.compile_slots.per_key} response_format compile(s) "
                                "running; wait for them to finish (or reuse a schema already compiled)", 1.0)

            def compile_off_loop() -> CompiledGrammar | None:
                try:
                    return model.grammars().compile(fmt)
                finally:
                    # In the worker's thread, when the work ends (even past a waiter's timeout).
                    self.compile_slots.give(key_id)

            compiling = asyncio.wrap_future(self.grammar_pool.submit(compile_off_loop))
            self._compiling[running] = compiling

            def forget(f: asyncio.Future) -> None:
                if self._compiling.get(running) is f:
                    del self._compiling[running]
                if not f.cancelled():
                    f.exception()             # retrieved: its waiters may all have timed out

            compiling.add_done_callback(forget)
        timeout = self.config.grammar_compile_timeout_s
        try:
            # Shielded: one waiter's timeout or cancel must not cancel a compile that others await.
            return await asyncio.wait_for(asyncio.shield(compiling), timeout)
        except GrammarError as err:
            raise invalid(str(err) if param == "response_format" else
                          f"the tools' parameter schemas cannot be enforced: {err}", param) from None
        except TimeoutError:
            # The compile finishes in its thread (and lands in the cache); this request does
            # not wait for it.
            raise invalid(f"response_format {fmt.type} took longer than {timeout:g} s to compile; simplify the "
                          "schema, regex or grammar", param) from None

    def _submit(self, job: Job) -> None:
        model = job.model
        eos = model.stop_ids if job.chat else model.tokenizer.eos_ids
        if job.streaming or job.params.stop:
            buffered, interval = self.config.stream_buffer_tokens, self.config.stream_interval
        else:
            # The whole output goes out at the end, so nothing is gained by waking the reader
            # per token, nor by pausing the request for it: it reads everything at once.
            # Stop strings need it to read as the tokens come (it finds them, and stops the
            # engine), so such a request keeps the streaming settings.
            buffered, interval = None, job.params.max_tokens * job.params.n + 1
        input_cost, output_cost = token_costs(self.prices.get(job.billed_model))
        # The engine's own id for the request: unique across keys (two keys may both send
        # request id "1"), never shown to clients; job.request_id is the client's.
        request = EngineRequest(request_id=uuid.uuid4().hex, prompt_ids=job.prompt_ids, params=job.params,
                                eos_token_ids=eos, max_buffered_tokens=buffered, stream_interval=interval,
                                grammar=job.grammar, tenant=job.key.key_id, tenant_weight=job.key.share,
                                tenant_band=BANDS.get(job.key.band, BAND_INTERACTIVE), priority=job.priority,
                                input_cost=input_cost, output_cost=output_cost, adapter=job.adapter)
        try:
            job.stream = model.engine.submit(request)
        except RequestRejected as err:
            raise invalid(str(err)) from None
        except TenantOverloaded:
            raise exhausted(f"key {job.key.key_id} has {self.config.engine.max_waiting_per_tenant} requests waiting for "
                            f"model {model.ref} (--max-waiting-per-key); retry when some have started",
                            1.0) from None
        except EngineOverloaded as err:
            raise exhausted(f"model {model.ref} is overloaded ({err}); retry with backoff", 1.0) from None
        except ValueError as err:
            raise invalid(str(err)) from None
        job.processor = OutputProcessor(request, model.texts, job.stream.abort_choice)

    async def updates(self, job: Job) -> AsyncIterator[tuple[list[ChoiceUpdate], RequestFinished | None]]:
        """The job's output in batches: whatever the engine has ready is taken at once (a
        slow reader catches up in one message instead of one per token), run through the
        output processor and folded into the job. Yields (per-choice updates in index
        order, the end of the request or None)."""
        stream, processor = job.stream, job.processor
        assert stream is not None and processor is not None
        finished = None
        while batch := await stream.next_batch():
            updates, finished = self._absorb(job, processor.process(batch))
            if finished is not None and job.ended_by is not None:
                # Stopped by the server: what came with the end still goes out, then the
                # bill, then the reason.
                if updates:
                    yield updates, None
                await self.bill(job, finished)
                raise job.ended_by
            if finished is None and job.streaming:
                await self._meter(job)
            yield updates, finished
        if finished is None:
            # An engine that closed the stream without its end (it failed): the caller must
            # hear it, not see a normal end (an HTTP stream's [DONE]).
            raise ServiceError(grpc.StatusCode.INTERNAL, f"model {job.model.ref} stopped this request without "
                                                         "finishing it; retry the request")

    async def _meter(self, job: Job) -> None:
        """Write the job's usage so far ahead to the ledger when `metering_tokens` new
        output tokens or `metering_interval_s` seconds have passed since the last write,
        before the adapter sends them: a crash then leaves fewer than metering_tokens of
        what the client received unbilled. (Unary requests are not written ahead: their
        client receives nothing before the end.)"""
        done = job.output_tokens
        now = time.monotonic()
        if done <= job.metered or (done - job.metered < self.config.metering_tokens
                                   and now - job.metered_at < self.config.metering_interval_s):
            return
        job.metered, job.metered_at = done, now
        await self.accountant.checkpoint(self._record(job, len(job.prompt_ids), done, 0))

    def _record(self, job: Job, prompt: int, completion: int, cached: int) -> UsageRecord:
        # An adapter is metered and priced under its own name (and version).
        name = job.billed_model
        version = job.adapter.version if job.adapter is not None else job.model.version
        cost = self.prices.get(name).cost(prompt, completion, cached)
        return UsageRecord(key_id=job.key.key_id, request_id=job.request_id, model=name, version=version,
                           prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached, cost=cost,
                           day=utc_day(), attempt=job.attempt)

    def _absorb(self, job: Job, events: list[OutputEvent]) -> tuple[list[ChoiceUpdate], RequestFinished | None]:
        updates: dict[int, ChoiceUpdate] = {}
        finished = None
        now = time.monotonic()
        for ev in events:
            if isinstance(ev, TextDelta):
                u = updates.setdefault(ev.index, ChoiceUpdate(ev.index))
                u.text += ev.text
                u.token_ids.extend(ev.token_ids)
                u.logprobs.extend(ev.logprobs)
                result = job.choices[ev.index]
                result.pieces.append(ev.text)
                result.logprobs.extend(ev.logprobs)
                result.tokens += len(ev.token_ids)
                if ev.index == 0 and ev.token_ids:
                    job.token_times.append((now, len(ev.token_ids)))
            elif isinstance(ev, ChoiceFinished):
                updates.setdefault(ev.index, ChoiceUpdate(ev.index)).finish_reason = ev.finish_reason
                job.choices[ev.index].finish_reason = ev.finish_reason
            elif isinstance(ev, RequestFinished):
                finished = ev
        return [updates[i] for i in sorted(updates)], finished

    async def run_to_end(self, job: Job) -> BilledUsage:
        """Wait for the whole output (unary calls) and bill it."""
        finished = None
        async for _, f in self.updates(job):
            finished = f or finished
        assert finished is not None
        billed = await self.bill(job, finished)
        self.raise_if_failed(finished)
        return billed

    @staticmethod
    def raise_if_failed(finished: RequestFinished) -> None:
        """A request the engine ended for its own input's sake (a structured output past
        the grammar limits mid-answer) ends as an error, once billed: INVALID_ARGUMENT,
        since sending it again fails again."""
        if finished.error:
            raise invalid(finished.error)

    async def bill(self, job: Job, finished: RequestFinished) -> BilledUsage:
        """The end of a request, once: its model version is no longer needed, its usage
        goes to the ledger and the key's quota, its timings to the metrics."""
        u = finished.usage
        rec = self._record(job, u.prompt_tokens, u.completion_tokens, u.cached_tokens)
        if not job.billed:
            job.billed = True
            # Released before the ledger write, which may wait on its store: a retired version
            # closes its engine without waiting for the bill.
            job.model.release()
            await self._charge(job, rec, u.total_tokens)
            self.metrics.observe_finished(rec.model, finished.timings, u, [c.finish_reason for c in job.choices if c.finish_reason], job.token_times,
                                          rec.cost)
        return BilledUsage(u, rec.cost)

    async def _charge(self, job: Job, rec: UsageRecord, total_tokens: int) -> None:
        """The request's usage in the ledger and in its key's token-rate quota."""
        await self.accountant.record(rec)
        self.quota.note_usage(job.key.key_id, total_tokens, job.request_id)

    async def billed_usage(self, key: KeyInfo, request_id: str):
        """The ledger's record of one of this key's requests."""
        try:
            rec = await self.accountant.lookup(key.key_id, request_id)
        except StoreUnavailable:
            raise unavailable("the ledger store is unreachable; retry shortly") from None
        if rec is None:
            running = self.job(key, request_id) is not None
            raise not_found(f"request {quote(request_id)} is " + (
                "still running; ask again when it ends" if running else
                "not billed to this key (unknown, refused before admission, or older than the ledger keeps)"))
        return rec

    def done(self, job: Job | None) -> None:
        """The adapter is finished with `job` (answered, failed or cut off): a request
        whose output was not billed yet is aborted and billed in the background."""
        if job is None:
            return
        if job.billed or job.stream is None:
            self.inflight.remove(job)
            return
        self._spawn(self._abandon(job))

    async def _abandon(self, job: Job) -> None:
        try:
            if job.stream is None or job.billed:
                return
            job.stream.abort()
            finished = None
            async for _, f in self.updates(job):
                finished = f or finished
            if finished is not None:
                await self.bill(job, finished)
        except ServiceError:
            pass                    # ended by the server (revoked, drain): billed before it raised
        except Exception:  # noqa: BLE001 - background task: log, never lose the loop
            log.exception("billing an abandoned request failed")
        finally:
            self.inflight.remove(job)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
