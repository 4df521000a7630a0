"""A minimal asyncio client for an OpenAI-compatible `/v1/completions` stream (SSE over
HTTP/1.1), standard library only: sol's environment has no HTTP client library and the
benchmark must not add one to sol's dependencies. One connection per request, like the
gRPC side's one stream per request."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any


class HTTPError(RuntimeError):
    pass


async def _read_headers(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status_line = await reader.readline()
    parts = status_line.decode("latin-1").split(" ", 2)
    if len(parts) < 2:
        raise HTTPError(f"bad status line {status_line!r}")
    headers: dict[str, str] = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def _body_pieces(reader: asyncio.StreamReader, headers: dict[str, str]):
    """Yield the body as it arrives, undoing chunked transfer encoding (what uvicorn sends
    for a streaming response)."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size_line = await reader.readline()
            if not size_line:
                return
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                return
            data = await reader.readexactly(size + 2)  # the chunk and its CRLF
            yield data[:-2]
    else:
        while True:
            data = await reader.read(65536)
            if not data:
                return
            yield data


async def stream_completion(host: str, port: int, body: dict[str, Any]) -> list[tuple[float, list[int]]]:
    """POST a streaming completion; returns (arrival time.perf_counter(), new token ids) per
    SSE event that carried tokens. The body must ask for `return_token_ids` so each event
    says which tokens it carries (text alone cannot be counted in tokens)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        payload = json.dumps(body).encode()
        writer.write(
            f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
            + payload)
        await writer.drain()
        status, headers = await _read_headers(reader)
        if status != 200:
            rest = b"".join([piece async for piece in _body_pieces(reader, headers)])
            raise HTTPError(f"HTTP {status}: {rest[:500]!r}")
        arrivals: list[tuple[float, list[int]]] = []
        buffer = b""
        async for piece in _body_pieces(reader, headers):
            now = time.perf_counter()
            buffer += piece
            # SSE events end with a blank line; an event may span pieces.
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                for line in event.split(b"\n"):
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        return arrivals
                    msg = json.loads(data)
                    if "error" in msg:
                        raise HTTPError(str(msg["error"]))
                    ids = [t for choice in msg.get("choices", []) for t in (choice.get("token_ids") or [])]
                    if ids:
                        arrivals.append((now, ids))
        return arrivals
    finally:
        writer.close()


async def wait_healthy(host: str, port: int, timeout_s: float, alive) -> None:
    """Poll GET /health until it answers 200; `alive()` False (the server died) stops early."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("the server exited while starting")
        try:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(f"GET /health HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            status, _ = await _read_headers(reader)
            writer.close()
            if status == 200:
                return
        except (OSError, HTTPError):
            pass
        await asyncio.sleep(0.5)
    raise TimeoutError(f"no healthy server on {host}:{port} after {timeout_s:.0f} s")
