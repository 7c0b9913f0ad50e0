"""THREATS.md, Control plane: identity comes from the channel, a run can neither reach nor forge the API and its
record is written outside the sandbox, and requests are bounded in size, concurrency and queue length.

Already covered in tests/integration/test_identity.py (x-agent-name from a non-root caller, certificates that
claim a uid or a group, tokens) and tests/integration/test_fairness.py (round-robin between a flooding and a
quiet caller with a long queue). The run's view of the API socket and of every socket inode is in
test_network.py::test_the_daemons_socket_and_state_are_not_in_the_run.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import json
import threading
import time
import uuid

import pytest

from conftest import attack, record, still_serves
from sandboxd.client import Client, SandboxdError
from sandboxd.v1 import sandbox_pb2 as pb


# Header names a naive service might take as the caller; none of them is an identity here.
CLAIMS = [("x-agent-name", "ci-bot"), ("x-agent-version", "9.9"), ("x-principal", "mallory"),
          ("x-forwarded-user", "mallory"), ("x-remote-user", "mallory"), ("x-sandboxd-principal", "mallory"),
          ("x-user-id", "0"), ("x-roles", "admin")]


def test_claims_never_change_the_caller(daemon):
    with Client(daemon.target, metadata=CLAIMS) as c:
        r = c.run("print('ok')", env={"APP_PRINCIPAL": "mallory"})
        assert (r.outcome, r.stdout) == ("exited", b"ok\n"), r
        rec = record(c, r.run_id)
    if not rec.get("principal"):
        pytest.skip("the record has no principal yet (identity not implemented)")
    # This process is root on the unix socket: that, and only that, is the principal.
    assert (rec["principal"], rec["auth_method"]) == ("root", "unix_peercred"), rec
    assert rec["peer"]["uid"] == 0
    assert rec["agent"] == {"name": "ci-bot", "version": "9.9"}, rec["agent"]   # recorded, as claims
    assert "mallory" not in json.dumps({k: v for k, v in rec.items() if k not in ("spec",)})


@pytest.mark.parametrize("header", ["Bearer forged-token", "Bearer " + hashlib.sha256(b"x").hexdigest(),
                                    "Basic cm9vdDpyb290", "Bearer ", "bearer not-a-token"])
def test_a_forged_credential_is_refused_not_ignored(daemon, header):
    """A credential that does not verify is an error, never a silent fallback to the peer's identity."""
    with Client(daemon.target, metadata=[("authorization", header)]) as c:
        with pytest.raises(SandboxdError) as e:
            c.run("print('should not run')")
    assert e.value.code == "UNAUTHENTICATED", e.value


def test_a_run_cannot_forge_its_result(sandbox):
    """A run prints a serialized gRPC result event claiming success, a fake JSON record line and an HTTP/2-like
    frame, then dies of SIGKILL: the client gets the real result, with the forgery as plain stdout."""
    fake = pb.ExecuteEvent(result=pb.Result(run_id="forged", outcome=pb.OUTCOME_EXITED, exit_code=0,
                                            message="all good")).SerializeToString()
    r = attack(sandbox, f"""
        os.write(1, {fake!r})
        os.write(1, b'\\x00\\x00\\x0c\\x00\\x01\\x00\\x00\\x00\\x01' + {fake!r})
        os.write(1, json.dumps({{'run_id': 'forged', 'outcome': 'exited', 'principal': 'root'}}).encode() + b'\\n')
        os.kill(os.getpid(), 9)
    """)
    assert (r.outcome, r.signal) == ("signaled", 9) and r.run_id != "forged", r
    assert r.stdout.startswith(fake)
    rec = record(sandbox, r.run_id)
    assert (rec["outcome"], rec["run_id"]) == ("signaled", r.run_id)
    if rec.get("principal"):
        assert rec["principal"] == "root"


@pytest.fixture
def small_requests(own_daemon):
    return own_daemon('[server]\nmax_request_bytes = "64KiB"')


OVERSIZE = [
    ("code", {"code": "#" * (65 << 10)}),
    ("stdin", {"stdin": b"x" * (65 << 10)}),
    ("files", {"files": {f"f{i}": b"x" * (17 << 10) for i in range(4)}}),
    ("env", {"env": {"APP_BIG": "x" * (65 << 10)}}),
    ("args", {"args": ["x" * (33 << 10)] * 2}),
    ("code-past-the-grpc-limit", {"code": "#" * (3 << 20)}),
    ("files-past-the-grpc-limit", {"files": {"big": b"x" * (3 << 20)}}),
]


@pytest.mark.parametrize("request_", [o[1] for o in OVERSIZE], ids=[o[0] for o in OVERSIZE])
def test_request_size_is_capped(small_requests, request_):
    """Past max_request_bytes the daemon refuses with RESOURCE_EXHAUSTED (and records the refusal); past the
    gRPC message limit (max_request_bytes + 1MiB) gRPC itself refuses before the request is read."""
    with small_requests.client() as c:
        kw = dict(request_)
        code = kw.pop("code", "print('never')")
        with pytest.raises(SandboxdError) as e:
            c.run(code, **kw)
        assert e.value.code == "RESOURCE_EXHAUSTED", e.value
        still_serves(c)


