"""Authenticate: who is calling, from the channel only, never from request fields. Daemon side.

Three ways, one result (a Principal):

- Unix socket: the caller's uid, gid and pid from SO_PEERCRED. grpcio does not expose peer credentials, so
  the public unix sockets are served by a small relay (UnixPeerProxy): it accepts each connection, reads
  SO_PEERCRED, and forwards the bytes to the real gRPC server on a private socket (in a root-only directory)
  from a client socket bound to a fresh, unguessable abstract address (128 random bits per connection: the
  daemon's prefix is visible in /proc/net/unix, so a predictable suffix would let any local user bind the next
  names first and make the relay drop other callers' connections). gRPC reports that address as the peer
  ("unix-abstract:..."), which maps back to the credentials. Only root can reach the private socket, so no
  caller can pick its own address.
- TLS with client certificates (mTLS): the certificate's URI SAN (e.g. spiffe://example.org/agent/triage),
  else its CN, verified against the configured CA by gRPC.
- Bearer tokens (`authorization: Bearer <token>` metadata): the config stores only SHA-256 hashes; every
  configured hash is compared in constant time, so timing reveals neither which token nor how much matched.

Agent claims (x-agent-name, x-agent-version, x-agent-tool, x-session-id, traceparent) are recorded beside the
principal as claims, never in place of it.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import errno
import grp
import hashlib
import hmac
import logging
import os
import pwd
import secrets
import socket
import struct
from dataclasses import dataclass, field

from .errors import SandboxError

log = logging.getLogger("sandboxd.auth")
CLAIM_KEYS = {"x-agent-name": "name", "x-agent-version": "version", "x-agent-tool": "tool",
              "x-session-id": "session_id", "traceparent": "traceparent"}
MAX_CLAIM = 256


class Unauthenticated(SandboxError):
    """No identity, or a credential that does not verify (wrong, expired or malformed token)."""

    reason = "unauthenticated"


@dataclass(frozen=True)
class Principal:
    id: str                                   # what records show, e.g. "root", "alice", "spiffe://...", "ci-bot"
    method: str                               # unix_peercred, mtls, token
    tags: frozenset[str] = frozenset()        # what policies match on: the id, "group:x", "unix-uid:0", ...
    roles: frozenset[str] = frozenset()
    peer: dict = field(default_factory=dict)  # uid/gid/pid, or the TCP address

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles

    def as_record(self) -> dict:
        return {"id": self.id, "method": self.method, "roles": sorted(self.roles),
                "groups": sorted(t[6:] for t in self.tags if t.startswith("group:"))}


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...]


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """256 bits from the OS CSPRNG, prefixed so leaked tokens are easy to grep for."""
    return "sbx_" + secrets.token_urlsafe(32)


def claims_of(metadata) -> dict:
    """Agent claims from metadata, bounded in size; recorded as claims, never trusted as identity."""
    out = {}
    for key, value in metadata or ():
        if key in CLAIM_KEYS and isinstance(value, str):
            out[CLAIM_KEYS[key]] = value[:MAX_CLAIM]
    return out


class Authenticator:
    """Turns a gRPC context into a Principal using the configuration's principals and tokens."""

    def __init__(self, identity, proxy: "UnixPeerProxy | None"):
        self.identity, self.proxy = identity, proxy

    def authenticate(self, context) -> Principal:
        metadata = context.invocation_metadata() or ()
        auth = [v for k, v in metadata if k == "authorization"]
        peer = context.peer() or ""
        if auth:
            principal = self._token(auth[0], peer)
            cred = self.proxy.lookup(peer[len("unix-abstract:"):]) if (
                self.proxy is not None and peer.startswith("unix-abstract:")) else None
            if cred is not None:  # a token over the unix socket: keep who connected, too
                principal = dataclasses.replace(principal, peer={**self._unix_peer(cred, None), "via": "unix"})
            return principal
        if peer.startswith("unix-abstract:") and self.proxy is not None:
            cred = self.proxy.lookup(peer[len("unix-abstract:"):])
            if cred is not None:
                return self._unix(cred)
        cert = self._certificate(context)
        if cert is not None:
            return self._cert(cert, peer)
        raise Unauthenticated("no identity: connect over the unix socket, present a client certificate, "
                              "or send 'authorization: Bearer <token>'")

    # -- methods ----------------------------------------------------------------------------------------
    def _token(self, header: str, peer: str) -> Principal:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("authorization: expected 'Bearer <token>'")
        digest = hash_token(token.strip())
        match = None
        for entry in self.identity.tokens:  # every entry, always: constant time over the whole list
            if hmac.compare_digest(entry.sha256, digest):
                match = entry
        if match is None:
            raise Unauthenticated("token not recognised")
        if match.expires and dt.datetime.now(dt.timezone.utc) >= match.expires:
            raise Unauthenticated(f"token for {match.principal!r} expired at {match.expires.isoformat()}")
        entry = self.identity.principal(match.principal)
        tags = {match.principal, f"token:{match.principal}"} | {f"group:{g}" for g in
                                                                (entry.groups if entry else ())}
        return Principal(id=match.principal, method="token", tags=frozenset(tags),
                         roles=frozenset(entry.roles if entry else ()), peer={"address": peer})

    def _unix(self, cred: PeerCred) -> Principal:
        try:
            user = pwd.getpwuid(cred.uid).pw_name
        except KeyError:
            user = None
        group_names = set()
        for gid in {cred.gid, *cred.groups}:
            with contextlib.suppress(KeyError):
                group_names.add(grp.getgrgid(gid).gr_name)
        tags = {f"unix-uid:{cred.uid}", f"unix-gid:{cred.gid}"} | {f"unix-group:{g}" for g in group_names}
        tags |= {f"unix-gid:{g}" for g in cred.groups}
        if user:
            tags.add(f"unix-user:{user}")
        entry = self.identity.match_unix(cred.uid, user, group_names)
        # Unmapped callers get a namespaced id, so a unix user can never share a name (and so records and
        # policies) with a configured principal, a token's principal or a certificate.
        pid = entry.name if entry else f"unix:{user or cred.uid}"
        tags.add(pid)
        if entry:
            tags |= {f"group:{g}" for g in entry.groups}
        return Principal(id=pid, method="unix_peercred", tags=frozenset(tags),
                         roles=frozenset(entry.roles if entry else ()), peer=self._unix_peer(cred, user))

    @staticmethod
    def _unix_peer(cred: PeerCred, user: str | None) -> dict:
        return {"uid": cred.uid, "gid": cred.gid, "pid": cred.pid, "user": user}

    @staticmethod
    def _certificate(context) -> dict | None:
        auth = context.auth_context() or {}
        if auth.get("transport_security_type") != [b"ssl"]:
            return None
        names = [v.decode() for v in auth.get("x509_subject_alternative_name", ())]
        uris = [n for n in names if "://" in n]
        cn = [v.decode() for v in auth.get("x509_common_name", ())]
        if not uris and not cn:
            return None
        return {"id": uris[0] if uris else cn[0], "uris": uris, "cn": cn[0] if cn else ""}

    def _cert(self, cert: dict, peer: str) -> Principal:
        """Whoever requests a certificate chooses its names, so an unmapped one is namespaced: a URI SAN
        (scheme://...) stands for itself, a CN becomes "x509-cn:<CN>". Neither can then pose as a unix uid, a
        group tag or a configured principal such as "root"; only [[principals]] cert_ids map a certificate to
        a configured name."""
        entry = self.identity.match_cert(cert["id"])
        if entry:
            pid = entry.name
        elif "://" in cert["id"] and cert["id"] in cert["uris"]:
            pid = cert["id"]
        else:
            pid = f"x509-cn:{cert['id']}"
        tags = {pid}
        if entry:
            tags |= {f"group:{g}" for g in entry.groups}
        return Principal(id=pid, method="mtls", tags=frozenset(tags), roles=frozenset(entry.roles if entry else ()),
                         peer={"address": peer, "certificate": cert["id"]})


