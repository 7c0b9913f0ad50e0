"""The name a transparent connection asks for: the TLS ClientHello's SNI or the HTTP request's Host header.

Pure logic, daemon side (the proxy's transparent listener). A program that ignores proxy settings connects to an
address; its redirected connection carries the original address (SO_ORIGINAL_DST), which the proxy never
connects to blindly. The name it needs comes from the first bytes the program sends: a TLS ClientHello (possibly
split over several records) or an HTTP/1.x request head. Anything else, or either of them without a name, has no
destination the allowlist could judge and is refused.
"""
from __future__ import annotations

import re

from .rules import HOST_RE, is_address, normalize_host

LIMIT = 16 << 10             # bytes read before a name must be known
REQUEST_LINE_RE = re.compile(rb"^[A-Z][A-Z-]{0,19} [^ \r\n]+ HTTP/1\.[01]\Z")


class Incomplete(Exception):
    """More bytes could still name the destination."""


def destination(data: bytes) -> tuple[str, str | None]:
    """(how, name) with how "sni", "host" or "unknown"; name None when the bytes name nothing (or not validly).
    Raises Incomplete while more bytes could tell."""
    if not data:
        raise Incomplete
    if data[0] == 0x16:
        try:
            return "sni", _valid(tls_sni(data))
        except ValueError:
            return "sni", None
    if b"\r\n" not in data[:LIMIT]:
        if len(data) < LIMIT and re.fullmatch(rb"[A-Z][A-Z-]{0,19}( [^ \r\n]*)?( [^\r\n]*)?\r?", data[:200]):
            raise Incomplete
        return "unknown", None
    if not REQUEST_LINE_RE.match(data.split(b"\r\n", 1)[0]):
        return "unknown", None
    if b"\r\n\r\n" not in data:
        if len(data) < LIMIT:
            raise Incomplete
        return "host", None
    return "host", _valid(http_host(data))


def http_host(data: bytes) -> str | None:
    """The Host header of a request head (exactly one, else None), without its port."""
    head = data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
    hosts = [h.split(b":", 1)[1].strip() for h in head if h.split(b":", 1)[0].strip().lower() == b"host"
             and b":" in h]
    if len(hosts) != 1:
        return None
    value = hosts[0].decode("latin-1")
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else None
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def tls_sni(data: bytes) -> str | None:
    """The host_name of a ClientHello's server_name extension, or None if it has none. ValueError when the bytes
    are not a ClientHello; Incomplete while the handshake message is not whole."""
    hello = _client_hello(data)
    r = _Reader(hello)
    r.take(2 + 32)                       # legacy_version, random
    r.take(r.int(1))                     # legacy_session_id
    r.take(r.int(2))                     # cipher_suites
    r.take(r.int(1))                     # legacy_compression_methods
    if not r.left:
        return None                      # no extensions at all
    exts = _Reader(r.take(r.int(2)))
    while exts.left:
        kind, body = exts.int(2), exts.take(exts.int(2))
        if kind != 0:                    # server_name
            continue
        names = _Reader(body)
        names = _Reader(names.take(names.int(2)))
        while names.left:
            name_type, name = names.int(1), names.take(names.int(2))
            if name_type == 0:           # host_name
                return name.decode("ascii")
        return None
    return None


def _client_hello(data: bytes) -> bytes:
    """The ClientHello body, reassembled from as many handshake records as it spans."""
    hs, i = b"", 0
    while True:
        if len(data) < i + 5:
            raise Incomplete
        if data[i] != 0x16 or data[i + 1] != 3:
            raise ValueError("not a TLS handshake record")
        length = int.from_bytes(data[i + 3:i + 5], "big")
        if len(data) < i + 5 + length:
            if i + 5 + length > LIMIT:
                raise ValueError(f"ClientHello longer than {LIMIT} bytes")
            raise Incomplete
        hs += data[i + 5:i + 5 + length]
        i += 5 + length
        if len(hs) >= 4:
            if hs[0] != 1:
                raise ValueError("not a ClientHello")
            need = int.from_bytes(hs[1:4], "big")
            if need > LIMIT:
                raise ValueError(f"ClientHello longer than {LIMIT} bytes")
            if len(hs) >= 4 + need:
                return hs[4:4 + need]


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        if n > self.left:
            raise ValueError("truncated ClientHello")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def int(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")


def _valid(name: str | None) -> str | None:
    """A lower-case DNS name or address literal, or None: the allowlist only judges names it could hold."""
    if not name:
        return None
    try:
        host = normalize_host(name)
    except UnicodeError:
        return None
    return host if is_address(host) or (HOST_RE.match(host) and not host.startswith("*")) else None
