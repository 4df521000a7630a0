"""Builds the server from a ServerConfig and runs it: gRPC (Inference, Admin, health,
reflection) on one port, Prometheus on another, models loaded in the background, and
a drain on SIGTERM: readiness goes NOT_SERVING, new requests get UNAVAILABLE, running
ones finish within the grace period, the ledger is flushed, exit 0."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

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
from server.grpc.admin import AdminServicer
from server.grpc.servicer import InferenceServicer
from server.grpc.wire import add_service
from server.health import Health
from server.inference import InferenceService
from server.metrics import ServiceMetrics
from server.models.hotload import HotLoadConfig, HotLoader, LoadOutcome
from server.models.kv_budget import KVBudget
from server.models.manager import EngineFactory, ModelManager, default_engine_factory
from server.tls import ReloadingCredentials, TlsFiles

log = logging.getLogger("sol.app")

INFERENCE = pb.DESCRIPTOR.services_by_name["Inference"]
ADMIN = pb.DESCRIPTOR.services_by_name["Admin"]
SERVICE_NAMES = (
    INFERENCE.full_name,
    ADMIN.full_name,
    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    reflection.SERVICE_NAME,
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
        self.engine_factory = engine_factory or default_engine_factory(config.engine)
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
        self.accountant = Accountant(self.store, self.spool, run)
        self.prices = PriceBook(self.store, run, Price(cached_discount=c.cached_discount))
        self.quota = QuotaGate(self.store, run)
        self.service = InferenceService(c, self.models, self.quota, self.accountant, self.prices, self.metrics)
        self.inference = InferenceServicer(self.service, self.auth, self.prices)
        self.admin = AdminServicer(self.store, self.auth, self.accountant, self.prices, self.models,
                                   self.inference, run)
        self.metrics.attach(lambda: self.models.stats(c.metrics_top_tenants),
                            lambda: (len(self.spool), self.accountant.store_up))
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
        reflection.enable_server_reflection(SERVICE_NAMES, self.server)
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
        self.accountant.start()
        self.prices.start()
        tls = "plain text" if self.tls is None else "TLS" + (", client certificates required" if self.tls.mutual
                                                              else "")
        print(f"sol: gRPC listening on {c.host}:{self.port} ({tls})"
              + (f", health on {c.host}:{self.health_port} (plain text)" if self.health_port else "")
              + (f", metrics on http://{c.host}:{self.metrics_port}/metrics" if self.metrics_port else "")
              + f"; ledger: {'redis ' + _safe_url(c.redis_url) if c.redis_url else c.ledger_path}",
              file=sys.stderr, flush=True)

    async def _start_http(self) -> None:
        """The OpenAI-compatible HTTP adapter over the same InferenceService, on this loop.
        Imported here: a gRPC-only server (--http-port 0) never loads FastAPI."""
        from server.http.app import create_app
        from server.http.server import HttpServer

        self.http = HttpServer(create_app(self.service, self.auth, self.prices, self.health),
                               self.config.host, self.config.http_port, tls=self.tls)
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
        if outcome.ok:
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
        the grace period), bill what was cut short, flush the ledger."""
        grace = self.config.grace_period_s
        await self.health.start_drain()
        self.metrics.ready.set(0)
        # Refuse new requests in the same loop turn as readiness flips: nothing may slip
        # in while the hot-loader below takes its time to stop.
        self.service.draining = True
        if self.hotloader is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.hotloader.stop)
        if not quiet:
            print(f"sol: draining: {len(self.service.inflight.jobs)} requests in flight, grace {grace:.0f} s",
                  file=sys.stderr, flush=True)
        try:
            await asyncio.wait_for(self.service.inflight.empty.wait(), timeout=grace)
        except TimeoutError:
            log.warning("grace period over with %d requests in flight; cancelling them",
                        len(self.service.inflight.jobs))
        await self.server.stop(grace=1.0)
        if self.http is not None:
            await self.http.stop()
        # Handlers cut off by the stop finish their cleanup on later loop turns: wait for
        # every request to leave and for the billing of the cut-off ones.
        deadline = asyncio.get_running_loop().time() + 10.0
        while (self.service.inflight.jobs or self.service.background) and \
                asyncio.get_running_loop().time() < deadline:
            if self.service.background:
                await asyncio.wait(list(self.service.background), timeout=0.1)
            else:
                await asyncio.sleep(0.01)
        await self.prices.close()
        await self.accountant.close()
        await asyncio.get_running_loop().run_in_executor(None, self.models.shutdown)
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


def _safe_url(url: str | None) -> str:
    """A Redis URL without its password, for logs."""
    if not url or "@" not in url:
        return url or ""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"


def serve(config: ServerConfig, engine_factory: EngineFactory | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(App(config, engine_factory).run_until_signal())
