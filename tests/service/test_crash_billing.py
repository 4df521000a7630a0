"""`sol serve` SIGKILLed at random moments under mixed gRPC and HTTP streaming load and
restarted (bench/crash.py; `sol bench crash` runs the long version): every delivered
token is billed but fewer than metering_tokens per cut run, nothing beyond what the
kill kept from the client, nothing twice; a cut request id retried after the restart
is served. On the embedded SQLite ledger and on Redis."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.crash import run_crash

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("ledger", ["sqlite", "redis"])
def test_a_killed_server_bills_what_it_delivered(ledger, tmp_path, request, monkeypatch):
    # The servers' kernels in this checkout's own cache: torch rebuilds a shared cache's
    # library whenever a checkout with another source path loads it, which on a machine
    # with several checkouts made restarts take minutes.
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(REPO / "build" / "torch_extensions"))
    redis_url = request.getfixturevalue("durable_redis").url if ledger == "redis" else None
    report = run_crash(tmp_path / "home", cycles=3, clients=4, redis_url=redis_url, seed=1,
                       kill_after_s=(0.8, 2.0))
    print(report.summary())
    assert not report.violations, report.violations[:10]
    assert report.cut >= 3 and report.retried_served >= 1, report.summary()
