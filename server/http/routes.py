"""The endpoints: each authenticates from the Authorization header, maps the body onto
the service's call, and shapes the answer; everything else (validation, chat template,
idempotency, quotas, the engine, billing) is `InferenceService`'s, shared with gRPC.

A client that goes away is noticed while it waits: a stream's disconnect cancels the
event generator, a unary call races its run against the connection; either way
`service.done(job)` aborts the engine request and bills what was generated, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, TypeVar

import grpc
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import Receive, Scope, Send

from gpt.registry import RegistryError
from server.accounting.auth import Authenticator, AuthError
from server.accounting.ledger import KeyInfo
from server.accounting.pricing import PriceBook
from server.call_frame import CallFrame, call_frame, count_call, internal_error
from server.errors import ServiceError, auth_error
from server.health import Health
from server.http import responses
from server.http.errors import service_error_body
from server.http.schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorBody,
    HealthBody,
    ModelCard,
    ModelList,
)
from server.http.tokens import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from server.inference import InferenceService, Job

T = TypeVar("T")

# Declared for the OpenAPI document (the "Authorize" scheme); the check itself is the
# Authenticator's, so a missing key gets sol's message, not FastAPI's.
bearer = HTTPBearer(auto_error=False, description="an API key from `sol keys create`")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text} for status, text in (
        (400, "invalid parameter or malformed JSON"), (401, "missing, unknown or revoked API key"),
        (403, "the key may not do this"), (404, "unknown model"), (409, "Idempotency-Key already used"),
        (413, "request body too large"), (429, "budget or rate limit reached; see Retry-After"),
        (503, "draining or no model loaded; retry (another replica will answer)"))}


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


class EventStream(StreamingResponse):
    """Server-sent events with a cleanup that always runs once the response ends, however
    it ends: on a disconnect Starlette cancels the sender, which may leave the generator
    parked at a `yield`, or (a client gone before the first byte) never started, so its
    own `finally` would run at some GC or never. The generator is closed first, so it no
    longer reads the job when `on_close` aborts and bills it."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncGenerator[bytes, None], on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._events = content
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self._events.aclose()
            finally:
                self._on_close()


def request_id(request: Request) -> str:
    """The service's idempotency key: Idempotency-Key, else X-Request-Id, else none (the
    service makes one)."""
    return request.headers.get("idempotency-key") or request.headers.get("x-request-id") or ""


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, unless the client leaves first: then `work` is cancelled and
    ClientGone raised."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task in done:
        return task.result()
    raise ClientGone


