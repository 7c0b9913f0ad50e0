"""THREATS.md, Memory: every way of holding memory is charged to the run's cgroup, the OOM kill stays inside the
run, and swap cannot extend the limit.

Already covered in tests/integration/test_limits.py (not repeated): a bytearray loop and a memfd fill.
"""
from __future__ import annotations

import os
import time

import pytest

from conftest import MiB, attack, find_cgroup_dirs, launcher_pid, probe, record, run_uids, script, still_serves

pytestmark = pytest.mark.cgroup2

LIMIT = 64 * MiB

# Each holds memory a different way; per-process rlimits see none of them (there is no RLIMIT_AS), so only the
# cgroup's memory limit ends them. Without it each would run to the wall clock (timeout) or fill the host.
HOLDERS = [
    ("map_noreserve-touched", """
        import mmap
        m = mmap.mmap(-1, 8 << 30, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x4000)   # MAP_NORESERVE
        for off in range(0, 8 << 30, 1 << 20):
            ctypes.memset(addr(m) + off, 1, 1 << 20)
    """),
    ("map_populate", """
        import mmap
        m = mmap.mmap(-1, 1 << 30, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x8000)   # MAP_POPULATE
    """),
    ("dev-shm-fill", """
        with open('/dev/shm/fill', 'wb') as f:
            while True:
                f.write(b'x' * (1 << 20)); f.flush()
    """),
    ("tmp-fill", """
        with open('/tmp/fill', 'wb') as f:
            while True:
                f.write(b'x' * (1 << 20)); f.flush()
    """),
    ("memfd-mmap-touched", """
        import mmap
        maps = []
        for n in range(8):                                     # each under RLIMIT_FSIZE, together over the limit
            fd = os.memfd_create(f'fill{n}'); os.ftruncate(fd, 32 << 20)
            maps.append(mmap.mmap(fd, 32 << 20))
            ctypes.memset(addr(maps[-1]), 1, 32 << 20)
    """),
    ("sysv-shm-touched", """
        libc.shmget.restype = ctypes.c_int; libc.shmat.restype = ctypes.c_void_p
        seg = libc.shmget(0, 1 << 30, 0o1000 | 0o600)
        ctypes.memset(libc.shmat(seg, None, 0), 1, 1 << 30)
    """),
    ("pipe-buffers", """
        import fcntl
        pipes = []
        while True:
            r, w = os.pipe()
            fcntl.fcntl(w, 1031, 1 << 20)                       # F_SETPIPE_SZ
            os.set_blocking(w, False)
            try:
                while True: os.write(w, b'x' * 65536)
            except BlockingIOError:
                pass
            pipes.append((r, w))
    """),
    ("threads-allocating", """
        import threading
        hold = []
        def grab():
            while True:
                hold.append(bytearray(4 << 20)); time.sleep(0.001)
        for _ in range(4):
            threading.Thread(target=grab, daemon=True).start()
        time.sleep(30)
    """),
]


@pytest.mark.parametrize("code", [h[1] for h in HOLDERS], ids=[h[0] for h in HOLDERS])
def test_memory_holders_end_as_memory_limit(sandbox, daemon, code):
    launcher = launcher_pid(daemon)
    r = attack(sandbox, code, memory=LIMIT, wall_time=10)
    assert (r.outcome, r.signal) == ("memory_limit", 9), (r, r.stderr[-2000:])
    assert r.peak_memory <= LIMIT, r.peak_memory
    assert r.wall_time < 8
    # The OOM kill stayed inside the run: the daemon and its launcher are the same processes as before.
    assert daemon.proc.poll() is None and launcher_pid(daemon) == launcher


def test_oom_among_many_processes_stays_inside_the_run(sandbox, daemon):
    """Eight processes of 16MiB each cannot fit in 64MiB: the kernel kills some of them (never init, never the
    daemon); the main process survives to report, and the result says processes were OOM-killed."""
    launcher = launcher_pid(daemon)
    r = attack(sandbox, """
        kids = []
        for i in range(8):
            pid = os.fork()
            if pid == 0:
                b = bytearray(16 << 20)
                for j in range(0, len(b), 4096):
                    b[j] = 1
                time.sleep(1); os._exit(0)
            kids.append(pid)
        print(sorted(os.waitstatus_to_exitcode(os.waitpid(k, 0)[1]) for k in kids))
    """, memory=LIMIT, wall_time=10)
    assert (r.outcome, r.exit_code) == ("exited", 0), r
    statuses = eval(r.stdout)
    assert -9 in statuses, statuses
    assert "OOM" in r.message, r.message
    assert daemon.proc.poll() is None and launcher_pid(daemon) == launcher


def test_oom_score_cannot_be_lowered(sandbox):
    """A run cannot make the global OOM killer prefer the host: lowering oom_score_adj needs CAP_SYS_RESOURCE
    (and Landlock refuses writes to /proc on top)."""
    s = probe(sandbox, """
        out['lower'] = err(lambda: os.write(os.open('/proc/self/oom_score_adj', os.O_WRONLY), b'-1000'))
        out['legacy'] = err(lambda: os.write(os.open('/proc/self/oom_adj', os.O_WRONLY), b'-17'))
        out['score_adj'] = open('/proc/self/oom_score_adj').read().strip()
    """)
    assert s == {"lower": "EACCES", "legacy": "EACCES", "score_adj": "1000"}


def test_memory_cannot_be_locked(sandbox):
    # RLIMIT_MEMLOCK 0: pinned memory could not be reclaimed or swapped by the host.
    s = probe(sandbox, """
        import mmap
        m = mmap.mmap(-1, 4096)
        out['mlock'] = sc(149, addr(m), 4096)
        out['mlockall'] = sc(151, 3)                              # MCL_CURRENT | MCL_FUTURE
    """)
    assert s == {"mlock": "EPERM", "mlockall": "EPERM"}


