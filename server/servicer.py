"""The Inference servicer: one request's path through the service.

    auth -> model -> validation -> chat template + tokenizer -> idempotency -> quota
         -> engine -> response chunks (+ usage) -> ledger and metrics

Every request the engine accepted is billed exactly once with the engine's own usage
(what it computed and generated), whether it finished, was cancelled through
CancelRequest (the stream then ends normally with usage), or lost its client
(disconnect, deadline: the engine request is aborted and billed in the background).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from gpt.registry import ModelNotFound, RegistryError
from proto.sol.v1 import sol_pb2 as pb
from proto.sol.v1 import sol_pb2_grpc as pb_grpc
from server import validation
from server.accounting import Accountant
from server.auth import Authenticator, AuthError
from server.config import ServerConfig
from server.engine.api import (
    ChoiceFinished,
    Delta,
    EngineOverloaded,
    EngineRequest,
    RequestFinished,
    RequestRejected,
    SamplingParams,
)
from server.engine.stream import RequestStream
from server.errors import ServiceError, exhausted, invalid, not_found, unavailable
from server.ledger import KeyInfo, StoreUnavailable, UsageRecord, utc_day
from server.metrics import ServiceMetrics
from server.models import LoadedModel, ModelManager
from server.pricing import PriceBook
from server.quota import QuotaGate

log = logging.getLogger("sol.servicer")

AUTH_CODES = {"unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
              "permission_denied": grpc.StatusCode.PERMISSION_DENIED,
              "unavailable": grpc.StatusCode.UNAVAILABLE}


def auth_error(err: AuthError) -> ServiceError:
    return ServiceError(AUTH_CODES[err.code], str(err), 1.0 if err.code == "unavailable" else None)


@dataclass
class Job:
    """One admitted request on its way through the engine."""

    key: KeyInfo
    model: LoadedModel
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    chat: bool
    created: int = field(default_factory=lambda: int(time.time()))
    stream: RequestStream | None = None
    billed: bool = False
    texts: dict[int, list[str]] = field(default_factory=dict)
    logprobs: dict[int, list[pb.TokenLogprob]] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)
    finish: dict[int, str] = field(default_factory=dict)
    token_times: list[float] = field(default_factory=list)


def _logprobs(delta: Delta) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=lp.token_id, token=lp.text, logprob=lp.logprob,
                            top=[pb.TopLogprob(token_id=t.token_id, token=t.text, logprob=t.logprob) for t in lp.top])
            for lp in delta.logprobs]


class Inflight:
    """Requests running on this server, by (key id, request id): for idempotency,
    CancelRequest, and the drain on shutdown."""

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


def flatten_metrics(tree: Any, prefix: str = "") -> dict[str, float]:
    """The numbers of a checkpoint's eval metrics as dotted keys (`tasks.per_family.add`);
    lists (samples, curves) stay in meta.json."""
    out: dict[str, float] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(flatten_metrics(value, f"{prefix}{key}."))
    elif isinstance(tree, int | float) and not isinstance(tree, bool):
        out[prefix.rstrip(".")] = float(tree)
    return out


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, config: ServerConfig, models: ModelManager, auth: Authenticator, quota: QuotaGate,
                 accountant: Accountant, prices: PriceBook, metrics: ServiceMetrics) -> None:
        self.config = config
        self.models = models
        self.auth = auth
        self.quota = quota
        self.accountant = accountant
        self.prices = prices
        self.metrics = metrics
        self.inflight = Inflight()
        self.draining = False
        # Billing of requests whose client went away; awaited before shutdown.
        self.background: set[asyncio.Task] = set()

    # --- RPCs -----------------------------------------------------------------------------
    async def ChatCompletion(self, request, context):
        return await self._unary(request, context, "ChatCompletion", chat=True)

    async def Completion(self, request, context):
        return await self._unary(request, context, "Completion", chat=False)

    async def ChatCompletionStream(self, request, context):
        async for chunk in self._stream(request, context, "ChatCompletionStream", chat=True):
            yield chunk

    async def CompletionStream(self, request, context):
        async for chunk in self._stream(request, context, "CompletionStream", chat=False):
            yield chunk

    async def CancelRequest(self, request, context):
        async def run(_):
            key = await self._authenticate(context)
            job = self.inflight.jobs.get((key.key_id, request.request_id))
            if job is None or job.stream is None:
                return pb.CancelRequestResponse(cancelled=False)
            job.stream.abort()
            return pb.CancelRequestResponse(cancelled=True)
        return await self._guard(context, "CancelRequest", run)

    async def GetRequestUsage(self, request, context):
        async def run(_):
            key = await self._authenticate(context)
            try:
                rec = await self.accountant.lookup(key.key_id, request.request_id)
            except StoreUnavailable:
                raise unavailable("the ledger store is unreachable; retry shortly") from None
            if rec is None:
                running = (key.key_id, request.request_id) in self.inflight.jobs
                raise not_found(f"request {request.request_id!r} is " + (
                    "still running; ask again when it ends" if running else
                    "not billed to this key (unknown, refused before admission, or older than the ledger keeps)"))
            cost = rec.cost
            usage = pb.Usage(prompt_tokens=rec.prompt_tokens, completion_tokens=rec.completion_tokens,
                             cached_tokens=rec.cached_tokens, total_tokens=rec.total_tokens, cost=cost)
            return pb.GetRequestUsageResponse(request_id=rec.request_id, model=rec.model, version=rec.version,
                                              usage=usage)
        return await self._guard(context, "GetRequestUsage", run)

    async def ListModels(self, request, context):
        async def run(_):
            await self._authenticate(context)
            return pb.ListModelsResponse(models=[self.model_info(m) for m in self.models.models()])
        return await self._guard(context, "ListModels", run)

    async def CountTokens(self, request, context):
        async def run(labels):
            await self._authenticate(context)
            model = self._resolve(request.model)
            labels["model"] = model.name
            if request.messages:
                msgs = validation.messages(request.messages, self.config.max_messages, self.config.max_prompt_chars)
                n = len(validation.chat_prompt(model.tokenizer, msgs))
            elif request.prompt:
                n = len(validation.raw_prompt(model.tokenizer, request.prompt, self.config.max_prompt_chars))
            else:
                raise invalid("send messages (counted with the chat template) or a prompt")
            return pb.CountTokensResponse(tokens=n, max_context=model.max_context)
        return await self._guard(context, "CountTokens", run)

    # --- shared plumbing ------------------------------------------------------------------
    def model_info(self, m: LoadedModel) -> pb.ModelInfo:
        metrics = flatten_metrics(m.meta.get("metrics") or {})
        price = self.prices.get(m.name)
        return pb.ModelInfo(name=m.name, version=m.version, aliases=self.models.aliases_of(m), stage=m.stage,
                            parent=m.parent, max_context=m.max_context, num_parameters=m.num_parameters,
                            eval_metrics=metrics, loaded_at=m.loaded_at, ready=True,
                            price=pb.Price(prompt_per_1k=price.prompt_per_1k,
                                           completion_per_1k=price.completion_per_1k,
                                           cached_discount=price.cached_discount))

    async def _guard(self, context, method: str, run):
        labels = {"model": ""}
        code = grpc.StatusCode.OK
        try:
            return await run(labels)
        except ServiceError as err:
            code = err.code
            context.set_trailing_metadata(err.trailing_metadata())
            await context.abort(err.code, err.message)
        except (asyncio.CancelledError, GeneratorExit):
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as err:
            if isinstance(err, grpc.aio.AbortError):
                raise
            code = grpc.StatusCode.INTERNAL
            ref = uuid.uuid4().hex[:12]
            log.exception("internal error %s in %s", ref, method)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error (ref {ref}); the request was not "
                                                          "completed, retry it")
        finally:
            self.metrics.requests.labels(labels["model"], method, code.name).inc()

    async def _authenticate(self, context) -> KeyInfo:
        try:
            return await self.auth.authenticate(context.invocation_metadata())
        except AuthError as err:
            raise auth_error(err) from None

    def _resolve(self, ref: str, checkout: bool = False) -> LoadedModel:
        """The loaded version `ref` names; with `checkout`, counted as in use (hot-load
        retires a version only after its last user released it)."""
        if not ref:
            raise invalid("model is empty: name one, e.g. NAME, NAME:ALIAS or NAME@VERSION "
                          "(ListModels shows what is served)")
        try:
            return self.models.checkout(ref) if checkout else self.models.resolve(ref)
        except ModelNotFound as err:
            raise not_found(str(err)) from None
        except RegistryError as err:
            raise invalid(str(err)) from None

    async def _admit(self, request, context, chat: bool, labels: dict) -> Job:
        if self.draining:
            raise unavailable("this server is shutting down and takes no new requests; retry (another "
                              "replica will answer)")
        key = await self._authenticate(context)
        model = self._resolve(request.model, checkout=True)
        labels["model"] = model.name
        admitting = claimed = False
        job: Job | None = None
        try:
            params, given = validation.sampling_params(request.params, model.engine.model.config.vocab_size)
            if chat:
                msgs = validation.messages(request.messages, self.config.max_messages, self.config.max_prompt_chars)
                prompt = validation.chat_prompt(model.tokenizer, msgs)
            else:
                prompt = validation.raw_prompt(model.tokenizer, request.prompt, self.config.max_prompt_chars)
            params = validation.fit_context(params, given, len(prompt), model.max_context,
                                            self.config.default_max_tokens)
            request_id = validation.request_id(request.request_id) if request.request_id else uuid.uuid4().hex
            job = Job(key=key, model=model, request_id=request_id, prompt_ids=prompt, params=params, chat=chat)
            if not self.inflight.add(job):
                job = None
                raise ServiceError(grpc.StatusCode.ALREADY_EXISTS, f"request_id {request_id!r} is already running; "
                                                                   "wait for it or send a new request_id")
            claim = await self.accountant.claim(key.key_id, request_id)
            if claim == "billed":
                raise ServiceError(grpc.StatusCode.ALREADY_EXISTS,
                                   f"request_id {request_id!r} was already served and billed; send a new "
                                   "request_id to generate again")
            if claim == "running":
                raise ServiceError(grpc.StatusCode.ALREADY_EXISTS, f"request_id {request_id!r} is already running "
                                                                   "(on another replica); wait for it or send a "
                                                                   "new request_id")
            claimed = True
            estimate = len(prompt) + params.max_tokens * params.n
            admitting = True
            admission = await self.quota.admit(key, request_id, estimate, max_tokens=params.max_tokens,
                                               n=params.n, max_tokens_given=given)
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

    def _submit(self, job: Job) -> None:
        tok = job.model.tokenizer
        eos = job.model.stop_ids if job.chat else [tok.eot_id]
        engine_request = EngineRequest(request_id=uuid.uuid4().hex, prompt_ids=job.prompt_ids, params=job.params,
                                       eos_token_ids=eos)
        try:
            job.stream = job.model.engine.submit(engine_request)
        except RequestRejected as err:
            raise invalid(str(err)) from None
        except EngineOverloaded as err:
            raise exhausted(f"model {job.model.ref} is overloaded ({err}); retry with backoff", 1.0) from None
        except ValueError as err:
            raise invalid(str(err)) from None

    def _absorb(self, job: Job, events) -> tuple[dict[int, pb.ChoiceDelta], RequestFinished | None]:
        """Fold engine events into the job; returns this batch's per-choice deltas."""
        deltas: dict[int, pb.ChoiceDelta] = {}
        finished = None
        now = time.monotonic()
        for ev in events:
            if isinstance(ev, Delta):
                d = deltas.setdefault(ev.index, pb.ChoiceDelta(index=ev.index))
                d.content += ev.text
                d.token_ids.extend(ev.token_ids)
                lps = _logprobs(ev)
                d.logprobs.extend(lps)
                job.texts.setdefault(ev.index, []).append(ev.text)
                job.logprobs.setdefault(ev.index, []).extend(lps)
                job.tokens[ev.index] = job.tokens.get(ev.index, 0) + len(ev.token_ids)
                if ev.index == 0 and ev.token_ids:
                    job.token_times.append(now)
            elif isinstance(ev, ChoiceFinished):
                deltas.setdefault(ev.index, pb.ChoiceDelta(index=ev.index)).finish_reason = ev.finish_reason
                job.finish[ev.index] = ev.finish_reason
            elif isinstance(ev, RequestFinished):
                finished = ev
        return deltas, finished

    async def _events(self, job: Job) -> AsyncIterator[list]:
        """The engine's events in batches: whatever is ready is taken at once, so a
        slow reader catches up in one message instead of one per token."""
        stream = job.stream
        assert stream is not None
        async for ev in stream:
            batch = [ev]
            while not isinstance(batch[-1], RequestFinished):
                try:
                    nxt = stream.get(0)
                except StopIteration:
                    break
                if nxt is None:
                    break
                batch.append(nxt)
            yield batch

    async def _bill(self, job: Job, finished: RequestFinished) -> pb.Usage:
        """Record the engine's usage for this request, once."""
        u = finished.usage
        cost = self.prices.get(job.model.name).cost(u.prompt_tokens, u.completion_tokens, u.cached_tokens)
        if not job.billed:
            job.billed = True
            job.model.release()
            await self.accountant.record(UsageRecord(
                key_id=job.key.key_id, request_id=job.request_id, model=job.model.name, version=job.model.version,
                prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, cached_tokens=u.cached_tokens,
                cost=cost, day=utc_day()))
            self.quota.note_usage(job.key.key_id, u.total_tokens, job.request_id)
            self.metrics.observe_finished(job.model.name, finished.timings, u, job.finish.values(), job.token_times,
                                          cost)
        return pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                        cached_tokens=u.cached_tokens, total_tokens=u.total_tokens, cost=cost)

    async def _abandon(self, job: Job) -> None:
        """The client is gone: abort the engine request and bill what it produced."""
        try:
            if job.stream is None or job.billed:
                return
            job.stream.abort()
            finished = None
            async for batch in self._events(job):
                _, finished = self._absorb(job, batch)
            if finished is not None:
                await self._bill(job, finished)
        except Exception:  # noqa: BLE001 - background task: log, never lose the loop
            log.exception("billing an abandoned request failed")
        finally:
            self.inflight.remove(job)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def _finally(self, job: Job | None) -> None:
        if job is None:
            return
        if job.billed or job.stream is None:
            self.inflight.remove(job)
            return
        self._spawn(self._abandon(job))

    async def _unary(self, request, context, method: str, chat: bool):
        job: Job | None = None

        async def run(labels):
            nonlocal job
            job = await self._admit(request, context, chat, labels)
            finished = None
            async for batch in self._events(job):
                _, f = self._absorb(job, batch)
                finished = f or finished
            assert finished is not None
            usage = await self._bill(job, finished)
            m = job.model
            indices = range(job.params.n)
            if chat:
                choices = [pb.ChatChoice(index=i, message=pb.ChatMessage(role="assistant", content="".join(job.texts.get(i, []))),
                                         finish_reason=job.finish.get(i, "abort"), logprobs=job.logprobs.get(i, []),
                                         completion_tokens=job.tokens.get(i, 0)) for i in indices]
                return pb.ChatCompletionResponse(id=job.request_id, model=m.name, version=m.version, choices=choices,
                                                 usage=usage, created=job.created)
            choices = [pb.CompletionChoice(index=i, text="".join(job.texts.get(i, [])), finish_reason=job.finish.get(i, "abort"),
                                           logprobs=job.logprobs.get(i, []), completion_tokens=job.tokens.get(i, 0))
                       for i in indices]
            return pb.CompletionResponse(id=job.request_id, model=m.name, version=m.version, choices=choices,
                                         usage=usage, created=job.created)

        try:
            return await self._guard(context, method, run)
        finally:
            self._finally(job)

    async def _stream(self, request, context, method: str, chat: bool):
        labels = {"model": ""}
        code = grpc.StatusCode.OK
        job: Job | None = None
        chunk_type = pb.ChatCompletionChunk if chat else pb.CompletionChunk
        try:
            try:
                job = await self._admit(request, context, chat, labels)
            except ServiceError as err:
                code = err.code
                context.set_trailing_metadata(err.trailing_metadata())
                await context.abort(err.code, err.message)
            m = job.model
            async for batch in self._events(job):
                deltas, finished = self._absorb(job, batch)
                chunk = chunk_type(id=job.request_id, model=m.name, version=m.version, created=job.created,
                                   choices=[deltas[i] for i in sorted(deltas)])
                if finished is not None:
                    chunk.usage.CopyFrom(await self._bill(job, finished))
                    chunk.final = True
                if chunk.choices or chunk.final:
                    yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            code = grpc.StatusCode.CANCELLED
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            ref = uuid.uuid4().hex[:12]
            log.exception("internal error %s in %s", ref, method)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error (ref {ref}); retry the request")
        finally:
            self.metrics.requests.labels(labels["model"], method, code.name).inc()
            self._finally(job)