class HttpApi:
    def __init__(self, service: InferenceService, auth: Authenticator, prices: PriceBook, health: Health) -> None:
        self.service = service
        self.models = service.models
        self.auth = auth
        self.prices = prices
        self.health = health
        self.metrics = service.metrics

    def count(self, model: str, method: str, code: str) -> None:
        count_call(self.metrics, "http", model, method, code)

    @contextlib.asynccontextmanager
    async def call(self, method: str) -> AsyncIterator[CallFrame]:
        """Every endpoint's frame, as the servicer's `call` is for gRPC (server/call_frame.py);
        the ServiceError that leaves it becomes an error body in the app's handler."""
        async with call_frame(self.metrics, "http", method, cancelled=(asyncio.CancelledError, ClientGone)) as frame:
            yield frame

    async def key(self, request: Request) -> KeyInfo:
        try:
            return await self.auth.authenticate(request.headers.items())
        except AuthError as err:
            raise auth_error(err) from None

    # --- generation ------------------------------------------------------------------------
    async def generate(self, body: ChatCompletionRequest | CompletionRequest, request: Request) -> Response:
        chat = isinstance(body, ChatCompletionRequest)
        method = ("ChatCompletion" if chat else "Completion") + ("Stream" if body.stream else "")
        job: Job | None = None
        streaming = False
        try:
            async with self.call(method) as call:
                key = await self.key(request)
                engine_logprobs, top = body.top_n()
                top_n = top if engine_logprobs else None
                params = body.sampling(engine_logprobs)
                what: dict[str, Any] = ({"messages": [m.message() for m in body.messages],
                                         "tools": body.tool_request()} if chat else {"prompt": body.text()})
                job = await self.service.admit(key, body.model, params, request_id=request_id(request),
                                               labels=call.labels, streaming=body.stream,
                                               priority=body.priority or 0, **what)
                headers = {"x-request-id": job.request_id}
                if body.stream:
                    call.deferred = streaming = True
                    outcome = {"code": "CANCELLED"}     # until the stream says otherwise
                    model, streamed = call.labels["model"], job

                    def close() -> None:
                        self.service.done(streamed)
                        self.count(model, method, outcome["code"])

                    events = self._events(job, chat, top_n, body.include_usage, method, outcome,
                                          body.return_token_ids)
                    return EventStream(events, close, headers={**headers, "cache-control": "no-cache",
                                                               "x-accel-buffering": "no"})
                billed = await until_disconnected(request, self.service.run_to_end(job))
                shape = responses.chat_completion if chat else responses.completion
                return JSONResponse(shape(job, billed, top_n), headers=headers)
        except ClientGone:
            return Response(status_code=499)      # nobody reads it; the job is billed below
        finally:
            if not streaming:
                self.service.done(job)

    async def _events(self, job: Job, chat: bool, top_n: int | None, include_usage: bool, method: str,
                      outcome: dict[str, str], return_token_ids: bool = False) -> AsyncGenerator[bytes, None]:
        """The stream's SSE events; `outcome["code"]` is what the metrics will count (the
        EventStream's close does the counting and the job's end)."""
        chunks = responses.ChunkMaker(job, chat, top_n, return_token_ids)
        try:
            async for updates, finished in self.service.updates(job):
                chunk = chunks.choices(updates)
                if chunk is not None:
                    yield chunk
                if finished is not None:
                    billed = await self.service.bill(job, finished)
                    if include_usage:
                        yield chunks.usage(billed)
                    self.service.raise_if_failed(finished)
            outcome["code"] = "OK"
            yield responses.SSE_DONE
        except ServiceError as err:
            outcome["code"] = err.code.name
            yield responses.sse(service_error_body(err)[1])
        except Exception:
            outcome["code"] = "INTERNAL"
            yield responses.sse(service_error_body(internal_error(method, mid_stream=True))[1])

    # --- models and health -----------------------------------------------------------------
    async def list_models(self, request: Request) -> dict[str, Any]:
        async with self.call("ListModels"):
            await self.key(request)
            cards = [card for m in self.models.models() for card in self._cards(m)]
            # LoRA adapters served over a loaded base, with the base as parent.
            cards += [{"id": name, "object": "model", "created": 0, "owned_by": "sol", "root": base.ref,
                       "parent": base.ref, "sol": {"name": name, "version": version, "stage": "adapter",
                                                   "max_context": base.max_context}}
                      for name, version, base in self.models.served_adapters()]
            return {"object": "list", "data": cards}

    async def retrieve_model(self, model_id: str, request: Request) -> dict[str, Any]:
        """One model card: a listed reference as /v1/models shows it, or any other
        reference the server resolves (NAME:latest) with the card of the version it serves."""
        async with self.call("GetModel") as call:
            await self.key(request)
            try:
                model = self.service.resolve(model_id)
            except ServiceError as err:
                # A malformed id names no model either: OpenAI answers any unknown id with 404.
                raise ServiceError(grpc.StatusCode.NOT_FOUND, err.message, param="model") from None
            call.labels["model"] = model.name
            cards = self._cards(model)
            card = next((c for c in cards if c["id"] == model_id), None)
            return card or {**cards[0], "id": model_id}

    async def request_usage(self, request_id: str, request: Request) -> dict[str, Any]:
        """What one of this key's requests was billed (gRPC's GetRequestUsage): how a client
        that stopped reading a stream learns its usage."""
        async with self.call("GetRequestUsage") as call:
            key = await self.key(request)
            rec = await self.service.billed_usage(key, request_id)
            call.labels["model"] = rec.model
            return {"id": rec.request_id, "object": "sol.request_usage", "model": f"{rec.model}@{rec.version}",
                    "usage": {"prompt_tokens": rec.prompt_tokens, "completion_tokens": rec.completion_tokens,
                              "total_tokens": rec.total_tokens,
                              "prompt_tokens_details": {"cached_tokens": rec.cached_tokens}},
                    "sol": {"cost": rec.cost, "version": rec.version, "request_id": rec.request_id}}

    async def tokenize(self, body: TokenizeRequest, request: Request) -> dict[str, Any]:
        async with self.call("Tokenize") as call:
            await self.key(request)
            model, ids = self.service.tokenize(body.model, add_generation_prompt=body.add_generation_prompt,
                                               labels=call.labels, **body.what())
            out: dict[str, Any] = {"count": len(ids), "max_model_len": model.max_context, "tokens": ids}
            if body.return_token_strs:
                out["token_strs"] = self.service.token_texts(model, ids)
            return out

    async def detokenize(self, body: DetokenizeRequest, request: Request) -> dict[str, Any]:
        async with self.call("Detokenize") as call:
            await self.key(request)
            _, text = self.service.detokenize(body.model, body.tokens, labels=call.labels)
            return {"prompt": text}

    def _cards(self, m) -> list[dict[str, Any]]:
        aliases = self.models.aliases_of(m)
        refs = [m.ref, *(f"{m.name}:{a}" for a in aliases)]
        with contextlib.suppress(ServiceError, RegistryError):
            if self.service.resolve(m.name) is m:       # the bare name serves this version
                refs.append(m.name)
        price = self.prices.get(m.name)
        try:
            created = int(dt.datetime.fromisoformat(m.loaded_at).timestamp())
        except ValueError:
            created = 0
        extra = {"name": m.name, "version": m.version, "stage": m.stage, "aliases": aliases,
                 "max_context": m.max_context, "scheduling": m.engine.config.scheduling,
                 "price": {"prompt_per_1k": price.prompt_per_1k,
                                                         "completion_per_1k": price.completion_per_1k,
                                                         "cached_discount": price.cached_discount}}
        return [{"id": ref, "object": "model", "created": created, "owned_by": "sol", "root": m.ref, "sol": extra}
                for ref in refs]

    def ready(self) -> JSONResponse:
        if self.health.serving:
            return JSONResponse({"status": "serving"})
        reason = "draining" if self.health.draining else "no model loaded yet"
        return JSONResponse({"status": "not_serving", "reason": reason}, status_code=503)