TCP_FLOOD = """
srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen(128)
keep, queued = [], 0
for i in range(100):
    c = socket.create_connection(srv.getsockname()); s, _ = srv.accept()
    c.setblocking(False)
    try:
        while True:
            queued += c.send(b'x' * 65536)
    except BlockingIOError:
        pass
    keep.append((c, s))
"""


def test_socket_buffers_count_against_the_memory_limit(sandbox):
    """Data queued in TCP sockets over the run's own loopback is kernel memory the run holds. cgroup v2 charges
    it to memory.current; cgroup v1 only when memory.kmem.tcp.limit_in_bytes is set (the v1 driver sets it to the
    memory limit since the battery found ~390MiB escaping a 64MiB limit). A run that queues far more than its
    limit must be stopped (memory_limit) or held back (sends block near the limit)."""
    r = attack(sandbox, TCP_FLOOD + "print(queued, flush=True)\ntime.sleep(0.5)", memory=LIMIT, wall_time=20)
    if r.outcome == "memory_limit":
        return
    assert r.outcome == "exited", r
    queued = int(r.stdout)
    assert queued <= 2 * LIMIT, f"{queued >> 20}MiB queued in socket buffers with a {LIMIT >> 20}MiB limit"


def test_socket_buffers_and_memory_together_stay_within_the_limit(sandbox):
    """The limit is one budget for the whole run: after filling socket buffers, allocating what is left of the
    limit plus 16MiB must end in memory_limit. On cgroup v2 socket memory is part of memory.current; on cgroup v1
    it is a separate counter, and the driver splits the run's budget between the two so they add up to it."""
    r = attack(sandbox, TCP_FLOOD + f"""
extra = max(16 << 20, {LIMIT} - queued + (16 << 20))
hold = bytearray(extra)
for i in range(0, extra, 4096):
    hold[i] = 1
print(queued >> 20, extra >> 20, flush=True)
time.sleep(0.5)
""", memory=LIMIT, wall_time=20)
    assert r.outcome == "memory_limit", (r.outcome, f"MiB in sockets, MiB allocated: {r.stdout!r}")


def _holds_probe(directory: str, uids: range) -> bool:
    """The cgroup holds the probe: a process of a run uid named PROBE_NAME (the run renames itself, so the run's
    cgroup is told from a warm pool's, whose waiting interpreters have run uids too)."""
    try:
        pids = open(os.path.join(directory, "cgroup.procs")).read().split()
    except OSError:
        return False
    for pid in pids:
        try:
            if os.stat(f"/proc/{pid}").st_uid in uids and open(f"/proc/{pid}/comm").read().strip() == PROBE_NAME:
                return True
        except OSError:
            pass
    return False


PROBE_NAME = "swapprobe"


def _swap_bound(run_dirs: list[str]) -> dict:
    """What stops swap from extending the run's memory limit, read from its cgroup on the host."""
    found = {}
    for d in run_dirs:
        for name in ("memory.memsw.limit_in_bytes", "memory.swap.max", "memory.limit_in_bytes", "memory.max",
                     "memory.kmem.tcp.limit_in_bytes"):
            path = os.path.join(d, name)
            if os.path.exists(path):
                found[name] = open(path).read().strip()
    return found


def test_memory_limit_includes_swap(sandbox, daemon):
    """No swap escape. Read the run's own cgroup while it runs: memory+swap is limited to the memory limit (v1:
    memsw == limit; v2: swap.max 0). On a host without swap the OOM outcome above is the whole story; the files are
    checked anyway, since swap can be added to a host at any time."""
    seen, result = {}, None
    code = f"libc.prctl(15, {PROBE_NAME.encode()!r}, 0, 0, 0)\nprint('ready', flush=True)\ntime.sleep(3)"
    for event in sandbox.execute(script(code), wall_time=10, memory=LIMIT):
        if getattr(event, "stream", None) == "stdout" and not seen:
            deadline = time.monotonic() + 5
            while not seen and time.monotonic() < deadline:
                # The run's own: with the warm pool on, idle pooled sandboxes have cgroups too.
                dirs = [os.path.join(p, c) for p in find_cgroup_dirs(daemon.parent_name) for c in os.listdir(p)
                        if c.startswith("run-") and _holds_probe(os.path.join(p, c), run_uids(daemon))]
                seen = _swap_bound(dirs)
        elif hasattr(event, "outcome"):
            result = event
    assert result.outcome == "exited", result
    assert record(sandbox, result.run_id)["outcome"] == "exited"
    if "memory.memsw.limit_in_bytes" in seen:
        # v1: memory+swap equals the memory counter's share; with the TCP share the budget is exactly LIMIT.
        tcp = int(seen.get("memory.kmem.tcp.limit_in_bytes", 0))
        assert int(seen["memory.memsw.limit_in_bytes"]) == int(seen["memory.limit_in_bytes"]) == LIMIT - tcp, seen
    elif "memory.swap.max" in seen:
        assert seen["memory.swap.max"] == "0" and int(seen["memory.max"]) == LIMIT, seen
    else:
        with open("/proc/swaps") as f:
            assert len(f.read().splitlines()) <= 1, "swap is on and the run's cgroup has no swap limit"
        tcp = int(seen.get("memory.kmem.tcp.limit_in_bytes", 0))
        assert int(seen.get("memory.limit_in_bytes", seen.get("memory.max", 0))) + tcp == LIMIT, seen
    still_serves(sandbox)
