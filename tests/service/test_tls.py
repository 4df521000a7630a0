"""TLS end to end with a CA made in the test: a real server on loopback with
--tls-cert/--tls-key (and --tls-client-ca), the Python client and CLI with --tls-ca
(and a client certificate), a certificate renewed on disk while serving, the plain-text
health port for probes, and the ledger on a real redis-server that speaks TLS only."""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from client.client import Client
from client.tls import ChannelTls
from client.types import SolError
from server.accounting.ledger import StoreUnavailable
from server.tls import TlsError, TlsFiles
from tests.certs import TestCA, served_serial
from tests.conftest import RedisServer
from tests.service.harness import ADMIN_KEY, RunningServer, publish_tiny, wait_for

MSG = [{"role": "user", "content": "hi"}]
REFUSED = grpc.StatusCode.UNAVAILABLE     # how a failed handshake reaches a gRPC client


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


@pytest.fixture(scope="module")
def registry_root(tmp_path_factory, tiny_tokenizer) -> Path:
    return publish_tiny(tmp_path_factory.mktemp("tls"), tiny_tokenizer)


class Pki:
    """A Secret-like directory: tls.crt, tls.key, ca.crt (and the client's files)."""

    def __init__(self, root: Path, ca: TestCA) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.ca = root, ca
        self.cert, self.key = root / "tls.crt", root / "tls.key"
        self.ca_file = ca.write_ca(root / "ca.crt")
        self.server = ca.issue("localhost")
        self.server.write(self.cert, self.key)

    def client_files(self, ca: TestCA | None = None, name: str = "client") -> tuple[Path, Path]:
        issued = (ca or self.ca).issue(name, client=True)
        cert, key = self.root / f"{name}.crt", self.root / f"{name}.key"
        issued.write(cert, key)
        return cert, key


def start(registry_root: Path, home: Path, pki: Pki, mutual: bool = False, **overrides) -> RunningServer:
    return RunningServer(registry_root, home, tls_cert=pki.cert, tls_key=pki.key,
                         tls_client_ca=pki.ca_file if mutual else None, **overrides).start()


def refused(client: Client) -> SolError:
    with pytest.raises(SolError) as info:
        client.list_models()
    assert info.value.code == REFUSED, info.value
    return info.value


def test_trusted_client_chats_untrusted_and_plain_text_are_refused(registry_root, ca, tmp_path):
    pki = Pki(tmp_path / "pki", ca)
    s = start(registry_root, tmp_path / "home", pki)
    try:
        with Client(s.target, admin_key=ADMIN_KEY, tls_ca=pki.ca_file, retries=0) as admin:
            key, _ = admin.create_key("tls")
        with Client(s.target, api_key=key, tls_ca=pki.ca_file, retries=0) as c:
            assert c.chat(MSG, model="tiny", max_tokens=3, ignore_eos=True).usage.completion_tokens == 3
            assert "".join(ch.text for ch in c.chat_stream(MSG, model="tiny", max_tokens=3))
        other = TestCA("another CA").write_ca(tmp_path / "other-ca.crt")
        for client in (Client(s.target, api_key=key, tls_ca=other, retries=0, timeout=5),
                       Client(s.target, api_key=key, retries=0, timeout=5)):          # plain text
            with client:
                refused(client)
    finally:
        s.stop()


def test_mutual_tls_needs_a_client_certificate_from_the_ca(registry_root, ca, tmp_path):
    pki = Pki(tmp_path / "pki", ca)
    s = start(registry_root, tmp_path / "home", pki, mutual=True)
    try:
        cert, key_file = pki.client_files()
        with Client(s.target, api_key="unused", tls_ca=pki.ca_file, tls_cert=cert, tls_key=key_file,
                    retries=0) as c:
            with pytest.raises(SolError) as info:          # through TLS; refused by the API key check
                c.list_models()
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
        stranger = pki.client_files(TestCA("a stranger's CA"), "stranger")
        for kwargs in ({}, {"tls_cert": stranger[0], "tls_key": stranger[1]}):
            with Client(s.target, api_key="unused", tls_ca=pki.ca_file, retries=0, timeout=5, **kwargs) as c:
                refused(c)
    finally:
        s.stop()


