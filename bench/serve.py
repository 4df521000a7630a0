"""`sol bench serve`: N concurrent streaming clients over gRPC on loopback against a real
`sol serve` process, compared with the same load on the in-process engine (no gRPC, no
auth, no ledger). Prints TTFT and inter-token latency p50/p99, tokens/s, and the ratio
gRPC / in-process (target >= 0.8 for tokens/s)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

TARGET_RATIO = 0.8
HTTP_TARGET_RATIO = 0.9         # --http: OpenAI-compatible SSE streams vs gRPC streams, same server


@dataclass
class Run:
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    tokens: int = 0
    wall_s: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)

    def note(self, start: float, arrivals: list[tuple[float, int]]) -> None:
        """arrivals: (time, tokens in that message) for one request."""
        if not arrivals:
            return
        self.ttft.append(arrivals[0][0] - start)
        self.e2e.append(arrivals[-1][0] - start)
        for (t0, _), (t1, k) in zip(arrivals, arrivals[1:], strict=False):
            # A message carrying k tokens stands for k inter-token gaps.
            self.itl.extend([(t1 - t0) / k] * k if k else [])
        self.tokens += sum(k for _, k in arrivals)

    def summary(self) -> dict[str, float]:
        def pct(xs: list[float], q: float) -> float:
            if not xs:
                return float("nan")
            xs = sorted(xs)
            return xs[min(len(xs) - 1, int(q * len(xs)))]
        return {"tokens_per_s": self.tokens / self.wall_s if self.wall_s else 0.0, "tokens": self.tokens,
                "wall_s": self.wall_s, "requests": len(self.ttft),
                "ttft_p50_ms": pct(self.ttft, 0.5) * 1e3, "ttft_p99_ms": pct(self.ttft, 0.99) * 1e3,
                "itl_p50_ms": pct(self.itl, 0.5) * 1e3, "itl_p99_ms": pct(self.itl, 0.99) * 1e3,
                "e2e_mean_ms": (statistics.fmean(self.e2e) * 1e3) if self.e2e else float("nan")}


def build_prompts(tokenizer, n: int, prompt_tokens: int, seed: int) -> list[str]:
    import random

    from training.data.corpus import build_corpus

    corpus = build_corpus(max_bytes=1 << 20)
    ids: list[int] = []
    for text in corpus.heldout or corpus.train:
        ids += tokenizer.encode(text)
        if len(ids) > 20_000:
            break
    rng = random.Random(seed)
    body = max(1, prompt_tokens - 4)          # the chat template adds 4 tokens
    prompts = []
    for _ in range(n):
        start = rng.randint(0, len(ids) - body - 1)
        prompts.append(tokenizer.decode(ids[start:start + body]))
    return prompts


async def closed_loop(clients: int, prompts: list[str], one) -> float:
    """`clients` workers take prompts from a shared queue until it is empty; returns wall time."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)

    async def worker() -> None:
        while True:
            try:
                prompt = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            await one(prompt)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return time.perf_counter() - t0


def run_in_process(ckpt_path: Path, device: str | None, prompts: list[str], clients: int, max_tokens: int) -> Run:
    from gpt.chat import chat_prompt_ids, chat_stop_ids
    from gpt.checkpoint import load_checkpoint
    from server.engine.api import Delta, EngineRequest, SamplingParams
    from server.engine.config import EngineConfig
    from server.engine.offline import build_engine

    ckpt = load_checkpoint(ckpt_path, device="cpu")
    engine = build_engine(ckpt.model, EngineConfig(device=device))
    run = Run()
    counter = iter(range(1 << 30))

    async def one(prompt: str, sink: Run) -> None:
        ids = chat_prompt_ids(ckpt.tokenizer, [{"role": "user", "content": prompt}])
        start = time.perf_counter()
        stream = engine.submit(EngineRequest(f"b{next(counter)}", ids, SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True), chat_stop_ids(ckpt.tokenizer)))
        arrivals = []
        async for ev in stream:
            if isinstance(ev, Delta) and ev.token_ids:
                arrivals.append((time.perf_counter(), len(ev.token_ids)))
        sink.note(start, arrivals)

    async def main() -> None:
        warm = Run()
        await closed_loop(min(clients, 4), prompts[:8], lambda p: one(p, warm))   # first calls pay for setup
        run.wall_s = await closed_loop(clients, prompts, lambda p: one(p, run))

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()
    return run


