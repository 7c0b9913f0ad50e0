"""The launcher process: a single-threaded fork server that owns every sandbox.

Started by the daemon (launcher.py) before any gRPC thread exists, as `python -m sandboxd.sandbox.forkserver`.
It imports everything a child needs up front, then only forks, so no child ever inherits a lock held by another
thread. It owns the cgroup driver: it creates each run's cgroup before fork, enforces the wall-clock and
CPU-time limits, and after each run kills and removes the cgroup, so nothing outlives a run even if the daemon
is gone. A cgroup that is still busy when its run ends (tasks dying, frozen, or stuck in the kernel) is retried
from the loop's timers rather than waited for, so one slow removal never holds up other runs' starts and
deadlines; the run's "finished" goes out only once its cgroup is gone (its uid is then reused) or, after
REMOVE_PATIENCE, with clean=false (the daemon quarantines the uid). If the daemon's end of the control socket closes (the daemon died), it kills every run, removes every
cgroup and exits.

Protocol (SOCK_SEQPACKET, one JSON object per message):
  daemon -> launcher  {"op": "start", "run_id"} + SCM_RIGHTS [spec memfd, stdin, stdout, stderr (, collect pipe)]
                      {"op": "session", "run_id"} + SCM_RIGHTS [spec memfd]
                      {"op": "call", "run_id", "call": {...}} + fds   (forwarded to the session's init, init.py)
                      {"op": "prepare", "run_id"} + SCM_RIGHTS [spec memfd]    (a pooled sandbox, spec.pooled)
                      {"op": "claim", "pool_id", "run_id"} + SCM_RIGHTS [spec memfd, stdin, stdout, stderr
                                                                         (, collect pipe)]
                      {"op": "kill", "run_id", "reason"}   {"op": "ping"}   {"op": "shutdown"}
  launcher -> daemon  {"ev": "ready", "driver"}  {"ev": "pong", "runs"}
                      {"ev": "egress", "run_id"} + SCM_RIGHTS [listener(s)]  (runs with egress, before "started")
                      {"ev": "started", "run_id", "at"}    (the payload's execve succeeded; a session is up;
                                                            a pooled sandbox is ready to be claimed)
                      {"ev": "call", "run_id", "msg": {...}} + fds   (what a session's init reported)
                      {"ev": "finished", "run_id", ...}   (see launcher.Finished)

A session is a run whose init stays up as a command server (init.py) until the daemon ends it, its lifetime
passes or the launcher goes: the launcher keeps a control socket to it and relays calls both ways, unchanged.
A pooled sandbox (the warm pool, sandboxd/pool.py) is a one-shot run whose init stops after the root filesystem
and waits on the same kind of socket for the one run it will serve ("claim"); a pooled sandbox nobody claims
lives until it is killed (drained) like any run.
"""
from __future__ import annotations

import argparse
import array
import heapq
import json
import logging
import os
import re
import select
import selectors
import signal
import socket
import sys
import time

from . import cgroups, child, creds
from . import _fds
from .spec import RunSpec, prestart_key, sandbox_key

log = logging.getLogger("sandboxd.launcher")
MAX_FDS = 8
SETUP_GRACE = 10.0   # seconds a run may spend in setup before its wall clock starts
CPU_POLL = 0.1       # seconds between CPU-time checks of running runs
REMOVE_PATIENCE = 30.0  # seconds a run's cgroup may stay busy before its run finishes unclean
REMOVE_RETRY_MAX = 0.1  # seconds between removal attempts, at most (they start at 5ms and double)


class Run:
    def __init__(self, spec: RunSpec, cgroup, pid: int, pidfd: int, status_r: int):
        self.spec, self.cgroup, self.pid, self.pidfd, self.status_r = spec, cgroup, pid, pidfd, status_r
        self.forked_at = time.time()
        self.exec_at: float | None = None
        self.deadline = time.monotonic() + spec.limits.wall_time + SETUP_GRACE
        self.kill_reason: str | None = None
        self.setup_error: str | None = None
        self.exit: dict = {}
        self.landlock: int | None = None    # the ABI the payload applied, as init reported it at exec
        self.buf = b""
        self.ctl: socket.socket | None = None   # sessions: the control socket to init

        self.egress_r: socket.socket | None = None   # egress: the channel init sends its listener on

