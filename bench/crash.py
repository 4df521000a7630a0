"""`sol bench crash`: crash-safe metering under fire. A real `sol serve` is SIGKILLed at
random moments under mixed gRPC and HTTP streaming load and restarted, cycle after
cycle; every client counts the tokens it received per request id. At the end the
ledger must hold, per request id: exactly what was received for runs that finished; for
runs cut by a kill, at least what was received less `metering_tokens` per cut run, and
at most what was received plus the tokens the server had handed out but the kill kept
from the client (one stream batch: `stream_buffer_tokens` per choice). Nothing is billed
twice, and a cut request id retried after the restart is served (its runs add up).

Embedded SQLite ledger by default; `--redis-url` for Redis (or `--ledger redis`, which
starts a redis-server with AOF on a free port)."""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parents[1]
ADMIN_KEY = "sk-sol-admin-crash-bench"
MESSAGES = [{"role": "user", "content": "tell me everything"}]


# --- what a client received ----------------------------------------------------------------

@dataclass
class SseResult:
    status: int = 0
    tokens: int = 0                       # token ids received, over every choice
    usage: dict | None = None
    error: dict | None = None             # the error event's "error", if the stream ended with one
    done: bool = False                    # saw data: [DONE]


def stream_chat(port: int, key: str, body: dict, request_id: str = "", timeout: float = 120.0,
                result: SseResult | None = None) -> SseResult:
    """POST a streaming chat completion (with sol's `return_token_ids`) and read it to
    its end, or to the connection's: what arrived is in the result as it arrives."""
    out = result or SseResult()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    if request_id:
        headers["Idempotency-Key"] = request_id
    try:
        conn.request("POST", "/v1/chat/completions",
                     json.dumps({**body, "stream": True, "return_token_ids": True,
                                 "stream_options": {"include_usage": True}}), headers)
        resp = conn.getresponse()
        out.status = resp.status
        if resp.status != 200:
            out.error = json.loads(resp.read() or b"{}").get("error")
            return out
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                out.done = True
                break
            event = json.loads(data)
            if "error" in event:
                out.error = event["error"]
                break
            out.tokens += sum(len(c.get("token_ids") or []) for c in event.get("choices", []))
            if event.get("usage"):
                out.usage = event["usage"]
    except (OSError, http.client.HTTPException, ValueError):
        pass                              # the server went away mid-stream
    finally:
        conn.close()
    return out


@dataclass
class Run:
    """One run of a request id, as its client saw it."""

    request_id: str
    protocol: str
    n: int
    delivered: int = 0
    finished: bool = False                # received the final usage
    reported: int | None = None           # the completion tokens that final usage said
    refused: str = ""                     # a status that refused it before it ran


@dataclass
class CrashReport:
    cycles: int = 0
    runs: int = 0
    finished: int = 0
    cut: int = 0
    retried_served: int = 0
    retried_refused: int = 0
    delivered: int = 0
    billed: int = 0
    max_unbilled: int = 0                 # worst delivered - billed of one request id
    max_overbilled: int = 0               # worst billed - delivered of one request id
    violations: list[str] = field(default_factory=list)
    restart_s: list[float] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.cycles} kills, {self.runs} runs ({self.finished} finished, {self.cut} cut, "
                f"{self.retried_served} cut ids retried and served, {self.retried_refused} refused); "
                f"delivered {self.delivered} completion tokens, billed {self.billed}; worst per request id: "
                f"{self.max_unbilled} unbilled, {self.max_overbilled} over; restart to ready "
                f"{min(self.restart_s, default=0):.1f}-{max(self.restart_s, default=0):.1f} s; "
                f"{len(self.violations)} violations")


# --- the server --------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    home: Path
    port: int
    http_port: int
    redis_url: str | None
    metering_tokens: int
    log: Path
    proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> float:
        from client.client import Client

        env = {**os.environ, "SOL_HOME": str(self.home), "SOL_ADMIN_KEY": ADMIN_KEY, "SOL_KEY_PEPPER": "crash",
               "SOL_METERING_TOKENS": str(self.metering_tokens)}
        env.pop("SOL_REDIS_URL", None)
        if self.redis_url:
            env["SOL_REDIS_URL"] = self.redis_url
        t0 = time.monotonic()
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "client.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                 "--http-port", str(self.http_port), "--metrics-port", "0", "--no-watch"],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        with Client(f"127.0.0.1:{self.port}", retries=0) as c:
            if not c.wait_ready(timeout):
                raise RuntimeError(f"sol serve did not become ready in {timeout:.0f} s; see {self.log}")
        return time.monotonic() - t0

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
            self.proc = None