def test_a_renewed_certificate_is_served_without_a_restart(registry_root, ca, tmp_path, caplog):
    pki = Pki(tmp_path / "pki", ca)
    s = start(registry_root, tmp_path / "home", pki)
    host, port = "127.0.0.1", s.app.port
    try:
        assert served_serial(host, port, pki.ca_file) == pki.server.serial
        with Client(s.target, admin_key=ADMIN_KEY, tls_ca=pki.ca_file, retries=0) as admin:
            admin.list_keys()
            # Half a rotation (the certificate without its key) is refused; the old pair serves on.
            renewed = ca.issue("localhost")
            with caplog.at_level(logging.WARNING, logger="sol.tls"):
                tmp = pki.cert.with_name(".half")
                tmp.write_bytes(renewed.cert_pem)
                tmp.replace(pki.cert)
                assert served_serial(host, port, pki.ca_file) == pki.server.serial
            assert any("cannot be used yet" in r.getMessage() for r in caplog.records)
            renewed.write(pki.cert, pki.key)
            wait_for(lambda: served_serial(host, port, pki.ca_file) == renewed.serial, timeout=10,
                     message="the renewed certificate on a new connection")
            admin.list_keys()                      # the connection made before still works
        with Client(s.target, admin_key=ADMIN_KEY, tls_ca=pki.ca_file, retries=0) as fresh:
            fresh.list_keys()
        assert s.app.tls_credentials.reloads == 1
    finally:
        s.stop()


def test_the_http_port_serves_https_with_the_same_files_and_follows_a_renewal(registry_root, ca, tmp_path):
    import ssl
    import urllib.request

    from tests.conftest import free_port

    pki = Pki(tmp_path / "pki", ca)
    s = start(registry_root, tmp_path / "home", pki, http_port=free_port())
    s.app.http.tls_poll_s = 0.1
    host, port = "127.0.0.1", s.app.http_port
    try:
        context = ssl.create_default_context(cafile=str(pki.ca_file))
        with urllib.request.urlopen(f"https://localhost:{port}/health", context=context, timeout=10) as r:
            assert r.status == 200
        assert served_serial(host, port, pki.ca_file) == pki.server.serial
        with pytest.raises(OSError):              # plain HTTP on the TLS port gets no answer
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
        renewed = ca.issue("localhost")
        renewed.write(pki.cert, pki.key)
        wait_for(lambda: served_serial(host, port, pki.ca_file) == renewed.serial, timeout=10,
                 message="the renewed certificate on the HTTPS port")
    finally:
        s.stop()


