"""THREATS.md, Time: every way of not ending is ended at the wall-clock limit (outcome timeout), CPU is bounded
by the cpu controller and RLIMIT_CPU, and ignoring or blocking SIGTERM buys nothing.

Already covered in tests/integration/test_limits.py (not repeated): time.sleep, a busy loop under cpu_time=1,
three forked spinners under cpu_time=1, SIGTERM ignored while sleeping.
"""
from __future__ import annotations

import os

import pytest

from conftest import attack, probe

pytestmark = pytest.mark.cgroup2

WALL = 2

# The launcher's deadline (from exec) kills the run's cgroup: none of these needs to cooperate.
WAITS = [
    ("pause", "signal.pause()"),
    ("select-forever", "import select\nselect.select([], [], [])"),
    ("poll-on-nothing", "import select\np = select.poll()\np.poll()"),
    ("read-a-pipe-nobody-writes", "r, w = os.pipe()\nos.read(r, 1)"),
    ("futex-wait", "import threading\nthreading.Event().wait()"),
    ("sigsuspend-all-blocked", "signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())\n"
                               "signal.sigwait({signal.SIGUSR1})"),
    ("wait-for-a-sleeping-child", "pid = os.fork()\nif pid == 0:\n    signal.pause()\nos.waitpid(pid, 0)"),
    ("busy-loop", "while True: pass"),
    ("eight-spinning-threads", "import threading\ndef spin():\n    while True: pass\n"
                               "for _ in range(8): threading.Thread(target=spin, daemon=True).start()\nspin()"),
    ("spinning-processes", "for _ in range(4):\n    if os.fork() == 0: break\nwhile True: pass"),
    ("sleep-in-a-new-session", "if os.fork() == 0:\n    os.setsid(); time.sleep(60)\nos.wait()"),
    ("nanosleep-loop-ignoring-everything",
     "for s in signal.valid_signals():\n"
     "    try: signal.signal(s, signal.SIG_IGN)\n    except (OSError, ValueError): pass\n"
     "signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())\nwhile True: time.sleep(0.001)"),
]


@pytest.mark.parametrize("code", [w[1] for w in WAITS], ids=[w[0] for w in WAITS])
def test_everything_ends_at_the_wall_clock(sandbox, code):
    r = attack(sandbox, code, wall_time=WALL, cpu_time=30)
    assert r.outcome == "timeout" and "wall-clock" in r.message, r
    assert WALL <= r.wall_time < WALL + 1.5, r.wall_time


def test_spinning_threads_are_held_to_the_cpu_bandwidth(sandbox):
    """Eight spinning threads on a multi-CPU host: the cpu controller (cpus = 1.0 by default) holds the run to one
    CPU's worth per second of wall time. Without it they would burn every CPU of the host."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs at least two CPUs to tell a bandwidth limit from the machine's size")
    r = attack(sandbox, dict(WAITS)["eight-spinning-threads"], wall_time=3, cpu_time=30)
    assert r.outcome == "timeout", r
    assert r.cpu_time <= r.wall_time * 1.0 + 0.4, (r.cpu_time, r.wall_time)


def test_cpu_time_limit_holds_when_sigxcpu_is_ignored(sandbox):
    """RLIMIT_CPU sends SIGXCPU at the soft limit and SIGKILL at the hard one; the launcher polls the cgroup's CPU
    time as well. Ignoring SIGXCPU changes nothing."""
    r = attack(sandbox, "signal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True: pass", cpu_time=1, wall_time=20)
    assert r.outcome == "timeout" and "CPU" in r.message, r
    assert r.wall_time < 5


def test_rlimit_cpu_is_the_cpu_time_limit(sandbox):
    # The per-process backstop: the kernel's own limit, whatever the launcher does.
    r = attack(sandbox, "print(open('/proc/self/limits').read())", cpu_time=3)
    line = next(line for line in r.stdout.decode().splitlines() if line.startswith("Max cpu time"))
    assert line.split()[3:5] == ["3", "4"], line


def test_no_real_time_scheduling_or_negative_nice(sandbox):
    """A SCHED_FIFO/RR/DEADLINE spinner would escape the CFS bandwidth limit (and could starve the host's CPU):
    refused without CAP_SYS_NICE and with RLIMIT_RTPRIO and RLIMIT_NICE at 0 (set by sandbox/rlimits.py in every
    run, whatever the launcher inherited)."""
    s = probe(sandbox, """
        import resource
        out['fifo'] = err(os.sched_setscheduler, 0, os.SCHED_FIFO, os.sched_param(1))
        out['rr'] = err(os.sched_setscheduler, 0, os.SCHED_RR, os.sched_param(1))
        # struct sched_attr {size, policy, flags, nice, priority, runtime, deadline, period}: SCHED_DEADLINE (6)
        attr = struct.pack('IIQiIQQQ', 48, 6, 0, 0, 0, 10 ** 6, 10 ** 7, 10 ** 7)
        out['deadline'] = sc(314, 0, ctypes.create_string_buffer(attr), 0)
        out['nice'] = err(os.setpriority, os.PRIO_PROCESS, 0, -20)
        out['rlimits'] = [resource.getrlimit(resource.RLIMIT_RTPRIO), resource.getrlimit(resource.RLIMIT_NICE)]
    """)
    assert s == {"fifo": "EPERM", "rr": "EPERM", "deadline": "EPERM", "nice": "EACCES",
                 "rlimits": [[0, 0], [0, 0]]}


def test_ignoring_and_blocking_sigterm_everywhere_is_escalated(sandbox):
    """Every process of the run ignores and blocks every catchable signal: the run still ends right at the limit
    (the stop is SIGKILL through the cgroup, which cannot be caught)."""
    r = attack(sandbox, """
        for _ in range(3):
            if os.fork() == 0:
                break
        for s in signal.valid_signals():
            try:
                signal.signal(s, signal.SIG_IGN)
            except (OSError, ValueError):
                pass
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        while True:
            time.sleep(0.01)
    """, wall_time=WALL)
    assert r.outcome == "timeout" and WALL <= r.wall_time < WALL + 1.5, r
