"""Shared helpers of the security battery: one test module per group of /work/shared/THREATS.md.

Every case runs its attack as an ordinary script through the real daemon and asserts the specific answer
THREATS.md names (an errno name, an outcome, a signal, the host's state). Besides its own expectation every
case also holds what THREATS.md promises for all of them, checked here by `attack` and by the `sandbox`
fixture of tests/conftest.py:

- the daemon keeps serving: a trivial run succeeds right after the attack;
- the run's record holds the outcome the client saw (read from the daemon's store, outside the sandbox);
- no process of the run remains and its cgroup is gone (the `sandbox` fixture, after each test).

Scripts import `PRELUDE` through `probe`: raw syscalls by x86_64 number (`sc`), errno names for Python calls
(`err`), and a dict `out` printed as JSON at the end. Numbers, not libc wrappers, so a case names exactly the
kernel entry point it attacks and glibc cannot answer (or fall back) on the kernel's behalf.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import grpc
import psutil
import pytest

from sandboxd import store as store_mod
from sandboxd.client import OUTCOMES, Client, Output, Result, SandboxdError, Started
from sandboxd.v1 import sandbox_pb2 as pb

# This file shadows tests/conftest.py as the importable module `conftest` once pytest has loaded it, so the
# names other test modules import from there stay available here too.
_root_spec = importlib.util.spec_from_file_location(
    "_sandboxd_tests_root_conftest", pathlib.Path(__file__).resolve().parent.parent / "conftest.py")
_root = importlib.util.module_from_spec(_root_spec)
_root_spec.loader.exec_module(_root)
ROOT, find_cgroup_dirs, procs_with_uids = _root.ROOT, _root.find_cgroup_dirs, _root.procs_with_uids
run_procs, waiting_in_pool = _root.run_procs, _root.waiting_in_pool
Daemon, _check_stopped = _root.Daemon, _root._check_stopped

if os.uname().machine != "x86_64":  # syscall numbers and machine code below are x86_64
    collect_ignore_glob = ["test_*.py"]

MiB = 1 << 20
# Small limits keep the whole battery to a few minutes; a case raises one only when its attack needs it.
DEFAULTS = {"wall_time": 5, "memory": 64 * MiB}

PRELUDE = r'''
import ctypes, errno, json, os, signal, socket, struct, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
NR = {
    "read": 0, "write": 1, "ioctl": 16, "shmget": 29, "shmat": 30, "getpid": 39, "socket": 41, "socketpair": 53,
    "clone": 56, "fork": 57, "kill": 62, "semget": 64, "msgget": 68, "ptrace": 101, "getuid": 102,
    "syslog": 103, "setuid": 105, "setgid": 106, "setgroups": 116, "setresuid": 117, "setresgid": 119,
    "setfsuid": 122, "setfsgid": 123, "capset": 126, "rt_sigqueueinfo": 129, "mknod": 133, "personality": 135,
    "vhangup": 153, "modify_ldt": 154, "pivot_root": 155, "prctl": 157, "adjtimex": 159, "setrlimit": 160,
    "chroot": 161, "acct": 163, "settimeofday": 164, "mount": 165, "umount2": 166, "swapon": 167,
    "swapoff": 168, "reboot": 169, "sethostname": 170, "setdomainname": 171, "iopl": 172, "ioperm": 173,
    "init_module": 175, "delete_module": 176, "quotactl": 179, "lookup_dcookie": 212, "clock_settime": 227,
    "tgkill": 234, "mq_open": 240, "kexec_load": 246, "add_key": 248, "request_key": 249, "keyctl": 250,
    "mknodat": 259, "unshare": 272, "perf_event_open": 298, "fanotify_init": 300, "prlimit64": 302,
    "name_to_handle_at": 303, "open_by_handle_at": 304, "clock_adjtime": 305, "setns": 308,
    "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312, "finit_module": 313, "seccomp": 317,
    "kexec_file_load": 320, "bpf": 321, "userfaultfd": 323, "pidfd_send_signal": 424, "io_uring_setup": 425,
    "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430,
    "fsconfig": 431, "fsmount": 432, "fspick": 433, "pidfd_open": 434, "clone3": 435, "pidfd_getfd": 438,
    "mount_setattr": 442, "memfd_secret": 447,
}
AT_FDCWD = -100


def _arg(a):
    if isinstance(a, bytes):
        return ctypes.c_char_p(a)
    if isinstance(a, int):
        return ctypes.c_long(a) if a < 0 else ctypes.c_ulong(a)
    return a


def sc(nr, *args):
    """A raw syscall: its return value, or the errno name when it fails."""
    nr = NR[nr] if isinstance(nr, str) else nr
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(nr), *map(_arg, args))
    return errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno())) if r == -1 else r


def err(fn, *args, **kw):
    """'ok' when fn(*args) succeeds, else the errno name of the OSError it raised."""
    try:
        fn(*args, **kw)
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e)) if e.errno else type(e).__name__


def addr(buf):
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


out = {}
'''


class SessionClient:
    """The battery's client with every run made a command in a fresh session (create, put the script, Exec the
    runner's command line, close), so each THREATS.md case also holds for a session's processes. A run's
    run_id is the call id, whose record is the session.call row."""

    def __init__(self, target: str, **kw):
        self.client = Client(target, **kw)
        self.target, self.stub, self.md = target, self.client.stub, self.client.metadata
        self._runners = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.client.close()

    def runners(self, **kw):
        return self.client.runners(**kw)

    def execute(self, code: str, runner: str = "python", *, args=(), stdin: bytes = b"", env=None, files=None,
                wall_time: float = 0, cpu_time: float = 0, memory: int = 0, pids: int = 0, output: int = 0,
                timeout=None):
        if self._runners is None:
            self._runners = {r.name: r for r in self.client.runners()}
        info = self._runners.get(runner)   # an unknown runner: the daemon refuses the session
        name = f"main.{info.extensions[0]}" if info and info.extensions else "main"
        argv = [f"/work/{name}" if part == "{script}" else part for part in (info.command if info else ["x"])]
        argv += list(args)
        try:
            s = self.stub.CreateSession(pb.CreateSessionRequest(
                runner=runner, files={name: code.encode(), **dict(files or {})}, env=dict(env or {}),
                limits=pb.Limits(wall_time_seconds=wall_time, cpu_time_seconds=cpu_time, memory_bytes=memory,
                                 pids=pids, output_bytes=output)), metadata=self.md, timeout=60)
        except grpc.RpcError as e:
            raise SandboxdError(e.code().name, e.details() or "") from None
        start = pb.ExecStart(session_id=s.session_id, argv=argv, stdin=stdin, close_stdin=True,
                             timeout_seconds=wall_time, output_bytes=output)
        call = self.stub.Exec(iter([pb.ExecRequest(start=start)]), metadata=self.md, timeout=timeout)
        try:
            for event in call:
                kind = event.WhichOneof("event")
                if kind == "started":
                    yield Started(event.started.run_id)
                elif kind in ("stdout", "stderr"):
                    yield Output(kind, getattr(event, kind).data)
                else:
                    r = event.result
                    yield Result(run_id=r.run_id, outcome=OUTCOMES.get(r.outcome, "unspecified"),
                                 exit_code=r.exit_code, signal=r.signal, cpu_time=r.cpu_time_seconds,
                                 wall_time=r.wall_time_seconds, peak_memory=r.peak_memory_bytes,
                                 stdout_bytes=r.stdout_bytes, stderr_bytes=r.stderr_bytes,
                                 stdout_truncated=r.stdout_truncated, stderr_truncated=r.stderr_truncated,
                                 message=r.message)
        except grpc.RpcError as e:
            raise SandboxdError(e.code().name, e.details() or "") from None
        finally:
            call.cancel()
            with contextlib.suppress(grpc.RpcError):
                self.stub.CloseSession(pb.CloseSessionRequest(session_id=s.session_id), metadata=self.md, timeout=60)

    def run(self, code: str, runner: str = "python", **kw) -> Result:
        out = {"stdout": [], "stderr": []}
        result = None
        for event in self.execute(code, runner, **kw):
            if isinstance(event, Output):
                out[event.stream].append(event.data)
            elif isinstance(event, Result):
                result = event
        assert result is not None
        return Result(**{**result.__dict__, "stdout": b"".join(out["stdout"]), "stderr": b"".join(out["stderr"])})


@pytest.fixture
def daemon(request, daemon):
    """The daemon the case's `sandbox` runs on, so a case that also checks the daemon (its processes, its
    directories) checks that one: in the pooled and session modes, the daemon whose pool is on."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("sandbox") in ("pooled", "session"):
        return request.getfixturevalue("pooled_daemon")
    return daemon


