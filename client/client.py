"""The blocking Python client: chat and completion (whole or streamed), models, token
counts, and the Admin calls. Retries UNAVAILABLE only (with backoff, honouring the
server's retry-after), reusing the request id so a retried request is billed once.

    from client import Client
    with Client(api_key="sk-sol-...") as c:
        print(c.chat([{"role": "user", "content": "hi"}], model="sol-small").text)
        for chunk in (stream := c.chat_stream([("user", "hi")], model="sol-small", max_tokens=64)):
            print(chunk.text, end="")
        print(stream.usage)
        # Structured outputs: json_schema= (a dict or JSON text, with strict=), regex=,
        # grammar= (Lark), json_object=True, or response_format= in OpenAI's shape.
        c.chat([("user", "What is 48 + 27? Reply in JSON.")], model="sol-small",
               json_schema={"type": "object", "properties": {"answer": {"type": "integer"}}})
"""

from __future__ import annotations

import os
import random
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc

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


def backoff_s(attempt: int, base: float, retry_after: float | None) -> float:
    """Exponential backoff with full jitter, never sooner than the server asked."""
    delay = random.uniform(0, base * (2 ** attempt))
    return max(delay, retry_after or 0.0)


class ChatStream:
    """Iterates the chunks of one streamed request. `usage`, `text`, `finish_reasons`
    fill in as it goes. `cancel()` stops generation and still delivers the final chunk
    with the usage billed; `close()` drops the connection (billed the same, unseen)."""

    def __init__(self, start: Callable[[], Any], cancel: Callable[[], Any], request_id: str,
                 retries: int, backoff: float) -> None:
        self._start = start
        self._cancel_rpc = cancel
        self.request_id = request_id
        self._retries = retries
        self._backoff = backoff
        self._call = None
        self.usage: Usage | None = None
        self.model = ""
        self.version = 0
        self.texts: dict[int, list[str]] = {}
        self.finish_reasons: dict[int, str] = {}

    @property
    def text(self) -> str:
        return "".join(self.texts.get(0, []))

    def __iter__(self) -> Iterator[Chunk]:
        attempt = 0
        received = False
        while True:
            self._call = self._start()
            try:
                for msg in self._call:
                    received = True
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
                # Only a stream that never started may be retried: a half-delivered answer
                # cannot be resumed, and its usage is already billed.
                if err.code() == grpc.StatusCode.UNAVAILABLE and not received and attempt < self._retries:
                    time.sleep(backoff_s(attempt, self._backoff, SolError.from_rpc(err).retry_after_s))
                    attempt += 1
                    continue
                raise SolError.from_rpc(err) from None

    def cancel(self) -> bool:
        """Ask the server to stop; keep iterating to receive the final chunk and usage."""
        return self._cancel_rpc()

    def close(self) -> None:
        if self._call is not None:
            self._call.cancel()


