"""One run, daemon side: hand the RunSpec to the launcher, stream the output under its caps, and turn what
the launcher reports into an Outcome.

Memory stays bounded whatever a script prints: each stream is read in chunks of at most CHUNK bytes through a
bounded queue, so a slow client slows the pipe (and the script blocks on write) instead of growing a buffer;
past the cap, bytes are counted and dropped. What the program did is data (RunResult.outcome), never an
exception; only failures of sandboxd itself raise.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import enum
import hashlib
import json
import logging
import os
import signal
from dataclasses import dataclass, field
from typing import AsyncIterator

from .errors import Overloaded, SetupFailed
from .sandbox.launcher import Finished, Launcher, LauncherError, fill_and_seal
from .sandbox.spec import RunSpec

log = logging.getLogger("sandboxd.supervisor")
CHUNK = 64 << 10          # bytes per output event: far below gRPC's message limit
QUEUE = 32                # chunks in flight per run before the pipes are left unread


class Outcome(enum.Enum):
    EXITED = "exited"
    SIGNALED = "signaled"
    TIMEOUT = "timeout"
    MEMORY_LIMIT = "memory_limit"
    OUTPUT_LIMIT = "output_limit"
    CANCELLED = "cancelled"
    REJECTED = "rejected"
    SETUP_FAILED = "setup_failed"
    INTERRUPTED = "interrupted"


@dataclass
class StreamStats:
    written: int = 0           # bytes the script wrote
    delivered: int = 0         # bytes passed on (<= the cap)
    truncated: bool = False
    sha256: "hashlib._Hash" = field(default_factory=hashlib.sha256)
    kept: bytearray = field(default_factory=bytearray)   # what the record stores, when the policy says so


@dataclass(frozen=True)
class RunResult:
    run_id: str
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
    stdout_sha256: str = ""
    stderr_sha256: str = ""
    message: str = ""
    setup_seconds: float | None = None   # request accepted -> payload exec'd
    oom_kills: int = 0
    landlock_abi: int | None = None      # what the payload applied (0: no Landlock); None: it never exec'd
    stored_stdout: bytes = b""
    stored_stderr: bytes = b""
    files: tuple = ()                    # collected files: {"path", "mode", "data"}
    files_truncated: bool = False
    egress: dict | None = None           # the proxy's summary, runs with egress only

    def as_record(self) -> dict:
        d = dataclasses.asdict(self)
        if d["egress"] is None:
            del d["egress"]
        d["outcome"] = self.outcome.value
        d["files"] = [{"path": f["path"], "size": len(f["data"]), "sha256": hashlib.sha256(f["data"]).hexdigest()}
                      for f in self.files]
        for stream in ("stdout", "stderr"):
            data = d.pop(f"stored_{stream}")
            if data:
                d[f"{stream}_stored_b64"] = base64.b64encode(data).decode()
        return d


class UidPool:
    """Distinct unprivileged uids for concurrent runs. A uid goes back to the pool only once its run's cgroup
    is gone (so no process with that uid can still exist); otherwise it stays out until restart."""

    def __init__(self, start: int, count: int):
        self.size = count
        self.free = list(range(start, start + count))
        self.quarantined: set[int] = set()

    def take(self) -> int:
        if not self.free:
            raise Overloaded("no free sandbox uid: every uid of the configured range is in use", retry_after=1.0)
        return self.free.pop(0)

    def give_back(self, uid: int, clean: bool) -> None:
        if clean:
            self.free.append(uid)
        else:
            self.quarantined.add(uid)
            log.error("uid %d quarantined: its run's cgroup could not be removed", uid)


def outcome_of(fin: Finished, spec: RunSpec, output_limited: bool, started: bool = False) -> tuple[Outcome, str]:
    if fin.kill_reason == "launcher_died" and started:
        # The user's code had started: its sandbox is gone, not "never built". Whatever it did is unknown.
        return Outcome.INTERRUPTED, "the sandbox was lost after the code started: the launcher exited during the run"
    if fin.setup_error:
        return Outcome.SETUP_FAILED, fin.setup_error
    reason = fin.kill_reason
    if reason in ("timeout",):
        return Outcome.TIMEOUT, f"wall-clock limit of {spec.limits.wall_time:g}s reached"
    if reason == "cpu_time":
        return Outcome.TIMEOUT, f"CPU-time limit of {spec.limits.cpu_time:g}s reached"
    if reason == "output_limit" or (output_limited and spec.stop_on_output_limit and fin.signal == signal.SIGKILL):
        return Outcome.OUTPUT_LIMIT, f"output passed the cap of {spec.limits.output} bytes per stream"
    if reason in ("cancelled", "shutdown", "daemon_gone", "stopped"):
        return Outcome.CANCELLED, f"run stopped: {reason}"
    if fin.oom_kills and fin.signal == signal.SIGKILL:
        return Outcome.MEMORY_LIMIT, f"memory limit of {spec.limits.memory} bytes reached (OOM kill)"
    if fin.signal == signal.SIGXCPU or (fin.signal == signal.SIGKILL and fin.cpu_ns >= spec.limits.cpu_time * 1e9):
        return Outcome.TIMEOUT, f"CPU-time limit of {spec.limits.cpu_time:g}s reached"
    if fin.signal:
        name = signal.Signals(fin.signal).name if fin.signal in signal.Signals._value2member_map_ else str(fin.signal)
        msg = f"killed by {name}"
        if fin.signal == signal.SIGSYS:
            msg += " (a system call the seccomp profile forbids"
            if fin.seccomp_kill:
                from .sandbox.seccomp import describe_kill
                msg += f": {describe_kill(fin.seccomp_kill['arch'], fin.seccomp_kill['nr'])}"
            msg += ")"
        return Outcome.SIGNALED, msg
    if fin.exit_code is None:
        return Outcome.SETUP_FAILED, "the run ended without an exit status"
    return Outcome.EXITED, ("" if not fin.oom_kills else f"{fin.oom_kills} process(es) of the run were OOM-killed")


class ActiveRun:
    """A run in flight. Its task runs to the end whatever the consumer does, so a result (and a record) exists
    for every run, including one whose client went away."""

    def __init__(self, spec: RunSpec, keep_output: int = 0):
        self.spec, self.keep_output = spec, keep_output
        self.queue: asyncio.Queue = asyncio.Queue(QUEUE)
        self.result: asyncio.Future[RunResult] = asyncio.get_running_loop().create_future()
        self.started: asyncio.Future[float | None] = asyncio.get_running_loop().create_future()
        self.handle = None
        self.cancel_reason: str | None = None
        self.stop_message = ""      # "stopped by <principal>: <reason>" when StopRun/StopPrincipal ended it
        self.task: asyncio.Task | None = None
        self.collected: list[dict] = []
        self.collect_truncated = False
        self.egress = None   # RunEgress, for runs with egress
        self.pooled = False  # served by a sandbox of the warm pool

    async def output(self) -> AsyncIterator[tuple[str, bytes]]:
        """("stdout" | "stderr", chunk) in the order read, until both streams are closed."""
        while (item := await self.queue.get()) is not None:
            yield item

    async def cancel(self, reason: str = "cancelled", drain: bool = True) -> None:
        self.cancel_reason = self.cancel_reason or reason
        if self.handle is not None:
            with contextlib.suppress(Exception):
                await self.handle.kill(reason)
        # Nobody reads the output any more: drain it so the pumps never block on a full queue.
        while drain and not self.queue.empty():
            self.queue.get_nowait()


REFILL_AFTER_RUN = 0.02   # seconds: a pooled run's replacement starts after its result and record, not before


class Supervisor:
    def __init__(self, launcher: Launcher, uids: UidPool, egress=None, pool=None):
        self.launcher, self.uids, self.egress, self.pool = launcher, uids, egress, pool
        self.active: dict[str, ActiveRun] = {}

    async def start(self, spec: RunSpec, stdin: bytes, accepted_at: float, keep_output: int = 0,
                    principal: str = "", runner: str = "") -> ActiveRun:
        """Allocate a uid (a pooled sandbox of `runner` comes with its own), hand the run to the launcher and
        start streaming. Raises SetupFailed or Overloaded before anything runs; after that, every failure is part
        of the RunResult."""
        pooled = self.pool.claim(runner, spec) if self.pool is not None and runner else None
        uid = pooled.spec.uid if pooled is not None else self.uids.take()
        spec = dataclasses.replace(spec, uid=uid, gid=uid)
        if pooled is not None and pooled.fits_prestart(spec):
            # The interpreter is running already, with the pool's stdio: the run's stdin goes into its memfd.
            spec = dataclasses.replace(spec, prestart=pooled.spec.prestart)
            stdin_fd, out_r, err_r = pooled.take_stdio()
            out_w = err_w = -1
            try:
                fill_and_seal(stdin_fd, stdin)
            finally:
                os.close(stdin_fd)
        else:
            if pooled is not None:
                pooled.close_stdio()
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
        run = ActiveRun(spec, keep_output)
        run.pooled = pooled is not None
        col_r, col_w = os.pipe2(os.O_CLOEXEC) if spec.collect else (-1, -1)
        try:
            if pooled is not None:
                run.handle = await self.launcher.claim(pooled.handle, spec, stdin, out_w, err_w, col_w)
            else:
                run.handle = await self.launcher.run(spec, stdin, out_w, err_w, col_w)
        except LauncherError as e:
            os.close(out_r)
            os.close(err_r)
            if col_r >= 0:
                os.close(col_r)
            self.uids.give_back(uid, True)
            raise SetupFailed(f"sandbox launcher unavailable: {e}") from e
        finally:
            for fd in (out_w, err_w, col_w):
                if fd >= 0:
                    os.close(fd)
        self.active[spec.run_id] = run
        if spec.egress is not None:
            run.egress = self.egress.open(spec, principal)
            asyncio.ensure_future(run.egress.serve(run.handle.egress)).add_done_callback(listener_served)
        run.task = asyncio.create_task(self._run(run, out_r, err_r, accepted_at, col_r))
        return run

    @staticmethod
    async def _collect(run: ActiveRun, fd: int) -> None:
        """Files the sandbox's file agent hands back after the payload exits (files.py frames), bounded."""
        from .pipes import FrameReader
        reader = FrameReader(fd)
        current, total = None, 0
        try:
            while (item := await reader.read()) is not None:
                kind, payload = item
                if kind == b"J":
                    head = json.loads(payload)
                    if head.get("done"):
                        run.collect_truncated = bool(head.get("truncated"))
                        continue
                    path = str(head.get("path", ""))
                    current = {"path": path, "mode": int(head.get("mode") or 0o644) & 0o7777, "data": bytearray()}
                elif kind == b"D" and current is not None:
                    total += len(payload)
                    if total > run.spec.collect_max:
                        run.collect_truncated, current = True, None
                        continue
                    current["data"] += payload
                elif kind == b"E" and current is not None:
                    current["data"] = bytes(current["data"])
                    run.collected.append(current)
                    current = None
        except (ValueError, OSError):
            run.collect_truncated = True
        finally:
            reader.close()

    async def _run(self, run: ActiveRun, out_r: int, err_r: int, accepted_at: float, col_r: int = -1) -> None:
        spec, handle = run.spec, run.handle
        stats = {"stdout": StreamStats(), "stderr": StreamStats()}
        limited = asyncio.Event()
        fin = Finished(spec.run_id, setup_error="sandboxd: internal error", clean=False)
        try:
            handle.started.add_done_callback(
                lambda f: run.started.done() or run.started.set_result(f.result() if not f.cancelled() else None))
            await asyncio.gather(self._pump(out_r, "stdout", stats["stdout"], run, limited),
                                 self._pump(err_r, "stderr", stats["stderr"], run, limited),
                                 *([self._collect(run, col_r)] if col_r >= 0 else []))
            await run.queue.put(None)
            # The launcher enforces the wall clock; this bound only guards against a lost launcher message.
            fin = await asyncio.wait_for(asyncio.shield(handle.finished), spec.limits.wall_time + 60)
        except Exception as e:  # noqa: BLE001 - the run must still end with a result
            log.exception("run %s: supervisor failed", spec.run_id)
            await run.cancel("cancelled")
            with contextlib.suppress(Exception):
                fin = await asyncio.wait_for(asyncio.shield(handle.finished), 30)
            fin = dataclasses.replace(fin, setup_error=fin.setup_error or f"sandboxd: {type(e).__name__}: {e}")
        finally:
            self.active.pop(spec.run_id, None)
            self.uids.give_back(spec.uid, fin.clean)
            if run.pooled and self.pool is not None:  # once this run's answer is on its way (below)
                asyncio.get_running_loop().call_later(REFILL_AFTER_RUN, self.pool.refill)
        egress = None
        if run.egress is not None:  # every connection's record is written before the run's own
            egress = await run.egress.close()
        if run.cancel_reason and not fin.kill_reason and not fin.setup_error:
            fin = dataclasses.replace(fin, kill_reason=run.cancel_reason)
        started = handle.started.result() if handle.started.done() and not handle.started.cancelled() else None
        exec_at = fin.exec_at or started
        wall = (fin.ended_at - exec_at) if (exec_at and fin.ended_at) else 0.0
        outcome, message = outcome_of(fin, spec, limited.is_set(), started=exec_at is not None)
        if outcome is Outcome.CANCELLED and run.stop_message:
            message = run.stop_message
        if not run.started.done():
            run.started.set_result(exec_at)
        run.result.set_result(RunResult(
            run_id=spec.run_id, outcome=outcome, exit_code=fin.exit_code or 0, signal=fin.signal or 0,
            cpu_seconds=fin.cpu_ns / 1e9, wall_seconds=max(wall, 0.0), peak_memory_bytes=fin.peak_memory,
            stdout_bytes=stats["stdout"].written, stderr_bytes=stats["stderr"].written,
            stdout_truncated=stats["stdout"].truncated, stderr_truncated=stats["stderr"].truncated,
            stdout_sha256=stats["stdout"].sha256.hexdigest(), stderr_sha256=stats["stderr"].sha256.hexdigest(),
            message=message, setup_seconds=(exec_at - accepted_at) if exec_at else None, oom_kills=fin.oom_kills,
            landlock_abi=fin.landlock_abi, stored_stdout=bytes(stats["stdout"].kept),
            stored_stderr=bytes(stats["stderr"].kept), files=tuple(run.collected), files_truncated=run.collect_truncated,
            egress=egress))

    async def _pump(self, fd: int, name: str, st: StreamStats, run: ActiveRun, limited: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=CHUNK)
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                    os.fdopen(fd, "rb", buffering=0))
        cap = run.spec.limits.output
        try:
            while chunk := await reader.read(CHUNK):
                st.written += len(chunk)
                room = cap - st.delivered
                if room > 0:
                    part = chunk[:room]
                    st.delivered += len(part)
                    st.sha256.update(part)
                    if len(st.kept) < run.keep_output:
                        st.kept += part[:run.keep_output - len(st.kept)]
                    if run.cancel_reason is None:
                        await run.queue.put((name, part))
                if st.written > cap and not st.truncated:
                    st.truncated = True
                    limited.set()
                    if run.spec.stop_on_output_limit:
                        with contextlib.suppress(Exception):
                            await run.handle.kill("output_limit")
        finally:
            transport.close()

    async def cancel_all(self, reason: str) -> None:
        for run in list(self.active.values()):
            await run.cancel(reason)


def listener_served(fut: asyncio.Future) -> None:
    """A run that ends before its listener arrives cancels the wait; anything else is worth a log line."""
    if not fut.cancelled() and fut.exception() is not None:
        log.error("egress listener not served: %r", fut.exception())
