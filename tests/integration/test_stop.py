"""The operators' stop button against a real daemon: StopRun, StopPrincipal, `sandboxctl stop`, and a principal
suspended in the configuration. Callers are told apart by bearer tokens over the unix socket (root connecting
with alice's token is alice, without the admin role), so every client runs in this process.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from conftest import ROOT
from sandboxd.auth import hash_token, new_token
from sandboxd.client import SandboxdError

from test_operations import LONG, Stream, events, run_processes, streams, wait_for, wait_record

TOKENS = {name: new_token() for name in ("alice", "bob")}
IDENTITY = f"""
[[principals]]
name = "root"
unix_uids = [0]
roles = ["admin"]

[[principals]]
name = "alice"

[[principals]]
name = "bob"

[[tokens]]
principal = "alice"
sha256 = "{hash_token(TOKENS['alice'])}"

[[tokens]]
principal = "bob"
sha256 = "{hash_token(TOKENS['bob'])}"

[[policies]]
name = "alice-one-at-a-time"
principals = ["alice"]
max_concurrent = 1

[[policies]]
name = "everyone"
principals = ["root", "bob"]
"""


class As:
    """The daemon as one principal sees it: what Stream needs (client()), with that principal's token."""

    def __init__(self, d, who: str | None):
        self.d, self.token = d, TOKENS.get(who) if who else None

    def client(self, **kw):
        return self.d.client(token=self.token, **kw) if self.token else self.d.client(**kw)


@pytest.fixture
def d(start_daemon):
    return start_daemon(IDENTITY)


def stopped_message(s: Stream) -> str:
    assert s.error is None and s.result is not None, s.error
    assert s.result.outcome == "cancelled", s.result
    return s.result.message


def test_an_admin_stops_a_running_run_and_the_record_says_who(d):
    with streams() as ss:
        s = Stream(As(d, "alice"), LONG, wall_time=60)
        ss.append(s)
        assert s.printed.wait(20), s.error
        with As(d, None).client() as admin:
            res = admin.stop_run(s.run_id, reason="runaway loop")
        assert res.runs_stopped == 1 and "stopped by root: runaway loop" in res.message, res
        s.join(30)
    assert stopped_message(s) == "stopped by root: runaway loop"
    assert s.stdout == b"go\n"
    rec = wait_record(d, s.run_id)
    assert rec["outcome"] == "cancelled" and rec["message"] == "stopped by root: runaway loop", rec
    [ev] = events(d, "run.stop")
    assert ev["data"]["run_id"] == s.run_id and ev["data"]["by"] == "root" and ev["data"]["principal"] == "alice"
    assert wait_for(lambda: not run_processes(d), 10), run_processes(d)
    with As(d, None).client() as admin, pytest.raises(SandboxdError) as e:
        admin.stop_run(s.run_id)
    assert e.value.code == "NOT_FOUND" and "not in flight" in e.value.message


def test_a_principal_stops_its_own_runs_and_nobody_elses(d):
    with streams() as ss:
        s = Stream(As(d, "alice"), LONG, wall_time=60)
        ss.append(s)
        assert s.printed.wait(20), s.error
        with As(d, "bob").client() as bob:
            with pytest.raises(SandboxdError) as e:
                bob.stop_run(s.run_id)
            assert e.value.code == "NOT_FOUND", e.value     # another's run reads as absent
            with pytest.raises(SandboxdError) as e:
                bob.stop_principal("alice")
            assert e.value.code == "PERMISSION_DENIED" and "admin" in e.value.message
            assert bob.stop_principal().runs_stopped == 0  # itself: allowed, nothing to stop
        assert not s.done.is_set()
        with As(d, "alice").client() as alice:
            assert alice.stop_run(s.run_id, "changed my mind").runs_stopped == 1
        s.join(30)
    assert stopped_message(s) == "stopped by alice: changed my mind"