@pytest.fixture(params=["oneshot", "session", pytest.param("pooled", marks=pytest.mark.pooled)])
def sandbox(request, daemon):
    """The battery runs three times: each script as a one-shot run, as a command in a session, and as a one-shot
    run on a daemon whose warm pool is on (python runs claim a sandbox built ahead of time, its interpreter
    already started; see test_pool.py). Sessions run on that daemon too, so they claim pooled session sandboxes
    when one is ready (and are built cold otherwise; tests/integration/test_sessions.py runs them cold)."""
    with (SessionClient if request.param == "session" else Client)(daemon.target) as c:
        yield c
    left = daemon.wait_no_leftovers()
    assert not left, f"runs left processes or cgroups behind: {left}"


def script(code: str) -> str:
    return PRELUDE + "\n" + textwrap.dedent(code)


# Session daemon and daemons a test starts: where each keeps its records (by gRPC target).
DATABASES: dict[str, pathlib.Path] = {}


@pytest.fixture(autouse=True)
def _known_daemon(daemon):
    DATABASES[daemon.target] = daemon.state_dir / "sandboxd.db"


@pytest.fixture
def own_daemon(start_daemon):
    """start_daemon, plus what `attack` needs to check that daemon's records."""
    def start(config_extra: str = "", **kw):
        d = start_daemon(config_extra, **kw)
        DATABASES[d.target] = d.state_dir / "sandboxd.db"
        return d
    return start


