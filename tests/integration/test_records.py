"""Every run, allowed or refused, has a durable record before its result is returned; restarts lose nothing."""
from __future__ import annotations

import pytest

from sandboxd import store as store_mod
from sandboxd.client import SandboxdError


def open_store(d):
    return store_mod.Store(str(d.state_dir / "sandboxd.db"))


def test_allowed_and_refused_runs_are_recorded_and_survive_a_restart(start_daemon):
    d = start_daemon()
    with d.client() as c:
        ok = c.run("print('hi')")
        with pytest.raises(SandboxdError):
            c.run("x", "nope")
        timed = c.run("import time; time.sleep(10)", wall_time=0.5)
    # The result was returned, so the record must already be durable: read it while the daemon runs.
    s = open_store(d)
    try:
        rec = s.get_run(ok.run_id)
        assert rec["outcome"] == "exited" and rec["runner"] == "python"
        assert rec["code_sha256"] and rec["stdout_bytes"] == 3
        assert rec["limits"]["memory"] == ok.limits["memory"]
        assert s.get_run(timed.run_id)["outcome"] == "timeout"
        rejected = [r for r in s.list_runs(outcome="rejected")]
        assert rejected and rejected[0]["reason"] == "not_found"
    finally:
        s.close()
    assert d.stop() == 0
    assert store_mod.verify(str(d.state_dir / "sandboxd.db")).ok


def test_restart_keeps_records_and_marks_interrupted_runs(start_daemon, tmp_path):
    d = start_daemon()
    with d.client() as c:
        first = c.run("print(1)")
    # Kill -9 during a run: the run was accepted and recorded as requested, never finished.
    events = d.client().execute("import time\nprint('go', flush=True)\ntime.sleep(30)")
    started = next(events)
    next(events)
    d.proc.kill()
    d.expected_exit = -9
    d.proc.wait()
    with pytest.raises(SandboxdError):
        list(events)
    # A new daemon on the same state dir: the old run is interrupted, the first one is intact.
    d2 = start_daemon(workdir=d.workdir)
    s = open_store(d2)
    try:
        assert s.get_run(first.run_id)["outcome"] == "exited"
        assert s.get_run(started.run_id)["outcome"] == "interrupted"
    finally:
        s.close()
    assert store_mod.verify(str(d2.state_dir / "sandboxd.db")).ok