def test_stop_principal_stops_its_running_and_queued_runs_only(d):
    with streams() as ss:
        running = Stream(As(d, "alice"), LONG, wall_time=60)
        ss.append(running)
        assert running.printed.wait(20), running.error
        queued = Stream(As(d, "alice"), "print('must never run')", wall_time=60)  # alice: max_concurrent 1
        other = Stream(As(d, "bob"), LONG, wall_time=60)
        ss += [queued, other]
        assert queued.started.wait(20) and other.printed.wait(20), (queued.error, other.error)
        with As(d, None).client() as admin:
            res = admin.stop_principal("alice", reason="incident 42")
        assert (res.runs_stopped, res.sessions_closed) == (2, 0), res
        running.join(30)
        queued.join(30)
        assert stopped_message(running) == stopped_message(queued) == "stopped by root: incident 42"
        assert queued.stdout == b"" and wait_record(d, queued.run_id)["outcome"] == "cancelled"
        assert not other.done.is_set()  # bob's run goes on
        with As(d, "bob").client() as bob:
            bob.stop_run(other.run_id)
        other.join(30)
    [ev] = events(d, "principal.stop")
    assert ev["data"] == {**ev["data"], "principal": "alice", "by": "root", "reason": "incident 42"}


def test_sandboxctl_stop(d):
    def ctl(*args):
        p = subprocess.run([sys.executable, "-m", "sandboxd.cli.ctl", "--target", d.target, "stop", *args],
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
        return p.returncode, p.stdout + p.stderr
    with streams() as ss:
        s = Stream(As(d, "alice"), LONG, wall_time=60)
        ss.append(s)
        assert s.printed.wait(20), s.error
        code, out = ctl(s.run_id, "--reason", "from the shell")
        assert code == 0 and "stopped by root: from the shell" in out, out
        s.join(30)
    assert stopped_message(s) == "stopped by root: from the shell"
    assert ctl(s.run_id)[0] == 1                       # nothing in flight
    code, out = ctl("--principal", "alice")
    assert code == 1 and "alice: 0 runs stopped, 0 sessions closed" in out, out
    assert ctl()[0] == 2


def test_suspending_a_principal_on_reload_stops_its_runs_and_refuses_it(d):
    with streams() as ss:
        s = Stream(As(d, "alice"), LONG, wall_time=60)
        ss.append(s)
        assert s.printed.wait(20), s.error
        text = d.config_path.read_text()
        d.config_path.write_text(text.replace('name = "alice"\n', 'name = "alice"\nsuspended = true\n', 1))
        os.kill(d.proc.pid, signal.SIGHUP)
        s.join(30)
    assert stopped_message(s) == "stopped by configuration: principal suspended"
    with As(d, "alice").client() as alice:
        for call in (lambda: alice.run("print(1)"), lambda: alice.list_runs(), alice.runners):
            with pytest.raises(SandboxdError) as e:
                call()
            assert e.value.code == "PERMISSION_DENIED" and "suspended" in e.value.message, e.value
    with As(d, "bob").client() as bob:
        assert bob.run("print(1)").ok
    [ev] = events(d, "principal.suspended")
    assert ev["data"]["principal"] == "alice" and ev["data"]["by"] == "configuration"
    denied = [e for e in events(d, "run.denied")]
    assert denied and "suspended" in denied[-1]["data"]["message"] and denied[-1]["data"]["principal"]["id"] == "alice"
    # Lifting the suspension is recorded too, and alice runs again.
    d.config_path.write_text(text)
    os.kill(d.proc.pid, signal.SIGHUP)
    assert wait_for(lambda: events(d, "principal.unsuspended"), 10)
    with As(d, "alice").client() as alice:
        assert alice.run("print(1)").ok


def test_the_async_client_stops_runs_too(daemon):
    import asyncio
    import threading

    from sandboxd.aio import AsyncClient

    results = {}
    with daemon.client() as c:
        t = threading.Thread(target=lambda: results.update(r=c.run("import time; print('up', flush=True); "
                                                                   "time.sleep(60)", wall_time=30)))
        t.start()

        async def stop():
            async with AsyncClient(daemon.target) as ac:
                for _ in range(200):
                    runs, _ = await ac.list_runs(limit=5)
                    live = [r["run_id"] for r in runs if not r.get("finished_at")]
                    if live:
                        return await ac.stop_run(live[0], reason="async test")
                    await asyncio.sleep(0.05)
        res = asyncio.run(stop())
        t.join(60)
    assert res is not None and res.runs_stopped == 1, res
    assert results["r"].outcome == "cancelled" and "async test" in results["r"].message, results["r"]
