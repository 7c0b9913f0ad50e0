"""THREATS.md, Processes: bombs hit the pids limit, nothing outlives the run, stopped processes still time out,
signals stay inside the run, rlimits cannot be raised, descriptor and IPC exhaustion stay inside.

Already covered in tests/integration/test_limits.py (not repeated): a catching fork bomb at pids=16, the
double-fork daemon ignoring SIGHUP/SIGTERM, SIGSTOP to itself, RLIMIT_NOFILE raised to 1<<20. The cgroup filesystem
(absent, not mountable) is checked in test_filesystem.py::test_no_sys_and_no_cgroup_filesystem.
"""
from __future__ import annotations

import collections
import json
import threading
import time

import psutil
import pytest

from conftest import (attack, launcher_pid, probe, procs_with_uids, record, run_procs, run_uids, script, sleepers,
                      still_serves)

pytestmark = pytest.mark.cgroup2


class Sampler:
    """Counts, on the host, the processes (and threads) of the daemon's uid range while a run goes on: of the
    run's cgroup, the one holding the most of them (a warm pool's waiting interpreters sit in cgroups of their
    own, one each)."""

    def __init__(self, uids: range):
        self.uids, self.procs, self.threads = uids, [], []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            procs, threads = collections.Counter(), collections.Counter()
            for p in procs_with_uids(self.uids.start, self.uids.stop):
                try:
                    with open(f"/proc/{p.pid}/cgroup") as f:
                        group = f.read()
                    threads[group] += p.num_threads()
                    procs[group] += 1
                except (psutil.Error, OSError):
                    pass
            self.procs.append(max(procs.values(), default=0))
            self.threads.append(max(threads.values(), default=0))
            time.sleep(0.02)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


# Bounded by the cgroup's pids.max and, per process, by RLIMIT_NPROC (the uid is unique to the run): both are
# set to `pids`. Remove both and the samples pass the limit.
BOMBS = [
    ("fork-bomb", "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"),
    ("fork-exec-bomb", "import os\nwhile True:\n    try:\n"
                       "        os.spawnv(os.P_NOWAIT, '/bin/sleep', ['sleep', '60'])\n"
                       "    except OSError:\n        pass\n"),
    ("thread-bomb", "import threading, time\nwhile True:\n    try:\n"
                    "        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
                    "    except RuntimeError:\n        time.sleep(0.01)\n"),
]


@pytest.mark.parametrize("code", [b[1] for b in BOMBS], ids=[b[0] for b in BOMBS])
def test_bombs_are_bounded_by_the_pids_limit(sandbox, daemon, code):
    pids = 24
    with Sampler(run_uids(daemon)) as s:
        r = attack(sandbox, code, raw=True, pids=pids, wall_time=3, memory=256 << 20)
    assert r.outcome == "timeout", r
    assert r.wall_time < 5
    # The host saw the bomb (or the test would prove nothing), and never more tasks than the limit.
    assert max(s.threads) >= pids // 2, (max(s.threads), s.threads[-20:])
    assert max(s.threads) <= pids, (max(s.threads), s.threads)
    assert not run_procs(daemon.uid_start, daemon.uid_start + daemon.uid_count)


def test_thread_bomb_reports_the_limit(sandbox):
    s = probe(sandbox, """
        import threading
        n = 0
        try:
            while True:
                threading.Thread(target=time.sleep, args=(30,), daemon=True).start(); n += 1
        except RuntimeError:
            pass
        out['threads'] = n
    """, pids=16)
    assert 8 <= s["threads"] < 16, s


