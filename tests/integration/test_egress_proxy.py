"""The egress proxy's per-run limits and its records, driven directly over the host's loopback.

The proxy object is the daemon's own (sandboxd.egress.proxy); the listener is an ordinary socket on 127.0.0.1
(in a run it is made inside the run's namespace, see test_egress.py), and the destination is an upstream server
on 127.0.0.1 that the policy opens explicitly (egress_allow_networks). Only loopback traffic.
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
import types

from sandboxd.egress.proxy import EgressProxy
from sandboxd.egress.resolver import Resolver
from sandboxd.metrics import Metrics
from sandboxd.sandbox.spec import Egress


class Upstream:
    """Counts bytes it receives; never answers, so a connection stays open until someone closes it."""

    def __init__(self):
        self.received = 0

    async def start(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader, writer):
        while data := await reader.read(65536):
            self.received += len(data)
        writer.close()


async def _proxy(upstream, **limits):
    records = []

    async def record(kind, run_id, data):
        records.append((kind, run_id, dict(data)))

    metrics = Metrics()
    proxy = EgressProxy(Resolver("static", {"up.test": ("127.0.0.1",)}), record, metrics)
    egress = Egress(policy="p", allow=(f"up.test:{upstream.port}",), networks=("127.0.0.1/32",), **limits)
    run = proxy.open(types.SimpleNamespace(run_id="run-1", egress=egress), "alice")
    lst = socket.create_server(("127.0.0.1", 0))
    fut = asyncio.get_running_loop().create_future()
    fut.set_result([lst])
    await run.serve(fut)
    return run, lst.getsockname()[1], records, metrics


async def _connect(port, target):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())
    status = (await r.readline()).decode().strip()
    if status.endswith("established"):
        await r.readline()
    return r, w, status


def arun(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_connections_at_once_are_capped():
    async def main():
        up = await Upstream().start()
        run, port, records, _ = await _proxy(up, max_connections=1)
        _, w1, s1 = await _connect(port, f"up.test:{up.port}")
        r2, w2, s2 = await _connect(port, f"up.test:{up.port}")
        body = await r2.read()
        summary = await run.close()
        return s1, s2, body, records, summary

    s1, s2, body, records, summary = arun(main())
    assert s1 == "HTTP/1.1 200 Connection established"
    assert s2 == "HTTP/1.1 503 Service Unavailable"
    assert b"1 egress connections at once" in body
    rules = [(d["decision"], d["rule"], d.get("cut")) for _, _, d in records]
    assert ("denied", "limit:connections", None) in rules
    assert ("allowed", f"allow:up.test:{records[0][2]['port']}", "run_ended") in rules
    assert summary["connections"] == {"allowed": 1, "denied": 1, "error": 0}


def test_bytes_out_cap_cuts_the_connection_at_the_cap():
    async def main():
        up = await Upstream().start()
        run, port, records, metrics = await _proxy(up, max_bytes_out=10000)
        r, w, status = await _connect(port, f"up.test:{up.port}")
        w.write(b"y" * 50000)
        with contextlib.suppress(ConnectionError):
            await r.read()   # the proxy closes the connection at the cap
        await run.close()
        await asyncio.sleep(0)
        return up, records, metrics, status

    up, records, metrics, status = arun(main())
    assert status.endswith("established")
    (_, run_id, rec), = records
    assert (run_id, rec["principal"], rec["cut"], rec["bytes_out"]) == ("run-1", "alice", "bytes_out", 10000)
    assert up.received == 10000
    assert metrics.registry.get_sample_value("sandboxd_egress_bytes_total", {"direction": "out"}) == 10000
    assert metrics.registry.get_sample_value("sandboxd_egress_connections_total", {"decision": "allowed"}) == 1


def test_connection_time_is_capped():
    async def main():
        up = await Upstream().start()
        run, port, records, _ = await _proxy(up, max_connection_time=0.3)
        r, w, status = await _connect(port, f"up.test:{up.port}")
        rest = await r.read()    # an idle connection, ended by the proxy
        await run.close()
        return rest, records

    rest, records = arun(main())
    assert rest == b""
    assert records[0][2]["cut"] == "connection_time"


def test_a_run_that_ends_leaves_no_connection_and_every_record_written():
    async def main():
        up = await Upstream().start()
        run, port, records, _ = await _proxy(up)
        conns = [await _connect(port, f"up.test:{up.port}") for _ in range(3)]
        await run.close()
        closed = [await r.read() for r, _, _ in conns]
        return closed, records

    closed, records = arun(main())
    assert closed == [b"", b"", b""]
    assert [d["cut"] for _, _, d in records] == ["run_ended"] * 3
