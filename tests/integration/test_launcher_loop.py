"""The launcher's single loop is never held up by one run's cgroup removal.

A run's cgroup cannot be removed while a task is still in it. Here one of run A's processes sits in a cgroup v1
freezer cgroup the test made and froze: SIGKILL stays pending on a frozen task, so after A is cancelled its
cgroup stays populated until the test thaws it, exactly like a task stuck in the kernel. Meanwhile run B must
start, hit its deadline and finish, and A must not be reported finished (its uid is reused once it is) before
its cgroup is really gone.
"""
from __future__ import annotations

import os
import time

import pytest

from conftest import procs_with_uids
from sandboxd.client import Output

FREEZER = "/sys/fs/cgroup/freezer"
pytestmark = pytest.mark.skipif(not os.path.isdir(FREEZER) or os.geteuid() != 0,
                                reason="needs root and the cgroup v1 freezer to hold a task in a cgroup")

SLOW = r"""
import ctypes, os, time
if os.fork() == 0:
    ctypes.CDLL(None).prctl(15, b"slowrm-child")   # PR_SET_NAME: how the test finds this process
    os.closerange(0, 3)                            # hold none of the run's pipes: only its cgroup stays busy
    time.sleep(3600)
print("ready", flush=True)
time.sleep(3600)
"""


def wait_for(predicate, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


def sigkill_pending(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        masks = [int(line.split()[1], 16) for line in f if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(m & (1 << (9 - 1)) for m in masks)


def test_a_slow_cgroup_removal_does_not_stall_other_runs(start_daemon):
    d = start_daemon()
    freezer = os.path.join(FREEZER, f"sandboxd-test-{os.getpid()}-slowrm")
    os.mkdir(freezer)
    try:
        with d.client() as c:
            events = c.execute(SLOW, wall_time=300)
            run_a = next(events).run_id
            for ev in events:
                if isinstance(ev, Output) and b"ready" in ev.data:
                    break
            child = wait_for(lambda: next((p for p in procs_with_uids(d.uid_start, d.uid_start + d.uid_count)
                                           if p.name() == "slowrm-child"), None), "run A's child")
            with open(os.path.join(freezer, "cgroup.procs"), "w") as f:
                f.write(str(child.pid))
            with open(os.path.join(freezer, "freezer.state"), "w") as f:
                f.write("FROZEN")
            wait_for(lambda: open(os.path.join(freezer, "freezer.state")).read().strip() == "FROZEN", "the freeze")
            events.close()                                   # cancels A: the launcher kills its cgroup
            wait_for(lambda: sigkill_pending(child.pid), "the kill of run A to reach its frozen child")

            b = c.run("import time; print('b ran', flush=True); time.sleep(3600)", wall_time=0.5)
            assert (b.outcome, b.stdout) == ("timeout", b"b ran\n"), b
            assert c.get_run(run_a).get("outcome") is None, "run A finished while its cgroup was still busy"

            with open(os.path.join(freezer, "freezer.state"), "w") as f:
                f.write("THAWED")
            record = wait_for(lambda: (r := c.get_run(run_a)).get("outcome") and r, "run A's record")
            assert record["outcome"] == "cancelled", record
            assert c.run("print(1)").outcome == "exited"   # A's uid came back clean: the daemon still serves
    finally:
        with open(os.path.join(freezer, "freezer.state"), "w") as f:
            f.write("THAWED")
        wait_for(lambda: not open(os.path.join(freezer, "cgroup.procs")).read().strip(), "the freezer to empty")
        os.rmdir(freezer)
