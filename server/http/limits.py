"""The request body size limit (413), as a plain ASGI middleware in front of the app.

The body is read here, counted as it arrives, and handed on whole: a client cannot make
the server buffer more than the limit by lying in Content-Length or by sending chunked.
Once the body is handed on, later `receive()` calls reach the server again, so the
routes still hear a client's disconnect.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.http.errors import body as error_body

DEFAULT_MAX_BODY_BYTES = 16 << 20     # as gRPC's max_receive_message_length


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 on_refused=None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.on_refused = on_refused        # counts the refusal (metrics), given the path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = self.max_bytes + 1
                if declared > self.max_bytes:
                    await self._refuse(scope, send)
                    return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        whole: Message | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> Message:
            nonlocal whole
            if whole is not None:
                message, whole = whole, None
                return message
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        if self.on_refused is not None:
            self.on_refused(scope["path"])
        payload = json.dumps(error_body(f"the request body is over {self.max_bytes} bytes; send a shorter "
                                        "conversation or prompt", "invalid_request_error",
                                        "request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})