def run_grpc(target: str, api_key: str, prompts: list[str], clients: int, max_tokens: int, model: str) -> Run:
    from client.aio import AsyncClient

    run = Run()

    async def main() -> None:
        async with AsyncClient(target, api_key=api_key, retries=0) as c:
            async def one(prompt: str, sink: Run) -> None:
                start = time.perf_counter()
                stream = c.chat_stream([{"role": "user", "content": prompt}], model=model, max_tokens=max_tokens,
                                       temperature=0.0, ignore_eos=True)
                arrivals = []
                async for chunk in stream:
                    k = sum(len(d.token_ids) for d in chunk.deltas)
                    if k:
                        arrivals.append((time.perf_counter(), k))
                sink.note(start, arrivals)

            warm = Run()
            await closed_loop(min(clients, 4), prompts[:8], lambda p: one(p, warm))
            run.wall_s = await closed_loop(clients, prompts, lambda p: one(p, run))

    asyncio.run(main())
    return run


def run_http(port: int, api_key: str, prompts: list[str], clients: int, max_tokens: int, model: str) -> Run:
    """The same load over the OpenAI-compatible HTTP API: streaming chat completions as
    SSE, one keep-alive connection per client, read by a minimal asyncio HTTP/1.1 client
    (the gRPC side uses sol's own lean client too; an SDK's per-chunk parsing would
    measure the client, not the server). `return_token_ids` gives each chunk's token
    count, as gRPC chunks carry their token ids."""
    import json as _json

    run = Run()

    async def read_chunked(reader: asyncio.StreamReader):
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                return
            data = await reader.readexactly(size + 2)
            yield data[:-2]

    async def one(conn: list, prompt: str, sink: Run) -> None:
        body = _json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
                            "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
                            "return_token_ids": True}).encode()
        if not conn:
            conn.extend(await asyncio.open_connection("127.0.0.1", port))
        reader, writer = conn
        start = time.perf_counter()
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: sol\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {api_key}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        status = await reader.readline()
        if not status.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"HTTP bench request failed: {status!r}")
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        arrivals, buffer = [], b""
        async for data in read_chunked(reader):
            buffer += data
            *events, buffer = buffer.split(b"\n\n")
            k = 0
            for event in events:
                if event.startswith(b"data: {"):
                    k += sum(len(c.get("token_ids", ())) for c in _json.loads(event[6:])["choices"])
            if k:
                arrivals.append((time.perf_counter(), k))
        sink.note(start, arrivals)

    async def main() -> None:
        async def loop(n: int, batch: list[str], sink: Run) -> float:
            queue = list(reversed(batch))
            conns: list[list] = [[] for _ in range(n)]

            async def worker(conn: list) -> None:
                while queue:
                    await one(conn, queue.pop(), sink)

            t0 = time.perf_counter()
            await asyncio.gather(*(worker(c) for c in conns))
            for c in conns:
                if c:
                    c[1].close()
            return time.perf_counter() - t0

        await loop(min(clients, 4), prompts[:8], Run())
        run.wall_s = await loop(clients, prompts, run)

    asyncio.run(main())
    return run


def _in_process_child(path: str, device: str | None, prompts: list[str], clients: int, max_tokens: int) -> Run:
    cpu0 = _own_cpu_seconds()
    run = run_in_process(Path(path), device, prompts, clients, max_tokens)
    run.cpu = {"cpu_s": _own_cpu_seconds() - cpu0}
    return run