# Daemonized descendants. Init exiting tears down the pid namespace; the launcher then kills the cgroup. Each
# variant ends the main process at once; the run must end promptly and leave nothing (the `sandbox` fixture and
# the explicit check below).
DAEMONS = [
    ("double-fork-block-all-signals", """
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                for s in signal.valid_signals():
                    try: signal.signal(s, signal.SIG_IGN)
                    except (OSError, ValueError): pass
                signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
                os.close(0); os.close(1); os.close(2)
                time.sleep(60)
            os._exit(0)
        time.sleep(0.2)
    """),
    ("daemon-keeps-stdout-open", """
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
                while True:
                    time.sleep(0.05); print('still here', flush=True)
            os._exit(0)
        time.sleep(0.2)
    """),
    ("stopped-daemon", """
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.kill(os.getpid(), signal.SIGSTOP); time.sleep(60)
            os._exit(0)
        time.sleep(0.2)
    """),
    ("pid-hopping-daemon", """
        if os.fork() == 0:
            os.setsid()
            while True:
                if os.fork() != 0:
                    os._exit(0)
                time.sleep(0.05)
        time.sleep(0.3)
    """),
    ("shell-nohup-new-session", """
        import subprocess
        subprocess.Popen(['/bin/sh', '-c', 'trap "" HUP TERM INT; nohup sleep 60 >/dev/null 2>&1 &'],
                         start_new_session=True).wait()
        time.sleep(0.2)
    """),
    ("new-process-group", """
        if os.fork() == 0:
            os.setpgid(0, 0)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            time.sleep(60)
        time.sleep(0.2)
    """),
]


@pytest.mark.parametrize("code", [d[1] for d in DAEMONS], ids=[d[0] for d in DAEMONS])
def test_daemonized_descendants_never_outlive_the_run(sandbox, daemon, code):
    r = attack(sandbox, code, wall_time=10)
    assert (r.outcome, r.exit_code) == ("exited", 0), (r, r.stderr[-2000:])
    assert r.wall_time < 3, r
    assert not run_procs(daemon.uid_start, daemon.uid_start + daemon.uid_count)


def test_stopping_the_whole_process_group_cannot_dodge_the_wall_clock(sandbox):
    r = attack(sandbox, """
        for _ in range(3):
            if os.fork() == 0:
                time.sleep(60)
        time.sleep(0.2)
        os.kill(0, signal.SIGSTOP)
    """, wall_time=2)
    assert r.outcome == "timeout" and 2 <= r.wall_time < 4, r


def test_signals_only_reach_processes_of_the_run(sandbox, daemon):
    """kill(-1), kill(1), and kills aimed at the daemon, the launcher and host processes of every uid the daemon
    hands to runs. Host pids do not exist in the run's pid namespace (ESRCH): that is the pid namespace's answer;
    the uid (and Landlock's signal scope) would also refuse, so the sleepers with the run uids are there to make
    a missing pid namespace visible as something other than ESRCH."""
    targets = {"daemon": daemon.proc.pid, "launcher": launcher_pid(daemon)}
    with sleepers([None, *run_uids(daemon)]) as procs:
        targets.update({f"sleeper-{i}": p.pid for i, p in enumerate(procs)})
        s = probe(sandbox, f"""
            targets = {targets!r}
            child = os.fork()
            if child == 0:
                time.sleep(30); os._exit(0)
            for name, pid in targets.items():
                out[name] = [sc('kill', pid, 9), sc('kill', -pid, 9), sc('tgkill', pid, pid, 9),
                             sc('pidfd_open', pid, 0), err(os.stat, f'/proc/{{pid}}')]
            out['kill-init'] = sc('kill', 1, 9)
            out['kill-all'] = sc('kill', -1, 9)          # the run's own child dies; the caller is spared
            out['child'] = os.waitpid(child, 0)[1]
        """)
        dead = {name: (p.pid, p.returncode) for name, p in zip(["root", *map(str, run_uids(daemon))], procs)
                if p.poll() is not None}
    assert not dead, f"host sleepers died (uid: (pid, status)): {dead}; the run saw {s}"
    assert daemon.proc.poll() is None and psutil.pid_exists(targets["launcher"])
    for name in targets:
        assert s[name] == ["ESRCH", "ESRCH", "ESRCH", "ESRCH", "ENOENT"], (name, s[name])
    assert s["kill-init"] == "EPERM"
    assert s["kill-all"] == 0 and s["child"] == 9


# Raising a hard limit needs CAP_SYS_RESOURCE. The limits are lowered before the uid changes and the profile allows
# setrlimit/prlimit64, so creds alone answer EPERM; if a limit were left at infinity, "raising" it would succeed.
RLIMITS = {"CPU": 0, "FSIZE": 1, "STACK": 3, "CORE": 4, "NPROC": 6, "NOFILE": 7, "MEMLOCK": 8, "MSGQUEUE": 12}