# --- the load ----------------------------------------------------------------------------

def _grpc_run(target: str, key: str, run: Run, max_tokens: int) -> None:
    from client.client import Client
    from client.types import SolError

    with Client(target, api_key=key, retries=0) as c:
        stream = c.chat_stream(MESSAGES, model="tiny", max_tokens=max_tokens, ignore_eos=True, n=run.n,
                               request_id=run.request_id)
        try:
            for chunk in stream:
                run.delivered += sum(len(d.token_ids) for d in chunk.deltas)
                if chunk.final and chunk.usage is not None:
                    run.finished, run.reported = True, chunk.usage.completion_tokens
        except SolError as err:
            if run.delivered == 0 and err.code != grpc.StatusCode.UNAVAILABLE:
                run.refused = err.code.name


def _http_run(port: int, key: str, run: Run, max_tokens: int) -> None:
    result = SseResult()
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": max_tokens, "ignore_eos": True, "n": run.n}
    stream_chat(port, key, body, run.request_id, result=result)
    run.delivered = result.tokens
    if result.usage is not None and result.done:
        run.finished, run.reported = True, result.usage["completion_tokens"]
    if result.status and result.status != 200:
        run.refused = str(result.status)


def one_run(server: Server, key: str, run: Run, max_tokens: int) -> None:
    if run.protocol == "grpc":
        _grpc_run(f"127.0.0.1:{server.port}", key, run, max_tokens)
    else:
        _http_run(server.http_port, key, run, max_tokens)


class Load:
    """Closed-loop clients, half gRPC and half HTTP, until stopped."""

    def __init__(self, server: Server, key: str, clients: int, cycle: int, rng: random.Random,
                 max_tokens: tuple[int, int]) -> None:
        self.server, self.key, self.rng, self.max_tokens = server, key, rng, max_tokens
        self.stop = threading.Event()
        self.runs: list[Run] = []
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, args=(cycle, i), daemon=True) for i in range(clients)]

    def _client(self, cycle: int, i: int) -> None:
        j = 0
        while not self.stop.is_set():
            with self._lock:
                n = self.rng.choice((1, 1, 2))
                max_tokens = self.rng.randint(*self.max_tokens)
            run = Run(f"c{cycle}-{i}-{j}", "grpc" if i % 2 == 0 else "http", n)
            with self._lock:
                self.runs.append(run)
            one_run(self.server, self.key, run, max_tokens)
            j += 1

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)


# --- the experiment ----------------------------------------------------------------------

def _publish_model(home: Path) -> None:
    from gpt.config import preset
    from gpt.model import GPT
    from gpt.registry import Registry, publish_checkpoint
    from gpt.tokenizer import train_tokenizer
    from training.data.corpus import build_corpus

    registry = Registry(home / "registry")
    if registry.root.exists() and any(registry.root.iterdir()):
        return
    import torch

    torch.manual_seed(0)
    tokenizer = train_tokenizer(build_corpus(max_bytes=1 << 20).train, vocab_size=preset("tiny").vocab_size,
                                show_progress=False)
    model = GPT(preset("tiny").replace(vocab_size=tokenizer.vocab_size, max_seq_len=2048)).eval()
    publish_checkpoint(registry, "tiny", model, tokenizer, {"stage": "base"})


def _store(home: Path, redis_url: str | None):
    if redis_url:
        from server.accounting.ledger_redis import RedisStore

        return RedisStore(redis_url)
    from server.accounting.ledger_sqlite import SqliteStore

    return SqliteStore(home / "ledger.sqlite3")