def _in_fresh_process(path: Path, device: str | None, prompts: list[str], clients: int, max_tokens: int) -> Run:
    """The in-process baseline runs in a fresh process too, like the server: neither side
    inherits this process's threads, heap or imported libraries."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_in_process_child, str(path), device, prompts, clients, max_tokens).result()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc), 0 where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path, registry: Path, model: str, device: str | None, admin_key: str, log: Path,
           watch: bool = True, http_port: int = 0, dtype: str | None = None, extra_args: tuple[str, ...] = ()):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = _free_port()
    env = {**os.environ, "SOL_HOME": str(home), "SOL_ADMIN_KEY": admin_key}
    env.pop("SOL_REDIS_URL", None)
    cmd = [sys.executable, "-m", "client.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--metrics-port", "0", "--http-port", str(http_port), "--registry", str(registry), "--model", model]
    if device:
        cmd += ["--device", device]
    if dtype:
        cmd += ["--dtype", dtype]
    if not watch:
        cmd += ["--no-watch"]
    cmd += extra_args
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
    target = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"sol serve exited with {proc.returncode}; see {log}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return proc, target
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"sol serve did not become ready; see {log}")


def stop_server(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGTERM (the graceful drain), then kill if it outlives the grace period."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()


def run_bench_serve(args: argparse.Namespace) -> int:
    from gpt.registry import Registry, default_home

    out_dir = default_home() / "bench" / "serve"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sol-bench-serve-") as tmp:
        home = Path(tmp)
        if args.model:
            registry = Registry(args.registry)
            resolved = registry.resolve(args.model)
            model_desc = f"{args.model} ({resolved.path})"
        else:
            registry, resolved = _random_model(home, args.preset)
            model_desc = f"{args.preset} preset, random init"
        from gpt.checkpoint import load_checkpoint

        tokenizer = load_checkpoint(resolved.path, device="cpu").tokenizer
        prompts = build_prompts(tokenizer, args.requests, args.prompt_tokens, seed=0)
        print(f"sol bench serve: {model_desc}; {args.clients} streaming clients, {args.requests} requests, "
              f"~{args.prompt_tokens} prompt + {args.max_tokens} generated tokens each", flush=True)

        admin_key = "sk-sol-admin-bench"
        http_port = _free_port() if args.http else 0
        proc, target = start_server(home, registry.root, f"{resolved.name}@{resolved.version}", args.device, admin_key,
                              home / "serve.log", watch=args.watch, http_port=http_port)
        locals_, remotes, https = [], [], []
        try:
            from client.client import Client

            with Client(target, admin_key=admin_key) as admin:
                key, _ = admin.create_key("bench")
            # Alternate the two, several rounds, and keep each side's best: on a shared
            # machine other work slows single runs down, never speeds them up.
            for r in range(args.rounds):
                local = _in_fresh_process(resolved.path, args.device, prompts, args.clients, args.max_tokens)
                locals_.append(local)
                server_cpu0, client_cpu0 = _cpu_seconds(proc.pid), _own_cpu_seconds()
                remote = run_grpc(target, key, prompts, args.clients, args.max_tokens,
                                  f"{resolved.name}@{resolved.version}")
                remote.cpu = {"server_cpu_s": _cpu_seconds(proc.pid) - server_cpu0,
                              "client_cpu_s": _own_cpu_seconds() - client_cpu0}
                remotes.append(remote)
                if args.http:
                    https.append(run_http(http_port, key, prompts, args.clients, args.max_tokens,
                                          f"{resolved.name}@{resolved.version}"))
                print(f"round {r + 1}/{args.rounds}: in-process {local.summary()['tokens_per_s']:.1f} tokens/s, "
                      f"gRPC {remote.summary()['tokens_per_s']:.1f} tokens/s"
                      + (f", HTTP {https[-1].summary()['tokens_per_s']:.1f} tokens/s" if args.http else ""),
                      flush=True)
        finally:
            stop_server(proc)

    local = max(locals_, key=lambda x: x.summary()["tokens_per_s"])
    remote = max(remotes, key=lambda x: x.summary()["tokens_per_s"])
    local_cpu, cpu = local.cpu["cpu_s"], remote.cpu
    a, b = local.summary(), remote.summary()
    ratios = {"tokens_per_s_grpc_over_in_process": b["tokens_per_s"] / a["tokens_per_s"],
              "ttft_p50_grpc_over_in_process": b["ttft_p50_ms"] / a["ttft_p50_ms"],
              "itl_p50_grpc_over_in_process": b["itl_p50_ms"] / a["itl_p50_ms"]}
    result = {"setup": {"model": model_desc, "clients": args.clients, "requests": args.requests,
                        "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
                        "device": args.device or "default", "cpus": os.cpu_count(), "rounds": args.rounds,
                        "registry_watch": args.watch,
                        "all_rounds_tokens_per_s": {"in_process": [x.summary()["tokens_per_s"] for x in locals_],
                                                    "grpc": [x.summary()["tokens_per_s"] for x in remotes]}},
              "in_process": {**a, "cpu_s": local_cpu}, "grpc": {**b, **cpu}, "ratios": ratios, "target": {"tokens_per_s_ratio": f">= {TARGET_RATIO}"}}
    if https:
        h = max(https, key=lambda x: x.summary()["tokens_per_s"]).summary()
        result["http"] = h
        result["setup"]["all_rounds_tokens_per_s"]["http"] = [x.summary()["tokens_per_s"] for x in https]
        ratios.update({"tokens_per_s_http_over_grpc": h["tokens_per_s"] / b["tokens_per_s"],
                       "ttft_p50_http_over_grpc": h["ttft_p50_ms"] / b["ttft_p50_ms"],
                       "itl_p50_http_over_grpc": h["itl_p50_ms"] / b["itl_p50_ms"]})
        result["target"]["tokens_per_s_http_over_grpc"] = f">= {HTTP_TARGET_RATIO}"
    (out_dir / "serve.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    rows = [("tokens/s", "tokens_per_s", "{:.1f}"), ("TTFT p50 (ms)", "ttft_p50_ms", "{:.1f}"),
            ("TTFT p99 (ms)", "ttft_p99_ms", "{:.1f}"), ("ITL p50 (ms)", "itl_p50_ms", "{:.2f}"),
            ("ITL p99 (ms)", "itl_p99_ms", "{:.2f}"), ("e2e mean (ms)", "e2e_mean_ms", "{:.1f}"),
            ("requests", "requests", "{}"), ("tokens", "tokens", "{}")]
    print(f"\n{'':16}{'in-process':>14}{'gRPC':>14}{'gRPC/in-proc':>14}")
    for label, k, fmt in rows:
        ratio = b[k] / a[k] if a[k] else float("nan")
        print(f"{label:16}{fmt.format(a[k]):>14}{fmt.format(b[k]):>14}{ratio:>14.2f}")
    print(f"CPU seconds (best rounds): in-process {local_cpu:.1f} (model load and warm-up included); gRPC: server "
          f"{cpu['server_cpu_s']:.1f}, clients {cpu['client_cpu_s']:.1f}")
    if https:
        print(f"\n{'':16}{'gRPC':>14}{'HTTP (SSE)':>14}{'HTTP/gRPC':>14}")
        for label, k, fmt in rows:
            ratio = h[k] / b[k] if b[k] else float("nan")
            print(f"{label:16}{fmt.format(b[k]):>14}{fmt.format(h[k]):>14}{ratio:>14.2f}")
        rh = ratios["tokens_per_s_http_over_grpc"]
        print(f"tokens/s ratio HTTP / gRPC: {rh:.2f} (target >= {HTTP_TARGET_RATIO}: "
              f"{'met' if rh >= HTTP_TARGET_RATIO else 'NOT met'})")
    r = ratios["tokens_per_s_grpc_over_in_process"]
    print(f"\ntokens/s ratio gRPC / in-process: {r:.2f} (target >= {TARGET_RATIO}: "
          f"{'met' if r >= TARGET_RATIO else 'NOT met'}); wrote {out_dir / 'serve.json'}")
    return 0


def _random_model(home: Path, preset_name: str):
    import torch

    from gpt.config import preset
    from gpt.model import GPT
    from gpt.registry import Registry, publish_checkpoint
    from gpt.tokenizer import train_tokenizer
    from training.data.corpus import build_corpus

    config = preset(preset_name)
    corpus = build_corpus(max_bytes=1 << 20)
    tokenizer = train_tokenizer(corpus.train, vocab_size=config.vocab_size, show_progress=False)
    torch.manual_seed(0)
    model = GPT(config.replace(vocab_size=tokenizer.vocab_size)).eval()
    registry = Registry(home / "registry")
    resolved = publish_checkpoint(registry, "bench", model, tokenizer, {"stage": "base"})
    return registry, resolved
