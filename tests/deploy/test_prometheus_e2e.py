"""End to end, the way a deployment sees sol: a real `sol serve` process (the command the
images run), the container healthcheck against it, and a real Prometheus on loopback
that scrapes its metrics port with sol's alert rules loaded. The TTFT histogram is read
back through Prometheus's HTTP API, and every alert and dashboard query is evaluated by
Prometheus against the live series."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.deploy.test_deploy_files import validate

ROOT = Path(__file__).resolve().parents[2]
HEALTHCHECK = ROOT / "deploy" / "docker" / "healthcheck.py"
ADMIN_KEY = "sk-sol-admin-e2e"
MESSAGES = [{"role": "user", "content": "What is 2 + 3?"}]
REQUESTS = 4

def _wait(condition, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: the process exited {proc.returncode}\n{log.read_text() if log else ''}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{log.read_text() if log else ''}")
        time.sleep(0.2)


def _stop(proc: subprocess.Popen, timeout: float = 30) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def _healthcheck(target: str, service: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HEALTHCHECK), "--target", target, "--service", service,
                           "--timeout", "2"], capture_output=True, text=True, timeout=30)


@pytest.fixture
def sol_server(tiny_checkpoint, tmp_path):
    """`sol serve` as the images start it, on free loopback ports, with the tiny model."""
    registry, resolved = tiny_checkpoint
    grpc_port, metrics_port = free_port(), free_port()
    env = dict(os.environ, SOL_HOME=str(tmp_path / "home"), SOL_ADMIN_KEY=ADMIN_KEY,
               SOL_KEY_PEPPER="e2e-pepper", SOL_GRACE_PERIOD="5", PYTHONUNBUFFERED="1")
    env.pop("SOL_REDIS_URL", None)          # the embedded ledger: this test is about metrics
    log = tmp_path / "sol-serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "client.cli", "serve", "--host", "127.0.0.1", "--port", str(grpc_port),
             "--metrics-port", str(metrics_port), "--http-port", "0", "--registry", str(registry.root),
             "--device", "cpu"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    target = f"127.0.0.1:{grpc_port}"
    try:
        _wait(lambda: _healthcheck(target).returncode == 0, 180, "sol serve to become ready", proc, log)
        yield {"target": target, "metrics_port": metrics_port, "model": resolved.name, "proc": proc, "log": log,
               "registry": registry.root}
    finally:
        _stop(proc)


@pytest.fixture
def prometheus(sol_server, tmp_path):
    """A real Prometheus scraping the server every second, with sol's rules loaded."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({        # JSON is YAML: no quoting surprises
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(validate.RULES)],
        "scrape_configs": [{"job_name": "sol",
                            "static_configs": [{"targets": [f"127.0.0.1:{sol_server['metrics_port']}"]}]}],
    }))
    log = tmp_path / "prometheus.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
            cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def api(path: str, **params):
        url = f"{base}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        _wait(ready, 60, "Prometheus to start", proc, log)
        yield api
    finally:
        _stop(proc)


def _scalar(result: list) -> float | None:
    return float(result[0]["value"][1]) if result else None


