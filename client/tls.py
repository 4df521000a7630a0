"""How the client reaches a server: plain text by default (a local `sol serve`), TLS when
asked for or when a CA is given, mutual TLS with a client certificate and key.

Each setting falls back to an environment variable. The client certificate's variables
are SOL_TLS_CLIENT_CERT/SOL_TLS_CLIENT_KEY, not SOL_TLS_CERT/SOL_TLS_KEY: those are the
server's own certificate, often set in the same container where an operator runs
`sol keys ...`, and must never be presented as a client identity by accident."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc

ENV_TLS = "SOL_TLS"
ENV_CA = "SOL_TLS_CA"
ENV_CERT = "SOL_TLS_CLIENT_CERT"
ENV_KEY = "SOL_TLS_CLIENT_KEY"
ENV_SERVER_NAME = "SOL_TLS_SERVER_NAME"

PathLike = str | os.PathLike


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


@dataclass(frozen=True)
class ChannelTls:
    """TLS settings of a channel. `ca` None trusts grpc's bundled public roots (a server
    with a publicly trusted certificate); `server_name` overrides the name checked in the
    server's certificate (when connecting by IP or through a port-forward)."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None

    @classmethod
    def resolve(cls, tls: bool | None = None, ca: PathLike | None = None, cert: PathLike | None = None,
                key: PathLike | None = None, server_name: str | None = None) -> ChannelTls | None:
        """The settings from arguments, then the environment; None for plain text.
        TLS is on when `tls` says so, else when SOL_TLS is true or a CA or client
        certificate is given."""
        ca = Path(ca) if ca else _env_path(ENV_CA)
        cert = Path(cert) if cert else _env_path(ENV_CERT)
        key = Path(key) if key else _env_path(ENV_KEY)
        server_name = server_name or os.environ.get(ENV_SERVER_NAME) or None
        if tls is None:
            tls = os.environ.get(ENV_TLS, "").strip().lower() in ("1", "true", "yes", "on") or \
                any(v is not None for v in (ca, cert, key))
        if not tls:
            return None
        if (cert is None) != (key is None):
            raise ValueError(f"a client certificate needs its key: give both --tls-cert and --tls-key "
                             f"({ENV_CERT}, {ENV_KEY})")
        return cls(ca, cert, key, server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        read = lambda p: p.read_bytes() if p is not None else None  # noqa: E731
        return grpc.ssl_channel_credentials(root_certificates=read(self.ca), private_key=read(self.key),
                                            certificate_chain=read(self.cert))

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def open_channel(target: str, options: list[tuple[str, object]], tls: ChannelTls | None,
                 aio: bool = False) -> grpc.Channel | grpc.aio.Channel:
    """A channel to `target`: plain text without `tls`, else TLS with its settings."""
    api = grpc.aio if aio else grpc
    if tls is None:
        return api.insecure_channel(target, options=options)
    return api.secure_channel(target, tls.credentials(), options=options + tls.options())
