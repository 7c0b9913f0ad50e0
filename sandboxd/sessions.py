"""Sessions, daemon side: the registry of live sessions, their lifecycle (create, idle and lifetime timers,
close), and the plumbing of every call into one (Exec, RunCode, files) over the launcher's session handle.

Runs in the daemon. A session is one sandbox for its whole life (one cgroup, one uid, the same namespaces, root,
seccomp profile and Landlock rules); the launcher's init serves it (sandbox/init.py) and every call's process goes
through the same isolation steps as a one-shot payload. Ownership is checked by the service before anything here
runs; this module trusts nothing that comes out of a sandbox: output is capped, frames and kernel reports are
bounded and parsed defensively, and outcomes and usage come from init's reaping and the cgroup, never from the
code inside.

Records: session.created and session.closed fold into a `runs` row of kind "session"; each exec and code cell is a
session.call event, a finished row of its own (kind "exec" or "code"); file operations are session.file events.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import re
import signal
import socket
import struct
import termios
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from . import kernel as kernel_mod
from .errors import InvalidRequest, Overloaded, SetupFailed, TooLarge
from .pipes import FrameReader, PipeReader, frame, write_all
from .policy import proxy_env
from .sandbox.launcher import CallHandle, LauncherError, SessionHandle, _sealed_memfd
from .sandbox.spec import File, RunSpec
from .supervisor import Outcome, listener_served

log = logging.getLogger("sandboxd.sessions")
CONTEXT_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")
KERNEL_PATH = "/.sandboxd/python_kernel.py"
REPORT_MAX = 64 << 20       # bytes of one cell's report (rich results can be images)
REFILL_AFTER_CREATE = 0.3   # seconds between a session's claim of a pooled sandbox and the pool's replacement
CLOSED_KEPT = 4096          # closed sessions remembered in memory for their NOT_FOUND message


def new_id() -> str:
    return f"{int(time.time() * 1000):012x}{os.urandom(8).hex()}"


@dataclass
class CallResult:
    call_id: str
    outcome: Outcome
    exit_code: int = 0
    signal: int = 0
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    peak_memory_bytes: int = 0
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    message: str = ""
    stdout_sha256: str = ""
    stderr_sha256: str = ""


@dataclass
class CellResult(CallResult):
    execution_count: int = 0
    kernel_restarted: bool = False
    error: bool = False


@dataclass
class Context:
    name: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    kernel: CallHandle | None = None
    sock: socket.socket | None = None
    count: int = 0
    died: str = ""                  # why the last kernel ended, said by the next cell that starts a fresh one
    running: str = ""               # the call id of the cell in progress
    stderr_tail: bytearray = field(default_factory=bytearray)


@dataclass
class Session:
    id: str
    principal: object               # auth.Principal
    policy: object                  # config.Policy
    runner: object                  # runners.Runner
    spec: RunSpec
    handle: SessionHandle | None = None
    created_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    idle_timeout: float = 600.0
    max_lifetime: float = 3600.0
    env: dict = field(default_factory=dict)
    agent: dict = field(default_factory=dict)
    pooled: bool = False            # its sandbox came from the warm pool
    state: str = "starting"
    end_reason: str = ""
    end_message: str = ""
    closed_at: float = 0.0
    active: int = 0
    contexts: dict[str, Context] = field(default_factory=dict)
    calls: dict[str, CallHandle] = field(default_factory=dict)
    closing: asyncio.Event = field(default_factory=asyncio.Event)
    egress: object = None           # egress.proxy.RunEgress, sessions under a policy with network = "egress"

    @property
    def expires_at(self) -> float:
        lifetime = self.created_at + self.max_lifetime
        return lifetime if self.active else min(lifetime, self.last_used + self.idle_timeout)

    @property
    def memory(self) -> int:
        return self.spec.limits.memory

    def touch(self) -> None:
        self.last_used = time.time()


class _Stream:
    """One output stream of a call: counted, hashed, capped."""

    def __init__(self, name: str, cap: int):
        self.name, self.cap = name, cap
        self.written = self.delivered = 0
        self.truncated = False
        self.sha = hashlib.sha256()

    def take(self, data: bytes) -> bytes:
        self.written += len(data)
        room = self.cap - self.delivered
        part = data[:max(room, 0)]
        if part:
            self.delivered += len(part)
            self.sha.update(part)
        if self.written > self.cap:
            self.truncated = True
        return part


class SessionManager:
    def __init__(self, daemon):
        self.d = daemon
        self.sessions: dict[str, Session] = {}
        self.closed: collections.OrderedDict[str, tuple[str, str, str, float]] = collections.OrderedDict()
        self._watch: asyncio.Task | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._watch = asyncio.create_task(self._watchdog())

    def live_for(self, principal_id: str) -> int:
        return sum(1 for s in self.sessions.values() if s.principal.id == principal_id and s.state != "closed")

    def check_room(self, principal_id: str, policy, memory: int, spec: RunSpec | None = None) -> None:
        cfg = self.d.config.sessions
        live = [s for s in self.sessions.values() if s.state != "closed"]
        if cfg.max_live == 0:
            raise Overloaded("sessions are disabled on this daemon (sessions.max_live = 0)")
        if len(live) >= cfg.max_live:
            raise Overloaded(f"too many live sessions: the daemon's limit is {cfg.max_live}", retry_after=5.0)
        if policy.max_sessions and self.live_for(principal_id) >= policy.max_sessions:
            raise Overloaded(f"principal {principal_id!r} already has {policy.max_sessions} live sessions, the "
                             f"most policy {policy.name!r} allows", retry_after=5.0)
        budget = self.memory_budget()
        # A pooled session sandbox this session will claim turns the pool's reservation into the session's.
        used = self.memory_held() + self.d.pool.memory() - (self.d.pool.claimable_memory(spec) if spec else 0)
        if used + memory > budget:
            # Idle pooled sandboxes yield to a session that would otherwise be refused.
            used -= self.d.pool.reclaim(used + memory - budget)
        if used + memory > budget:
            raise Overloaded(f"the sessions' memory budget is spent: {used} of {budget} bytes are held by live "
                             f"sessions and the warm pool, and this one asks for {memory}", retry_after=5.0)

    def memory_budget(self) -> int:
        """Bytes of memory limits that live sessions and the warm pool's sandboxes may hold together."""
        return self.d.config.sessions.memory_budget or _half_memory()

    def memory_held(self) -> int:
        return sum(s.memory for s in self.sessions.values() if s.state != "closed")

    async def create(self, session: Session, files: tuple[File, ...] = (), tar: bytes = b"") -> Session:
        """Start the sandbox. Raises SetupFailed (recorded by the caller) if it cannot be built."""
        d = self.d
        pooled = d.pool.claim(session.runner.name, session.spec) if d.pool is not None else None
        uid = pooled.spec.uid if pooled is not None else d.uids.take()
        session.spec = dataclasses.replace(session.spec, uid=uid, gid=uid, files=tuple(files))
        session.pooled = pooled is not None
        self.sessions[session.id] = session
        try:
            if pooled is not None:
                session.handle = await d.launcher.claim_session(pooled.handle, session.spec)
            else:
                session.handle = await d.launcher.session(session.spec)
            if session.spec.egress is not None:  # served from the moment init hands its listener over
                session.egress = d.egress.open(session.spec, session.principal.id)
                asyncio.ensure_future(session.egress.serve(session.handle.egress)).add_done_callback(listener_served)
            started = await asyncio.wait_for(asyncio.shield(session.handle.started), 60)
        except (LauncherError, asyncio.TimeoutError) as e:
            await self._ended(session, "setup_failed", f"sandbox launcher: {e}", clean=True)
            raise SetupFailed(f"the session's sandbox could not be started: {e}") from None
        if not started:
            fin = await session.handle.finished
            await self._ended(session, "setup_failed", fin.setup_error or "the sandbox did not start", fin.clean)
            raise SetupFailed(f"the session's sandbox could not be started: {fin.setup_error}")
        session.handle.finished.add_done_callback(lambda f: asyncio.ensure_future(self._lost(session, f)))
        session.state = "ready"
        if session.pooled:  # a little later, so the build does not share the CPU with this session's answer
            asyncio.get_running_loop().call_later(REFILL_AFTER_CREATE, d.pool.refill)
        d.metrics.session_opened(session.runner.name)
        if tar:
            try:
                await self.import_tar(session, _chunks(tar), "")
            except Exception:
                await self.close(session, "setup_failed", "the workspace tar could not be imported")
                raise
        return session

    async def _lost(self, session: Session, fut) -> None:
        """The sandbox ended without being closed (init died, the launcher went): close the session as failed."""
        if session.state == "closed" or session.closing.is_set():
            return
        fin = fut.result()
        await self.close(session, "failed", f"the session's sandbox ended: {fin.setup_error or fin.kill_reason or 'init exited'}")

    async def close(self, session: Session, reason: str, message: str = "") -> None:
        if session.closing.is_set():
            while session.state != "closed":
                await asyncio.sleep(0.01)
            return
        session.closing.set()
        # From now on it reads as closed, with its reason, everywhere (calls on it are already NOT_FOUND).
        session.end_reason, session.end_message = reason, message
        clean = True
        if session.handle is not None and not session.handle.finished.done():
            with contextlib.suppress(Exception):
                await session.handle.kill(reason)
        if session.handle is not None:
            try:
                fin = await asyncio.wait_for(asyncio.shield(session.handle.finished), 30)
                clean = fin.clean
            except asyncio.TimeoutError:
                clean = False
        for ctx in session.contexts.values():
            if ctx.sock is not None:
                ctx.sock.close()
                ctx.sock = None
        await self._ended(session, reason, message, clean)

    async def _ended(self, session: Session, reason: str, message: str, clean: bool) -> None:
        d = self.d
        if session.state == "closed":
            return
        was_live = session.state != "starting"
        session.state, session.end_reason, session.end_message = "closed", reason, message
        session.closing.set()
        session.closed_at = time.time()
        self.sessions.pop(session.id, None)
        self.closed[session.id] = (session.principal.id, reason, message, session.closed_at)
        while len(self.closed) > CLOSED_KEPT:
            self.closed.popitem(last=False)
        d.uids.give_back(session.spec.uid, clean)
        d.pool.refill()   # its memory and uid may be what the pool was waiting for
        if was_live:
            d.metrics.session_closed(session.runner.name, reason, session.closed_at - session.created_at)
        egress = {}
        if session.egress is not None:  # every connection's record is written before the session's own
            egress = {"egress": await session.egress.close()}
        await d.record_event("session.closed", session.id, {
            "outcome": "closed" if reason in ("closed",) else reason, "end_reason": reason, "message": message,
            "closed_at": session.closed_at, "lifetime_seconds": session.closed_at - session.created_at,
            "pooled": session.pooled, **egress})
        log.info("session %s closed: %s %s", session.id, reason, message, extra={"run_id": session.id})

    async def close_all(self, reason: str) -> None:
        await asyncio.gather(*(self.close(s, reason) for s in list(self.sessions.values())),
                             return_exceptions=True)

    async def close_principal(self, principal_id: str, who: str, reason: str) -> int:
        """Close every session of a principal (operators' stop button and suspension)."""
        mine = [s for s in self.sessions.values() if s.principal.id == principal_id]
        await asyncio.gather(*(self.close(s, "stopped", f"stopped by {who}: {reason}".rstrip(": "))
                               for s in mine), return_exceptions=True)
        return len(mine)

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            now = time.time()
            for s in list(self.sessions.values()):
                if s.state != "ready" or s.closing.is_set():
                    continue
                if now >= s.created_at + s.max_lifetime:
                    asyncio.ensure_future(self.close(s, "max_lifetime", f"the session reached its maximum lifetime "
                                                                        f"of {s.max_lifetime:g}s"))
                elif not s.active and now >= s.last_used + s.idle_timeout:
                    asyncio.ensure_future(self.close(s, "idle_timeout", f"no call for {s.idle_timeout:g}s"))

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        await self.close_all("daemon_shutdown")

    # -- lookup ----------------------------------------------------------------------------------------------
    def ended_message(self, session_id: str, principal) -> str | None:
        info = self.closed.get(session_id)
        if info is None or not (principal.is_admin or info[0] == principal.id):
            return None
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(info[3]))
        return f"session {session_id!r} ended at {when}: {info[1]}" + (f" ({info[2]})" if info[2] else "")

    # -- Exec ------------------------------------------------------------------------------------------------
    def call_env(self, session: Session, env: dict) -> dict:
        runner = session.runner
        merged = dict(runner.env)
        merged.update(session.env)
        for name, value in env.items():
            if not runner.allows_session_env(name):
                raise InvalidRequest(f"env: {name!r} may not be set in runner {runner.name!r}'s sessions")
            merged[name] = value
        merged.update(dict(runner.session_env_force))
        if session.spec.egress is not None:  # the proxy is the only way out: no caller picks another
            merged.update(proxy_env(session.spec.egress))
        return merged

    async def exec(self, session: Session, argv: list[str], env: dict, cwd: str, timeout: float, output: int,
                   tty: bool = False, rows: int = 0, cols: int = 0, stdin: bytes = b"", close_stdin: bool = False,
                   requests: AsyncIterator | None = None, on_result=None) -> AsyncIterator[tuple[str, object]]:
        """Events: ("started", call_id), ("stdout" | "stderr", bytes), ("result", CallResult). `on_result` (async)
        gets the result before it is yielded, and also when the consumer goes away mid-call (then from a task of
        its own, after the call was stopped): every call that started has its result recorded."""
        on_result = on_result or _nothing
        call_id = new_id()
        queue: asyncio.Queue = asyncio.Queue()
        streams = {"stdout": _Stream("stdout", output), "stderr": _Stream("stderr", output)}
        readers: list[PipeReader] = []
        stdin_fd = master = -1
        fds: list[int] = []
        if not tty:
            in_r, stdin_fd = os.pipe2(os.O_CLOEXEC)
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            fds = [in_r, out_w, err_w]
        session.active += 1
        session.touch()
        accepted = time.time()
        reason: list[str] = []
        pending = [0]
        try:
            handle = await session.handle.call({"op": "exec", "id": call_id, "argv": argv, "env": env, "cwd": cwd,
                                                "tty": tty, "rows": rows, "cols": cols}, fds)
            session.calls[call_id] = handle
            for fd in fds:
                os.close(fd)
            fds = []
            msg, mfds = await handle.started
            if msg.get("ev") == "call_failed":
                for fd in ([] if tty else [out_r, err_r, stdin_fd]):
                    os.close(fd)
                stdin_fd = -1
                failed = CallResult(call_id, Outcome.SETUP_FAILED, message=f"{msg.get('step')}: {msg.get('error')}")
                await on_result(failed)
                yield "started", call_id
                yield "result", failed
                return
            oom_before = msg.get("oom_kills", 0)

            def feed(name: str, reader_ref: list):
                def on_data(data: bytes) -> None:
                    part = streams[name].take(data)
                    if part:
                        pending[0] += len(part)
                        queue.put_nowait((name, part))
                        if pending[0] > (4 << 20):
                            for r in readers:
                                r.pause()
                    if streams[name].truncated and "output_limit" not in reason and not reason:
                        reason.append("output_limit")
                        asyncio.ensure_future(session.handle.signal(call_id, signal.SIGKILL))
                return on_data

            if tty:
                master = mfds[0] if mfds else -1
                for extra in mfds[1:]:
                    os.close(extra)
                if master < 0:
                    raise SetupFailed("the terminal was not handed over")
                stdin_fd = os.dup(master)
                os.set_blocking(stdin_fd, False)
                readers.append(PipeReader(master, feed("stdout", [])))
            else:
                readers.append(PipeReader(out_r, feed("stdout", [])))
                readers.append(PipeReader(err_r, feed("stderr", [])))
            handle.finished.add_done_callback(lambda _f: queue.put_nowait(("exit", None)))
            yield "started", call_id

            async def pump_stdin() -> None:
                nonlocal stdin_fd
                try:
                    if stdin:
                        await write_all(stdin_fd, stdin)
                    if close_stdin and not tty:
                        os.close(stdin_fd)
                        stdin_fd = -1
                        return
                    if requests is None:
                        if not tty:
                            os.close(stdin_fd)
                            stdin_fd = -1
                        return
                    async for kind, value in requests:
                        if kind == "stdin" and stdin_fd >= 0:
                            await write_all(stdin_fd, value)
                        elif kind == "close_stdin" and stdin_fd >= 0:
                            if tty:
                                await write_all(stdin_fd, b"\x04")
                            else:
                                os.close(stdin_fd)
                                stdin_fd = -1
                        elif kind == "resize" and tty and stdin_fd >= 0:
                            fcntl.ioctl(stdin_fd, termios.TIOCSWINSZ, struct.pack("HHHH", *value, 0, 0))
                except (OSError, asyncio.CancelledError):
                    pass

            feeder = asyncio.ensure_future(pump_stdin())
            timer = asyncio.get_running_loop().call_later(
                timeout, lambda: reason or (reason.append("timeout"),
                                            asyncio.ensure_future(session.handle.signal(call_id, signal.SIGKILL))))
            try:
                while True:
                    kind, data = await queue.get()
                    if kind == "exit":
                        # Everything the command wrote before it exited is in the pipes now; what a background
                        # child writes later is not this call's.
                        for r in readers:
                            r.resume()
                            r.drain()
                            r.close()
                        while not queue.empty():
                            k, v = queue.get_nowait()
                            if k in ("stdout", "stderr"):
                                yield k, v
                        break
                    pending[0] -= len(data)
                    if pending[0] < (1 << 20):
                        for r in readers:
                            r.resume()
                    yield kind, data
            finally:
                timer.cancel()
                feeder.cancel()
                if not handle.finished.done():
                    reason.append("cancelled")
                    await session.handle.signal(call_id, signal.SIGKILL)
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(asyncio.shield(handle.finished), 10)
                fin = handle.finished.result() if handle.finished.done() else {"ev": "call_exit", "signal": 9}
                result = self._call_result(call_id, fin, reason, oom_before, streams, accepted, timeout, session)
                # A task of its own: it completes even when this generator is being torn down by a cancel.
                recording = asyncio.ensure_future(on_result(result))
            await recording
            yield "result", result
        finally:
            for fd in fds:
                os.close(fd)
            for r in readers:
                r.close()
            if stdin_fd >= 0:
                os.close(stdin_fd)
            session.calls.pop(call_id, None)
            session.active -= 1
            session.touch()

    @staticmethod
    def _call_result(call_id, fin: dict, reason: list, oom_before: int, streams: dict, accepted: float,
                     timeout: float, session: Session, cls=CallResult, **extra) -> CallResult:
        # A call's peak: its process's own peak RSS, bounded by its session cgroup's peak (RSS counts shared file
        # pages the cgroup may not be charged for; the cgroup's figure is what the memory limit applies to).
        rss, cgroup_peak = int(fin.get("maxrss", 0)), int(fin.get("peak_memory") or 0)
        common = dict(cpu_seconds=fin.get("cpu_ns", 0) / 1e9, wall_seconds=time.time() - accepted,
                      peak_memory_bytes=min(rss, cgroup_peak) if cgroup_peak else rss,
                      stdout_bytes=streams["stdout"].written, stderr_bytes=streams["stderr"].written,
                      stdout_truncated=streams["stdout"].truncated, stderr_truncated=streams["stderr"].truncated,
                      stdout_sha256=streams["stdout"].sha.hexdigest(), stderr_sha256=streams["stderr"].sha.hexdigest(),
                      **extra)
        sig, code = int(fin.get("signal") or 0), int(fin.get("code") or 0)
        first = reason[0] if reason else ""
        # What the daemon itself stopped the call for comes first, even if the session ended meanwhile.
        if fin.get("ev") == "call_failed" and first not in ("timeout", "output_limit", "cancelled"):
            return cls(call_id, Outcome.SETUP_FAILED, message=f"{fin.get('step')}: {fin.get('error')}", **common)
        if first == "timeout":
            return cls(call_id, Outcome.TIMEOUT, signal=sig, message=f"wall-clock limit of {timeout:g}s reached",
                       **common)
        if first == "output_limit":
            return cls(call_id, Outcome.OUTPUT_LIMIT, signal=sig,
                       message=f"output passed the cap of {streams['stdout'].cap} bytes per stream", **common)
        if first == "cancelled":
            return cls(call_id, Outcome.CANCELLED, signal=sig, message="the call was cancelled", **common)
        cpu_limit = session.spec.limits.cpu_time
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and fin.get("cpu_ns", 0) >= cpu_limit * 1e9):
            return cls(call_id, Outcome.TIMEOUT, signal=sig, message=f"CPU-time limit of {cpu_limit:g}s reached",
                       **common)
        if sig == signal.SIGKILL and fin.get("oom_kills", 0) > oom_before:
            return cls(call_id, Outcome.MEMORY_LIMIT, signal=sig,
                       message=f"memory limit of {session.spec.limits.memory} bytes reached (OOM kill)", **common)
        if sig:
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
            msg = f"killed by {name}"
            if sig == signal.SIGSYS:
                msg += " (a system call the seccomp profile forbids"
                kill = fin.get("seccomp_kill")
                if isinstance(kill, dict) and "arch" in kill and "nr" in kill:
                    from .sandbox.seccomp import describe_kill
                    msg += f": {describe_kill(str(kill['arch']), int(kill['nr']))}"
                msg += ")"
            return cls(call_id, Outcome.SIGNALED, signal=sig, message=msg, **common)
        killed = fin.get("oom_kills", 0) - oom_before
        return cls(call_id, Outcome.EXITED, exit_code=code,
                   message=f"{killed} process(es) of the session were OOM-killed" if killed > 0 else "", **common)

    # -- RunCode ---------------------------------------------------------------------------------------------
    def context(self, session: Session, name: str) -> Context:
        name = name or "default"
        if not CONTEXT_RE.match(name):
            raise InvalidRequest(f"context: {name!r} is not a simple name ([A-Za-z0-9_.-], at most 64)")
        ctx = session.contexts.get(name)
        if ctx is None:
            if len(session.contexts) >= 16:
                raise InvalidRequest("context: a session has at most 16 kernel contexts; reset one first")
            ctx = session.contexts[name] = Context(name)
        return ctx

    async def _start_kernel(self, session: Session, ctx: Context) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        kid = new_id()
        interpreter = session.runner.command[0]
        env = self.call_env(session, {})
        env.setdefault("MPLBACKEND", "Agg")
        try:
            handle = await session.handle.call({"op": "exec", "id": kid, "extra": True, "env": env, "cwd": "",
                                                "argv": [interpreter, "-I", "-u", KERNEL_PATH]},
                                               [null, null, err_w, theirs.fileno()])
        finally:
            theirs.close()
            os.close(null)
            os.close(err_w)
        msg, _ = await handle.started
        if msg.get("ev") == "call_failed":
            os.close(err_r)
            ours.close()
            raise SetupFailed(f"the kernel could not be started: {msg.get('step')}: {msg.get('error')}")
        ctx.kernel, ctx.sock, ctx.count = handle, ours, 0
        ctx.stderr_tail = bytearray()

        def tail(data: bytes) -> None:
            ctx.stderr_tail += data
            del ctx.stderr_tail[:-4096]
        PipeReader(err_r, tail)

    async def _kill_kernel(self, session: Session, ctx: Context) -> None:
        if ctx.kernel is not None and not ctx.kernel.finished.done():
            await session.handle.signal(ctx.kernel.id, signal.SIGKILL)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(ctx.kernel.finished), 10)
        if ctx.sock is not None:
            ctx.sock.close()
        ctx.kernel, ctx.sock = None, None

    async def run_code(self, session: Session, ctx: Context, code: str, timeout: float,
                       output: int, on_result=None) -> AsyncIterator[tuple[str, object]]:
        """Events: ("started", call_id), ("stdout"|"stderr", bytes), ("result", bundle dict),
        ("error", dict), ("done", CellResult). Cells of one context run one at a time: a second waits.
        `on_result` as for exec: every cell that started has its result recorded, a cancelled one too."""
        call_id = new_id()
        session.active += 1
        session.touch()
        try:
            async with ctx.lock:
                async for event in self._cell(session, ctx, call_id, code, timeout, output, on_result or _nothing):
                    yield event
        finally:
            session.active -= 1
            session.touch()

    async def _cell(self, session, ctx: Context, call_id: str, code: str, timeout: float, output: int, on_result):
        accepted = time.time()
        restarted, note = False, ""
        if ctx.kernel is None or ctx.kernel.finished.done():
            if ctx.died:
                restarted, note = True, f"started a fresh kernel: the previous one {ctx.died}"
            await self._start_kernel(session, ctx)
            ctx.died = ""
        ctx.count += 1
        count = ctx.count
        kernel = ctx.kernel
        oom_before = (await kernel.started)[0].get("oom_kills", 0)
        queue: asyncio.Queue = asyncio.Queue()
        streams = {"stdout": _Stream("stdout", output), "stderr": _Stream("stderr", output)}
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        rep_r, rep_w = os.pipe2(os.O_CLOEXEC)
        code_fd = _sealed_memfd("sandboxd-cell", code.encode("utf-8", "surrogatepass"))
        reason: list[str] = []
        report = bytearray()
        report_total = [0]
        try:
            ctx.sock.sendmsg([json.dumps({"op": "cell", "id": call_id, "count": count}).encode()],
                             [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                               struct.pack("4i", code_fd, out_w, err_w, rep_w))])
        except OSError as e:
            for fd in (out_r, err_r, rep_r):
                os.close(fd)
            ctx.died = f"was gone ({e})"
            raise SetupFailed(f"the kernel is not reachable: {e}") from None
        finally:
            for fd in (code_fd, out_w, err_w, rep_w):
                os.close(fd)
        ctx.running = call_id

        def feed(name):
            def on_data(data: bytes) -> None:
                part = streams[name].take(data)
                if part:
                    queue.put_nowait((name, part))
                if streams[name].truncated and not reason:
                    reason.append("output_limit")
                    asyncio.ensure_future(session.handle.signal(kernel.id, signal.SIGINT, group=False))
            return on_data

        def on_report(data: bytes) -> None:
            report_total[0] += len(data)
            if report_total[0] > REPORT_MAX:
                return  # past the bound the rest of this cell's report is dropped
            report.extend(data)
            while True:
                nl = report.find(b"\n")
                if nl < 0:
                    break
                line = bytes(report[:nl])
                del report[:nl + 1]
                queue.put_nowait(("report", line))

        readers = [PipeReader(out_r, feed("stdout")), PipeReader(err_r, feed("stderr")),
                   PipeReader(rep_r, on_report, lambda: queue.put_nowait(("report_eof", None)))]
        died = asyncio.Event()
        kernel.finished.add_done_callback(lambda _f: (died.set(), queue.put_nowait(("died", None))))
        loop = asyncio.get_running_loop()
        grace = self.d.config.sessions.cell_grace

        def on_timeout() -> None:
            if reason:
                return
            reason.append("timeout")
            asyncio.ensure_future(session.handle.signal(kernel.id, signal.SIGINT, group=False))
            loop.call_later(grace, lambda: died.is_set() or asyncio.ensure_future(
                session.handle.signal(kernel.id, signal.SIGKILL)))
        timer = loop.call_later(timeout, on_timeout)
        yield "started", call_id
        error = None
        finished_ok = False
        cancelled = True
        try:
            while True:
                kind, data = await queue.get()
                if kind in ("stdout", "stderr"):
                    yield kind, data
                elif kind == "report":
                    event = _parse_report(data)
                    if event is None:
                        continue
                    if event[0] == "done":
                        finished_ok = True
                        break
                    if event[0] == "error":
                        error = event[1]
                    yield event
                elif kind in ("report_eof", "died"):
                    if kind == "report_eof" and not died.is_set():
                        # The report closed without "done": wait briefly for the kernel's fate.
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(asyncio.shield(kernel.finished), 0.5)
                        if not kernel.finished.done():
                            finished_ok = True
                            break
                    break
            for r in readers[:2]:
                r.drain()
            while not queue.empty():
                k, v = queue.get_nowait()
                if k in ("stdout", "stderr"):
                    yield k, v
            cancelled = False
        finally:
            timer.cancel()
            ctx.running = ""
            for r in readers:
                r.close()
            if not finished_ok and not kernel.finished.done():
                # The client went away mid-cell: interrupt it; a kernel that ignores that is killed.
                reason.append("cancelled")
                await session.handle.signal(kernel.id, signal.SIGINT, group=False)
                try:
                    await asyncio.wait_for(asyncio.shield(kernel.finished), grace)
                except asyncio.TimeoutError:
                    pass
            if cancelled:  # the consumer went away: record the cell from a task of its own
                asyncio.ensure_future(on_result(CellResult(
                    call_id, Outcome.CANCELLED, wall_seconds=time.time() - accepted, message="the cell was cancelled",
                    stdout_bytes=streams["stdout"].written, stderr_bytes=streams["stderr"].written,
                    stdout_sha256=streams["stdout"].sha.hexdigest(), stderr_sha256=streams["stderr"].sha.hexdigest(),
                    execution_count=count, kernel_restarted=restarted, error=error is not None)))
        outcome_extra = dict(execution_count=count, kernel_restarted=restarted)
        if kernel.finished.done():
            fin = kernel.finished.result()
            how = (f"was killed by {signal.Signals(fin['signal']).name}" if fin.get("signal") in
                   signal.Signals._value2member_map_ else f"exited with status {fin.get('code')}")
            oom = fin.get("signal") == signal.SIGKILL and fin.get("oom_kills", 0) > oom_before
            if oom:
                how += f" (memory limit of {session.spec.limits.memory} bytes reached)"
            ctx.died = how
            await self._kill_kernel(session, ctx)
            if error is None and not finished_ok:
                tail = bytes(ctx.stderr_tail).decode("utf-8", "replace").strip().splitlines()[-20:]
                error = {"name": "KernelDied", "value": f"the kernel {how} while running this cell; the next cell "
                                                        f"starts a fresh one", "traceback": tail}
                yield "error", error
            if not finished_ok:
                res = self._call_result(call_id, fin, reason, oom_before, streams, accepted, timeout, session,
                                        CellResult, **outcome_extra)
                if res.outcome == Outcome.EXITED:
                    res = dataclasses.replace(res, outcome=Outcome.SIGNALED if fin.get("signal") else Outcome.EXITED)
                res.error = True
                res.message = (res.message + "; " if res.message else "") + f"the kernel {how}"
                if note:
                    res.message += f"; {note}"
                await on_result(res)
                yield "done", res
                return
        first = reason[0] if reason else ""
        outcome = {"timeout": Outcome.TIMEOUT, "output_limit": Outcome.OUTPUT_LIMIT,
                   "cancelled": Outcome.CANCELLED}.get(first, Outcome.EXITED)
        msg = {"timeout": f"wall-clock limit of {timeout:g}s reached: the cell was interrupted",
               "output_limit": f"output passed the cap of {output} bytes per stream: the cell was interrupted",
               "cancelled": "the cell was cancelled"}.get(first, "")
        if note:
            msg = f"{msg}; {note}" if msg else note
        res = CellResult(
            call_id, outcome, wall_seconds=time.time() - accepted, stdout_bytes=streams["stdout"].written,
            stderr_bytes=streams["stderr"].written, stdout_truncated=streams["stdout"].truncated,
            stderr_truncated=streams["stderr"].truncated, message=msg, stdout_sha256=streams["stdout"].sha.hexdigest(),
            stderr_sha256=streams["stderr"].sha.hexdigest(), error=error is not None, **outcome_extra)
        await on_result(res)
        yield "done", res

    async def interrupt(self, session: Session, name: str) -> bool:
        ctx = self.context(session, name)
        if not ctx.running or ctx.kernel is None:
            return False
        await session.handle.signal(ctx.kernel.id, signal.SIGINT, group=False)
        return True

    async def reset(self, session: Session, name: str) -> None:
        ctx = self.context(session, name)
        if ctx.running and ctx.kernel is not None:
            await session.handle.signal(ctx.kernel.id, signal.SIGKILL)
        async with ctx.lock:
            await self._kill_kernel(session, ctx)
            ctx.count, ctx.died = 0, ""
        session.contexts.pop(ctx.name, None)

    # -- files -----------------------------------------------------------------------------------------------
    async def file_op(self, session: Session, req: dict, send: AsyncIterator[bytes] | None = None
                      ) -> AsyncIterator[tuple[bytes, bytes]]:
        """Run one file agent; yields (kind, payload) frames it writes. `send` feeds frames to its input."""
        call_id = new_id()
        in_r, in_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        session.active += 1
        session.touch()
        reader = FrameReader(out_r)
        feeder = None
        try:
            try:
                handle = await session.handle.call({"op": "file", "id": call_id, "req": req}, [in_r, out_w])
            finally:
                os.close(in_r)
                os.close(out_w)
            msg, _ = await handle.started
            if msg.get("ev") == "call_failed":
                os.close(in_w)
                in_w = -1
                raise SetupFailed(f"the file agent could not start: {msg.get('step')}: {msg.get('error')}")
            os.set_blocking(in_w, False)

            async def feed() -> None:
                nonlocal in_w
                try:
                    if send is not None:
                        async for chunk in send:
                            await write_all(in_w, chunk)
                except OSError:
                    pass
                finally:
                    os.close(in_w)
                    in_w = -1
            feeder = asyncio.ensure_future(feed())
            while (item := await reader.read()) is not None:
                yield item
            if feeder.done() and feeder.exception():
                raise feeder.exception()
        finally:
            if feeder is not None and not feeder.done():
                feeder.cancel()
                with contextlib.suppress(BaseException):
                    await feeder
            elif in_w >= 0 and feeder is None:
                os.close(in_w)
            reader.close()
            if "handle" in locals() and not handle.finished.done():
                await session.handle.signal(call_id, signal.SIGKILL)
            session.active -= 1
            session.touch()

    async def simple_file_op(self, session: Session, req: dict) -> list[dict]:
        out = []
        async for kind, payload in self.file_op(session, req):
            if kind == b"J":
                out.append(json.loads(payload))
                if len(out) > 200_000:
                    break
        return out

    async def import_tar(self, session: Session, chunks: AsyncIterator[bytes], path: str) -> dict:
        limit = max(session.spec.limits.work_size, self.d.config.sessions.transfer_limit) * 2
        total = [0]
        digest = hashlib.sha256()

        async def frames():
            async for chunk in chunks:
                total[0] += len(chunk)
                if total[0] > limit:
                    raise TooLarge(f"the tar is larger than {limit} bytes")
                digest.update(chunk)
                for i in range(0, len(chunk), 256 << 10):
                    yield frame(b"D", chunk[i:i + (256 << 10)])
            yield frame(b"E", b"")
        results = []
        async for kind, payload in self.file_op(session, {"op": "import", "path": path}, frames()):
            if kind == b"J":
                results.append(json.loads(payload))
        if total[0] > limit:
            raise TooLarge(f"the tar is larger than {limit} bytes")
        res = results[-1] if results else {"error": "other", "message": "the file agent reported nothing"}
        res["sha256"], res["tar_bytes"] = digest.hexdigest(), total[0]
        return res


