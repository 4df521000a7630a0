"""`sol bench fuzz`: hostile input through both public APIs of a running server, counted.

A seeded generator makes request after request from families of bad input (extreme and
non-finite numbers, Unicode and lone surrogates, huge strings, grammar bombs, schemas
nested thousands of levels deep, bad model references, bad logit_bias, negative and huge
max_tokens and n, malformed JSON bodies, bad prices and model lifecycle calls) and sends
each over gRPC or HTTP, a few at a time, bounded in count and time. Meanwhile one healthy
client sends small completions in a loop. The report: how many answers of each status per
protocol, the cases that got INTERNAL/UNKNOWN or HTTP 5xx (expected: none), whether the
server still answers a normal request, its RSS growth, and the healthy client's latency
percentiles during the run.

`run_fuzz` is the part the tests call against an in-process server; the CLI starts a
`sol serve` of a random tiny model on loopback, runs it, and stops the server.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import math
import random
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from proto.sol.v1 import sol_pb2 as pb
from proto.sol.v1 import sol_pb2_grpc as pb_grpc

INT32 = 2**31 - 1
BAD_CODES = ("INTERNAL", "UNKNOWN")
WEIRD_TEXT = ["", "\x00", "\u202e", "١٢٣", "²", "\U0001F600" * 50, "a" * 70_000, "\ud800", "é" * 300, "\n\r\t",
              "{" * 5000, "%s%n", "<|end|>", "𝟘𝟙"]
BAD_REFS = ["tiny@²", "tiny@" + "9" * 5000, "tiny@١", "tiny@0", "tiny@99999999999", "tiny@-1", "tiny@ 1", "",
            "TINY", "tiny:", "tiny:@", "tiny@1@2", "x" * 100_000, "tiny:latest\x00", "../../etc", "tiny@1.5"]
NUMBERS = [math.nan, math.inf, -math.inf, -1.0, 0.0, 1e-300, 1e308, 2.0000001, -2.5, 100.0, 0.5]
INTS = [-1, 0, 1, 2, 7, 8, 9, 20, 21, 300, 301, 4096, INT32, -INT32 - 1]


@dataclass
class FuzzReport:
    cases: int = 0
    seconds: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)        # "grpc INVALID_ARGUMENT" / "http 400" -> count
    bad: list[str] = field(default_factory=list)                  # cases answered INTERNAL/UNKNOWN/5xx
    client_refused: int = 0                                       # cases the client libraries would not send
    healthy_after: bool = False
    rss_before_mib: float = 0.0
    rss_after_mib: float = 0.0
    healthy_requests: int = 0
    healthy_errors: int = 0
    healthy_p50_ms: float = 0.0
    healthy_p99_ms: float = 0.0
    healthy_max_ms: float = 0.0
    baseline_p50_ms: float = 0.0                                  # the healthy client alone, before the run
    baseline_p99_ms: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "bad": self.bad[:20], "rss_growth_mib": round(self.rss_after_mib - self.rss_before_mib, 1)}


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Cases:
    """The generator: `next()` gives (protocol, description, call) where call() returns
    the status name (gRPC) or HTTP status as text."""

    def __init__(self, rng: random.Random, model: str, grpc_target: str, http_port: int, key: str,
                 admin_key: str) -> None:
        self.rng = rng
        self.model = model
        self.http_port = http_port
        self.md = (("authorization", f"Bearer {key}"),)
        self.admin_md = (("authorization", f"Bearer {admin_key}"),)
        self.key = key
        self.channel = grpc.insecure_channel(grpc_target, options=[("grpc.max_receive_message_length", 64 << 20)])
        self.inference = pb_grpc.InferenceStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)
        self.serial = 0

    def close(self) -> None:
        self.channel.close()

    # --- values ---------------------------------------------------------------------------
    def pick(self, values: list) -> Any:
        return self.rng.choice(values)

    def text(self) -> str:
        return self.pick(WEIRD_TEXT + ["hello", "Once upon a time"])

    def ref(self) -> str:
        return self.pick(BAD_REFS + [self.model] * 6 + [f"{self.model}@1", f"{self.model}:latest", "nosuch"])

    def constraint(self) -> dict[str, Any]:
        self.serial += 1
        i = self.serial
        kind = self.rng.randrange(9)
        if kind == 0:
            return {"type": "regex", "regex": f"a{{{9_000_000 + i}}}"}
        if kind == 1:
            return {"type": "regex", "regex": f"(a{{{1001 + i % 50}}}){{1000}}"}
        if kind == 2:
            depth = self.pick([65, 1000, 3000])
            return {"type": "json_schema", "json_schema": {"name": "deep", "schema":
                    '{"type": "array", "items": ' * depth + "{}" + "}" * depth}}
        if kind == 3:
            return {"type": "json_schema", "json_schema": {"name": "x", "schema": self.pick(
                ["{", "[]", "null", '{"type": "nope"}', '{"not": {}}', '{"$ref": "#/nowhere"}'])}}
        if kind == 4:
            return {"type": "grammar", "grammar": self.pick(['start: "a" missing', "root ::= x", "start: y\ny: y y | \"a\"",
                                                              "start: /(a|aa)*b{1000}/"])}
        if kind == 5:
            return {"type": self.pick(["bogus", "", "TEXT", "regex"]), "regex": self.text()[:100]}
        if kind == 6:
            return {"type": "regex", "regex": self.pick(["[a-z", "(?<=a)b", "\\", "a{2,1}", "[0-9]{3}", ".*"])}
        if kind == 7:
            return {"type": "json_object"}
        return {"type": "regex", "regex": f"x{{{self.rng.randrange(1, 20000)}}}"}

    def sampling(self) -> dict[str, Any]:
        """A few fields of SamplingParams, each extreme or odd."""
        out: dict[str, Any] = {}
        for name in self.rng.sample(["max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
                                     "stop", "stop_token_ids", "presence_penalty", "frequency_penalty",
                                     "repetition_penalty", "logprobs", "n", "logit_bias", "response_format",
                                     "ignore_eos"], self.rng.randrange(1, 5)):
            if name in ("max_tokens", "min_tokens", "top_k", "logprobs", "n"):
                out[name] = self.pick(INTS)
            elif name == "seed":
                out[name] = self.pick([-1, 0, 2**63 - 1, -(2**63)])
            elif name == "stop":
                out[name] = [self.text()[:80] for _ in range(self.pick([0, 1, 8, 9]))]
            elif name == "stop_token_ids":
                out[name] = [self.pick(INTS) for _ in range(self.pick([1, 16, 17]))]
            elif name == "logit_bias":
                out[name] = {self.pick(INTS): self.pick(NUMBERS) for _ in range(self.pick([1, 3, 301]))}
            elif name == "response_format":
                out[name] = self.constraint()
            elif name == "ignore_eos":
                out[name] = True
            else:
                out[name] = self.pick(NUMBERS)
        out.setdefault("max_tokens", self.pick([1, 2, 4]))
        return out

    # --- gRPC -----------------------------------------------------------------------------
    def _rpc(self, fn: Callable, request, metadata, streaming: bool = False) -> str:
        try:
            if streaming:
                for _ in fn(request, metadata=metadata, timeout=30):
                    pass
            else:
                fn(request, metadata=metadata, timeout=30)
        except grpc.RpcError as err:
            return err.code().name
        return "OK"

    def grpc_params(self, values: dict[str, Any]) -> pb.SamplingParams:
        values = dict(values)
        fmt = values.pop("response_format", None)
        bias = values.pop("logit_bias", None)
        for name in ("max_tokens", "min_tokens", "top_k", "logprobs", "n"):
            if name in values:
                values[name] = max(-INT32 - 1, min(INT32, values[name]))
        params = pb.SamplingParams(**values)
        if bias:
            for k, v in bias.items():
                params.logit_bias[max(-INT32 - 1, min(INT32, k))] = v
        if fmt is not None:
            js = fmt.get("json_schema")
            params.response_format.CopyFrom(pb.ResponseFormat(
                type=fmt.get("type", ""), regex=fmt.get("regex", ""), grammar=fmt.get("grammar", ""),
                json_schema=pb.JsonSchema(name=js["name"], schema=js["schema"]) if js else None))
        return params

    def grpc_case(self) -> tuple[str, Callable[[], str]]:
        kind = self.rng.randrange(10)
        if kind <= 3:
            params = self.sampling()
            req = pb.CompletionRequest(model=self.ref(), prompt=self.text() or "x", params=self.grpc_params(params))
            stream = kind == 3
            return (f"Completion{'Stream' if stream else ''} {json.dumps(params, default=str)[:200]}",
                    lambda: self._rpc(self.inference.CompletionStream if stream else self.inference.Completion,
                                      req, self.md, stream))
        if kind <= 5:
            params = self.sampling()
            msgs = [pb.ChatMessage(role=self.pick(["user", "system", "assistant", "robot", ""]), content=self.text())
                    for _ in range(self.pick([0, 1, 3]))]
            req = pb.ChatCompletionRequest(model=self.ref(), messages=msgs, params=self.grpc_params(params),
                                           request_id=self.pick(["", "ok-id", "bad id!", "x" * 200, "١"]))
            return (f"ChatCompletion {json.dumps(params, default=str)[:200]}",
                    lambda: self._rpc(self.inference.ChatCompletion, req, self.md))
        if kind == 6:
            ref = self.ref()
            req = pb.CountTokensRequest(model=ref, prompt=self.text())
            return f"CountTokens {ref[:40]!r}", lambda: self._rpc(self.inference.CountTokens, req, self.md)
        if kind == 7:
            ref = self.pick(BAD_REFS + ["nosuch", "nosuch@3"])
            load = self.rng.random() < 0.5
            if load:
                return (f"LoadModel {ref[:40]!r}",
                        lambda: self._rpc(self.admin.LoadModel, pb.LoadModelRequest(model=ref), self.admin_md))
            return (f"UnloadModel {ref[:40]!r}",
                    lambda: self._rpc(self.admin.UnloadModel, pb.UnloadModelRequest(model=ref), self.admin_md))
        if kind == 8:
            price = pb.Price(prompt_per_1k=self.pick(NUMBERS), completion_per_1k=self.pick(NUMBERS),
                             cached_discount=self.pick(NUMBERS))
            model = self.pick([self.model, "other", "BAD NAME", ""])
            req = pb.SetPriceRequest(model=model, price=price)
            return f"SetPrice {model!r} {price}".replace("\n", " "), lambda: self._rpc(self.admin.SetPrice, req,
                                                                                         self.admin_md)
        day = self.pick(["2026-12-07", "٢٠٢٦-١٢-٠٧", "x", ""])
        req = pb.GetUsageRequest(from_day=day)
        return f"GetUsage {day!r}", lambda: self._rpc(self.admin.GetUsage, req, self.admin_md)

    # --- HTTP -----------------------------------------------------------------------------
    def _post(self, path: str, body: bytes) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=30)
        try:
            conn.request("POST", path, body=body, headers={"Authorization": f"Bearer {self.key}",
                                                           "Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            return str(r.status)
        finally:
            conn.close()

    def http_case(self) -> tuple[str, Callable[[], str]]:
        chat = self.rng.random() < 0.5
        body: dict[str, Any] = {"model": self.ref(), **self.sampling()}
        if body.get("logit_bias"):
            body["logit_bias"] = {str(k): v for k, v in body["logit_bias"].items()}
            if self.rng.random() < 0.5:
                body["logit_bias"][self.pick(["١", " 1", "1_0", "+1", "9" * 5000, "x"])] = 1.0
        if chat:
            body["messages"] = [{"role": self.pick(["user", "robot"]), "content": self.text()}]
        else:
            body["prompt"] = self.pick([self.text(), [self.text()], 5, None])
        if self.rng.random() < 0.2:
            body["stream"] = True
        if self.rng.random() < 0.1:
            body[self.pick(["max_tokens", "n", "temperature"])] = self.pick(["7", None, [], {}, 10**30, -(10**30)])
        path = "/v1/chat/completions" if chat else "/v1/completions"
        try:
            data = json.dumps(body, ensure_ascii=self.rng.random() < 0.5).encode("utf-8", "surrogatepass")
        except (ValueError, TypeError):
            data = b"{}"
        roll = self.rng.random()
        if roll < 0.05:
            data = data[: self.rng.randrange(1, max(2, len(data)))]         # cut short
        elif roll < 0.08:
            data = bytes(self.rng.randrange(256) for _ in range(64))       # not JSON at all
        elif roll < 0.1:
            data = data.replace(b"0.5", b"NaN", 1).replace(b"1e+308", b"Infinity", 1)
        return f"POST {path} {data[:200]!r}", lambda: self._post(path, data)

    def next(self) -> tuple[str, str, Callable[[], str]]:
        if self.rng.random() < 0.5:
            return ("grpc", *self.grpc_case())
        return ("http", *self.http_case())


def _healthy_loop(target: str, key: str, model: str, stop: threading.Event, latencies: list[float],
                  errors: list[str]) -> None:
    md = (("authorization", f"Bearer {key}"),)
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        while not stop.is_set():
            started = time.monotonic()
            try:
                stub.Completion(pb.CompletionRequest(model=model, prompt="Hello there", params=pb.SamplingParams(
                    max_tokens=4, temperature=0.0)), metadata=md, timeout=30)
                latencies.append(time.monotonic() - started)
            except grpc.RpcError as err:
                errors.append(err.code().name)
            stop.wait(0.05)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _baseline(target: str, key: str, model: str, seconds: float) -> list[float]:
    """The healthy client's latencies with nothing else running."""
    stop, latencies, errors = threading.Event(), [], []
    loop = threading.Thread(target=_healthy_loop, args=(target, key, model, stop, latencies, errors), daemon=True)
    loop.start()
    time.sleep(seconds)
    stop.set()
    loop.join(60)
    return latencies[1:]           # the first pays for warm-up


