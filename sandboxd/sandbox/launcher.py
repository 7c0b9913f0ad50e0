"""Daemon side of the fork server.

Theory of operation
-------------------
The daemon is multithreaded (grpc.aio runs its own threads), and fork() in a multithreaded Python process copies
locks that other threads hold; a child that touches one deadlocks. So the daemon never forks a sandbox itself.
At start-up, before the gRPC server exists, it starts the launcher (forkserver.py): a separate, single-threaded
Python process that has imported everything a sandbox needs and then only forks. Starting it uses
subprocess (fork+exec in C), so no Python runs after fork in the daemon.

The two talk over a SOCK_SEQPACKET socketpair. For each run the daemon sends a small "start" message and four
file descriptors (SCM_RIGHTS): a sealed memfd holding the RunSpec as JSON (a spec can be megabytes; socket
buffers are not), a sealed memfd with stdin, and the write ends of the stdout and stderr pipes. The daemon
keeps the read ends and streams from them; it never sees a path inside a sandbox. The launcher answers with
"started" when the payload's execve succeeded and "finished" once the run's processes are dead and its cgroup
is removed, carrying the exit status, the kill reason (timeout, cpu_time, output_limit, cancelled...) and the
usage read from the cgroup. For a run with egress it first sends "egress" with one or two descriptors: the
listening sockets (explicit proxy, then transparent) the run's init made inside the run's network namespace,
which the daemon's egress proxy serves (RunHandle.egress).

A pooled sandbox (the warm pool) is started with prepare() ("started" once it waits) and given its one run with
claim(), which from then on behaves exactly like run().

If the launcher dies, every run dies with it (PR_SET_PDEATHSIG); pending runs finish as setup_failed or
cancelled and the next start() spawns a new launcher, which removes any cgroup the old one left.
"""
from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import json
import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass

from . import _fds
from .spec import RunSpec

log = logging.getLogger("sandboxd.launcher")


class LauncherError(Exception):
    """The launcher could not be started or is not answering."""


@dataclass
class Finished:
    run_id: str
    exit_code: int | None = None
    signal: int | None = None
    setup_error: str | None = None
    kill_reason: str | None = None
    cpu_ns: int = 0
    peak_memory: int = 0
    oom_kills: int = 0
    forked_at: float | None = None
    exec_at: float | None = None
    ended_at: float | None = None
    clean: bool = True
    seccomp_kill: dict | None = None    # {"arch": audit arch hex, "nr": syscall number} from the kernel log
    landlock_abi: int | None = None     # the Landlock ABI the payload applied (0: none); None: it never exec'd


class RunHandle:
    """One run in flight: `started` resolves with the exec time, `finished` with a Finished."""

    def __init__(self, launcher: "Launcher", run_id: str):
        loop = asyncio.get_running_loop()
        self.launcher, self.run_id = launcher, run_id
        self.started: asyncio.Future[float] = loop.create_future()
        self.finished: asyncio.Future[Finished] = loop.create_future()
        # The proxy's listeners, egress runs only: [explicit] or [explicit, transparent].
        self.egress: asyncio.Future[list[socket.socket]] = loop.create_future()

    async def kill(self, reason: str) -> None:
        await self.launcher.send({"op": "kill", "run_id": self.run_id, "reason": reason})


class CallHandle:
    """One call in a session: `started` resolves with init's call_started message (and the terminal's master
    fd for tty calls, owned by the caller from then on); `finished` with call_exit or call_failed."""

    def __init__(self, call_id: str):
        loop = asyncio.get_running_loop()
        self.id = call_id
        self.started: asyncio.Future[tuple[dict, list[int]]] = loop.create_future()
        self.finished: asyncio.Future[dict] = loop.create_future()

    def resolve(self, msg: dict, fds: list[int]) -> None:
        ev = msg.get("ev")
        if ev == "call_started" and not self.started.done():
            self.started.set_result((msg, fds))
            return
        for fd in fds:
            os.close(fd)
        if ev in ("call_exit", "call_failed") and not self.finished.done():
            if not self.started.done():
                self.started.set_result((msg, []))
            self.finished.set_result(msg)