@pytest.mark.parametrize("call", ["prlimit64", "setrlimit"])
@pytest.mark.parametrize("resource", RLIMITS)
def test_hard_rlimits_cannot_be_raised(sandbox, resource, call):
    n = RLIMITS[resource]
    s = probe(sandbox, f"""
        cur = (ctypes.c_ulong * 2)()
        assert sc('prlimit64', 0, {n}, 0, cur) == 0
        new = (ctypes.c_ulong * 2)(cur[1], 2 ** 64 - 1)      # soft up to the old hard, hard to infinity
        out['r'] = sc('prlimit64', 0, {n}, new, 0) if {call!r} == 'prlimit64' else sc('setrlimit', {n}, new)
        after = (ctypes.c_ulong * 2)()
        sc('prlimit64', 0, {n}, 0, after)
        out['hard'] = (cur[1], after[1])
    """)
    assert s["r"] == "EPERM"
    assert s["hard"][0] == s["hard"][1] < 2 ** 64 - 1


def test_rlimits_of_init_are_out_of_reach(sandbox):
    assert probe(sandbox, "out['r'] = sc('prlimit64', 1, 7, 0, (ctypes.c_ulong * 2)())")["r"] == "EPERM"


EXHAUSTION = [
    ("open", "os.open('/dev/null', os.O_RDONLY)", 1),
    ("pipe", "os.pipe()", 2),
    ("socketpair", "socket.socketpair()", 2),
    ("eventfd", "os.eventfd(0)", 1),
    ("dup", "os.dup(1)", 1),
]


@pytest.mark.parametrize("expr,per", [e[1:] for e in EXHAUSTION], ids=[e[0] for e in EXHAUSTION])
def test_descriptor_exhaustion_stops_at_rlimit_nofile(sandbox, expr, per):
    s = probe(sandbox, f"""
        import resource
        keep, out['err'] = [], None
        try:
            while True:
                keep.append({expr})
        except OSError as e:
            out['err'] = errno.errorcode[e.errno]
        out['opened'] = len(keep) * {per}
        out['limit'] = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    """)
    assert s["err"] == "EMFILE"
    assert s["limit"] - 3 - per < s["opened"] <= s["limit"] - 3, s


def _sysvipc_counts() -> dict[str, int]:
    counts = {}
    for kind in ("shm", "msg", "sem"):
        with open(f"/proc/sysvipc/{kind}") as f:
            counts[kind] = sum(1 for _ in f)
    return counts


def test_sysv_ipc_and_message_queue_exhaustion_stay_inside(sandbox):
    """The run's IPC namespace holds its own tables: exhausting them (ENOSPC at shmmni/msgmni/semmni) shows
    nothing on the host, during the run or after. POSIX message queues cannot be created at all
    (RLIMIT_MSGQUEUE 0: EMFILE)."""
    host_before = _sysvipc_counts()
    code = r"""
        libc.shmget.restype = libc.msgget.restype = libc.semget.restype = ctypes.c_int
        for kind, make in (('shm', lambda: libc.shmget(0, 4096, 0o1000 | 0o600)),
                           ('msg', lambda: libc.msgget(0, 0o1000 | 0o600)),
                           ('sem', lambda: libc.semget(0, 1, 0o1000 | 0o600))):
            n = 0
            while make() >= 0:
                n += 1
            out[kind] = (errno.errorcode[ctypes.get_errno()], n)
        out['mq_open'] = sc('mq_open', b'sandboxd', os.O_CREAT | os.O_RDWR, 0o600, 0)
        print(json.dumps(out), flush=True)
        time.sleep(1)
    """
    during, result = None, None
    for event in sandbox.execute(script(code), wall_time=10, memory=256 << 20):
        if getattr(event, "stream", None) == "stdout" and during is None:
            during = _sysvipc_counts()
            inside = json.loads(event.data.decode().splitlines()[0])
        elif hasattr(event, "outcome"):
            result = event
    assert result.outcome == "exited" and result.exit_code == 0, result
    assert inside["shm"][0] == inside["msg"][0] == inside["sem"][0] == "ENOSPC", inside
    assert min(inside["shm"][1], inside["msg"][1], inside["sem"][1]) >= 1000, inside
    assert inside["mq_open"] == "EMFILE"
    assert during == host_before == _sysvipc_counts()
    assert record(sandbox, result.run_id)["outcome"] == "exited"
    still_serves(sandbox)
