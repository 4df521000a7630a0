"""`sol bench fairness`: one key that floods the server must not take every other key's
time to first token with it. Two real `sol serve` processes (a random model of a small preset)
run side by side, one with `--scheduling fcfs`, one with `--scheduling fair`, each tenant's load driven by its
own process over gRPC:

- solo: the light tenant alone (one closed-loop client, short prompts), once per round;
- mixed: the light tenant beside a heavy one (closed-loop streams, more than the batch
  holds, prompts 8x longer): light TTFT p99 against solo (target fair <= 2x) and against
  fcfs (target fair <= 0.2x), total tokens/s fair / fcfs (target >= 0.95); the two
  servers run side by side and their mixed phases alternate (--rounds), pooled;
- weights (fair only): two heavy tenants of share 2 and 1, the same load each: their
  generated tokens (target 2:1 within 10%), over a phase long enough for the counters'
  bound to be within that (weights_seconds), with the bound reported.

A request still without its first token when a phase ends counts with the time it had
waited (a lower bound), so a starved tenant is not flattered by its missing requests.
Writes fairness.json and fairness.png (each tenant's tokens/s over time, per phase)."""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

TARGETS = {"light_ttft_p99_fair_over_solo": 2.0, "light_ttft_p99_fair_over_fcfs": 0.2,
           "tokens_per_s_fair_over_fcfs": 0.95, "weights_ratio_tolerance": 0.10}


@dataclass
class Tenant:
    """One tenant's load: `clients` closed-loop streams of `prompts` (cycled)."""

    name: str
    key: str
    clients: int
    prompts: list[str]
    max_tokens: int


@dataclass
class TenantRun:
    name: str
    ttft: list[float] = field(default_factory=list)          # seconds, requests started in the window
    arrivals: list[tuple[float, int]] = field(default_factory=list)   # (monotonic time, tokens)
    requests: int = 0
    errors: int = 0
    censored: int = 0               # requests with no first token when the phase ended


def drive(target: str, model: str, tenant: Tenant, start: float, end: float) -> TenantRun:
    """Run in a child process: `tenant`'s closed loop from `start` to `end` (monotonic
    clock, system-wide on Linux, so the parent's times compare)."""
    from client.aio import AsyncClient

    run = TenantRun(tenant.name)

    async def main() -> None:
        async with AsyncClient(target, api_key=tenant.key, retries=0, timeout=600.0) as c:
            async def one(prompt: str, t0: float, first: list[float]) -> None:
                stream = c.complete_stream(prompt, model=model, max_tokens=tenant.max_tokens, temperature=0.0,
                                           ignore_eos=True)
                async for chunk in stream:
                    k = sum(len(d.token_ids) for d in chunk.deltas)
                    if k:
                        now = time.monotonic()
                        if not first:
                            first.append(now)
                        run.arrivals.append((now, k))

            async def worker(w: int) -> None:
                i = w
                while time.monotonic() < end:
                    prompt = tenant.prompts[i % len(tenant.prompts)]
                    i += tenant.clients
                    t0 = time.monotonic()
                    first: list[float] = []
                    try:
                        # Cut at the phase's end (the gRPC call is cancelled, the server aborts it).
                        await asyncio.wait_for(one(prompt, t0, first), timeout=max(0.001, end - t0))
                    except TimeoutError:
                        if not first:
                            # Still waiting for its first token when the phase ended: its TTFT is
                            # at least this long, and leaving it out would flatter a starved tenant.
                            run.ttft.append(end - t0)
                            run.censored += 1
                        break
                    except Exception:   # noqa: BLE001 - a refused request counts as an error, the loop goes on
                        run.errors += 1
                        await asyncio.sleep(0.05)
                        continue
                    if first:
                        run.ttft.append(first[0] - t0)
                        run.requests += 1

            delay = start - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await asyncio.gather(*(worker(w) for w in range(tenant.clients)))

    asyncio.run(main())
    return run