class SessionHandle(RunHandle):
    """A session's sandbox: `started` resolves once init serves commands, `finished` when the sandbox is gone."""

    def __init__(self, launcher: "Launcher", run_id: str):
        super().__init__(launcher, run_id)
        self.calls: dict[str, CallHandle] = {}
        self.finished.add_done_callback(lambda _f: self._gone())

    async def call(self, call: dict, fds: list[int] = ()) -> CallHandle:
        handle = CallHandle(call["id"])
        if self.finished.done():
            handle.resolve({"ev": "call_failed", "id": handle.id, "step": "session", "error": "the session is gone"},
                           [])
            return handle
        self.calls[handle.id] = handle
        handle.finished.add_done_callback(lambda _f: self.calls.pop(handle.id, None))
        try:
            await self.launcher.send({"op": "call", "run_id": self.run_id, "call": call}, list(fds))
        except LauncherError as e:
            handle.resolve({"ev": "call_failed", "id": handle.id, "step": "launcher", "error": str(e)}, [])
        return handle

    async def signal(self, call_id: str, sig: int, group: bool = True) -> None:
        with contextlib.suppress(LauncherError):
            await self.launcher.send({"op": "call", "run_id": self.run_id,
                                      "call": {"op": "signal", "id": call_id, "sig": int(sig), "group": group}})

    def on_call(self, msg: dict, fds: list[int]) -> None:
        handle = self.calls.get(str(msg.get("id", "")))
        if handle is None:
            for fd in fds:
                os.close(fd)
            return
        handle.resolve(msg, fds)

    def _gone(self) -> None:
        for handle in list(self.calls.values()):
            handle.resolve({"ev": "call_failed", "id": handle.id, "step": "session", "error": "the session ended"},
                           [])
        self.calls.clear()


def _sealed_memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    fill_and_seal(fd, data)
    return fd


def stdin_memfd() -> int:
    """An empty stdin memfd, as a run's is before fill_and_seal: a prestarted interpreter holds it from its
    start, and the daemon fills it for the run that claims it (the same file the cold path hands a run)."""
    return os.memfd_create("sandboxd-stdin", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)


def fill_and_seal(fd: int, data: bytes) -> None:
    """Write `data` at offset 0, leave the offset at 0 and seal the file: nobody can change it from here on."""
    view, offset = memoryview(data), 0
    while offset < len(view):
        offset += os.pwrite(fd, view[offset:], offset)
    os.lseek(fd, 0, os.SEEK_SET)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)