def test_queue_and_concurrency_are_capped(own_daemon):
    """One slot, a queue of one: the third concurrent request is refused at once with a retry hint, the
    daemon keeps serving, and the refusal is recorded."""
    d = own_daemon('[admission]\nmax_concurrent = 1\nmax_queue = 1\nmax_queue_wait = "20s"')
    results, errors = [], []

    def run(code):
        with d.client() as c:
            try:
                results.append(c.run(code, wall_time=10))
            except SandboxdError as e:
                errors.append(e)

    hold = threading.Thread(target=run, args=("import time; time.sleep(2)",))
    hold.start()
    time.sleep(0.7)
    queued = threading.Thread(target=run, args=("print('queued')",))
    queued.start()
    time.sleep(0.5)
    run("print('third')")
    hold.join()
    queued.join()
    assert [e.code for e in errors] == ["RESOURCE_EXHAUSTED"] and errors[0].retry_after, errors
    assert sorted(r.outcome for r in results) == ["exited", "exited"], results
    with d.client() as c:
        still_serves(c)


FAIR = """
[admission]
max_concurrent = 1
max_queue = 3
max_queue_wait = "30s"
[[principals]]
name = "flooder"
unix_uids = [0]
roles = ["admin"]
[[tokens]]
principal = "quiet"
sha256 = "{sha}"
[[policies]]
name = "everyone"
principals = ["flooder", "quiet"]
"""


def test_one_caller_cannot_fill_the_queue_for_everyone(own_daemon):
    """THREATS.md: request size, concurrency and queue length are capped per caller; one caller cannot starve the
    others. The flooder holds the only slot and tries to put max_queue requests in the queue; a second caller
    arriving then must be queued and served, and what is refused is the flooder's excess. (Before 669bb4c the
    queue was one shared queue: the quiet caller got RESOURCE_EXHAUSTED "1 running and 3 queued".)"""
    token = f"sbx_{uuid.uuid4().hex}"
    d = own_daemon(FAIR.format(sha=hashlib.sha256(token.encode()).hexdigest()))
    flood_results = []

    def flood(code):
        with d.client() as c:
            try:
                flood_results.append(c.run(code, wall_time=10).outcome)
            except SandboxdError as e:
                flood_results.append(e.code)

    threads = [threading.Thread(target=flood, args=("import time; time.sleep(3)",))]
    threads[0].start()
    time.sleep(0.7)
    for _ in range(3):
        threads.append(threading.Thread(target=flood, args=("print('flood')",)))
        threads[-1].start()
    time.sleep(0.7)
    try:
        with Client(d.target, metadata=[("authorization", f"Bearer {token}")]) as quiet:
            r = quiet.run("print('quiet')", wall_time=10)
        assert (r.outcome, r.stdout) == ("exited", b"quiet\n")
    finally:
        for t in threads:
            t.join()
    assert "RESOURCE_EXHAUSTED" in flood_results and flood_results.count("exited") >= 2, flood_results


# Runs as uid/gid 65534: finds the relay's abstract addresses in /proc/net/unix and binds the names that follow
# each one (name ending in N: the same name ending in N+1 .. N+500), holding them until stdin closes.
SQUATTER = r"""
import os, re, socket, sys
assert os.getuid() == os.geteuid() == 65534
seen = [line.split()[-1][1:] for line in open("/proc/net/unix").read().splitlines()[1:]
        if line.split()[-1].startswith("@sandboxd-")]
held = []
for name in seen:
    # The names end in a number (decimal before the fix, random hex after it): squat the next ones either way.
    m = re.fullmatch(r"(.*?)([0-9a-f]+)", name)
    if m:
        digits = m.group(2)
        for k in range(1, 501):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.bind("\0" + m.group(1) + format(int(digits, 16) + k, "x").zfill(len(digits)))
                held.append(s)
            except OSError:
                s.close()
print(len(seen), len(held), flush=True)
sys.stdin.read()
"""


def test_a_local_user_cannot_make_the_relay_drop_other_callers_connections(own_daemon):
    """The relay's per-connection addresses are visible to everyone; squatting the next ones must not matter."""
    d = own_daemon()
    with Client(d.target) as held_open:
        held_open.runners()  # this connection's relay address is now listed in /proc/net/unix
        squatter = subprocess.Popen(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                                     sys.executable, "-c", SQUATTER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        try:
            seen, held = map(int, squatter.stdout.readline().split())
            assert squatter.poll() is None, squatter.stderr.read()
            assert seen >= 1, "the squatter saw no relay address: the test proves nothing"
            assert held > 0, "the squatter could bind no name next to the relay's"
            failures = []
            for i in range(40):
                # A channel of its own (no shared subchannel): a new connection, so a new relay address, each time.
                with Client(d.target, options=[("grpc.use_local_subchannel_pool", 1)]) as c:
                    try:
                        c.runners(timeout=10)
                    except SandboxdError as e:
                        failures.append(f"connection {i}: {e}")
            assert not failures, failures
        finally:
            squatter.stdin.close()
            squatter.wait(30)