def run_fuzz(target: str, http_port: int, key: str, healthy_key: str, admin_key: str, model: str, cases: int,
             seconds: float, seed: int = 0, server_pid: int | None = None, concurrency: int = 4,
             baseline_s: float = 0.0) -> FuzzReport:
    """Send up to `cases` cases within `seconds`, `concurrency` at a time; `healthy_key`
    (its own key, so the fuzzing key's rate and compile share do not touch it) runs the
    healthy client, first alone for `baseline_s` seconds."""
    report = FuzzReport()
    if baseline_s > 0:
        alone = _baseline(target, healthy_key, model, baseline_s)
        report.baseline_p50_ms = round(_pct(alone, 0.5) * 1e3, 1)
        report.baseline_p99_ms = round(_pct(alone, 0.99) * 1e3, 1)
    gen = Cases(random.Random(seed), model, target, http_port, key, admin_key)
    if server_pid is not None:
        report.rss_before_mib = rss_mib(server_pid)
    stop = threading.Event()
    latencies: list[float] = []
    healthy_errors: list[str] = []
    healthy = threading.Thread(target=_healthy_loop, args=(target, healthy_key, model, stop, latencies,
                                                           healthy_errors), daemon=True)
    healthy.start()
    statuses: Counter[str] = Counter()
    started = time.monotonic()
    lock = threading.Lock()

    def one(protocol: str, what: str, call: Callable[[], str]) -> None:
        try:
            status = call()
        except (ValueError, TypeError, UnicodeError):
            with lock:
                report.client_refused += 1           # the client library refused to encode it
            return
        except OSError as err:
            status = f"connection error {type(err).__name__}"
        with lock:
            statuses[f"{protocol} {status}"] += 1
            if status in BAD_CODES or status.startswith("5") or status.startswith("connection"):
                report.bad.append(f"{protocol} {status}: {what}")

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        pending: set[concurrent.futures.Future] = set()
        sent = 0
        while sent < cases and time.monotonic() - started < seconds:
            try:
                protocol, what, call = gen.next()
            except (ValueError, TypeError):
                report.client_refused += 1            # e.g. a proto field that will not take the value
                sent += 1
                continue
            pending.add(pool.submit(one, protocol, what, call))
            sent += 1
            if len(pending) >= concurrency * 2:
                _, pending = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
        concurrent.futures.wait(pending)
    report.cases = sent
    report.seconds = round(time.monotonic() - started, 1)
    stop.set()
    healthy.join(60)
    gen.close()
    report.statuses = dict(sorted(statuses.items()))
    report.healthy_requests = len(latencies)
    report.healthy_errors = len(healthy_errors)
    report.healthy_p50_ms = round(_pct(latencies, 0.5) * 1e3, 1)
    report.healthy_p99_ms = round(_pct(latencies, 0.99) * 1e3, 1)
    report.healthy_max_ms = round(max(latencies, default=0.0) * 1e3, 1)
    # Still healthy: a normal request answers, on both protocols.
    with grpc.insecure_channel(target) as channel:
        try:
            r = pb_grpc.InferenceStub(channel).Completion(pb.CompletionRequest(
                model=model, prompt="Hello", params=pb.SamplingParams(max_tokens=2)),
                metadata=(("authorization", f"Bearer {healthy_key}"),), timeout=60)
            grpc_ok = bool(r.choices)
        except grpc.RpcError:
            grpc_ok = False
    gen.key = healthy_key
    http_ok = gen._post("/v1/completions", json.dumps({"model": model, "prompt": "Hello", "max_tokens": 2}).encode())
    report.healthy_after = grpc_ok and http_ok == "200"
    if server_pid is not None:
        report.rss_after_mib = rss_mib(server_pid)
    return report


