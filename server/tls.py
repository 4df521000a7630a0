"""TLS for the server's ports, from one set of file settings (`--tls-cert`, `--tls-key`,
`--tls-client-ca` in server/config.py): the gRPC port takes `ReloadingCredentials`, an
HTTP port (uvicorn) takes `TlsFiles.uvicorn_options()`.

Certificates are rotated by replacing the files (a cert-manager Secret mounted in a pod
is swapped atomically by the kubelet): grpc asks the fetcher at every new connection's
handshake, the fetcher compares the files' stat signature with the last one it loaded,
and only a changed, complete and matching set is handed over, so a half-written
rotation keeps the previous certificate serving. Connections already open keep theirs."""

from __future__ import annotations

import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger("sol.tls")

Signature = tuple[tuple[int, int, int] | None, ...]


class TlsError(ValueError):
    """Unusable TLS settings or files."""


@dataclass(frozen=True)
class TlsMaterial:
    cert_chain: bytes
    key: bytes
    client_ca: bytes | None


@dataclass(frozen=True)
class TlsFiles:
    """Where the server's certificate chain, its key and (for mutual TLS) the CA of client
    certificates are."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    @classmethod
    def from_settings(cls, cert: Path | None, key: Path | None, client_ca: Path | None) -> TlsFiles | None:
        """The files, checked (readable, the key matches the certificate), or None for
        plain text. TlsError names the setting to fix."""
        if cert is None and key is None:
            if client_ca is not None:
                raise TlsError("--tls-client-ca (SOL_TLS_CLIENT_CA) needs TLS: set --tls-cert and --tls-key too")
            return None
        if cert is None or key is None:
            raise TlsError("--tls-cert and --tls-key (SOL_TLS_CERT, SOL_TLS_KEY) go together: "
                           f"set {'--tls-key' if key is None else '--tls-cert'} too")
        files = cls(Path(cert), Path(key), Path(client_ca) if client_ca is not None else None)
        files.load()
        return files

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def paths(self) -> tuple[Path, ...]:
        return (self.cert, self.key) + ((self.client_ca,) if self.client_ca is not None else ())

    def signature(self) -> Signature:
        """What changes when a file is replaced or rewritten (inode, mtime, size); None
        for a file that is missing right now (mid-rotation)."""
        out = []
        for p in self.paths():
            try:
                st = os.stat(p)
            except OSError:
                out.append(None)
            else:
                out.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(out)

    def load(self) -> TlsMaterial:
        """The files' bytes, checked the way a TLS server would load them."""
        try:
            material = self._read()
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.cert, self.key)
            if self.client_ca is not None:
                context.load_verify_locations(cafile=self.client_ca)
        except OSError as err:
            # ssl.SSLError is an OSError: a garbled PEM or a key of another certificate.
            raise TlsError(f"cannot use the TLS files {', '.join(map(str, self.paths()))}: {err}") from None
        # The check above read the files a second time: a rotation in between would pair
        # bytes that were never checked together.
        if self._read() != material:
            raise TlsError("the TLS files changed while being read (a rotation in progress?)")
        return material

    def _read(self) -> TlsMaterial:
        return TlsMaterial(self.cert.read_bytes(), self.key.read_bytes(),
                           self.client_ca.read_bytes() if self.client_ca is not None else None)

    def uvicorn_options(self) -> dict[str, Any]:
        """Keyword arguments of `uvicorn.Config` / `uvicorn.run` for the same files."""
        options: dict[str, Any] = {"ssl_certfile": str(self.cert), "ssl_keyfile": str(self.key)}
        if self.client_ca is not None:
            options.update(ssl_ca_certs=str(self.client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
        return options


class ReloadingCredentials:
    """gRPC server credentials that follow the files: `credentials` for
    `server.add_secure_port`; a changed set of files is served from the next handshake."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        # The signature before the load: a change during the load is picked up next time.
        self._signature = files.signature()
        self._refused: Signature | None = None
        self.reloads = 0
        self.credentials = grpc.dynamic_ssl_server_credentials(
            self._configuration(files.load()), self._fetch, require_client_authentication=files.mutual)

    @staticmethod
    def _configuration(material: TlsMaterial) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(material.key, material.cert_chain)],
                                                         root_certificates=material.client_ca)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc's certificate fetcher, run on a grpc thread before each handshake: None
        keeps the current configuration. It must not raise: a bad rotation is logged
        (once per state of the files) and the previous certificate keeps serving."""
        signature = self.files.signature()
        if signature == self._signature:
            return None
        try:
            material = self.files.load()
        except TlsError as err:
            if signature != self._refused:
                self._refused = signature
                log.warning("TLS files changed but cannot be used yet; the previous certificate keeps serving: %s",
                            err)
            return None
        self._signature = signature
        self.reloads += 1
        log.info("TLS certificate reloaded from %s", self.files.cert)
        return self._configuration(material)
