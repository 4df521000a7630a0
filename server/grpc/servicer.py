"""The Inference servicer: the gRPC adapter over the one request path
(`server.inference.InferenceService`). It authenticates from the call's metadata,
maps protobuf messages to the service's types and back, and turns ServiceErrors into
gRPC statuses; one wrapper gives every call the same error mapping and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc

from proto.sol.v1 import sol_pb2 as pb
from proto.sol.v1 import sol_pb2_grpc as pb_grpc
from server import validation
from server.accounting.auth import Authenticator, AuthError
from server.accounting.ledger import KeyInfo
from server.accounting.pricing import PriceBook
from server.call_frame import call_frame
from server.engine.api import TokenLogprob
from server.errors import ServiceError, auth_error, bounded
from server.grpc.tools import message, tool_calls_pb, tools
from server.inference import BilledUsage, ChoiceUpdate, InferenceService, Job
from server.models.manager import LoadedModel
from server.tool_output import ToolStreams, answer


def logprobs_pb(logprobs: list[TokenLogprob]) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=lp.token_id, token=lp.text, logprob=lp.logprob,
                            top=[pb.TopLogprob(token_id=t.token_id, token=t.text, logprob=t.logprob) for t in lp.top])
            for lp in logprobs]


def usage_pb(billed: BilledUsage) -> pb.Usage:
    u = billed.usage
    return pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                    cached_tokens=u.cached_tokens, total_tokens=u.total_tokens, cost=billed.cost)


def delta_pb(update: ChoiceUpdate, streams: ToolStreams | None = None) -> pb.ChoiceDelta:
    """A choice's delta; for a chat request with tools, its content and complete calls as
    the tool-call parser reads them."""
    if streams is None:
        return pb.ChoiceDelta(index=update.index, content=update.text, token_ids=update.token_ids,
                              logprobs=logprobs_pb(update.logprobs), finish_reason=update.finish_reason or "")
    said = streams.update(update)
    return pb.ChoiceDelta(index=update.index, content=said.content or "", token_ids=update.token_ids,
                          logprobs=logprobs_pb(update.logprobs), finish_reason=said.finish_reason or "",
                          tool_calls=tool_calls_pb(said.calls))


def chat_choice_pb(job: Job, i: int) -> pb.ChatChoice:
    said = answer(job, i)
    return pb.ChatChoice(index=i, message=pb.ChatMessage(role="assistant", content=said.content or "",
                                                         tool_calls=tool_calls_pb(said.calls)),
                         finish_reason=said.finish_reason or "abort", logprobs=logprobs_pb(job.choices[i].logprobs),
                         completion_tokens=job.choices[i].tokens)


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
    def __init__(self, service: InferenceService, auth: Authenticator, prices: PriceBook) -> None:
        self.service = service
        self.models = service.models
        self.auth = auth
        self.prices = prices
        self.metrics = service.metrics

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
        async with self.call(context, "CancelRequest"):
            key = await self.authenticate(context)
            return pb.CancelRequestResponse(cancelled=self.service.cancel(key, request.request_id))

    async def GetRequestUsage(self, request, context):
        async with self.call(context, "GetRequestUsage"):
            key = await self.authenticate(context)
            rec = await self.service.billed_usage(key, request.request_id)
            usage = pb.Usage(prompt_tokens=rec.prompt_tokens, completion_tokens=rec.completion_tokens,
                             cached_tokens=rec.cached_tokens, total_tokens=rec.total_tokens, cost=rec.cost)
            return pb.GetRequestUsageResponse(request_id=rec.request_id, model=rec.model, version=rec.version,
                                              usage=usage)

    async def ListModels(self, request, context):
        async with self.call(context, "ListModels"):
            await self.authenticate(context)
            return pb.ListModelsResponse(models=[self.model_info(m) for m in self.models.models()]
                                         + [self.adapter_info(*a) for a in self.models.served_adapters()])

    async def CountTokens(self, request, context):
        async with self.call(context, "CountTokens") as labels:
            await self.authenticate(context)
            model = self.service.resolve(request.model)
            labels["model"] = model.name
            ids = self.service.prompt_ids(model, [message(m) for m in request.messages] or None,
                                          request.prompt or None)
            return pb.CountTokensResponse(tokens=len(ids), max_context=model.max_context)

    # --- shared plumbing ------------------------------------------------------------------
    def model_info(self, m: LoadedModel) -> pb.ModelInfo:
        metrics = flatten_metrics(m.meta.get("metrics") or {})
        price = self.prices.get(m.name)
        return pb.ModelInfo(name=m.name, version=m.version, aliases=self.models.aliases_of(m), stage=m.stage,
                            parent=m.parent, max_context=m.max_context, num_parameters=m.num_parameters,
                            eval_metrics=metrics, loaded_at=m.loaded_at, ready=True,
                            scheduling=m.engine.config.scheduling,
                            price=pb.Price(prompt_per_1k=price.prompt_per_1k,
                                           completion_per_1k=price.completion_per_1k,
                                           cached_discount=price.cached_discount))

    def adapter_info(self, name: str, version: int, base: LoadedModel) -> pb.ModelInfo:
        """A served LoRA adapter: its base as parent, priced under its own name."""
        price = self.prices.get(name)
        return pb.ModelInfo(name=name, version=version, stage="adapter", parent=base.ref, max_context=base.max_context,
                            loaded_at=base.loaded_at, ready=True, scheduling=base.engine.config.scheduling,
                            price=pb.Price(prompt_per_1k=price.prompt_per_1k, completion_per_1k=price.completion_per_1k,
                                           cached_discount=price.cached_discount))

    @contextlib.asynccontextmanager
    async def call(self, context, method: str) -> AsyncIterator[dict[str, str]]:
        """Every RPC's frame (Inference and Admin, unary and streaming; server/call_frame.py):
        yields the metric labels to fill in and turns the ServiceError that leaves it into
        the call's status. Status messages are bounded here, the last guard against a
        message too long for a trailer (which the client would see as RESOURCE_EXHAUSTED)."""
        try:
            async with call_frame(self.metrics, "grpc", method, cancelled=(asyncio.CancelledError, GeneratorExit),
                                  passthrough=(grpc.aio.AbortError,)) as frame:
                yield frame.labels
        except ServiceError as err:
            context.set_trailing_metadata(err.trailing_metadata())
            await context.abort(err.code, bounded(err.message))

    async def authenticate(self, context) -> KeyInfo:
        try:
            return await self.auth.authenticate(context.invocation_metadata())
        except AuthError as err:
            raise auth_error(err) from None

    async def _admit(self, request, context, chat: bool, labels: dict[str, Any], streaming: bool) -> Job:
        key = await self.authenticate(context)
        params = validation.sampling_params(request.params)
        what: dict[str, Any] = ({"messages": [message(m) for m in request.messages], "tools": tools(request)}
                                if chat else {"prompt": request.prompt})
        return await self.service.admit(key, request.model, params, request_id=request.request_id,
                                        labels=labels, streaming=streaming, priority=request.priority, **what)

    async def _unary(self, request, context, method: str, chat: bool):
        job: Job | None = None
        try:
            async with self.call(context, method) as labels:
                job = await self._admit(request, context, chat, labels, streaming=False)
                usage = usage_pb(await self.service.run_to_end(job))
                m = job.model
                if chat:
                    choices = [chat_choice_pb(job, i) for i in range(len(job.choices))]
                    return pb.ChatCompletionResponse(id=job.request_id, model=m.name, version=m.version,
                                                     choices=choices, usage=usage, created=job.created)
                choices = [pb.CompletionChoice(index=i, text=c.text, finish_reason=c.finish,
                                               logprobs=logprobs_pb(c.logprobs), completion_tokens=c.tokens)
                           for i, c in enumerate(job.choices)]
                return pb.CompletionResponse(id=job.request_id, model=m.name, version=m.version, choices=choices,
                                             usage=usage, created=job.created)
        finally:
            self.service.done(job)

    async def _stream(self, request, context, method: str, chat: bool):
        job: Job | None = None
        chunk_type = pb.ChatCompletionChunk if chat else pb.CompletionChunk
        try:
            async with self.call(context, method) as labels:
                job = await self._admit(request, context, chat, labels, streaming=True)
                m = job.model
                streams = ToolStreams(job) if chat else None
                async for updates, finished in self.service.updates(job):
                    chunk = chunk_type(id=job.request_id, model=m.name, version=m.version, created=job.created,
                                       choices=[delta_pb(u, streams) for u in updates])
                    if finished is not None:
                        chunk.usage.CopyFrom(usage_pb(await self.service.bill(job, finished)))
                        chunk.final = True
                    if chunk.choices or chunk.final:
                        yield chunk
                    if finished is not None:
                        self.service.raise_if_failed(finished)
        finally:
            self.service.done(job)
