"""A short fuzz run (bench/fuzz.py) against a real server on loopback, both protocols:
no case answers INTERNAL/UNKNOWN or HTTP 5xx, and the server still serves afterwards."""

from __future__ import annotations

import os

from bench.fuzz import run_fuzz
from client.client import Client
from tests.conftest import free_port
from tests.service.harness import ADMIN_KEY, RunningServer, publish_tiny


def test_short_fuzz_run_gets_no_internal_errors(tiny_tokenizer, tmp_path):
    server = RunningServer(publish_tiny(tmp_path, tiny_tokenizer), tmp_path / "home", http_port=free_port()).start()
    try:
        with Client(server.target, admin_key=ADMIN_KEY, retries=0) as admin:
            key, _ = admin.create_key("fuzz")
            healthy, _ = admin.create_key("healthy")
        report = run_fuzz(server.target, server.app.http_port, key, healthy, ADMIN_KEY, "tiny", cases=150,
                          seconds=240, seed=1, server_pid=os.getpid())
    finally:
        server.stop()
    assert report.cases == 150
    assert not report.bad, report.bad
    assert report.healthy_after and report.healthy_requests > 0
    # The stated cap of `sol bench fuzz` (--rss-cap-mib), on this process (server and clients).
    assert report.rss_after_mib - report.rss_before_mib <= 256, report.as_dict()
    assert sum(report.statuses.values()) + report.client_refused == report.cases
    # Both protocols were exercised, and refusals dominate.
    assert any(s.startswith("grpc INVALID_ARGUMENT") for s in report.statuses)
    assert any(s.startswith("http 400") for s in report.statuses)