def record(client, run_id: str) -> dict:
    db = DATABASES[client.target]
    s = store_mod.Store(str(db))
    try:
        rec = s.get_run(run_id)
    finally:
        s.close()
    assert rec is not None, f"run {run_id} has no record"
    return rec


def still_serves(client) -> None:
    r = client.run("print('still here')", wall_time=10)
    assert (r.outcome, r.exit_code, r.stdout) == ("exited", 0, b"still here\n"), r


def attack(sandbox, code: str, *, raw: bool = False, caller: str = "root", **limits):
    """Run an attack script (with PRELUDE unless raw); then the daemon must still serve and the run's record
    must hold the outcome the client saw and the caller (this process: root on the unix socket). Returns the
    Result."""
    r = sandbox.run(code if raw else script(code), **{**DEFAULTS, **limits})
    rec = record(sandbox, r.run_id)
    assert rec["outcome"] == r.outcome, (rec["outcome"], r)
    if "principal" in rec:  # absent only before the identity work
        assert rec["principal"] == caller, (rec["principal"], caller)
    still_serves(sandbox)
    return r


def probe(sandbox, code: str, **limits) -> dict:
    """Run an attack that reports into `out`; it must exit 0. Returns `out`."""
    r = attack(sandbox, textwrap.dedent(code) + "\nprint(json.dumps(out))", **limits)
    assert (r.outcome, r.exit_code) == ("exited", 0), (r, r.stderr.decode(errors="replace")[-3000:])
    return json.loads(r.stdout.decode().splitlines()[-1])


def run_uids(d) -> range:
    return range(d.uid_start, d.uid_start + d.uid_count)


def launcher_pid(d) -> int:
    kids = [p for p in psutil.Process(d.proc.pid).children() if "forkserver" in " ".join(p.cmdline())]
    assert len(kids) == 1, kids
    return kids[0].pid


def metrics_port(d) -> int:
    m = re.search(r"metrics http://127\.0\.0\.1:(\d+)", d.log())
    assert m, "the daemon did not log its metrics address"
    return int(m.group(1))


@contextlib.contextmanager
def sleepers(uids):
    """Host processes the test owns, one per uid (None: root), killed by pid afterwards. A sleeper with a uid of
    the daemon's run range is what a run could signal if the pid namespace were missing.

    setpriv changes the uid, not Popen(user=...): that makes Popen fork() this process, which has gRPC threads,
    and gRPC's at-fork handlers then sometimes abort the child (SIGABRT) before it execs."""
    procs = []
    try:
        for uid in uids:
            creds = [] if uid is None else ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
            procs.append(subprocess.Popen([*creds, "sleep", "300"], stdin=subprocess.DEVNULL))
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def sha256_file(path: str) -> str:
    import hashlib
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def host_python_binaries() -> list[str]:
    """The interpreter runs use (the image's python3) and the one the daemon and launcher run on."""
    return sorted({os.path.realpath("/usr/bin/python3"), os.path.realpath(sys.executable)})
