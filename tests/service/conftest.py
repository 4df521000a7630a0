"""Service fixtures: ledger stores (parametrized over Redis and SQLite) and a Redis that
survives being killed (AOF, fsync always), as production runs it."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.conftest import RedisServer


class DurableRedis(RedisServer):
    """The shared fixture's redis-server with AOF persistence: killing and restarting it
    keeps every acknowledged write, like a production ledger Redis."""

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return
            except (redis.ConnectionError, redis.BusyLoadingError):
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")


@pytest.fixture
def durable_redis(tmp_path):
    server = DurableRedis(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "sqlite":
        from server.accounting.ledger_sqlite import SqliteStore

        s = SqliteStore(tmp_path / "ledger.sqlite3")
        yield s
        s.close()
    else:
        from server.accounting.ledger_redis import RedisStore

        server = DurableRedis(tmp_path)
        server.start()
        s = RedisStore(server.url)
        s.server = server
        yield s
        s.close()
        server.stop()
