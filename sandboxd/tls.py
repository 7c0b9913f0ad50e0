"""TLS for the TCP listeners, with certificate rotation on SIGHUP. Daemon side.

gRPC's dynamic server credentials ask `fetch` before every new handshake whether the certificate changed; a
reload that read new files (same paths or new ones) hands the new material over here, so new connections use the
new server certificate and client CA while open ones keep theirs. require_client_cert is fixed when the listener
is created, and a listener cannot gain or lose TLS: changing either needs a restart (Daemon.reload refuses it).
"""
from __future__ import annotations

import ssl
import threading
from dataclasses import dataclass

import grpc

from .config import TlsConfig
from .errors import ConfigError


@dataclass(frozen=True)
class Material:
    key: bytes
    cert: bytes
    client_ca: bytes | None


def load(tls: TlsConfig) -> Material:
    """Read and check the files now, so a broken rotation is refused at reload, not at the next handshake."""
    def read(name: str, path: str) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise ConfigError(f"server.tls.{name}: cannot read {path}: {e.strerror}") from None
    material = Material(read("key", tls.key), read("cert", tls.cert),
                        read("client_ca", tls.client_ca) if tls.client_ca else None)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(tls.cert, tls.key)
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"server.tls.cert/key: {tls.cert} and {tls.key} are not a certificate and its key: "
                          f"{e}") from None
    if material.client_ca:
        try:
            ctx.load_verify_locations(cadata=material.client_ca.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as e:
            raise ConfigError(f"server.tls.client_ca: {tls.client_ca}: not a PEM certificate bundle: {e}") from None
    return material


class Rotation:
    """The current certificate material, and credentials that pick up each new one at the next handshake."""

    def __init__(self, material: Material, require_client_cert: bool):
        self.material, self.require = material, require_client_cert
        self.generation = 0
        self._lock = threading.Lock()   # fetch runs on gRPC's threads

    @staticmethod
    def _configuration(m: Material) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(m.key, m.cert)], root_certificates=m.client_ca)

    def credentials(self) -> grpc.ServerCredentials:
        seen = self.generation

        def fetch():
            nonlocal seen
            with self._lock:
                if self.generation == seen:
                    return None
                seen = self.generation
                return self._configuration(self.material)
        return grpc.dynamic_ssl_server_credentials(self._configuration(self.material), fetch,
                                                   require_client_authentication=self.require)

    def update(self, material: Material) -> bool:
        """True when the material changed (new connections will use it)."""
        with self._lock:
            if material == self.material:
                return False
            self.material, self.generation = material, self.generation + 1
            return True