class Launcher:
    def __init__(self, staging: str, cgroup_parent_name: str = "sandboxd", cgroup_parent_path: str | None = None,
                 log_level: str = "INFO", log_format: str = "text"):
        self.staging = staging
        self.args = ["--staging", staging, "--cgroup-parent-name", cgroup_parent_name, "--log-level", log_level,
                     "--log-format", log_format]
        if cgroup_parent_path:
            self.args += ["--cgroup-parent-path", cgroup_parent_path]
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.runs: dict[str, RunHandle] = {}
        self.driver = ""
        self._pongs: list[asyncio.Future] = []
        self._ready: asyncio.Future | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self.sock is not None

    async def start(self, timeout: float = 30.0) -> None:
        os.makedirs(self.staging, mode=0o700, exist_ok=True)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.set_inheritable(False)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sandboxd.sandbox.forkserver", "--fd", str(theirs.fileno()), *self.args],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=_launcher_env(),
        )
        theirs.close()
        ours.setblocking(False)
        self.sock = ours
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        loop.add_reader(ours.fileno(), self._on_readable)
        try:
            msg = await asyncio.wait_for(self._ready, timeout)
        except asyncio.TimeoutError:
            await self.stop()
            raise LauncherError("the launcher did not become ready") from None
        if msg.get("ev") != "ready":
            await self.stop()
            raise LauncherError(msg.get("error", "the launcher failed to start"))
        self.driver = msg["driver"]
        log.info("launcher ready: pid %s, cgroup driver %s", msg.get("pid"), self.driver)

    async def stop(self, timeout: float = 30.0) -> None:
        """Ask the launcher to end every run, remove the cgroups and exit; then reap it."""
        if self.proc is None:
            return
        with contextlib.suppress(OSError, LauncherError):
            await self.send({"op": "shutdown"})
        try:
            await asyncio.wait_for(asyncio.to_thread(self.proc.wait), timeout)
        except asyncio.TimeoutError:
            log.error("launcher did not exit in %ss; killing it", timeout)
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait)
        with contextlib.suppress(OSError):  # only if empty (a root still mounted there stays, and is visible)
            os.rmdir(self.staging)
        self._closed()

    async def ping(self, timeout: float = 2.0) -> dict:
        fut = asyncio.get_running_loop().create_future()
        self._pongs.append(fut)
        await self.send({"op": "ping"})
        return await asyncio.wait_for(fut, timeout)

    async def send(self, msg: dict, fds: list[int] = ()) -> None:
        if self.sock is None:
            raise LauncherError("the launcher is not running")
        data = json.dumps(msg).encode()
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] \
            if fds else []
        while True:
            try:
                self.sock.sendmsg([data], anc)
                return
            except BlockingIOError:
                await asyncio.sleep(0.001)
            except OSError as e:
                raise LauncherError(f"the launcher is gone: {e}") from e

    async def _hand_over(self, handle: RunHandle, op: str, memfds: list[int], fds: list[int] = (),
                         **extra) -> RunHandle:
        """Register `handle` and send `op` with the memfds (closed here: once sent, the launcher has its own
        copies) and the caller's fds (the caller keeps and closes those)."""
        self.runs[handle.run_id] = handle
        try:
            await self.send({"op": op, "run_id": handle.run_id, **extra}, [*memfds, *fds])
        except LauncherError:
            del self.runs[handle.run_id]
            raise
        finally:
            for fd in memfds:
                os.close(fd)
        return handle

    def _check_alive(self) -> None:
        if not self.alive:
            raise LauncherError("the launcher is not running")

    async def session(self, spec: RunSpec) -> SessionHandle:
        """Start a session's sandbox; await `handle.started` before calling into it."""
        self._check_alive()
        return await self._hand_over(SessionHandle(self, spec.run_id), "session",
                                     [_sealed_memfd("sandboxd-spec", spec.to_json())])

    async def run(self, spec: RunSpec, stdin: bytes, stdout_w: int, stderr_w: int, collect_w: int = -1) -> RunHandle:
        """Hand a run to the launcher. The caller keeps ownership of stdout_w/stderr_w (and collect_w) and closes
        them once this returns (the launcher has its own copies by then)."""
        self._check_alive()
        memfds = [_sealed_memfd("sandboxd-spec", spec.to_json()), _sealed_memfd("sandboxd-stdin", stdin)]
        return await self._hand_over(RunHandle(self, spec.run_id), "start", memfds,
                                     [stdout_w, stderr_w] + ([collect_w] if collect_w >= 0 else []))

    async def prepare(self, spec: RunSpec, stdio: tuple[int, int, int] | None = None) -> RunHandle:
        """Build a pooled sandbox (spec.pooled): `started` resolves once it waits for its run, `finished` if it
        ends unclaimed (drained, or its build failed). A prestarted one (spec.prestart) takes its interpreter's
        stdin memfd and stdout, stderr write ends (the caller keeps and closes them)."""
        self._check_alive()
        return await self._hand_over(RunHandle(self, spec.run_id), "prepare",
                                     [_sealed_memfd("sandboxd-spec", spec.to_json())], list(stdio or ()))

    async def claim(self, pooled: RunHandle, spec: RunSpec, stdin: bytes, stdout_w: int, stderr_w: int,
                    collect_w: int = -1) -> RunHandle:
        """Hand a run to the pooled sandbox of `pooled` (same contract as run()). From here on the launcher
        reports under the run's id; the pooled handle never resolves again. A run using the prestarted
        interpreter (spec.prestart) has its stdio already (pool.Prestarted): stdin and the pipes are not sent."""
        self._check_alive()
        if self.runs.get(pooled.run_id) is pooled:
            del self.runs[pooled.run_id]
        memfds = [_sealed_memfd("sandboxd-spec", spec.to_json())]
        stdio = []
        if not spec.prestart:
            memfds.append(_sealed_memfd("sandboxd-stdin", stdin))
            stdio = [stdout_w, stderr_w]
        return await self._hand_over(RunHandle(self, spec.run_id), "claim", memfds,
                                     stdio + ([collect_w] if collect_w >= 0 else []), pool_id=pooled.run_id)

    async def claim_session(self, pooled: RunHandle, spec: RunSpec) -> SessionHandle:
        """Hand a session (spec.session) to a pooled session sandbox: its init takes the session's spec and
        files and reports ready (`started`); from then on it is that session under its id."""
        self._check_alive()
        if self.runs.get(pooled.run_id) is pooled:
            del self.runs[pooled.run_id]
        return await self._hand_over(SessionHandle(self, spec.run_id), "claim",
                                     [_sealed_memfd("sandboxd-spec", spec.to_json())], pool_id=pooled.run_id)

    def _on_readable(self) -> None:
        while self.sock is not None:
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(8 * 4),
                                                             socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                return
            except OSError:
                data, anc = b"", []
            fds = _fds.received(anc)
            if not data:
                for fd in fds:
                    os.close(fd)
                self._closed()
                return
            self._dispatch(json.loads(data), fds)

    def _dispatch(self, msg: dict, fds: list[int] = ()) -> None:
        ev = msg.get("ev")
        if ev == "egress" and 1 <= len(fds) <= 2:
            handle = self.runs.get(msg.get("run_id"))
            fut = getattr(handle, "egress", None)
            if fut is not None and not fut.done():
                fut.set_result([socket.socket(fileno=fd) for fd in fds])
                return
        if ev == "call":
            handle = self.runs.get(msg.get("run_id", ""))
            if isinstance(handle, SessionHandle):
                handle.on_call(msg.get("msg") or {}, list(fds))
            else:
                for fd in fds:
                    os.close(fd)
            return
        for fd in fds:  # a descriptor nobody asked for is closed, never leaked
            os.close(fd)
        if ev in ("ready", "failed"):
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(msg)
        elif ev == "pong":
            while self._pongs:
                fut = self._pongs.pop(0)
                if not fut.done():
                    fut.set_result(msg)
                    break
        elif ev == "started":
            handle = self.runs.get(msg["run_id"])
            if handle and not handle.started.done():
                handle.started.set_result(msg["at"])
        elif ev == "finished":
            handle = self.runs.pop(msg["run_id"], None)
            if handle:
                fin = Finished(**{k: v for k, v in msg.items() if k in Finished.__dataclass_fields__})
                if not handle.started.done():
                    handle.started.set_result(None)
                if not handle.egress.done():
                    handle.egress.cancel()
                handle.finished.set_result(fin)

    def _closed(self) -> None:
        """The launcher is gone: every pending run ends (its processes died with the launcher)."""
        if self.sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        if self._ready is not None and not self._ready.done():
            self._ready.set_result({"ev": "failed", "error": "the launcher exited during start-up"})
        for run_id, handle in self.runs.items():
            if not handle.started.done():
                handle.started.set_result(None)
            if not handle.finished.done():
                handle.finished.set_result(Finished(run_id, setup_error="launcher: exited during the run",
                                                    kill_reason="launcher_died", clean=False))
            if not handle.egress.done():
                handle.egress.cancel()
        self.runs.clear()
        for fut in self._pongs:
            if not fut.done():
                fut.set_exception(LauncherError("the launcher is gone"))
        self._pongs.clear()


def _launcher_env() -> dict[str, str]:
    """The launcher inherits nothing it does not need (the payload's environment is built from scratch anyway)."""
    keep = ("PATH", "PYTHONPATH", "VIRTUAL_ENV", "LANG", "TMPDIR", "PYTHONDONTWRITEBYTECODE")
    return {k: os.environ[k] for k in keep if k in os.environ}