def run(args: argparse.Namespace) -> int:
    """The CLI: a `sol serve` of a random tiny model on loopback, fuzzed, then stopped."""
    from bench.serve import _free_port, _random_model, start_server, stop_server
    from client.client import Client

    admin_key = "sk-sol-admin-fuzz"
    with tempfile.TemporaryDirectory(prefix="sol-bench-fuzz-") as tmp:
        home = Path(tmp)
        registry, _ = _random_model(home, "tiny")
        http_port = _free_port()
        log = home / "serve.log"
        proc, target = start_server(home, registry.root, "bench", None, admin_key, log, watch=False,
                                    http_port=http_port)
        try:
            with Client(target, admin_key=admin_key) as admin:
                key, _ = admin.create_key("fuzz")
                healthy_key, _ = admin.create_key("healthy")
            report = run_fuzz(target, http_port, key, healthy_key, admin_key, "bench", args.cases, args.seconds,
                              args.seed, proc.pid, args.concurrency, args.baseline_seconds)
        finally:
            stop_server(proc)
        errors = [line for line in log.read_text(errors="replace").splitlines() if "Traceback" in line]
    out = report.as_dict()
    out["server_log_tracebacks"] = len(errors)
    out["rss_cap_mib"] = args.rss_cap_mib
    out["rss_within_cap"] = out["rss_growth_mib"] <= args.rss_cap_mib
    print(json.dumps(out, indent=2))
    return 0 if not report.bad and report.healthy_after and out["rss_within_cap"] and not errors else 1