def run_phase(target: str, model: str, tenants: list[Tenant], seconds: float) -> tuple[dict[str, TenantRun], float]:
    """Every tenant's process starts together (after a second to spawn) and stops at the
    same instant; returns the runs and the phase's start time."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(len(tenants), mp_context=ctx) as pool:
        # Spawned interpreters import the client before the clock starts.
        list(pool.map(_warm, range(len(tenants))))
        start = time.monotonic() + 1.0
        futures = [pool.submit(drive, target, model, t, start, start + seconds) for t in tenants]
        return {t.name: f.result() for t, f in zip(tenants, futures, strict=True)}, start


def _warm(_: int) -> None:
    import client.aio  # noqa: F401


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def tokens(run: TenantRun) -> int:
    return sum(k for _, k in run.arrivals)


def series(run: TenantRun, start: float, seconds: float, bin_s: float = 1.0) -> list[float]:
    bins = [0.0] * max(1, int(seconds / bin_s))
    for t, k in run.arrivals:
        i = int((t - start) / bin_s)
        if 0 <= i < len(bins):
            bins[i] += k / bin_s
    return bins


# The shares phase runs until heavy-1 (a third of the service) is expected to finish this
# many batches' worth of requests: the counters' bound is one batch of requests' cost
# (fair_policy.py), so after 10 batches the ratio is 2 within 2 / 10 = 10% even in the
# worst case. Capped, so a very slow machine ends with the bound it got (reported).
WEIGHTS_BATCHES = 10
WEIGHTS_MAX_S = 180.0


def weights_seconds(args: argparse.Namespace, phases: dict) -> float:
    """The shares phase's length: at least --weights-seconds, and long enough for heavy-1
    to finish WEIGHTS_BATCHES x max_num_seqs requests at the rate the fair mixed phases
    served the heavy tenant (the same requests, the same server). A phase of fixed seconds
    on a slow, shared machine finished only ~32 heavy requests, where the bound allows
    an error of 50%: its ratio measured noise, not the policy."""
    rounds = [phases[f"mixed (fair) #{r + 1}"]["heavy"] for r in range(args.rounds)]
    heavy_rps = sum(m["requests"] for m in rounds) / (args.seconds * len(rounds))
    needed = WEIGHTS_BATCHES * args.max_num_seqs / max(heavy_rps / 3.0, 1e-3)
    return min(max(args.weights_seconds, needed), max(args.weights_seconds, WEIGHTS_MAX_S))


def run_bench_fairness(args: argparse.Namespace) -> int:
    from bench.serve import _random_model, build_prompts, start_server, stop_server
    from client.client import Client
    from gpt.checkpoint import load_checkpoint
    from gpt.registry import default_home

    out_dir = Path(args.out) if args.out else default_home() / "bench" / "fairness"
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {"setup": {"preset": args.preset, "seconds": args.seconds, "rounds": args.rounds,
                              "weights_seconds": args.weights_seconds,
                              "max_num_seqs": args.max_num_seqs,
                              "light": {"clients": 1, "prompt_tokens": args.prompt_tokens,
                                        "max_tokens": args.max_tokens},
                              "heavy": {"clients": args.heavy_clients, "prompt_tokens": 8 * args.prompt_tokens,
                                        "max_tokens": args.heavy_max_tokens},
                              "cpus": os.cpu_count()}, "phases": {}}
    plots: list[tuple[str, dict[str, list[float]]]] = []
    with tempfile.TemporaryDirectory(prefix="sol-bench-fairness-") as tmp:
        home = Path(tmp)
        registry, resolved = _random_model(home, args.preset)
        tokenizer = load_checkpoint(resolved.path, device="cpu").tokenizer
        light_prompts = build_prompts(tokenizer, 64, args.prompt_tokens, seed=1)
        # Each heavy tenant its own prompts: shared ones would be served from the prefix
        # cache to whichever asked second, at the cached rate.
        heavy_prompts = {name: build_prompts(tokenizer, 64, 8 * args.prompt_tokens, seed=seed)
                         for seed, name in enumerate(("heavy", "heavy-2", "heavy-1"), start=2)}
        model = f"{resolved.name}@{resolved.version}"
        admin_key = "sk-sol-admin-bench"
        servers: dict[str, tuple] = {}
        try:
            for scheduling in ("fcfs", "fair"):
                proc, target = start_server(home / scheduling, registry.root, model, None, admin_key,
                                            home / f"serve-{scheduling}.log", watch=False,
                                            extra_args=("--scheduling", scheduling, "--max-num-seqs",
                                                        str(args.max_num_seqs), "--max-waiting-per-key", "0"))
                with Client(target, admin_key=admin_key) as admin:
                    keys = {name: admin.create_key(name, share=share)[0]
                            for name, share in (("light", 1.0), ("heavy", 1.0), ("heavy-2", 2.0), ("heavy-1", 1.0))}
                servers[scheduling] = (proc, target, keys)

            def tenant(scheduling: str, name: str) -> Tenant:
                keys = servers[scheduling][2]
                if name == "light":
                    return Tenant(name, keys[name], 1, light_prompts, args.max_tokens)
                return Tenant(name, keys[name], args.heavy_clients, heavy_prompts[name], args.heavy_max_tokens)

            # Both servers run side by side (an idle one costs nothing) and the phases that
            # compare them alternate, so a busy spell of this shared machine hits both alike.
            # The solo phase too is taken in every round: measured once, at the start, a
            # load change of this shared machine between it and the mixed phases (another
            # engineer's job starting) read as the policy's doing.
            plan = [("fcfs", "warm-up", ["light", "heavy"], 3.0), ("fair", "warm-up", ["light", "heavy"], 3.0)]
            for r in range(args.rounds):
                plan += [("fcfs", f"solo #{r + 1}", ["light"], args.seconds),
                         ("fcfs", f"mixed (fcfs) #{r + 1}", ["light", "heavy"], args.seconds),
                         ("fair", f"mixed (fair) #{r + 1}", ["light", "heavy"], args.seconds)]
            # The shares phase is sized by work, not time (see weights_seconds), so it is
            # planned once the mixed phases have measured this machine's speed.
            plan.append(("fair", "weights (fair)", ["heavy-2", "heavy-1"], None))
            for scheduling, label, names, seconds in plan:
                if seconds is None:
                    seconds = weights_seconds(args, result["phases"])
                    result["setup"]["weights_seconds_run"] = seconds
                runs, start = run_phase(servers[scheduling][1], model, [tenant(scheduling, n) for n in names], seconds)
                if label == "warm-up":
                    continue
                result["phases"][label] = {
                    name: {"seconds": seconds, "requests": r.requests, "errors": r.errors, "censored": r.censored,
                           "tokens": tokens(r), "tokens_per_s": tokens(r) / seconds,
                           "requests_per_s": r.requests / seconds,
                           "ttft_p50_ms": pct(r.ttft, 0.5) * 1e3, "ttft_p99_ms": pct(r.ttft, 0.99) * 1e3,
                           "ttft_ms": [round(x * 1e3, 1) for x in r.ttft] if name == "light" else []}
                    for name, r in runs.items()}
                plots.append((label, {name: series(r, start, seconds) for name, r in runs.items()}))
                print(f"{label}: " + ", ".join(
                    f"{n} {v['tokens_per_s']:.0f} tok/s, {v['requests']} req, TTFT p99 {v['ttft_p99_ms']:.0f} ms"
                    for n, v in result["phases"][label].items()), flush=True)
        finally:
            for proc, _, _ in servers.values():
                stop_server(proc)

    p = result["phases"]
    solo_ttft = [x for r in range(args.rounds) for x in p[f"solo #{r + 1}"]["light"]["ttft_ms"]]
    solo, solo_p50 = pct(solo_ttft, 0.99), pct(solo_ttft, 0.5)

    def pooled(scheduling: str) -> dict:
        """The rounds of one policy's mixed phase together: TTFT over every light request,
        tokens/s over the total time."""
        rounds = [p[f"mixed ({scheduling}) #{r + 1}"] for r in range(args.rounds)]
        ttft = [x for m in rounds for x in m["light"]["ttft_ms"]]
        return {"light_ttft_p99_ms": pct(ttft, 0.99), "light_ttft_p50_ms": pct(ttft, 0.5),
                "tokens_per_s": sum(v["tokens"] for m in rounds for v in m.values()) / (args.seconds * len(rounds)),
                "heavy_over_light_requests": sum(m["heavy"]["requests"] for m in rounds)
                / max(1, sum(m["light"]["requests"] for m in rounds))}

    fcfs, fair = pooled("fcfs"), pooled("fair")
    w = p["weights (fair)"]
    ratio = w["heavy-2"]["tokens"] / max(1, w["heavy-1"]["tokens"])
    # What the counters' bound allows this phase: |S_2 / 2 - S_1| <= B * C, so the ratio
    # is 2 within 2 * B * C / S_1 (S_1 in requests of cost C: B / heavy-1's requests).
    bound = 2.0 * args.max_num_seqs / max(1, w["heavy-1"]["requests"])
    result["summary"] = {
        "light_ttft_p99_ms": {"solo": solo, "fcfs": fcfs["light_ttft_p99_ms"], "fair": fair["light_ttft_p99_ms"]},
        "light_ttft_p50_ms": {"solo": solo_p50, "fcfs": fcfs["light_ttft_p50_ms"], "fair": fair["light_ttft_p50_ms"]},
        "light_ttft_p99_fair_over_solo": fair["light_ttft_p99_ms"] / solo,
        "light_ttft_p99_fair_over_fcfs": fair["light_ttft_p99_ms"] / fcfs["light_ttft_p99_ms"],
        "heavy_over_light_requests": {"fcfs": fcfs["heavy_over_light_requests"],
                                      "fair": fair["heavy_over_light_requests"]},
        "tokens_per_s": {"fcfs": fcfs["tokens_per_s"], "fair": fair["tokens_per_s"]},
        "tokens_per_s_fair_over_fcfs": fair["tokens_per_s"] / fcfs["tokens_per_s"],
        "weights_tokens_ratio": ratio, "weights_ratio_bound": bound, "targets": TARGETS}
    total = result["summary"]["tokens_per_s"]
    s = result["summary"]
    met = {"fair <= 2x solo": s["light_ttft_p99_fair_over_solo"] <= TARGETS["light_ttft_p99_fair_over_solo"],
           "fair <= 0.2x fcfs": s["light_ttft_p99_fair_over_fcfs"] <= TARGETS["light_ttft_p99_fair_over_fcfs"],
           "throughput >= 0.95": s["tokens_per_s_fair_over_fcfs"] >= TARGETS["tokens_per_s_fair_over_fcfs"],
           "2:1 within 10%": abs(ratio / 2.0 - 1.0) <= TARGETS["weights_ratio_tolerance"]}
    s["met"] = met
    (out_dir / "fairness.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    _plot(plots, out_dir / "fairness.png")
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"\nlight TTFT p99: solo {solo:.0f} ms, fcfs {fcfs['light_ttft_p99_ms']:.0f} ms, "
          f"fair {fair['light_ttft_p99_ms']:.0f} ms -> fair/solo {s['light_ttft_p99_fair_over_solo']:.2f}, "
          f"fair/fcfs {s['light_ttft_p99_fair_over_fcfs']:.2f} (p50: solo {solo_p50:.0f} ms, "
          f"fcfs {fcfs['light_ttft_p50_ms']:.0f} ms, fair {fair['light_ttft_p50_ms']:.0f} ms)")
    print(f"total tokens/s: fcfs {total['fcfs']:.0f}, fair {total['fair']:.0f} -> "
          f"{s['tokens_per_s_fair_over_fcfs']:.2f}")
    print(f"weights 2:1 -> generated tokens {w['heavy-2']['tokens']}:{w['heavy-1']['tokens']} = {ratio:.2f} "
          f"over {w['heavy-1']['seconds']:.0f} s, {w['heavy-1']['requests']} heavy-1 requests "
          f"(the counters' bound allows 2 +- {bound:.2f})")
    print("targets: " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in met.items()))
    print(f"wrote {out_dir / 'fairness.json'} and {out_dir / 'fairness.png'}")
    return 0


def _plot(plots: list[tuple[str, dict[str, list[float]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(plots), 1, figsize=(8, 2.4 * len(plots)), sharex=True)
    for ax, (label, per_tenant) in zip(axes, plots, strict=True):
        for name, ys in per_tenant.items():
            ax.plot(range(len(ys)), ys, label=name)
        ax.set_title(label, fontsize=10)
        ax.set_ylabel("tokens/s")
        ax.legend(fontsize=8, loc="upper right")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("seconds into the phase")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