def test_prometheus_scrapes_sol_and_reads_back_ttft(sol_server, prometheus):
    from client.client import Client

    model = sol_server["model"]
    with Client(sol_server["target"], admin_key=ADMIN_KEY) as admin:
        key, _ = admin.create_key("e2e")
    client = Client(sol_server["target"], api_key=key)

    def chat():
        stream = client.chat_stream(MESSAGES, model=model, max_tokens=8, temperature=0, ignore_eos=True)
        assert len(list(stream)) > 0

    # The scrape target is up: Prometheus reached the metrics port by itself.
    def target_up():
        targets = prometheus("targets")["activeTargets"]
        return any(t["labels"]["job"] == "sol" and t["health"] == "up" for t in targets)
    _wait(target_up, 60, "Prometheus to scrape sol")

    # The TTFT histogram, read back: one observation per request, labelled by model. One
    # request first, so the series exists in Prometheus before the others raise it (a
    # rate needs two samples that differ).
    count_query = f'sum(sol_time_to_first_token_seconds_count{{job="sol",model="{model}"}})'

    def count() -> float:
        return _scalar(prometheus("query", query=count_query)["result"]) or 0

    chat()
    _wait(lambda: count() >= 1, 60, "the first TTFT observation in Prometheus")
    for _ in range(REQUESTS - 1):
        chat()
    client.close()
    _wait(lambda: count() >= REQUESTS, 60, f"{REQUESTS} TTFT observations in Prometheus")
    buckets = prometheus("query", query=f'sol_time_to_first_token_seconds_bucket{{job="sol",model="{model}"}}')
    by_le = {b["metric"]["le"]: float(b["value"][1]) for b in buckets["result"]}
    assert by_le["+Inf"] == REQUESTS
    cumulative = [by_le[le] for le in sorted(by_le, key=float)]
    assert cumulative == sorted(cumulative)
    # A quantile over the last minute is a finite latency: what the TTFT panel and the
    # SolTimeToFirstTokenP99High alert compute.
    p99 = prometheus("query", query="histogram_quantile(0.99, sum by (model, le) "
                                    f'(increase(sol_time_to_first_token_seconds_bucket{{model="{model}"}}[1m])))')["result"]
    assert p99 and p99[0]["metric"]["model"] == model
    assert 0 < float(p99[0]["value"][1]) < 60 and math.isfinite(float(p99[0]["value"][1]))

    # Every alert rule loads and evaluates without error against the live series, and
    # none fires on a healthy server.
    def rules_evaluated():
        groups = prometheus("rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return rules if rules and all(r.get("lastEvaluation", "").startswith("2") and
                                      not r["lastEvaluation"].startswith("0001") for r in rules) else None
    rules = _wait(rules_evaluated, 30, "every rule to be evaluated")
    assert {r["name"] for r in rules} == {r["alert"] for g in validate._yaml().safe_load(
        validate.RULES.read_text())["groups"] for r in g["rules"]}
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    assert not [r["name"] for r in rules if r["state"] != "inactive"]

    # Every dashboard query runs (Grafana variables substituted) and the core panels
    # have data.
    empty = []
    for where, expr in validate.dashboard_queries():
        result = prometheus("query", query=validate.grafana_to_promql(expr))["result"]
        if not result:
            empty.append(where)
    for panel in ("Time to first token", "Tokens per second", "KV cache usage", "Requests running and waiting"):
        assert not [w for w in empty if w.endswith(panel)], f"no data for {panel}"

    # The HPA's metric, as prometheus-adapter would ask for it (here by scrape target, as
    # there are no pod labels on loopback): one value per target.
    for name, query in validate.adapter_queries(matchers='job="sol"', group_by="instance"):
        result = prometheus("query", query=query)["result"]
        assert len(result) == 1 and result[0]["metric"]["instance"].endswith(str(sol_server["metrics_port"])), name


def _series(prometheus, query: str) -> list[dict]:
    return prometheus("query", query=query)["result"]


def test_checkpoint_rollout_and_refusal_seen_through_prometheus(sol_server, prometheus, tiny_tokenizer):
    """The runbook's rollout, observed the way an operator observes it: publishing a new
    version into the registry moves every replica to it (the "Loaded model versions"
    panel), and a broken version is refused while the old one keeps serving, which fires
    SolModelLoadFailed in a real Prometheus."""
    from gpt.checkpoint import write_checkpoint
    from gpt.registry import Registry, publish_checkpoint
    from tests.conftest import make_tiny_model

    registry = Registry(sol_server["registry"])
    model = sol_server["model"]
    info = f'sol_model_version_info{{job="sol",model="{model}"}}'
    _wait(lambda: _series(prometheus, info), 60, "the first version in Prometheus")

    # A good new version: published, hot-loaded, seen by Prometheus.
    new = publish_checkpoint(registry, model, make_tiny_model(tiny_tokenizer, seed=1), tiny_tokenizer,
                             {"stage": "sft", "step": 1}, aliases=("sft",))
    _wait(lambda: any(s["metric"]["version"] == str(new.version) for s in _series(prometheus, info)), 120,
          f"{model}@{new.version} to be loaded and scraped")
    assert _healthcheck(sol_server["target"]).returncode == 0

    # A broken one: the weights do not match the sha256 in meta.json.
    def write_broken(tmp):
        write_checkpoint(tmp, make_tiny_model(tiny_tokenizer, seed=2), tiny_tokenizer,
                         {"name": model, "stage": "sft", "step": 2})
        weights = tmp / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    broken = registry.publish(model, write_broken, ("sft",))

    failures = f'sum(sol_model_load_failures_total{{job="sol",model="{model}"}})'
    _wait(lambda: (_scalar(_series(prometheus, failures)) or 0) >= 1, 120, "the load failure to be counted")

    def alert_firing():
        alerts = prometheus("alerts")["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == "SolModelLoadFailed" and a["state"] == "firing"]
    fired = _wait(alert_firing, 60, "SolModelLoadFailed to fire")
    assert fired[0]["labels"]["model"] == model
    # The good version keeps serving and the server stays ready.
    versions = {s["metric"]["version"] for s in _series(prometheus, info)}
    assert str(broken.version) not in versions and str(new.version) in versions
    assert _healthcheck(sol_server["target"]).returncode == 0


def test_healthcheck_follows_readiness_and_drain(sol_server):
    """The container healthcheck says SERVING while a model is loaded; liveness answers
    too; after SIGTERM the server drains and exits 0."""
    target = sol_server["target"]
    assert _healthcheck(target).returncode == 0
    assert _healthcheck(target, "liveness").returncode == 0
    unknown = _healthcheck(target, "no.such.Service")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stdout
    assert _stop(sol_server["proc"]) == 0, sol_server["log"].read_text()
    assert _healthcheck(target).returncode == 1