def run_crash(home: Path, cycles: int = 20, clients: int = 6, redis_url: str | None = None, seed: int = 0,
              metering_tokens: int = 16, kill_after_s: tuple[float, float] = (0.5, 3.0),
              max_tokens: tuple[int, int] = (40, 600), stream_buffer_tokens: int = 32) -> CrashReport:
    """Kill and restart `sol serve` `cycles` times under load; check the ledger against
    what the clients received. Returns the report (violations listed, none expected)."""
    from client.client import Client

    rng = random.Random(seed)
    home.mkdir(parents=True, exist_ok=True)
    _publish_model(home)
    server = Server(home, free_port(), free_port(), redis_url, metering_tokens, home / "serve.log")
    report = CrashReport()
    runs: dict[str, list[Run]] = {}
    server.start()
    with Client(f"127.0.0.1:{server.port}", admin_key=ADMIN_KEY) as admin:
        key, info = admin.create_key("crash-bench")
    cut_last: list[Run] = []
    try:
        for cycle in range(cycles + 1):
            # A cut request id of the previous cycle, retried on the restarted server: served.
            for prev in cut_last[:2]:
                retry = Run(prev.request_id, prev.protocol, prev.n)
                one_run(server, key, retry, 30)
                runs[retry.request_id].append(retry)
                if retry.refused:
                    report.retried_refused += 1
                    report.violations.append(f"{retry.request_id}: retried after the restart, refused "
                                             f"({retry.refused})")
                else:
                    report.retried_served += 1
            if cycle == cycles:
                break
            load = Load(server, key, clients, cycle, rng, max_tokens)
            load.start()
            time.sleep(rng.uniform(*kill_after_s))
            load.stop.set()               # no new runs: the kill cuts the ones in flight
            server.kill()
            load.join()
            report.cycles += 1
            for run in load.runs:
                runs.setdefault(run.request_id, []).append(run)
            cut_last = [r for r in load.runs if not r.finished and r.delivered > 0]
            rng.shuffle(cut_last)
            report.restart_s.append(server.start())
    finally:
        server.stop()
    store = _store(home, redis_url)
    try:
        _check(store, info.key_id, runs, report, metering_tokens, stream_buffer_tokens)
    finally:
        store.close()
    return report


def _check(store, key_id: str, runs: dict[str, list[Run]], report: CrashReport, metering_tokens: int,
           stream_buffer_tokens: int) -> None:
    billed_total = 0
    for rid, attempts in runs.items():
        ran = [r for r in attempts if not r.refused]
        rec = store.get_record(key_id, rid)
        billed = rec.completion_tokens if rec is not None else 0
        delivered = sum(r.delivered for r in ran)
        cut = [r for r in ran if not r.finished]
        report.runs += len(ran)
        report.finished += len(ran) - len(cut)
        report.cut += sum(1 for r in cut if r.delivered)
        report.delivered += delivered
        billed_total += billed
        low = delivered - metering_tokens * len(cut)
        high = delivered + sum(stream_buffer_tokens * r.n for r in cut)
        if not cut:
            low = high = sum(r.reported or 0 for r in ran)
            if low != delivered:
                report.violations.append(f"{rid}: final usage said {low} tokens, the client received {delivered}")
        if not low <= billed <= high:
            report.violations.append(f"{rid}: billed {billed} completion tokens, received {delivered} over "
                                     f"{len(ran)} runs ({len(cut)} cut): outside [{low}, {high}]")
        report.max_unbilled = max(report.max_unbilled, delivered - billed)
        report.max_overbilled = max(report.max_overbilled, billed - delivered)
    report.billed = billed_total
    ledger = sum(r.completion_tokens for r in store.usage(key_id=key_id))
    if ledger != billed_total:
        report.violations.append(f"the usage rows hold {ledger} completion tokens, the request records "
                                 f"{billed_total}: something was billed twice")


def run_bench_crash(args) -> int:
    import tempfile

    redis = None
    redis_url = args.redis_url
    if args.ledger == "redis" and not redis_url:
        import shutil

        workdir = Path(tempfile.mkdtemp(prefix="sol-crash-redis-"))
        port = free_port()
        redis = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
                                  "127.0.0.1", "--save", "", "--appendonly", "yes", "--appendfsync", "always",
                                  "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        redis_url = f"redis://127.0.0.1:{port}/0"
    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="sol-crash-"))
    try:
        t0 = time.monotonic()
        report = run_crash(home, cycles=args.cycles, clients=args.clients, redis_url=redis_url, seed=args.seed,
                           metering_tokens=args.metering_tokens)
        print(f"sol bench crash ({'redis' if redis_url else 'sqlite'} ledger, {time.monotonic() - t0:.0f} s): "
              + report.summary())
        for v in report.violations[:20]:
            print("  violation:", v)
        return 1 if report.violations else 0
    finally:
        if redis is not None:
            redis.kill()
            redis.wait()