async def _nothing(_result) -> None:
    pass


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(data), 1 << 20):
        yield data[i:i + (1 << 20)]


def _parse_report(line: bytes):
    """One line of a kernel's report, or None if it is not a well-formed event (untrusted input)."""
    try:
        msg = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(msg, dict):
        return None
    kind = msg.get("type")
    if kind == "done":
        return ("done", None)
    if kind == "result":
        data = msg.get("data")
        if not isinstance(data, dict):
            return None
        bundle = {str(k)[:128]: v if isinstance(v, str) else json.dumps(v) for k, v in list(data.items())[:32]}
        if "text/plain" not in bundle:
            bundle["text/plain"] = ""
        kind_ = msg.get("kind") if msg.get("kind") in ("execute_result", "display_data") else "display_data"
        return ("result", {"data": bundle, "kind": kind_})
    if kind == "error":
        tb = msg.get("traceback")
        tb = [str(t) for t in tb[:1000]] if isinstance(tb, list) else []
        return ("error", {"name": str(msg.get("name", ""))[:256], "value": str(msg.get("value", ""))[:65536],
                          "traceback": tb})
    return None


def _half_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError):
        return 8 << 30


def kernel_files(runner) -> tuple[File, ...]:
    return (File("python_kernel.py", kernel_mod.source(), 0o444),) if runner.kernel == "python" else ()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