class Removal:
    """A finished run whose cgroup is not gone yet, and the "finished" message that waits for it."""

    def __init__(self, cgroup, finished: dict):
        self.cgroup, self.finished = cgroup, finished
        self.give_up = time.monotonic() + REMOVE_PATIENCE
        self.next_at, self.interval, self.error = 0.0, 0.005, "tasks still running"


class ForkServer:
    def __init__(self, sock: socket.socket, driver: cgroups.CgroupDriver, staging: str):
        self.sock, self.driver, self.staging = sock, driver, staging
        self.cap_last = creds.last_cap()
        self.sel = selectors.DefaultSelector()
        self.runs: dict[str, Run] = {}
        self.removing: dict[str, Removal] = {}
        self.timers: list[tuple[float, str]] = []
        self.stopping = False
        self.kmsg = KernelLog.open()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)

    # -- main loop ---------------------------------------------------------------------------------------
    def serve(self) -> None:
        signal.set_wakeup_fd(self.wake_w.fileno())
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: None)  # only wakes the loop; handled below as a shutdown
        self.sel.register(self.sock, selectors.EVENT_READ, self.on_control)
        self.sel.register(self.wake_r, selectors.EVENT_READ, self.on_signal)
        if self.kmsg is not None:
            self.sel.register(self.kmsg.fd, selectors.EVENT_READ, lambda _f: self.kmsg.drain())
        self.send(ev="ready", driver=self.driver.name, pid=os.getpid())
        while not (self.stopping and not self.runs and not self.removing):
            timeout = CPU_POLL if self.runs else None
            if self.removing:
                soonest = max(0.0, min(r.next_at for r in self.removing.values()) - time.monotonic())
                timeout = soonest if timeout is None else min(timeout, soonest)
            for key, _ in self.sel.select(timeout):
                try:
                    key.data(key.fileobj)
                except Exception:  # noqa: BLE001 - one run's trouble must never take the launcher down
                    log.exception("launcher: handling %r failed", key.fileobj)
            self.tick()
        self.driver.teardown()

    def on_signal(self, _):
        while True:
            try:
                if not self.wake_r.recv(64):
                    break
            except BlockingIOError:
                break
        self.shutdown("shutdown")

    def on_control(self, _):
        try:
            data, anc, _flags, _addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS * 4))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, anc = b"", []
        fds = _fds.received(anc)
        if not data:  # the daemon is gone: nobody will read results, so end every run now
            for fd in fds:
                os.close(fd)
            self.sel.unregister(self.sock)
            self.shutdown("daemon_gone")
            return
        msg = json.loads(data)
        op = msg.get("op")
        try:
            if op in ("start", "session", "prepare"):
                self.handle_start(msg, fds)
            elif op == "claim":
                self.handle_claim(msg, fds)
            elif op == "call":
                self.handle_call(msg, fds)
            elif op == "kill":
                self.handle_kill(msg["run_id"], msg.get("reason", "cancelled"))
            elif op == "ping":
                self.send(ev="pong", runs=len(self.runs), usable=self.driver.usable())
            elif op == "shutdown":
                self.shutdown("shutdown")
        finally:
            for fd in fds:
                os.close(fd)

    def shutdown(self, reason: str) -> None:
        self.stopping = True
        for run_id in list(self.runs):
            self.handle_kill(run_id, reason)

    def send(self, fds: list[int] = (), **msg) -> None:
        if self.sock.fileno() < 0:
            return
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        data = json.dumps(msg).encode()
        for _ in range(1000):
            try:
                self.sock.sendmsg([data], anc)
                return
            except BlockingIOError:  # the daemon is slow to read: a short wait, never a lost message
                select.select([], [self.sock], [], 0.01)
            except OSError as e:
                log.warning("cannot reach the daemon: %s", e)
                return
        log.error("the daemon has not read its socket for 10s; dropped %s", msg.get("ev"))

    # -- runs --------------------------------------------------------------------------------------------
    def handle_start(self, msg: dict, fds: list[int]) -> None:
        run_id = msg["run_id"]
        if self.stopping:
            self.send(ev="finished", run_id=run_id, setup_error="launcher: shutting down", clean=True)
            return
        try:
            pooled = msg.get("op") == "prepare"
            if not fds:
                raise ValueError("no spec")
            spec = RunSpec.from_json(_read_fd(fds[0]))
            # A pooled sandbox may be a session's (spec.session), built up to its zygote.
            session = spec.session if pooled else msg.get("op") == "session"
            waits = session or pooled   # init gets a control socket instead of a program
            # A prestarted pooled sandbox comes with its interpreter's stdio (stdin memfd, stdout, stderr).
            expected = (4,) if pooled and spec.prestart else (1,) if waits else (4, 5)
            if len(fds) not in expected:
                raise ValueError(f"expected {' or '.join(map(str, expected))} fds, got {len(fds)}")
            if (spec.run_id != run_id or spec.uid <= 0 or spec.gid <= 0 or spec.session != session
                    or spec.pooled != pooled or (pooled and spec.network != "none")
                    or (spec.prestart and (session or not pooled))):
                raise ValueError("bad spec: run id or mode mismatch, or privileged uid/gid")
            cg = self.driver.create(run_id, cgroups.CgroupLimits(spec.limits.memory, spec.limits.pids,
                                                                 spec.limits.cpus))
        except Exception as e:  # noqa: BLE001 - reported as setup_failed, the launcher keeps serving
            self.send(ev="finished", run_id=run_id, setup_error=f"launcher: {type(e).__name__}: {e}", clean=True)
            return
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        ctl = theirs = None
        extra = -1
        if waits:
            ctl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            extra = theirs.fileno()
            if len(fds) == 4:
                stdio = (fds[1], fds[2], fds[3])
            else:
                null = [os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC) for _ in range(3)]
                fds.extend(null)
                stdio = tuple(null)
        else:
            stdio = (fds[1], fds[2], fds[3])
            extra = fds[4] if len(fds) == 5 else -1
        egress_r, egress_w = egress_channel(spec)
        try:
            join = cg.join_paths()
            pid = os.fork()
        except Exception as e:  # noqa: BLE001
            os.close(status_r)
            os.close(status_w)
            for sock in (ctl, theirs):
                if sock is not None:
                    sock.close()
            for sock in (egress_r, egress_w):
                if sock is not None:
                    sock.close()
            self._remove_cgroup(cg)
            self.send(ev="finished", run_id=run_id, setup_error=f"launcher: fork: {e}", clean=True)
            return
        if pid == 0:
            try:
                child.keeper(spec, stdio, status_w, join, self.staging, self.cap_last, extra,
                             egress_w.fileno() if egress_w is not None else -1)
            finally:
                os._exit(child.SETUP_FAILED)
        os.close(status_w)
        pidfd = os.pidfd_open(pid)
        run = Run(spec, cg, pid, pidfd, status_r)
        if session and not pooled:
            theirs.close()
            ctl.setblocking(False)
            run.ctl = ctl
            run.deadline = time.monotonic() + spec.lifetime + SETUP_GRACE
            self.sel.register(ctl, selectors.EVENT_READ, lambda _f, r=run: self.on_call_event(r))
        elif pooled:  # no wall clock until a run claims it; init only ever reads its control socket
            theirs.close()
            run.ctl = ctl
            run.deadline = float("inf")
        if egress_w is not None:
            egress_w.close()
            run.egress_r = egress_r
            self.sel.register(egress_r, selectors.EVENT_READ, lambda _f, r=run: self.on_egress(r))
        self.runs[run_id] = run
        os.set_blocking(status_r, False)
        self.sel.register(status_r, selectors.EVENT_READ, lambda _f, r=run: self.on_status(r))
        self.sel.register(pidfd, selectors.EVENT_READ, lambda _f, r=run: self.on_exit(r))
        heapq.heappush(self.timers, (run.deadline, run_id))

    def handle_call(self, msg: dict, fds: list[int]) -> None:
        """Relay a command to a session's init, with its fds (closed here afterwards by on_control)."""
        run = self.runs.get(msg.get("run_id", ""))
        call = msg.get("call") or {}
        if (run is None or run.ctl is None or run.kill_reason is not None or not run.spec.session
                or run.spec.pooled):
            self.send(ev="call", run_id=msg.get("run_id"), msg={"ev": "call_failed", "id": call.get("id", ""),
                                                                "step": "launcher", "error": "the session is gone"})
            return
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        try:
            run.ctl.sendmsg([json.dumps(call).encode()], anc)
        except OSError as e:
            self.send(ev="call", run_id=run.spec.run_id, msg={"ev": "call_failed", "id": call.get("id", ""),
                                                              "step": "launcher", "error": f"init: {e}"})

    def handle_claim(self, msg: dict, fds: list[int]) -> None:
        """Give a pooled sandbox its one run: the run takes the pooled Run's place under its own id (the cgroup
        keeps its name, which nothing inside the sandbox can see: it has its own cgroup namespace), its wall clock
        starts as a cold run's would, and init gets the spec and the run's pipes (closed here afterwards by
        on_control). From then on it is an ordinary one-shot run."""
        pool_id, run_id = str(msg.get("pool_id", "")), str(msg.get("run_id", ""))
        run = self.runs.get(pool_id)
        try:
            if run is None or not run.spec.pooled or run.ctl is None or run.kill_reason is not None:
                raise ValueError(f"pooled sandbox {pool_id!r} is gone")
            spec = RunSpec.from_json(_read_fd(fds[0])) if fds else None
            # A run using the prestarted interpreter brings its spec (and collect pipe) only, a session its spec.
            expected = (1,) if spec is not None and spec.session else (1, 2) if spec is not None and spec.prestart \
                else (4, 5)
            if spec is None or run_id in self.runs or run_id in self.removing or len(fds) not in expected:
                raise ValueError(f"bad claim: run id in use or {len(fds)} fds")
            if (spec.run_id != run_id or spec.pooled or spec.session != run.spec.session
                    or (spec.uid, spec.gid) != (run.spec.uid, run.spec.gid) or sandbox_key(spec) != sandbox_key(run.spec)):
                raise ValueError("the run does not fit the pooled sandbox (uid or root filesystem differ)")
            if spec.prestart and (spec.prestart != run.spec.prestart or prestart_key(spec) != prestart_key(run.spec)):
                raise ValueError("the run does not fit the prestarted interpreter (argv, env, seccomp or stack differ)")
            limits = cgroups.CgroupLimits(spec.limits.memory, spec.limits.pids, spec.limits.cpus)
            if limits != cgroups.CgroupLimits(run.spec.limits.memory, run.spec.limits.pids, run.spec.limits.cpus):
                self.driver.relimit(run.cgroup, limits)
        except Exception as e:  # noqa: BLE001 - the run fails closed
            # The daemon took that sandbox out of its pool, so nobody else will claim it: it goes. Its uid is
            # free again at once unless a prestarted interpreter runs as that uid (it is dying meanwhile); init
            # and a session's zygote are root.
            pooled = run is not None and run.spec.pooled
            self.send(ev="finished", run_id=run_id, setup_error=f"launcher: pool: {type(e).__name__}: {e}",
                      clean=not (pooled and run.spec.prestart))
            if pooled:
                self.handle_kill(pool_id, "cancelled")
            return
        del self.runs[pool_id]
        run.spec, run.forked_at = spec, time.time()
        run.deadline = time.monotonic() + (spec.lifetime if spec.session else spec.limits.wall_time) + SETUP_GRACE
        heapq.heappush(self.timers, (run.deadline, run_id))
        self.runs[run_id] = run
        ctl, run.ctl = run.ctl, None
        try:
            ctl.sendmsg([b'{"op": "claim"}'], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
        except OSError as e:
            run.setup_error = f"pool: the sandbox is gone: {e}"
            self.handle_kill(run_id, "cancelled")
            ctl.close()
            return
        if spec.session:  # the session's calls go over the same socket from now on
            ctl.setblocking(False)
            run.ctl = ctl
            self.sel.register(ctl, selectors.EVENT_READ, lambda _f, r=run: self.on_call_event(r))
        else:
            ctl.close()

    def on_call_event(self, run: Run) -> None:
        try:
            data, anc, _flags, _addr = run.ctl.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS * 4))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, anc = b"", []
        fds = _fds.received(anc)
        try:
            if not data:  # init is gone; on_exit reports the session's end
                self.sel.unregister(run.ctl)
                return
            try:
                msg = json.loads(data)
            except ValueError:
                return
            if msg.get("ev") == "call_exit" and msg.get("signal") == signal.SIGSYS and self.kmsg is not None:
                self.kmsg.drain()
                msg["seccomp_kill"] = self.kmsg.seccomp_kills.pop(run.spec.uid, None)
            if msg.get("ev") in ("call_started", "call_exit"):
                # The daemon tells an OOM kill of a call from the cgroup's counter before and after it.
                try:
                    usage = run.cgroup.usage()
                    msg.update(oom_kills=usage.oom_kills, peak_memory=usage.peak_memory)
                except cgroups.CgroupError:
                    pass
            self.send(fds, ev="call", run_id=run.spec.run_id, msg=msg)
        finally:
            for fd in fds:
                os.close(fd)

    def handle_kill(self, run_id: str, reason: str) -> None:
        run = self.runs.get(run_id)
        if run is None:
            return
        run.kill_reason = run.kill_reason or reason
        try:
            run.cgroup.kill()
        except cgroups.CgroupError as e:
            log.error("run %s: kill failed: %s; killing the keeper", run_id, e)
            os.kill(run.pid, signal.SIGKILL)

    def on_egress(self, run: Run) -> None:
        """Pass the run's proxy listeners (explicit, then transparent) on to the daemon, once; the launcher keeps
        no copy."""
        if run.egress_r is None:  # the run ended earlier in the same select() batch
            return
        try:
            _msg, fds, _flags, _addr = socket.recv_fds(run.egress_r, 64, 2, socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            return
        except OSError:
            fds = []
        self._close_egress(run)
        if fds:
            try:
                self.send(fds=fds[:2], ev="egress", run_id=run.spec.run_id)
            finally:
                for fd in fds:
                    os.close(fd)

    def _close_egress(self, run: Run) -> None:
        if run.egress_r is not None:
            self.sel.unregister(run.egress_r)
            run.egress_r.close()
            run.egress_r = None

    def on_status(self, run: Run) -> None:
        if run.status_r < 0:  # on_exit already drained and closed it earlier in the same select() batch
            return
        try:
            data = os.read(run.status_r, 65536)
        except BlockingIOError:
            return
        if not data:
            self.sel.unregister(run.status_r)
            os.close(run.status_r)
            run.status_r = -1
            return
        run.buf += data
        self._consume(run)

    def _consume(self, run: Run) -> None:
        while b"\n" in run.buf:
            line, run.buf = run.buf.split(b"\n", 1)
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            ev = msg.pop("ev", None)
            if ev == "pooled" and run.spec.pooled:
                self.send(ev="started", run_id=run.spec.run_id, at=time.time())
            elif ev == "ready" and run.spec.session and run.exec_at is None:
                run.exec_at = time.time()
                # A backstop only: the daemon closes the session at its lifetime; this ends it if the daemon
                # could not (SETUP_GRACE later, so the daemon's own close, with its reason, comes first).
                run.deadline = time.monotonic() + run.spec.lifetime + SETUP_GRACE
                heapq.heappush(self.timers, (run.deadline, run.spec.run_id))
                self.send(ev="started", run_id=run.spec.run_id, at=run.exec_at)
            elif ev == "exec" and run.exec_at is None:
                run.exec_at = time.time()
                run.landlock = msg.get("landlock")
                run.deadline = time.monotonic() + run.spec.limits.wall_time
                heapq.heappush(self.timers, (run.deadline, run.spec.run_id))
                self.send(ev="started", run_id=run.spec.run_id, at=run.exec_at)
            elif ev == "setup_failed":
                run.setup_error = f"{msg.get('step')}: {msg.get('error')}"
            elif ev == "exit":
                run.exit = msg

    def on_exit(self, run: Run) -> None:
        if run.spec.run_id not in self.runs:  # already finished earlier in the same select() batch
            return
        os.waitpid(run.pid, 0)
        if run.status_r >= 0:  # drain what init wrote before it died
            self.sel.unregister(run.status_r)
            os.set_blocking(run.status_r, True)
            run.buf += child._read_all(run.status_r)
            os.close(run.status_r)
            run.status_r = -1
            self._consume(run)
        self.sel.unregister(run.pidfd)
        os.close(run.pidfd)
        if run.ctl is not None:
            try:
                self.sel.unregister(run.ctl)
            except (KeyError, ValueError):
                pass
            run.ctl.close()
        self._close_egress(run)
        ended = time.time()
        sigsys = None
        if self.kmsg is not None:
            if run.exit.get("signal") == signal.SIGSYS:
                self.kmsg.drain()  # the record may still be in flight
            # Taken in every case, so a record of a killed child never outlives its run (uids are reused).
            kill = self.kmsg.seccomp_kills.pop(run.spec.uid, None)
            sigsys = kill if run.exit.get("signal") == signal.SIGSYS else None
        try:
            usage = run.cgroup.usage()
        except cgroups.CgroupError:
            usage = cgroups.Usage(0, 0, 0)
        del self.runs[run.spec.run_id]
        self.removing[run.spec.run_id] = Removal(run.cgroup, dict(
            run_id=run.spec.run_id, setup_error=run.setup_error, kill_reason=run.kill_reason,
            exit_code=run.exit.get("code"), signal=run.exit.get("signal"), cpu_ns=usage.cpu_ns,
            peak_memory=usage.peak_memory, oom_kills=usage.oom_kills, forked_at=run.forked_at,
            exec_at=run.exec_at, ended_at=ended, seccomp_kill=sigsys, landlock_abi=run.landlock))
        self._try_removal(run.spec.run_id)

    def _try_removal(self, run_id: str) -> None:
        """One non-blocking attempt at a finished run's cgroup; "finished" goes out when it is gone or given up."""
        r = self.removing[run_id]
        try:
            gone = r.cgroup.try_remove()
        except cgroups.CgroupError as e:
            gone, r.error = False, str(e)
        now = time.monotonic()
        if not gone and now < r.give_up:
            r.next_at, r.interval = now + r.interval, min(r.interval * 2, REMOVE_RETRY_MAX)
            return
        if not gone:
            log.error("cgroup of run %s not removed within %ss: %s", run_id, REMOVE_PATIENCE, r.error)
        del self.removing[run_id]
        self.send(ev="finished", **r.finished, clean=gone)

    def _remove_cgroup(self, cg) -> bool:
        try:
            cg.remove()
            return True
        except cgroups.CgroupError as e:
            log.error("cgroup of run %s not removed: %s", cg.run_id, e)
            return False

    def tick(self) -> None:
        now = time.monotonic()
        for run_id in [i for i, r in self.removing.items() if r.next_at <= now]:
            self._try_removal(run_id)
        while self.timers and self.timers[0][0] <= now:
            deadline, run_id = heapq.heappop(self.timers)
            run = self.runs.get(run_id)
            if run is not None and run.deadline <= now and run.kill_reason is None:
                self.handle_kill(run_id, "timeout")
        for run_id, run in list(self.runs.items()):
            # A session's CPU is bounded per process (RLIMIT_CPU) and by its cgroup's bandwidth, not in total.
            if run.kill_reason is None and run.exec_at is not None and not run.spec.session:
                try:
                    if run.cgroup.cpu_ns() > run.spec.limits.cpu_time * 1e9:
                        self.handle_kill(run_id, "cpu_time")
                except cgroups.CgroupError:
                    pass


class KernelLog:
    """Seccomp kills as the kernel reports them (audit type=1326 records in /dev/kmsg), keyed by uid.

    A run's uid is unique among live runs, so a record carrying it names the syscall that killed that run
    without mapping pids across namespaces. Best effort: records can be rate-limited or missing (no /dev/kmsg
    in a container); the outcome is then still "signaled, SIGSYS", just without the syscall's name."""

    PATTERN = re.compile(rb"type=1326 .*?\buid=(\d+) .*?\bsig=31 arch=([0-9a-f]+) syscall=(\d+)")

    def __init__(self, fd: int):
        self.fd = fd
        self.seccomp_kills: dict[int, dict] = {}

    @classmethod
    def open(cls) -> "KernelLog | None":
        try:
            fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.lseek(fd, 0, os.SEEK_END)  # only what happens from now on
        except OSError:
            return None
        return cls(fd)

    def drain(self) -> None:
        while True:
            try:
                record = os.read(self.fd, 8192)
            except BlockingIOError:
                return
            except BrokenPipeError:  # the ring buffer overran us: skip ahead
                continue
            except OSError:
                return
            m = self.PATTERN.search(record)
            if m:
                uid, arch, nr = int(m.group(1)), m.group(2).decode(), int(m.group(3))
                if len(self.seccomp_kills) > 4096:
                    self.seccomp_kills.clear()
                self.seccomp_kills[uid] = {"arch": arch, "nr": nr}


def egress_channel(spec: RunSpec) -> tuple[socket.socket | None, socket.socket | None]:
    """The step that readies egress for a run before fork, also for a session: a channel on which the run's
    init sends its proxy listener (see child.setup_egress). None, None for a run without egress."""
    if spec.network != "egress":
        return None, None
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    ours.setblocking(False)
    return ours, theirs


def _read_fd(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="sandboxd-launcher")
    p.add_argument("--fd", type=int, required=True, help="the control socket inherited from the daemon")
    p.add_argument("--staging", required=True, help="an empty root-only directory to assemble roots on")
    p.add_argument("--cgroup-parent-name", default="sandboxd")
    p.add_argument("--cgroup-parent-path", default=None)
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--log-format", default="text", choices=("text", "json"))
    args = p.parse_args(argv)
    from .. import logs  # the daemon's formatters, so both processes write one log format
    logs.setup(args.log_level, args.log_format)
    if os.uname().machine != "x86_64":
        sys.exit("sandboxd launcher: only x86_64 is supported")
    sock = socket.socket(fileno=args.fd)
    sock.setblocking(False)
    try:
        driver = cgroups.detect(args.cgroup_parent_name, args.cgroup_parent_path)
        driver.setup()
        stale = driver.recover()
        if stale:
            log.warning("removed cgroups of %d runs left by a previous launcher: %s", len(stale), stale)
    except Exception as e:  # noqa: BLE001
        sock.setblocking(True)
        sock.send(json.dumps({"ev": "failed", "error": f"cgroups: {type(e).__name__}: {e}"}).encode())
        sys.exit(1)
    ForkServer(sock, driver, args.staging).serve()


if __name__ == "__main__":
    main()