def test_health_port_answers_probes_in_plain_text(registry_root, ca, tmp_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tests.conftest import free_port

    pki = Pki(tmp_path / "pki", ca)
    s = start(registry_root, tmp_path / "home", pki, mutual=True, health_port=free_port())
    try:
        with grpc.insecure_channel(f"127.0.0.1:{s.app.health_port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            for service in ("", "liveness"):
                reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            # Nothing else is served there.
            with pytest.raises(grpc.RpcError) as info:
                ch.unary_unary("/sol.v1.Admin/ListKeys")(b"", timeout=5)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        s.stop()


def test_cli_takes_the_tls_flags(registry_root, ca, tmp_path, capsys):
    from client.cli import main

    pki = Pki(tmp_path / "pki", ca)
    s = start(registry_root, tmp_path / "home", pki, mutual=True)
    cert, key_file = pki.client_files()
    try:
        flags = ["--target", s.target, "--tls-ca", str(pki.ca_file), "--tls-cert", str(cert), "--tls-key",
                 str(key_file)]
        assert main(["keys", "create", "--name", "cli", "--admin-key", ADMIN_KEY, *flags]) == 0
        key = capsys.readouterr().out.strip()
        assert main(["served", "--api-key", key, "--json", *flags]) == 0
        assert '"tiny"' in capsys.readouterr().out
        assert main(["served", "--api-key", key, "--target", s.target, "--timeout", "5"]) == 1   # plain text
        assert "unavailable" in capsys.readouterr().err
        assert main(["served", "--api-key", key, "--tls-cert", str(cert), *flags[:4]]) == 2       # no key
        assert "--tls-key" in capsys.readouterr().err
    finally:
        s.stop()


def test_tls_settings_are_checked_at_start(ca, tmp_path):
    pki = Pki(tmp_path / "pki", ca)
    assert TlsFiles.from_settings(None, None, None) is None
    with pytest.raises(TlsError, match="--tls-key"):
        TlsFiles.from_settings(pki.cert, None, None)
    with pytest.raises(TlsError, match="--tls-client-ca"):
        TlsFiles.from_settings(None, None, pki.ca_file)
    other_key = tmp_path / "other.key"
    other_key.write_bytes(ca.issue().key_pem)
    with pytest.raises(TlsError, match="cannot use the TLS files"):
        TlsFiles.from_settings(pki.cert, other_key, None)           # a key of another certificate
    with pytest.raises(TlsError, match="cannot use the TLS files"):
        TlsFiles.from_settings(pki.cert, tmp_path / "missing.key", None)
    files = TlsFiles.from_settings(pki.cert, pki.key, pki.ca_file)
    assert files.uvicorn_options() == {"ssl_certfile": str(pki.cert), "ssl_keyfile": str(pki.key),
                                       "ssl_ca_certs": str(pki.ca_file), "ssl_cert_reqs": 2}
    assert ChannelTls.resolve() is None                          # the client's default: plain text
    assert ChannelTls.resolve(ca=pki.ca_file) == ChannelTls(ca=pki.ca_file)


def test_sol_serve_reports_bad_tls_settings(tmp_path):
    import os
    import sys

    env = {**os.environ, "SOL_HOME": str(tmp_path), "SOL_TLS_CERT": str(tmp_path / "missing.crt")}
    env.pop("SOL_TLS_KEY", None)
    out = subprocess.run([sys.executable, "-m", "client.cli", "serve", "--port", "0", "--metrics-port", "0"],
                         env=env, capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 2, out.stderr
    assert "sol: error: --tls-cert and --tls-key" in out.stderr and "Traceback" not in out.stderr


# --- the ledger on a Redis that speaks TLS only -----------------------------------------------

class TlsRedis(RedisServer):
    """The shared fixture's redis-server, with its plain-text port off and a TLS port."""

    def __init__(self, workdir: Path, pki: Pki, auth_clients: bool) -> None:
        super().__init__(workdir)
        self.pki = pki
        self.auth_clients = auth_clients

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen(
            [self.binary, "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
             "--tls-cert-file", str(self.pki.cert), "--tls-key-file", str(self.pki.key),
             "--tls-ca-cert-file", str(self.pki.ca_file), "--tls-auth-clients", "yes" if self.auth_clients else "no",
             "--save", "", "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cert, key = self.pki.client_files(name="redis-probe")
        probe = redis.Redis.from_url(self.url, ssl_ca_certs=str(self.pki.ca_file), ssl_certfile=str(cert),
                                     ssl_keyfile=str(key), socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if probe.ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server with TLS did not start on port {self.port}")


@pytest.fixture
def tls_redis(tmp_path, ca):
    server = TlsRedis(tmp_path, Pki(tmp_path / "redis-pki", ca), auth_clients=False)
    server.start()
    yield server
    server.stop()


def test_ledger_over_tls(registry_root, ca, tmp_path, tls_redis):
    from server.accounting.ledger_redis import RedisStore

    pki = tls_redis.pki
    with pytest.raises(ValueError, match="rediss://"):
        RedisStore(tls_redis.url.replace("rediss://", "redis://"), tls_ca=pki.ca_file)
    untrusted = RedisStore(tls_redis.url, tls_ca=TestCA("not Redis's").write_ca(tmp_path / "wrong-ca.crt"))
    with pytest.raises(StoreUnavailable):
        untrusted.ping()
    untrusted.close()

    s = RunningServer(registry_root, tmp_path / "home", redis_url=tls_redis.url, redis_tls_ca=pki.ca_file).start()
    try:
        with Client(s.target, admin_key=ADMIN_KEY, retries=0) as admin:
            key, _ = admin.create_key("over-tls")
            with Client(s.target, api_key=key, retries=0) as c:
                c.chat(MSG, model="tiny", max_tokens=4, ignore_eos=True, request_id="tls-1")
            wait_for(lambda: admin.usage().total.completion_tokens == 4, message="usage recorded in Redis")
        assert s.app.accountant.store_up and len(s.app.spool) == 0
    finally:
        s.stop()


def test_ledger_with_a_redis_client_certificate(tmp_path, ca):
    from server.accounting.ledger_redis import RedisStore

    server = TlsRedis(tmp_path, Pki(tmp_path / "redis-pki", ca), auth_clients=True)
    server.start()
    try:
        pki = server.pki
        cert, key = pki.client_files(name="ledger")
        store = RedisStore(f"{server.url}?ssl_certfile={cert}&ssl_keyfile={key}", tls_ca=pki.ca_file)
        store.ping()
        store.close()
        without = RedisStore(server.url, tls_ca=pki.ca_file)
        with pytest.raises(StoreUnavailable):
            without.ping()
        without.close()
    finally:
        server.stop()
