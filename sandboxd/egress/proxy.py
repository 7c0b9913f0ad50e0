"""The egress proxy: serves the listener each run with egress made inside its own network namespace.

Runs in the daemon (asyncio). A run reaches the proxy only at 127.0.0.1:<port> of its own namespace, through a
socket its init created there (sandbox/egress.py); the run has no route, interface or resolver beyond that. For
each connection the proxy reads one request head, HTTP CONNECT host:port (HTTPS and any TCP) or a plain HTTP
request with an absolute URL, and then:

    allowlist (name, port) -> resolve (the daemon's resolver) -> address check -> limits -> connect -> relay

Every attempt, allowed or not, becomes one `egress.connection` event in the hash-chained log (written when the
connection ends, before the run's own record is finished) and counts in the metrics. A refusal answers
403 naming the policy, so a tool's error says why. Plain HTTP is forwarded with `Connection: close`, so one
connection never carries a second request to another host.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import socket
import struct
import time
import urllib.parse

from . import rules, sniff
from .resolver import ResolveError, Resolver

log = logging.getLogger("sandboxd.egress")
HEAD_LIMIT = 16 << 10        # bytes of request line + headers
HEAD_TIMEOUT = 10.0          # seconds to send them
CONNECT_TIMEOUT = 10.0
CHUNK = 64 << 10
KEPT = 200                   # connections listed in the run's own record (every one is an event regardless)
SO_ORIGINAL_DST = 80          # linux/netfilter_ipv4.h
HOP_HEADERS = {b"proxy-connection", b"proxy-authorization", b"connection", b"keep-alive"}


class _Refused(Exception):
    def __init__(self, decision: str, rule: str, status: int, why: str):
        super().__init__(why)
        self.decision, self.rule, self.status = decision, rule, status


class _Cut(Exception):
    pass


class EgressProxy:
    """One per daemon. `record(kind, run_id, data)` appends to the log (awaited); `metrics` counts."""

    def __init__(self, resolver: Resolver, record, metrics):
        self.resolver, self.record, self.metrics = resolver, record, metrics

    def open(self, spec, principal: str) -> "RunEgress":
        return RunEgress(self, spec, principal)


class RunEgress:
    """Egress of one run: its allowlist, its limits, its connections."""

    def __init__(self, proxy: EgressProxy, spec, principal: str):
        self.proxy, self.run_id, self.principal, self.egress = proxy, spec.run_id, principal, spec.egress
        self.rules = tuple(rules.parse_rule(a) for a in self.egress.allow)
        self.networks = tuple(rules.parse_network(n) for n in self.egress.networks)
        self.used = {"in": 0, "out": 0}
        self.active = 0
        self.counts = {"allowed": 0, "denied": 0, "error": 0}
        self.kept: list[dict] = []
        self.handlers: set[asyncio.Task] = set()
        self.recording: set[asyncio.Task] = set()   # past the relay: only their record is left to write
        self.servers: list[asyncio.base_events.Server] = []
        self.closed = False

    async def serve(self, listeners: "asyncio.Future") -> None:
        """Serve the run's listeners (explicit, then transparent) once the launcher hands them over (it never
        does if setup fails first)."""
        socks = await listeners
        for sock, transparent in zip(socks, (False, True)):
            if self.closed:
                sock.close()
                continue
            sock.setblocking(False)
            self.servers.append(await asyncio.start_server(functools.partial(self._handle, transparent=transparent),
                                                           sock=sock, limit=HEAD_LIMIT))
        if self.closed:  # the run ended while the servers were starting
            for server in self.servers:
                server.close()

    async def close(self) -> dict:
        """The run is over: stop listening, end every connection, wait for their records; the run's summary."""
        self.closed = True
        for server in self.servers:
            server.close()
        for task in self.handlers - self.recording:
            task.cancel()   # a cancelled handler still writes its record (see _handle)
        await asyncio.gather(*self.handlers, return_exceptions=True)
        return {"connections": self.counts, "bytes_in": self.used["in"], "bytes_out": self.used["out"],
                "listed": self.kept, "unlisted": sum(self.counts.values()) - len(self.kept)}

    # -- one connection ----------------------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, transparent: bool) -> None:
        task = asyncio.current_task()
        self.handlers.add(task)
        task.add_done_callback(self.handlers.discard)
        self.active += 1
        started, at = time.monotonic(), time.time()
        rec = {"principal": self.principal, "policy": self.egress.policy, "at": at, "mode": None, "destination": None,
               "port": None, "address": None, "decision": "denied", "rule": None, "bytes_in": 0, "bytes_out": 0}
        upstream = None
        try:
            try:
                await self._connect(reader, writer, rec, started, transparent)
            except _Refused as r:
                rec.update(decision=r.decision, rule=r.rule, error=str(r))
                if rec["mode"] != "transparent" or rec.get("via") == "host":  # TLS and the rest cannot read a 403
                    await self._reply(writer, r.status, str(r))
                return
            upstream = rec.pop("_upstream")
            await self._relay(reader, writer, *upstream, rec, started)
        except asyncio.CancelledError:
            rec["cut"] = rec.get("cut") or "run_ended"
        except Exception as e:  # noqa: BLE001 - a broken connection must still be recorded
            rec.update(decision="error" if rec["decision"] != "allowed" else "allowed", rule=rec["rule"] or "internal")
            rec.setdefault("error", f"{type(e).__name__}: {e}")
        finally:
            self.recording.add(task)
            self.active -= 1
            upstream = upstream or rec.pop("_upstream", None)
            for w in (writer, upstream[1] if upstream else None):
                if w is not None:
                    w.close()
            rec["duration"] = round(time.monotonic() - started, 6)
            await self._record(rec)
            self.recording.discard(task)

    async def _connect(self, reader, writer, rec: dict, started: float, transparent: bool) -> None:
        if transparent:
            host, port, forward = await self._sniff(reader, writer, rec)
        else:
            host, port, forward = await self._request(reader, rec)
        rec.update(destination=host, port=port)
        where = f"{host}:{port}"
        rule = rules.match(self.rules, host, port)
        if rule is None:
            raise _Refused("denied", "not-allowed", 403,
                           f"{where} is not in the egress allowlist of policy {self.egress.policy!r}")
        if self.active > self.egress.max_connections:
            raise _Refused("denied", "limit:connections", 503, f"{where}: {self.egress.max_connections} egress "
                           f"connections at once is the limit of policy {self.egress.policy!r}")
        for direction in ("in", "out"):
            if self.used[direction] >= getattr(self.egress, f"max_bytes_{direction}"):
                raise _Refused("denied", f"limit:bytes_{direction}", 403,
                               f"{where}: the run used its egress byte budget ({direction})")
        try:
            addresses = await self.proxy.resolver.resolve(host, port)
        except ResolveError as e:
            raise _Refused("error", "resolve", 502, f"cannot resolve {e}") from None
        refusals = []
        for ip in addresses:
            why = rules.address_refusal(ip, self.networks)
            if why is None:
                break
            refusals.append((ip, why))
        else:
            rec["address"] = str(addresses[0]) if addresses else None
            listed = ", ".join(f"{a} ({why})" for a, why in refusals) or "nothing"
            raise _Refused("denied", f"address:{refusals[0][1]}" if refusals else "resolve", 403,
                           f"{where} resolves to {listed}, which policy {self.egress.policy!r} does not open "
                           f"(egress_allow_networks)")
        rec.update(address=str(ip), rule=f"allow:{rule.text}")
        try:
            up_r, up_w = await asyncio.wait_for(asyncio.open_connection(str(ip), port, limit=CHUNK),
                                                CONNECT_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as e:
            raise _Refused("error", "connect", 502, f"{where} ({ip}): connect failed: "
                           f"{e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__}") from None
        rec["decision"] = "allowed"
        rec["_upstream"] = (up_r, up_w)
        if forward:
            self._count(rec, "out", len(forward))
            up_w.write(forward)
        elif not transparent:
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

    async def _request(self, reader, rec: dict) -> tuple[str, int, bytes]:
        """The explicit proxy: CONNECT host:port, or a plain HTTP request with an absolute URL."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ConnectionError):
            raise _Refused("denied", "bad-request", 400,
                           f"expected an HTTP CONNECT or proxy request head within {HEAD_LIMIT} bytes") from None
        line, _, rest = head.partition(b"\r\n")
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            raise _Refused("denied", "bad-request", 400, "expected an HTTP/1.x request line")
        method, target = parts[0].decode("latin-1"), parts[1].decode("latin-1")
        try:
            if method == "CONNECT":
                rec["mode"] = "connect"
                host, port = rules.split_host_port(target)
                forward = b""
            else:
                rec["mode"] = "http"
                url = urllib.parse.urlsplit(target)
                if url.scheme != "http" or not url.hostname:
                    raise ValueError(f"{target!r}: expected CONNECT host:port or an absolute http:// URL")
                host, port = rules.normalize_host(url.hostname), url.port or 80
                forward = _origin_request(method, url, parts[2], rest)
        except ValueError as e:
            raise _Refused("denied", "bad-request", 400, str(e)) from None
        return host, port, forward

    async def _sniff(self, reader, writer, rec: dict) -> tuple[str, int, bytes]:
        """Transparent mode: the port the run connected to, and the name its first bytes give (SNI or Host);
        never the address it connected to, which is only recorded."""
        rec["mode"] = "transparent"
        try:
            ip, port = _original_destination(writer.get_extra_info("socket"))
        except OSError as e:
            raise _Refused("denied", "bad-request", 400, f"no original destination: {e.strerror}") from None
        rec.update(original_address=ip, port=port)
        if ipaddress.ip_address(ip).is_loopback:
            raise _Refused("denied", "bad-request", 400, "a connection to the transparent listener itself")
        data, left = b"", HEAD_TIMEOUT
        while True:
            try:
                how, host = sniff.destination(data)
                break
            except sniff.Incomplete:
                pass
            at = time.monotonic()
            try:
                chunk = await asyncio.wait_for(reader.read(sniff.LIMIT - len(data)), max(left, 0))
            except (asyncio.TimeoutError, ConnectionError):
                chunk = b""
            left -= time.monotonic() - at
            if not chunk:
                how, host = "unknown", None
                break
            data += chunk
        rec["via"] = how
        if host is None:
            raise _Refused("denied", "no-name", 403, f"{ip}:{port}: the connection names no destination (TLS "
                           f"with SNI or HTTP with a Host header), so policy {self.egress.policy!r} cannot allow it")
        return host, port, data

    async def _relay(self, reader, writer, up_r, up_w, rec: dict, started: float) -> None:
        pumps = [asyncio.ensure_future(self._pump(reader, up_w, "out", rec)),
                 asyncio.ensure_future(self._pump(up_r, writer, "in", rec))]
        left = self.egress.max_connection_time - (time.monotonic() - started)
        try:
            done, pending = await asyncio.wait(pumps, timeout=max(left, 0), return_when=asyncio.FIRST_EXCEPTION)
            if pending and not any(t.exception() for t in done):
                rec["cut"] = "connection_time"
        finally:
            for t in pumps:
                t.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, direction: str, rec: dict) -> None:
        cap = getattr(self.egress, f"max_bytes_{direction}")
        while data := await src.read(CHUNK):
            room = cap - self.used[direction]
            if len(data) > room:
                self._count(rec, direction, max(room, 0))
                dst.write(data[:max(room, 0)])
                rec["cut"] = f"bytes_{direction}"
                raise _Cut(direction)
            self._count(rec, direction, len(data))
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            with contextlib.suppress(OSError):
                dst.write_eof()

    def _count(self, rec: dict, direction: str, n: int) -> None:
        self.used[direction] += n
        rec[f"bytes_{direction}"] += n

    async def _reply(self, writer: asyncio.StreamWriter, status: int, why: str) -> None:
        reason = {400: "Bad Request", 403: "Forbidden", 502: "Bad Gateway", 503: "Service Unavailable"}[status]
        body = f"sandboxd egress: {why}\n".encode()
        writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\nX-Sandboxd-Egress: refused\r\n\r\n"
                     .encode() + body)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.drain(), 5)

    async def _record(self, rec: dict) -> None:
        decision = rec["decision"]
        self.counts[decision] += 1
        if len(self.kept) < KEPT:
            self.kept.append({k: rec[k] for k in ("destination", "port", "address", "decision", "rule", "bytes_in",
                                                  "bytes_out", "duration", "via", "original_address") if k in rec}
                             | ({"cut": rec["cut"]} if "cut" in rec else {}))
        with contextlib.suppress(Exception):
            self.proxy.metrics.egress_connection(decision, rec["bytes_in"], rec["bytes_out"])
        try:
            await self.proxy.record("egress.connection", self.run_id, rec)
        except Exception:  # noqa: BLE001 - the run's own record still lists it (self.kept)
            log.exception("run %s: egress record not written", self.run_id)


def _original_destination(sock) -> tuple[str, int]:
    """Where a redirected connection was going (SO_ORIGINAL_DST, from the run's own conntrack)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, addr = struct.unpack("!2xH4s8x", raw)
    return socket.inet_ntoa(addr), port


def _origin_request(method: str, url: urllib.parse.SplitResult, version: bytes, rest: bytes) -> bytes:
    """The request as the origin expects it: origin-form target, no proxy or hop-by-hop headers, and
    Connection: close so the next request (perhaps for another host) needs a new, checked connection."""
    path = url.path or "/"
    if url.query:
        path += "?" + url.query
    lines = [f"{method} {path} ".encode("latin-1") + version]
    has_host = False
    for header in rest.split(b"\r\n"):
        if not header:
            continue
        name = header.split(b":", 1)[0].strip().lower()
        if name in HOP_HEADERS:
            continue
        has_host |= name == b"host"
        lines.append(header)
    if not has_host:
        lines.append(b"Host: " + url.netloc.encode("latin-1"))
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"
