"""One caller flooding the daemon cannot starve another: waiters are served round-robin across principals.
Two real callers on the unix socket: root (this process) and uid 65534 (a client in a subprocess)."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG = """
[server]
socket_mode = "0666"
[admission]
max_concurrent = 1
max_queue = 50
max_queue_wait = "120s"
[[principals]]
name = "flooder"
unix_uids = [0]
roles = ["admin"]
[[principals]]
name = "other"
unix_uids = [65534]
[[policies]]
name = "everyone"
principals = ["flooder", "other"]
"""
OTHER = """
import sys
from sandboxd.client import Client
r = Client(sys.argv[1]).run("print(1)")
print(r.run_id, r.outcome)
"""


@pytest.fixture
def open_workdir():
    """pytest's temp root is 0700; the second caller (uid 65534) must be able to reach the socket."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="sandboxd-fair-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_flooding_caller_does_not_starve_another(start_daemon, open_workdir):
    if not os.path.exists("/usr/bin/setpriv"):
        pytest.skip("needs setpriv (util-linux) to run a second caller as another uid")
    d = start_daemon(CONFIG, workdir=open_workdir)
    flood_ids, threads = [], []

    def flood():
        with d.client() as c:
            flood_ids.append(c.run("import time; time.sleep(0.4)").run_id)

    for _ in range(8):
        t = threading.Thread(target=flood)
        t.start()
        threads.append(t)
    # Wait until the flooder holds the slot and has a queue behind it, then the other caller arrives.
    time.sleep(1.0)
    other = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", sys.executable,
                            "-c", OTHER, d.target], capture_output=True, text=True, timeout=120, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    for t in threads:
        t.join(120)
    assert other.returncode == 0, other.stderr
    other_id, outcome = other.stdout.split()
    assert outcome == "exited"
    with d.client() as c:
        records = {rid: c.get_run(rid) for rid in [*flood_ids, other_id]}
    assert records[other_id]["principal"] == "other"
    mine = records[other_id]
    overtaking = [rid for rid in flood_ids
                  if mine["received_at"] < records[rid]["started_at"] < mine["started_at"]]
    still_queued = [rid for rid in flood_ids if records[rid]["started_at"] > mine["started_at"]]
    # FIFO would run every flood request queued before it first; round-robin lets at most one through
    # (the grant already due to the flooder's turn) before the other caller's run.
    assert still_queued, "the flood was over before the other caller arrived: the test proves nothing"
    assert len(overtaking) <= 1, (len(overtaking), len(still_queued))
