"""The asyncio client: the same calls as client.Client, awaitable, with async streams.

    async with AsyncClient(api_key=...) as c:
        r = await c.chat([("user", "hi")], model="sol-small")
        stream = c.chat_stream([("user", "hi")], model="sol-small")
        async for chunk in stream:
            print(chunk.text, end="")
        print(stream.usage)
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc

from client.client import backoff_s
from client.params import sampling_pb
from client.tls import ChannelTls, PathLike, open_channel
from client.types import (
    Chunk,
    Completion,
    KeyInfo,
    ModelInfo,
    SolError,
    Usage,
    UsageReport,
    UsageRow,
    default_target,
    messages_pb,
    tool_fields,
)
from proto.sol.v1 import sol_pb2 as pb
from proto.sol.v1 import sol_pb2_grpc as pb_grpc


class AsyncChatStream:
    """`async for` over the chunks; `usage`, `text`, `finish_reasons` fill in as it goes.
    `await cancel()` stops generation and the final chunk still brings the usage."""

    def __init__(self, client: AsyncClient, method, request, timeout: float | None) -> None:
        self._client = client
        self._method = method
        self._request = request
        self._timeout = timeout
        self._call = None
        self.request_id = request.request_id
        self.usage: Usage | None = None
        self.model = ""
        self.version = 0
        self.texts: dict[int, list[str]] = {}
        self.finish_reasons: dict[int, str] = {}
        # Timestamps of each chunk's arrival (time.perf_counter), for latency measurements.
        self.arrivals: list[float] = []

    @property
    def text(self) -> str:
        return "".join(self.texts.get(0, []))

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        attempt = 0
        received = False
        while True:
            self._call = self._method(self._request, metadata=self._client._md(), timeout=self._timeout)
            try:
                async for msg in self._call:
                    received = True
                    self.arrivals.append(time.perf_counter())
                    chunk = Chunk.from_pb(msg)
                    self.model, self.version = chunk.model, chunk.version
                    for d in chunk.deltas:
                        self.texts.setdefault(d.index, []).append(d.text)
                        if d.finish_reason:
                            self.finish_reasons[d.index] = d.finish_reason
                    if chunk.final:
                        self.usage = chunk.usage
                    yield chunk
                return
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.UNAVAILABLE and not received and attempt < self._client.retries:
                    await asyncio.sleep(backoff_s(attempt, self._client.backoff, SolError.from_rpc(err).retry_after_s))
                    attempt += 1
                    continue
                raise SolError.from_rpc(err) from None

    async def cancel(self) -> bool:
        return await self._client.cancel(self.request_id)

    def close(self) -> None:
        if self._call is not None:
            self._call.cancel()


class AsyncClient:
    def __init__(self, target: str | None = None, api_key: str | None = None, admin_key: str | None = None,
                 timeout: float | None = 120.0, retries: int = 3, backoff: float = 0.2, tls: bool | None = None,
                 tls_ca: PathLike | None = None, tls_cert: PathLike | None = None, tls_key: PathLike | None = None,
                 tls_server_name: str | None = None) -> None:
        """TLS settings as for client.Client."""
        self.target = target or default_target()
        self.api_key = api_key if api_key is not None else os.environ.get("SOL_API_KEY")
        self.admin_key = admin_key if admin_key is not None else os.environ.get("SOL_ADMIN_KEY")
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.channel = open_channel(self.target, [("grpc.max_receive_message_length", 16 << 20)],
                                    ChannelTls.resolve(tls, tls_ca, tls_cert, tls_key, tls_server_name), aio=True)
        self.inference = pb_grpc.InferenceStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _md(self, admin: bool = False) -> tuple[tuple[str, str], ...]:
        key = self.admin_key if admin else self.api_key
        return (("authorization", f"Bearer {key}"),) if key else ()

    async def _unary(self, method, request, admin: bool = False, timeout: float | None = None):
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        attempt = 0
        while True:
            left = None if deadline is None else max(0.001, deadline - time.monotonic())
            try:
                return await method(request, metadata=self._md(admin), timeout=left)
            except grpc.RpcError as err:
                wait = backoff_s(attempt, self.backoff, SolError.from_rpc(err).retry_after_s)
                if (err.code() == grpc.StatusCode.UNAVAILABLE and attempt < self.retries
                        and (deadline is None or time.monotonic() + wait < deadline)):
                    await asyncio.sleep(wait)
                    attempt += 1
                    continue
                raise SolError.from_rpc(err) from None

    @staticmethod
    def _request(kind, model: str, request_id: str | None, user: str, params: dict[str, Any], **payload):
        # `priority` is the request's, not a sampling parameter: order among the key's own
        # requests when the server is busy (lower first).
        params = dict(params)
        priority = int(params.pop("priority", 0) or 0)
        return kind(model=model, params=sampling_pb(params), request_id=request_id or uuid.uuid4().hex,
                    user=user, priority=priority, **payload)

    async def chat(self, messages, model: str, request_id: str | None = None, user: str = "",
                   timeout: float | None = None, **params: Any) -> Completion:
        params, tools = tool_fields(params)
        req = self._request(pb.ChatCompletionRequest, model, request_id, user, params, messages=messages_pb(messages),
                            **tools)
        return Completion.from_pb(await self._unary(self.inference.ChatCompletion, req, timeout=timeout))

    async def complete(self, prompt: str, model: str, request_id: str | None = None, user: str = "",
                       timeout: float | None = None, **params: Any) -> Completion:
        req = self._request(pb.CompletionRequest, model, request_id, user, params, prompt=prompt)
        return Completion.from_pb(await self._unary(self.inference.Completion, req, timeout=timeout))

    def chat_stream(self, messages, model: str, request_id: str | None = None, user: str = "",
                    timeout: float | None = None, **params: Any) -> AsyncChatStream:
        params, tools = tool_fields(params)
        req = self._request(pb.ChatCompletionRequest, model, request_id, user, params, messages=messages_pb(messages),
                            **tools)
        return AsyncChatStream(self, self.inference.ChatCompletionStream, req, self.timeout if timeout is None else timeout)

    def complete_stream(self, prompt: str, model: str, request_id: str | None = None, user: str = "",
                        timeout: float | None = None, **params: Any) -> AsyncChatStream:
        req = self._request(pb.CompletionRequest, model, request_id, user, params, prompt=prompt)
        return AsyncChatStream(self, self.inference.CompletionStream, req, self.timeout if timeout is None else timeout)

    async def cancel(self, request_id: str) -> bool:
        r = await self._unary(self.inference.CancelRequest, pb.CancelRequestRequest(request_id=request_id))
        return r.cancelled

    async def request_usage(self, request_id: str) -> Usage:
        r = await self._unary(self.inference.GetRequestUsage, pb.GetRequestUsageRequest(request_id=request_id))
        return Usage.from_pb(r.usage)

    async def list_models(self) -> list[ModelInfo]:
        r = await self._unary(self.inference.ListModels, pb.ListModelsRequest())
        return [ModelInfo.from_pb(m) for m in r.models]

    async def count_tokens(self, model: str, messages=None, prompt: str = "") -> int:
        req = pb.CountTokensRequest(model=model, messages=messages_pb(messages or []), prompt=prompt)
        return (await self._unary(self.inference.CountTokens, req)).tokens

    async def create_key(self, name: str, token_budget: int | None = None, rpm: int | None = None,
                         tpm: int | None = None, share: float | None = None,
                         band: str | None = None) -> tuple[str, KeyInfo]:
        req = pb.CreateKeyRequest(name=name, token_budget=token_budget, rpm=rpm, tpm=tpm, share=share, band=band)
        r = await self._unary(self.admin.CreateKey, req, admin=True)
        return r.key, KeyInfo.from_pb(r.info)

    async def update_key(self, key_id: str, share: float | None = None, band: str | None = None) -> KeyInfo:
        req = pb.UpdateKeyRequest(key_id=key_id, share=share, band=band)
        return KeyInfo.from_pb((await self._unary(self.admin.UpdateKey, req, admin=True)).info)

    async def revoke_key(self, key_id: str) -> bool:
        return (await self._unary(self.admin.RevokeKey, pb.RevokeKeyRequest(key_id=key_id), admin=True)).revoked

    async def usage(self, key_id: str = "", model: str = "", from_day: str = "", to_day: str = "") -> UsageReport:
        r = await self._unary(self.admin.GetUsage, pb.GetUsageRequest(key_id=key_id, model=model, from_day=from_day,
                                                                      to_day=to_day), admin=True)
        return UsageReport([UsageRow.from_pb(x) for x in r.rows], UsageRow.from_pb(r.total), r.spooled_records)