def _peer_cred(sock: socket.socket) -> PeerCred:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    groups: tuple[int, ...] = ()
    with contextlib.suppress(OSError, ValueError, IndexError):
        # Supplementary groups of the peer at connect time (SO_PEERGROUPS would avoid the /proc read, but
        # Python has no constant for it on every version).
        raw_groups = sock.getsockopt(socket.SOL_SOCKET, 59, 4 * 64)  # SO_PEERGROUPS
        groups = tuple(struct.unpack(f"{len(raw_groups) // 4}I", raw_groups))
    return PeerCred(pid, uid, gid, groups)


class UnixPeerProxy:
    """Relays the public unix sockets to the private gRPC socket, remembering each connection's SO_PEERCRED
    under the abstract address its relay connection is bound to."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.prefix = f"sandboxd-{secrets.token_hex(16)}-"
        self.peers: dict[str, PeerCred] = {}
        self.servers: list[asyncio.AbstractServer] = []
        self.tasks: set[asyncio.Task] = set()

    def lookup(self, address: str) -> PeerCred | None:
        return self.peers.get(address) if address.startswith(self.prefix) else None

    async def listen(self, path: str, mode: int) -> None:
        server = await asyncio.start_unix_server(self._accept, path, limit=1 << 20)
        os.chmod(path, mode)
        self.servers.append(server)

    def stop_listening(self) -> None:
        """No new connections; relays already open go on (their calls may still be finishing)."""
        for server in self.servers:
            server.close()

    async def close(self) -> None:
        self.stop_listening()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self.tasks.add(task)
        sock = writer.get_extra_info("socket")
        name, up, upstream_writer = "", None, None
        try:
            cred = _peer_cred(sock)
            up, name = _bind_unguessable(self.prefix)
            self.peers[name] = cred
            up.setblocking(False)
            await asyncio.get_running_loop().sock_connect(up, self.upstream)
            up_reader, upstream_writer = await asyncio.open_unix_connection(sock=up, limit=1 << 20)
            await asyncio.gather(_pipe(reader, upstream_writer), _pipe(up_reader, writer))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self.peers.pop(name, None)
            for w in (writer, upstream_writer):
                if w is not None:
                    w.close()
            if upstream_writer is None and up is not None:
                up.close()
            self.tasks.discard(task)


def _bind_unguessable(prefix: str, attempts: int = 8) -> tuple[socket.socket, str]:
    """A unix socket bound to prefix + 128 random bits. A taken name (which nobody can predict, so only chance or
    a bug) is retried with a fresh one rather than dropping the caller's connection."""
    for _ in range(attempts):
        name = f"{prefix}{secrets.token_hex(16)}"
        up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            up.bind("\0" + name)
            return up, name
        except OSError as e:
            up.close()
            if e.errno != errno.EADDRINUSE:
                raise
    raise OSError(errno.EADDRINUSE, f"no free relay address after {attempts} attempts")


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(256 << 10):
            writer.write(data)
            await writer.drain()
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()
