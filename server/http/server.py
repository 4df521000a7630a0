"""uvicorn embedded in the App: a task on the same event loop as grpc.aio, so both
protocols reach the same InferenceService, engines and ledger without a thread hop.

The socket is bound here, before uvicorn starts: a taken port is an OSError at start
(as for gRPC) rather than uvicorn's sys.exit inside a task, and port 0 gives a free one.
uvicorn installs no signal handlers: the App owns SIGTERM and drains both protocols.

With TLS the same files as the gRPC port serve HTTPS; a watcher re-reads them when they
change on disk (a cert-manager rotation) and loads them into uvicorn's SSL context, so
new connections get the new certificate without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import uvicorn
from starlette.types import ASGIApp

from server.http.deadlines import DeadlineH11Protocol
from server.tls import TlsError, TlsFiles

log = logging.getLogger("sol.http")


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto named explicitly: accepted sockets inherit it, and asyncio sets TCP_NODELAY
    # only on sockets whose proto is IPPROTO_TCP. Without it Nagle holds each small SSE
    # chunk until the client's delayed ACK (~40 ms a token).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} for HTTP ({err.strerror}); pick another with --http-port "
                      "(0 turns HTTP off)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


@dataclass(frozen=True)
class HttpTimeouts:
    """How long a client may take (ServerConfig's --http-* flags): the deadlines to the
    end of a request's headers and of its body (server/http/deadlines.py), the idle
    keep-alive (uvicorn's own timer) and the header block's size (h11's limit)."""

    header_s: float = 10.0
    body_s: float = 30.0
    keepalive_s: float = 30.0
    max_header_bytes: int = 16384


class HttpServer:
    def __init__(self, app: ASGIApp, host: str, port: int, shutdown_grace_s: float = 1.0,
                 tls: TlsFiles | None = None, tls_poll_s: float = 2.0,
                 timeouts: HttpTimeouts | None = None) -> None:
        self.sock = bind(host, port)
        self.port: int = self.sock.getsockname()[1]
        self.tls = tls
        self.tls_poll_s = tls_poll_s
        self.timeouts = t = timeouts or HttpTimeouts()
        self.shutdown_grace_s = shutdown_grace_s
        # No lifespan (the App starts and stops everything), no access log (metrics count
        # requests; a line per request would cost more CPU than the request's framing).
        self.server = _EmbeddedServer(uvicorn.Config(
            app, lifespan="off", access_log=False, log_level="warning",
            # Past ours (stop() closes the stuck connections first), so uvicorn's own cut,
            # which logs at ERROR, is only the last resort.
            timeout_graceful_shutdown=shutdown_grace_s + 2.0,
            http=DeadlineH11Protocol.configure(t.header_s, t.body_s), timeout_keep_alive=t.keepalive_s,
            h11_max_incomplete_event_size=t.max_header_bytes, server_header=False,
            **(tls.uvicorn_options() if tls else {})))
        self._task: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[self.sock]))
        while not self.server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        if self.tls is not None:
            self._watcher = asyncio.get_running_loop().create_task(self._follow_tls(self.tls))

    async def _follow_tls(self, tls: TlsFiles) -> None:
        seen = tls.signature()
        while True:
            await asyncio.sleep(self.tls_poll_s)
            now = tls.signature()
            if now == seen or None in now:
                continue
            try:
                tls.load()          # a half-written rotation fails here and is retried
                context = self.server.config.ssl
                assert context is not None
                context.load_cert_chain(str(tls.cert), str(tls.key))
                if tls.client_ca is not None:
                    context.load_verify_locations(cafile=str(tls.client_ca))
            except (TlsError, OSError) as err:
                log.warning("HTTPS keeps its current certificate: %s", err)
                continue
            seen = now
            log.info("HTTPS certificate reloaded from %s", tls.cert)

    async def stop(self) -> None:
        """Stop accepting, let open responses end (up to the grace), then close."""
        if self._watcher is not None:
            self._watcher.cancel()
        if self._task is None:
            self.sock.close()
            return
        self.server.should_exit = True
        # uvicorn closes idle connections and those whose response ends; a response still
        # open after the grace has a reader that stopped reading (its writes paused): it
        # cannot be finished, so its connection is closed here, which the app sees as a
        # disconnect (billing what was sent). Left to uvicorn, its task would be cancelled
        # and logged at ERROR as an exception in the app.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.shutdown_grace_s
        while self.server.server_state.connections and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for connection in list(self.server.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.abort()
        try:
            await self._task
        except Exception:  # noqa: BLE001 - shutting down: report, go on with the drain
            log.exception("HTTP server stopped with an error")
        finally:
            self.sock.close()