def build_router(api: HttpApi) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/chat/completions", response_model=None, tags=["OpenAI"],
                 responses={200: {"model": ChatCompletionResponse, "description": "the answer (or, with stream, "
                                  "text/event-stream chunks ending with `data: [DONE]`)"}, **ERRORS})
    async def chat_completions(body: ChatCompletionRequest, request: Request, _: Credentials) -> Response:
        """A chat turn: the messages through the model's chat template."""
        return await api.generate(body, request)

    @router.post("/v1/completions", response_model=None, tags=["OpenAI"],
                 responses={200: {"model": CompletionResponse, "description": "the continuation (or, with stream, "
                                  "text/event-stream chunks ending with `data: [DONE]`)"}, **ERRORS})
    async def completions(body: CompletionRequest, request: Request, _: Credentials) -> Response:
        """Continue raw text (base models)."""
        return await api.generate(body, request)

    @router.get("/v1/models", response_model=ModelList, tags=["OpenAI"], responses={401: ERRORS[401]})
    async def models(request: Request, _: Credentials) -> dict[str, Any]:
        """Every reference this server serves: NAME@VERSION, each NAME:ALIAS, and NAME."""
        return await api.list_models(request)

    @router.get("/v1/models/{model_id:path}", response_model=ModelCard, tags=["OpenAI"],
                responses={401: ERRORS[401], 404: ERRORS[404]})
    async def model(model_id: str, request: Request, _: Credentials) -> dict[str, Any]:
        """One model reference (NAME@VERSION, NAME:ALIAS, NAME): the version it serves, its
        stage, aliases, context and price."""
        return await api.retrieve_model(model_id, request)

    @router.get("/v1/requests/{request_id}/usage", tags=["sol"], responses={401: ERRORS[401], 404: ERRORS[404]})
    async def request_usage(request_id: str, request: Request, _: Credentials) -> dict[str, Any]:
        """sol extension: the usage and cost billed for one of this key's requests (its id is
        the response's `id` and `x-request-id`), also for a stream the client stopped; 404
        while it is still running."""
        return await api.request_usage(request_id, request)

    @router.post("/tokenize", response_model=TokenizeResponse, response_model_exclude_none=True, tags=["vLLM"],
                 responses={400: ERRORS[400], 401: ERRORS[401], 404: ERRORS[404]})
    async def tokenize(body: TokenizeRequest, request: Request, _: Credentials) -> dict[str, Any]:
        """vLLM's /tokenize: a prompt or a conversation (through the chat template) as the
        model's token ids, with the model's context; nothing is generated or billed."""
        return await api.tokenize(body, request)

    @router.post("/detokenize", response_model=DetokenizeResponse, tags=["vLLM"],
                 responses={400: ERRORS[400], 401: ERRORS[401], 404: ERRORS[404]})
    async def detokenize(body: DetokenizeRequest, request: Request, _: Credentials) -> dict[str, Any]:
        """vLLM's /detokenize: token ids back to text with the model's tokenizer."""
        return await api.detokenize(body, request)

    @router.get("/health", response_model=HealthBody, tags=["health"])
    async def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @router.get("/ready", response_model=HealthBody, tags=["health"], responses={503: {"model": HealthBody}})
    async def ready() -> JSONResponse:
        """Readiness: a model is loaded and the server is not draining (gRPC health's "" service)."""
        return api.ready()

    return router
