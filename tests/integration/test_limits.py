"""Limits end runs with the right outcome, inside the run's cgroup, and leave nothing behind."""
from __future__ import annotations

import pytest

from conftest import run_procs
from sandboxd.client import SandboxdError

pytestmark = pytest.mark.cgroup2


def test_wall_clock_timeout_ends_the_whole_run(sandbox):
    r = sandbox.run("import time\nprint('start', flush=True)\ntime.sleep(30)", wall_time=1)
    assert r.outcome == "timeout" and "wall-clock" in r.message
    assert r.stdout == b"start\n"
    assert 0.9 < r.wall_time < 10


def test_stopped_process_cannot_dodge_the_wall_clock(sandbox):
    r = sandbox.run("import os, signal\nos.kill(os.getpid(), signal.SIGSTOP)", wall_time=1)
    assert r.outcome == "timeout"


def test_ignoring_sigterm_does_not_help(sandbox):
    r = sandbox.run("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                    "while True: time.sleep(0.01)", wall_time=1)
    assert r.outcome == "timeout"


def test_cpu_time_limit(sandbox):
    r = sandbox.run("while True: pass", cpu_time=1, wall_time=20)
    assert r.outcome == "timeout" and "CPU" in r.message, r
    assert r.cpu_time >= 0.9


def test_cpu_time_limit_counts_every_process(sandbox):
    code = ("import os\nfor _ in range(3):\n    if os.fork() == 0:\n        break\nwhile True: pass")
    r = sandbox.run(code, cpu_time=1, wall_time=20)
    assert r.outcome == "timeout", r
    assert r.wall_time < 10


def test_memory_limit_is_an_oom_kill_inside_the_run(sandbox):
    r = sandbox.run("b = []\nwhile True: b.append(bytearray(8 << 20))", memory=64 << 20)
    assert r.outcome == "memory_limit", r
    assert r.signal == 9
    assert r.peak_memory >= 48 << 20


def test_memory_limit_counts_tmpfs_and_memfd(sandbox):
    r = sandbox.run("import os\nfd = os.memfd_create('x')\nchunk = b'x' * (1 << 20)\n"
                    "while True: os.write(fd, chunk)", memory=32 << 20)
    assert r.outcome == "memory_limit", r


def test_fork_bomb_stopped_by_pids_limit(sandbox):
    code = ("import os, time\nn = 0\nwhile True:\n    try:\n        pid = os.fork()\n"
            "    except OSError as e:\n        print('fork failed', e.errno, flush=True); break\n"
            "    if pid == 0:\n        time.sleep(30); os._exit(0)\n    n += 1\nprint(n)")
    r = sandbox.run(code, pids=16, wall_time=10)
    assert r.outcome == "exited", r
    lines = r.stdout.decode().split("\n")
    assert lines[0] == "fork failed 11"  # EAGAIN
    assert int(lines[1]) < 16


def test_daemonized_descendant_does_not_outlive_the_run(sandbox, daemon):
    code = ("import os, signal, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            "        signal.signal(signal.SIGHUP, signal.SIG_IGN); signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "        os.close(1); os.close(2)\n        time.sleep(60)\n    os._exit(0)\n"
            "time.sleep(0.2)\nprint('parent done')")
    r = sandbox.run(code)
    assert (r.outcome, r.stdout) == ("exited", b"parent done\n")
    assert not run_procs(daemon.uid_start, daemon.uid_start + daemon.uid_count)


def test_closing_stdout_and_running_on_still_times_out(sandbox):
    r = sandbox.run("import os, time\nos.close(1); os.close(2)\ntime.sleep(30)", wall_time=1)
    assert r.outcome == "timeout"


def test_output_cap_cuts_flags_and_stops(sandbox):
    r = sandbox.run("import sys\nwhile True: sys.stdout.write('x' * 65536)", output=100_000)
    assert r.outcome == "output_limit", r
    assert r.stdout_truncated and not r.stderr_truncated
    assert len(r.stdout) == 100_000
    assert r.stdout_bytes >= 100_000


def test_binary_output_without_newlines_is_passed_through_exactly(sandbox):
    r = sandbox.run("import sys, os\nsys.stdout.buffer.write(bytes(range(256)) * 1000)\nsys.stdout.flush()")
    assert r.outcome == "exited" and r.stdout == bytes(range(256)) * 1000


def test_output_cap_on_stderr(sandbox):
    r = sandbox.run("import os\nwhile True: os.write(2, b'\\xff\\xfe' * 50000)", output=50_000)
    assert r.outcome == "output_limit" and r.stderr_truncated and len(r.stderr) == 50_000


def test_tmp_fills_up_with_enospc(sandbox):
    # Many files, each under the file-size limit, so only the tmpfs size can stop them.
    code = ("import errno\ntry:\n    for i in range(1000):\n        with open(f'/tmp/f{i}', 'wb') as f:\n"
            "            for _ in range(8): f.write(b'x' * (1 << 20))\n"
            "except OSError as e:\n    print(errno.errorcode[e.errno], i)")
    r = sandbox.run(code, memory=256 << 20)
    err, files = r.stdout.split()
    assert err == b"ENOSPC" and 4 <= int(files) <= 8, r  # 64MiB of /tmp holds 8 files of 8MiB


def test_inode_limit(sandbox):
    code = ("import errno, os\ntry:\n    for i in range(100000): open(f'/work/f{i}', 'w').close()\n"
            "except OSError as e:\n    print(errno.errorcode[e.errno], i < 100000)")
    r = sandbox.run(code)
    assert r.stdout == b"ENOSPC True\n", r


def test_file_size_limit_is_efbig(sandbox):
    code = ("import errno, signal\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "f = open('/work/big', 'wb', buffering=0)\ntry:\n    f.seek((1 << 40)); f.write(b'x')\n"
            "except OSError as e:\n    print(errno.errorcode[e.errno])")
    r = sandbox.run(code)
    assert r.stdout == b"EFBIG\n", r


def test_limits_in_result_are_the_effective_ones(sandbox):
    r = sandbox.run("pass", wall_time=3, memory=100 << 20)
    assert r.limits["wall_time"] == 3 and r.limits["memory"] == 100 << 20


def test_a_request_may_raise_a_limit_above_the_runners_default(sandbox):
    # The python runner's default wall time is 10s and its maximum 300s: asking for more than the default is
    # allowed (README, sandboxctl run --help and the proto say so), asking past the maximum is not.
    r = sandbox.run("pass", wall_time=20)
    assert r.outcome == "exited" and r.limits["wall_time"] == 20
    with pytest.raises(SandboxdError, match="limits.wall_time: 301.0 is above the maximum 300.0"):
        sandbox.run("pass", wall_time=301)


POLICY_CEILINGS = """
[[principals]]
name = "root"
unix_uids = [0]
roles = ["admin"]
[[policies]]
name = "tight"
principals = ["root"]
[policies.limits]
tmp_size = "1MiB"
open_files = 32
"""


def test_policy_ceilings_apply_to_limits_a_request_cannot_set(start_daemon):
    """tmp_size and open_files are not request limits: the policy's ceiling must still bind the run."""
    d = start_daemon(POLICY_CEILINGS)
    with d.client() as c:
        r = c.run("""
import errno, os, resource
try:
    with open('/tmp/fill', 'wb') as f:
        f.write(b'x' * (2 << 20))
    print('written')
except OSError as e:
    print(errno.errorcode[e.errno])
print(resource.getrlimit(resource.RLIMIT_NOFILE)[1])
""")
    assert r.stdout.split() == [b"ENOSPC", b"32"], r
