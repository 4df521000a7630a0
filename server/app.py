"""Builds the server from a ServerConfig and runs it: gRPC (Inference, Admin, health,
reflection) on one port, Prometheus on another, models loaded in the background, and
a drain on SIGTERM: readiness goes NOT_SERVING, new requests get UNAVAILABLE, running
ones finish within the grace period, the ledger is flushed, exit 0."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import NoReturn

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gpt.checkpoint import CheckpointError
from gpt.registry import Registry, RegistryError
from proto.sol.v1 import sol_pb2 as pb
from server.accounting.accountant import Accountant
from server.accounting.auth import (
    Authenticator,
    check_pepper,
    resolve_admin_key,
    resolve_pepper,
    run_blocking,
)
from server.accounting.ledger import LedgerStore, Price
from server.accounting.pricing import PriceBook
from server.accounting.quota import QuotaGate
from server.accounting.spool import Spool
from server.config import ServerConfig
from server.errors import unavailable
from server.gateway_metrics import GatewayCollector
from server.grpc import reflection
from server.grpc.admin import AdminServicer
from server.grpc.servicer import InferenceServicer
from server.grpc.wire import add_service
from server.health import Health
from server.inference import InferenceService
from server.metrics import ServiceMetrics
from server.models.hotload import HotLoadConfig, HotLoader, LoadOutcome
from server.models.kv_budget import KVBudget
from server.models.manager import EngineBuilder, EngineFactory, ModelManager
from server.tls import ReloadingCredentials, TlsFiles

log = logging.getLogger("sol.app")

# The drain past the grace period (README, "Drain"): clients still reading get their
# final status within CUT_READ_S; then both protocols close what is left within STOP_S
# (a reader that stopped reading cannot take a status behind its full window); then the
# cleanup (billing what was cut, the ledger flush, the engines) gets CLEANUP_S.
CUT_READ_S = 1.0
STOP_S = 0.5
CLEANUP_S = 1.5
DRAIN_BOUND_S = CUT_READ_S + STOP_S + CLEANUP_S

INFERENCE = pb.DESCRIPTOR.services_by_name["Inference"]
ADMIN = pb.DESCRIPTOR.services_by_name["Admin"]
SERVICE_NAMES = (
    INFERENCE.full_name,
    ADMIN.full_name,
    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    *reflection.SERVICE_NAMES,
)


def make_store(config: ServerConfig) -> LedgerStore:
    if config.redis_url:
        from server.accounting.ledger_redis import RedisStore

        return RedisStore(config.redis_url, timeout_s=config.store_timeout_s, tls_ca=config.redis_tls_ca)
    from server.accounting.ledger_sqlite import SqliteStore

    return SqliteStore(config.ledger_path)


class App:
    def __init__(self, config: ServerConfig, engine_factory: EngineFactory | None = None) -> None:
        self.config = config
        self.engine_factory = engine_factory or EngineBuilder(config.engine)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self.http = None                     # server.http.server.HttpServer when --http-port is set
        self._stopped = asyncio.Event()
        self._metrics_server = None
        self.hotloader: HotLoader | None = None
        self.health_port: int | None = None
        self._health_server: grpc.aio.Server | None = None
        self.tls: TlsFiles | None = None
        self.tls_credentials: ReloadingCredentials | None = None

    async def start(self) -> None:
        c = self.config
        # First: a TLS mistake is reported before anything opens a file or a port.
        self.tls = TlsFiles.from_settings(c.tls_cert, c.tls_key, c.tls_client_ca)
        self._loop = asyncio.get_running_loop()
        self.executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="sol-io")
        run = functools.partial(run_blocking, self.executor)
        self.store = make_store(c)
        self.spool = Spool(c.spool_path)
        self.metrics = ServiceMetrics()
        self.health = Health()
        budget = None if c.engine.num_blocks is not None else KVBudget(c.kv_budget_mb << 20, c.kv_per_model_mb << 20)
        self.models = ModelManager(Registry(c.registry), self.engine_factory, warmup=c.warmup, kv_budget=budget,
                                   max_cpu_loras=c.max_cpu_loras)
        pepper = resolve_pepper(c.key_pepper, c.home)
        check_pepper(self.store, pepper)
        self.auth = Authenticator(self.store, pepper,
                                  resolve_admin_key(c.admin_key, c.admin_key_file, c.home), run, c.auth_cache_s)
        self.accountant = Accountant(self.store, self.spool, run, slot=c.replica_slot if c.port else "", lease_s=c.instance_lease_s)
        self.prices = PriceBook(self.store, run, Price(cached_discount=c.cached_discount))
        self.quota = QuotaGate(self.store, run)
        self.quota.seed(self.spool.records())
        self.service = InferenceService(c, self.models, self.quota, self.accountant, self.prices, self.metrics)
        self.inference = InferenceServicer(self.service, self.auth, self.prices)
        self.admin = AdminServicer(self.store, self.auth, self.accountant, self.prices, self.models,
                                   self.inference, run)
        self.metrics.attach(lambda: self.models.stats(c.metrics_top_tenants),
                            lambda: (len(self.spool), self.accountant.store_up))
        # The same engine figures under vLLM's names, for inference gateways.
        self.metrics.registry.register(GatewayCollector(
            self.models.stats, lambda: next((m.engine.config.block_size for m in self.models.models()), None)))
        self.models.on_change.append(self._models_changed)

        self.server = grpc.aio.server(options=[
            ("grpc.so_reuseport", 0),                       # a taken port is an error, not a shared one
            ("grpc.max_receive_message_length", 16 << 20),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ])
        # Both through the Inference servicer's frame: one place maps errors and counts calls.
        add_service(self.server, INFERENCE, self.inference, self.inference.call)
        add_service(self.server, ADMIN, self.admin, self.inference.call)
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, self.server)
        reflection.enable(SERVICE_NAMES, self.server)
        if self.tls is not None:
            self.tls_credentials = ReloadingCredentials(self.tls)
        self.port = _listen(self.server, c.host, c.port, "--port",
                            self.tls_credentials.credentials if self.tls_credentials else None)
        if c.health_port:
            # Health only, plain text: for probes that cannot speak TLS (Kubernetes' gRPC
            # probes); the same servicer as the main port, so both report the same states.
            self._health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, self._health_server)
            self.health_port = _listen(self._health_server, c.host, c.health_port, "--health-port")
        if c.http_port:
            # Before gRPC starts: a taken HTTP port then fails the start with nothing running.
            await self._start_http()
        await self.server.start()
        if self._health_server is not None:
            await self._health_server.start()
        await self.health.start()
        if c.metrics_port:
            self._metrics_server, _ = self.metrics.serve(c.metrics_port, c.host)
            self.metrics_port = self._metrics_server.server_port
        await self.prices.refresh()
        # Before the first request: what this replica's previous run left (a crash) is
        # billed and its request ids and reservations freed.
        await self.accountant.begin()
        self.accountant.start()
        # Revocations made on other replicas end this one's running requests of the key.
        self._revocation_watch = asyncio.get_running_loop().create_task(
            self.service.watch_revocations(self.auth.revoked, c.auth_cache_s))
        self.prices.start()
        tls = "plain text" if self.tls is None else "TLS" + (", client certificates required" if self.tls.mutual
                                                              else "")
        print(f"sol: gRPC listening on {c.host}:{self.port} ({tls})"
              + (f", health on {c.host}:{self.health_port} (plain text)" if self.health_port else "")
              + (f", metrics on http://{c.host}:{self.metrics_port}/metrics" if self.metrics_port else "")
              + f"; ledger: {'redis ' + _safe_url(c.redis_url) if c.redis_url else c.ledger_path}",
              file=sys.stderr, flush=True)
        if self.http_port:
            base = f"{'http' if self.tls is None else 'https'}://{_url_host(c.host)}:{self.http_port}"
            cors = ", ".join(c.cors_origins) if c.cors_origins else "off"
            print(f"sol: HTTP (OpenAI-compatible) API on {base}/v1, playground on {base}/ (CORS: {cors})",
                  file=sys.stderr, flush=True)

    async def _start_http(self) -> None:
        """The OpenAI-compatible HTTP adapter over the same InferenceService, on this loop.
        Imported here: a gRPC-only server (--http-port 0) never loads FastAPI."""
        from server.http.app import create_app
        from server.http.server import HttpServer, HttpTimeouts

        c = self.config
        self.http = HttpServer(create_app(self.service, self.auth, self.prices, self.health,
                                          cors_origins=c.cors_origins),
                               c.host, c.http_port, shutdown_grace_s=STOP_S, tls=self.tls,
                               timeouts=HttpTimeouts(c.http_header_timeout_s, c.http_body_timeout_s,
                                                     c.http_keepalive_timeout_s, c.http_max_header_bytes))
        await self.http.start()
        self.http_port = self.http.port

    async def load_models(self) -> None:
        """Load the configured models (or every model's latest). A model named on the
        command line that cannot load is fatal; discovery with nothing to serve is not:
        readiness stays NOT_SERVING until a model arrives (Admin.LoadModel, hot-load)."""
        loop = asyncio.get_running_loop()
        loaded = await loop.run_in_executor(None, self.models.load_default, list(self.config.models))
        if not loaded:
            print(f"sol: no model to serve in {self.config.registry}; readiness stays NOT_SERVING until one "
                  "is loaded (train one with `sol pipeline`, or Admin.LoadModel)", file=sys.stderr, flush=True)
        for m in loaded:
            print(f"sol: serving {m.ref} ({', '.join(self.models.aliases_of(m)) or 'no aliases'})",
                  file=sys.stderr, flush=True)
        if self.config.watch and self.hotloader is None:
            self.hotloader = HotLoader(self.models, self.models.registry,
                                       HotLoadConfig(follow=list(self.config.models),
                                                     poll_interval_s=self.config.poll_interval_s),
                                       on_outcome=self._load_outcome)
            self.admin.hotloader = self.hotloader
            self.hotloader.start()
            how = "filesystem events + polling" if self.hotloader.watcher.events_active else "polling"
            print(f"sol: watching {self.config.registry} for new versions ({how} every "
                  f"{self.config.poll_interval_s:g} s)", file=sys.stderr, flush=True)

    def _load_outcome(self, outcome: LoadOutcome) -> None:
        if outcome.superseded:
            print(f"sol: loaded {outcome.ref}, but {outcome.error}", file=sys.stderr, flush=True)
        elif outcome.ok:
            self.metrics.model_loads.labels(outcome.model).inc()
            self.metrics.model_load_seconds.labels(outcome.model).observe(outcome.seconds)
            print(f"sol: serving {outcome.ref} ({', '.join(self._aliases_of(outcome)) or 'no aliases'})",
                  file=sys.stderr, flush=True)
        else:
            self.metrics.model_load_failures.labels(outcome.model).inc()
            print(f"sol: refused {outcome.ref}; the previous version keeps serving: {outcome.error}",
                  file=sys.stderr, flush=True)

    def _aliases_of(self, outcome: LoadOutcome) -> list[str]:
        return next((self.models.aliases_of(m) for m in self.models.models()
                     if (m.name, m.version) == (outcome.model, outcome.version)), [])

    def _models_changed(self) -> None:
        models = self.models.models()
        self.metrics.model_info.clear()
        for m in models:
            self.metrics.model_info.labels(m.name, str(m.version), m.stage).set(1)
        self.metrics.models_loaded.set(len(models))
        ready = bool(models)
        self.metrics.ready.set(1 if ready and not self.service.draining else 0)
        if _other_thread(self._loop):
            asyncio.run_coroutine_threadsafe(self.health.set_models_ready(ready), self._loop)
        else:
            self._loop.create_task(self.health.set_models_ready(ready))

    async def drain(self, quiet: bool = False) -> None:
        """Readiness first, then no new requests, then wait for the running ones (up to
        the grace period); past it, end them with UNAVAILABLE, close what is left, bill
        what was cut short, flush the ledger: exit within grace + DRAIN_BOUND_S."""
        loop = asyncio.get_running_loop()
        grace = self.config.grace_period_s
        grace_ends = loop.time() + grace
        await self.health.start_drain()
        self.metrics.ready.set(0)
        # Refuse new requests in the same loop turn as readiness flips: nothing may slip
        # in while the hot-loader below takes its time to stop.
        self.service.draining = True
        if self.hotloader is not None:
            # A load under way is not waited for: it cannot serve any more.
            await loop.run_in_executor(None, self.hotloader.stop, STOP_S)
        if not quiet:
            print(f"sol: draining: {len(self.service.inflight.jobs)} requests in flight, grace {grace:g} s",
                  file=sys.stderr, flush=True)
        try:
            await asyncio.wait_for(self.service.inflight.empty.wait(), timeout=max(0.0, grace_ends - loop.time()))
        except TimeoutError:
            cut = await self._cut_running(CUT_READ_S)
            log.warning("grace period over: %d request(s) in flight ended with UNAVAILABLE (retry)", cut)
        stops = [self.server.stop(grace=STOP_S)]
        if self.http is not None:
            stops.append(self.http.stop())
        await asyncio.gather(*stops)
        log.info("drain: protocols stopped %.2f s after the grace period began", loop.time() - grace_ends + grace)
        # Handlers cut off by the stop finish their cleanup on later loop turns: wait for
        # every request to leave and for the billing of the cut-off ones.
        deadline = loop.time() + CLEANUP_S
        while (self.service.inflight.jobs or self.service.background) and loop.time() < deadline:
            if self.service.background:
                await asyncio.wait(list(self.service.background), timeout=0.1)
            else:
                await asyncio.sleep(0.01)
        await self.prices.close()
        if getattr(self, "_revocation_watch", None) is not None:
            self._revocation_watch.cancel()
        await self.accountant.close()
        log.info("drain: requests billed, ledger flushed %.2f s in", loop.time() - grace_ends + grace)
        await loop.run_in_executor(None, self.models.shutdown, CLEANUP_S)
        log.info("drain: engines stopped %.2f s in", loop.time() - grace_ends + grace)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        self.store.close()
        self.executor.shutdown(wait=False)
        self.service.grammar_pool.shutdown(wait=False, cancel_futures=True)
        if self._health_server is not None:
            # Last: probes see the drain (NOT_SERVING) until the process is done.
            await self._health_server.stop(grace=None)
        left = len(self.spool)
        if not quiet or left:
            print("sol: stopped" + (f"; {left} usage records stay spooled for the next start" if left else ""),
                  file=sys.stderr, flush=True)
        self._stopped.set()

    async def _cut_running(self, wait_s: float) -> int:
        """End what still runs after the grace period: each request is billed and its call
        ends with UNAVAILABLE (an HTTP stream with an error event), not a silent cut. A
        client still reading gets its text so far and the status within `wait_s`; one that
        stopped reading (its stream back-pressured) is closed with the protocols."""
        cut = self.service.end(unavailable("this server is shutting down and its grace period ended before the "
                                     "request finished: it was stopped and billed for the tokens generated so "
                                     "far; retry (another replica will answer)"))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.service.inflight.empty.wait(), timeout=wait_s)
        return cut

    async def run_until_signal(self) -> int:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        try:
            await self.start()
        except (OSError, ValueError) as err:
            # Settings the operator must fix (TLS files, a port taken, a Redis CA without
            # rediss://): one line, not a traceback.
            print(f"sol: error: {err}", file=sys.stderr)
            return 2
        loader = asyncio.create_task(self.load_models())
        waiter = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({loader, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if loader in done and loader.exception() is not None:
            err = loader.exception()
            waiter.cancel()
            await self.drain(quiet=True)
            if isinstance(err, RegistryError | CheckpointError | OSError | ValueError):
                print(f"sol: error: {err}", file=sys.stderr)
                return 2
            raise err
        await waiter
        if not loader.done():
            loader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await loader
        await self.drain()
        return 0


def _listen(server: grpc.aio.Server, host: str, port: int, flag: str,
            credentials: grpc.ServerCredentials | None = None) -> int:
    """Bind `server` (TLS with `credentials`); the port bound, or OSError naming the flag."""
    address = f"{host}:{port}"
    try:
        bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if not bound:
        raise OSError(f"cannot listen on {address} (port taken?); pick another with {flag}")
    return bound


def _other_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is not loop
    except RuntimeError:
        return True


def _url_host(host: str) -> str:
    """`host` as a URL writes it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def _safe_url(url: str | None) -> str:
    """A Redis URL without its password, for logs."""
    if not url or "@" not in url:
        return url or ""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"


def serve(config: ServerConfig, engine_factory: EngineFactory | None = None) -> NoReturn:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    code = asyncio.run(App(config, engine_factory).run_until_signal())
    # The drain has closed what this process owns (ledger, spool, engines, sockets). The
    # interpreter's own teardown then took up to 9 s (gRPC core's, with a stream stuck
    # behind a client's full window), past any grace period: exit now instead.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
