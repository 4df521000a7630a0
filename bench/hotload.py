"""`sol bench hotload`: latency while new versions are swapped in under load.

A real `sol serve` process follows `bench:latest` in a scratch registry; streaming
clients send greedy chats without pause; after a steady phase the benchmark publishes
new versions one after another. It reports end-to-end latency p50/p99 during swaps
against the steady state measured in the same run (target: p99 ratio <= 1.5), the time
from publish to the first answer served by the new version, and failed requests (the
target is zero). It writes JSON and a PNG timeline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

TARGET_P99_RATIO = 1.5


@dataclass
class Sample:
    start: float
    end: float
    ttft: float
    version: int
    ok: bool
    error: str = ""


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _publish(registry, tokenizer, preset: str, seed: int):
    import torch

    from gpt.config import preset as model_preset
    from gpt.model import GPT
    from gpt.registry import publish_checkpoint

    torch.manual_seed(seed)
    model = GPT(model_preset(preset).replace(vocab_size=tokenizer.vocab_size, tie_embeddings=False))
    return publish_checkpoint(registry, "bench", model, tokenizer, {"stage": "sft", "seed": seed})


def _clients(target: str, key: str, clients: int, max_tokens: int, stop: threading.Event,
             samples: list[Sample]) -> threading.Thread:
    from client.aio import AsyncClient

    async def one_client(c, i: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            start = time.monotonic()
            first = None
            try:
                stream = c.chat_stream([{"role": "user", "content": f"Client {i} asks question {n}."}],
                                       model="bench", max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
                async for chunk in stream:
                    if first is None and any(d.token_ids for d in chunk.deltas):
                        first = time.monotonic()
                end = time.monotonic()
                samples.append(Sample(start, end, (first or end) - start, stream.version, True))
            except Exception as err:  # every failure is counted and reported
                samples.append(Sample(start, time.monotonic(), 0.0, 0, False, str(err)[:200]))

    async def main() -> None:
        async with AsyncClient(target, api_key=key, retries=0) as c:
            await asyncio.gather(*(one_client(c, i) for i in range(clients)))

    thread = threading.Thread(target=lambda: asyncio.run(main()), name="bench-clients", daemon=True)
    thread.start()
    return thread


def run_bench_hotload(args: argparse.Namespace) -> int:
    from bench.serve import start_server, stop_server
    from client.client import Client
    from gpt.config import preset as model_preset
    from gpt.registry import Registry, default_home
    from gpt.tokenizer import train_tokenizer
    from training.data.corpus import build_corpus

    out_dir = Path(args.out) if args.out else default_home() / "bench" / "hotload"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sol-bench-hotload-") as tmp:
        home = Path(tmp)
        registry = Registry(home / "registry")
        tokenizer = train_tokenizer(build_corpus(max_bytes=1 << 20).train, model_preset(args.preset).vocab_size,
                                    show_progress=False)
        _publish(registry, tokenizer, args.preset, seed=1)
        admin_key = "sk-sol-admin-bench"
        proc, target = start_server(home, registry.root, "bench", None, admin_key, home / "serve.log")
        samples: list[Sample] = []
        publishes: list[tuple[float, int]] = []
        stop = threading.Event()
        try:
            with Client(target, admin_key=admin_key) as admin:
                key, _ = admin.create_key("bench")
            print(f"sol bench hotload: {args.preset} preset, {args.clients} streaming clients, "
                  f"{args.max_tokens} tokens per answer; steady {args.steady_s:.0f}s, then {args.swaps} swaps "
                  f"{args.swap_interval_s:.0f}s apart", flush=True)
            thread = _clients(target, key, args.clients, args.max_tokens, stop, samples)
            time.sleep(args.warmup_s)
            t_steady = time.monotonic()
            time.sleep(args.steady_s)
            for i in range(args.swaps):
                t = time.monotonic()
                resolved = _publish(registry, tokenizer, args.preset, seed=100 + i)
                publishes.append((t, resolved.version))
                print(f"published bench@{resolved.version}", flush=True)
                time.sleep(args.swap_interval_s)
            stop.set()
            thread.join(timeout=120)
            t_end = time.monotonic()
        finally:
            stop_server(proc)

    result = summarise(samples, publishes, t_steady, t_end, args)
    (out_dir / "hotload.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    plot(samples, publishes, t_steady, out_dir / "hotload.png")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        s, w = result["steady"], result["during_swaps"]
        print(f"\n{'':28}{'steady':>10}{'swaps':>10}{'ratio':>8}")
        print(f"{'e2e latency p50 (ms)':28}{s['p50_ms']:>10.1f}{w['p50_ms']:>10.1f}{w['p50_ms'] / s['p50_ms']:>8.2f}")
        print(f"{'e2e latency p99 (ms)':28}{s['p99_ms']:>10.1f}{w['p99_ms']:>10.1f}{result['p99_ratio']:>8.2f}"
              f"   target <= {TARGET_P99_RATIO}")
        print(f"{'requests':28}{s['requests']:>10}{w['requests']:>10}")
        print("publish -> first answer by the new version: "
              + ", ".join(f"v{v}: {x:.2f}s" for v, x in result["publish_to_first_served_s"].items()))
        print(f"failed requests: {result['failed']} of {result['requests']}")
        print(f"wrote {out_dir / 'hotload.json'} and {out_dir / 'hotload.png'}")
    return 0 if result["failed"] == 0 else 1


def summarise(samples: list[Sample], publishes: list[tuple[float, int]], t_steady: float, t_end: float,
              args: argparse.Namespace) -> dict:
    ok = [s for s in samples if s.ok]
    first_swap = publishes[0][0] if publishes else t_end
    steady = [s.end - s.start for s in ok if s.start >= t_steady and s.end < first_swap]
    during = [s.end - s.start for s in ok if s.end >= first_swap]
    to_first = {}
    for t, version in publishes:
        served = [s.start + s.ttft for s in ok if s.version == version]
        if served:
            to_first[str(version)] = min(served) - t
    failures = [asdict(s) for s in samples if not s.ok]
    p99_steady, p99_swaps = percentile(steady, 0.99), percentile(during, 0.99)
    return {
        "setup": {"preset": args.preset, "clients": args.clients, "max_tokens": args.max_tokens,
                  "steady_s": args.steady_s, "swaps": args.swaps, "swap_interval_s": args.swap_interval_s},
        "steady": {"requests": len(steady), "p50_ms": percentile(steady, 0.5) * 1e3, "p99_ms": p99_steady * 1e3},
        "during_swaps": {"requests": len(during), "p50_ms": percentile(during, 0.5) * 1e3,
                         "p99_ms": p99_swaps * 1e3},
        "p99_ratio": p99_swaps / p99_steady if steady and during else float("nan"),
        "target": {"p99_ratio": f"<= {TARGET_P99_RATIO}", "failed": 0},
        "publish_to_first_served_s": to_first,
        "versions_served": sorted({s.version for s in ok}),
        "requests": len(samples), "failed": len(failures), "failures": failures[:20],
    }


def plot(samples: list[Sample], publishes: list[tuple[float, int]], t0: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    versions = sorted({s.version for s in samples if s.ok})
    for v in versions:
        pts = [(s.end - t0, (s.end - s.start) * 1e3) for s in samples if s.ok and s.version == v]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=8, label=f"served by v{v}")
    bad = [(s.end - t0, 0) for s in samples if not s.ok]
    if bad:
        ax.scatter([b[0] for b in bad], [b[1] for b in bad], marker="x", color="red", label="failed")
    for t, v in publishes:
        ax.axvline(t - t0, color="grey", linestyle="--", linewidth=1)
        ax.text(t - t0, ax.get_ylim()[1] * 0.97, f" publish v{v}", fontsize=8, va="top")
    ax.set_xlabel("seconds since the steady phase began")
    ax.set_ylabel("end-to-end latency (ms)")
    ax.set_title("sol bench hotload: request latency while new versions swap in")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