class Client:
    def __init__(self, target: str | None = None, api_key: str | None = None, admin_key: str | None = None,
                 timeout: float | None = 120.0, retries: int = 3, backoff: float = 0.2,
                 channel: grpc.Channel | None = None, tls: bool | None = None, tls_ca: PathLike | None = None,
                 tls_cert: PathLike | None = None, tls_key: PathLike | None = None,
                 tls_server_name: str | None = None) -> None:
        """Plain text unless TLS is asked for (`tls=True`, SOL_TLS) or a CA or client
        certificate is given (`tls_ca`/SOL_TLS_CA, `tls_cert`+`tls_key`/SOL_TLS_CLIENT_CERT
        +SOL_TLS_CLIENT_KEY for mutual TLS); see client/tls.py."""
        self.target = target or default_target()
        self.api_key = api_key if api_key is not None else os.environ.get("SOL_API_KEY")
        self.admin_key = admin_key if admin_key is not None else os.environ.get("SOL_ADMIN_KEY")
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        if channel is None:
            tls_settings = ChannelTls.resolve(tls, tls_ca, tls_cert, tls_key, tls_server_name)
            channel = open_channel(self.target, [("grpc.keepalive_time_ms", 30_000),
                                                 ("grpc.max_receive_message_length", 16 << 20)], tls_settings)
        self.channel = channel
        self.inference = pb_grpc.InferenceStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing -------------------------------------------------------------------------
    def _md(self, admin: bool = False) -> tuple[tuple[str, str], ...]:
        key = self.admin_key if admin else self.api_key
        return (("authorization", f"Bearer {key}"),) if key else ()

    def _unary(self, method, request, admin: bool = False, timeout: float | None = None):
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        attempt = 0
        while True:
            left = None if deadline is None else max(0.001, deadline - time.monotonic())
            try:
                return method(request, metadata=self._md(admin), timeout=left)
            except grpc.RpcError as err:
                retry_after = SolError.from_rpc(err).retry_after_s
                wait = backoff_s(attempt, self.backoff, retry_after)
                if (err.code() == grpc.StatusCode.UNAVAILABLE and attempt < self.retries
                        and (deadline is None or time.monotonic() + wait < deadline)):
                    time.sleep(wait)
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

    def wait_ready(self, timeout: float, service: str = "") -> bool:
        """Poll grpc.health.v1 until `service` is SERVING ("" = ready to serve a model,
        "liveness" = the server answers); False after `timeout` seconds."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.25)

    # --- inference ------------------------------------------------------------------------
    def chat(self, messages, model: str, request_id: str | None = None, user: str = "",
             timeout: float | None = None, **params: Any) -> Completion:
        params, tools = tool_fields(params)
        req = self._request(pb.ChatCompletionRequest, model, request_id, user, params, messages=messages_pb(messages),
                            **tools)
        return Completion.from_pb(self._unary(self.inference.ChatCompletion, req, timeout=timeout))

    def complete(self, prompt: str, model: str, request_id: str | None = None, user: str = "",
                 timeout: float | None = None, **params: Any) -> Completion:
        req = self._request(pb.CompletionRequest, model, request_id, user, params, prompt=prompt)
        return Completion.from_pb(self._unary(self.inference.Completion, req, timeout=timeout))

    def chat_stream(self, messages, model: str, request_id: str | None = None, user: str = "",
                    timeout: float | None = None, **params: Any) -> ChatStream:
        params, tools = tool_fields(params)
        req = self._request(pb.ChatCompletionRequest, model, request_id, user, params, messages=messages_pb(messages),
                            **tools)
        return self._stream(self.inference.ChatCompletionStream, req, timeout)

    def complete_stream(self, prompt: str, model: str, request_id: str | None = None, user: str = "",
                        timeout: float | None = None, **params: Any) -> ChatStream:
        req = self._request(pb.CompletionRequest, model, request_id, user, params, prompt=prompt)
        return self._stream(self.inference.CompletionStream, req, timeout)

    def _stream(self, method, req, timeout: float | None) -> ChatStream:
        timeout = self.timeout if timeout is None else timeout
        return ChatStream(lambda: method(req, metadata=self._md(), timeout=timeout),
                          lambda: self.cancel(req.request_id), req.request_id, self.retries, self.backoff)

    def cancel(self, request_id: str) -> bool:
        return self._unary(self.inference.CancelRequest, pb.CancelRequestRequest(request_id=request_id)).cancelled

    def request_usage(self, request_id: str) -> Usage:
        """What a request of this key was billed (e.g. after a dropped stream)."""
        r = self._unary(self.inference.GetRequestUsage, pb.GetRequestUsageRequest(request_id=request_id))
        return Usage.from_pb(r.usage)

    def list_models(self) -> list[ModelInfo]:
        return [ModelInfo.from_pb(m) for m in self._unary(self.inference.ListModels, pb.ListModelsRequest()).models]

    def count_tokens(self, model: str, messages=None, prompt: str = "") -> int:
        req = pb.CountTokensRequest(model=model, messages=messages_pb(messages or []), prompt=prompt)
        return self._unary(self.inference.CountTokens, req).tokens

    # --- admin ----------------------------------------------------------------------------
    def create_key(self, name: str, token_budget: int | None = None, rpm: int | None = None,
                   tpm: int | None = None, share: float | None = None, band: str | None = None) -> tuple[str, KeyInfo]:
        """Returns (the key in clear, shown this once; its info). `share`: the key's
        fair-share weight (default 1); `band`: "interactive" (default) or "batch"."""
        req = pb.CreateKeyRequest(name=name, token_budget=token_budget, rpm=rpm, tpm=tpm, share=share, band=band)
        r = self._unary(self.admin.CreateKey, req, admin=True)
        return r.key, KeyInfo.from_pb(r.info)

    def update_key(self, key_id: str, share: float | None = None, band: str | None = None) -> KeyInfo:
        """Change a key's share or band (None = unchanged); the updated key."""
        req = pb.UpdateKeyRequest(key_id=key_id, share=share, band=band)
        return KeyInfo.from_pb(self._unary(self.admin.UpdateKey, req, admin=True).info)

    def revoke_key(self, key_id: str) -> bool:
        return self._unary(self.admin.RevokeKey, pb.RevokeKeyRequest(key_id=key_id), admin=True).revoked

    def list_keys(self, include_revoked: bool = False) -> list[KeyInfo]:
        r = self._unary(self.admin.ListKeys, pb.ListKeysRequest(include_revoked=include_revoked), admin=True)
        return [KeyInfo.from_pb(k) for k in r.keys]

    def usage(self, key_id: str = "", model: str = "", from_day: str = "", to_day: str = "") -> UsageReport:
        r = self._unary(self.admin.GetUsage, pb.GetUsageRequest(key_id=key_id, model=model, from_day=from_day,
                                                                to_day=to_day), admin=True)
        return UsageReport([UsageRow.from_pb(x) for x in r.rows], UsageRow.from_pb(r.total), r.spooled_records)

    def set_price(self, model: str, prompt_per_1k: float, completion_per_1k: float,
                  cached_discount: float = 0.5) -> None:
        price = pb.Price(prompt_per_1k=prompt_per_1k, completion_per_1k=completion_per_1k,
                         cached_discount=cached_discount)
        self._unary(self.admin.SetPrice, pb.SetPriceRequest(model=model, price=price), admin=True)

    def load_model(self, model: str) -> ModelInfo:
        r = self._unary(self.admin.LoadModel, pb.LoadModelRequest(model=model), admin=True, timeout=600.0)
        return ModelInfo.from_pb(r.info)

    def unload_model(self, model: str) -> bool:
        return self._unary(self.admin.UnloadModel, pb.UnloadModelRequest(model=model), admin=True,
                           timeout=600.0).unloaded

    def set_alias(self, model: str, alias: str, version: int) -> ModelInfo:
        """Promote or roll back: `model:alias` serves `version` from the next request on."""
        r = self._unary(self.admin.SetAlias, pb.SetAliasRequest(model=model, alias=alias, version=version),
                        admin=True, timeout=600.0)
        return ModelInfo.from_pb(r.info)
