"""pid 1 of a session: a small command server that starts each call's process inside the sandbox it keeps alive.

Runs in the session's init (forked by the keeper, see child.py), after hostname, loopback and the root filesystem
are in place. Two processes serve the session:

    init (root, no Landlock)      relays commands from the launcher, opens terminals, signals calls, reaps orphans
      `- zygote (root, Landlock)  forks every call's process, reaps it and reports its exit
           `- call              rlimits -> credentials (own session) -> closed fds -> seccomp -> exec (or file agent)

Why a zygote: Landlock scopes ptrace, signals and abstract unix sockets to a domain, and /proc (hidepid) shows
only what ptrace may read. If every call entered a domain of its own, a later call could not see, signal or
connect to what an earlier one left running in the background. The zygote enters the session's one domain once;
every call inherits it, exactly as every process of a one-shot run shares one. It stays root (so no payload can
signal or trace it) and runs nothing but sandboxd's own code; it has no seccomp filter, the calls have.

Protocol with the launcher over `ctl` (a SOCK_SEQPACKET socket inherited before any untrusted code existed; no
payload ever holds it):

    launcher -> init   {"op": "exec", "id", "argv", "env", "cwd", "tty", "rows", "cols", "extra"}
                            + fds [stdin, stdout, stderr] (+ [fd 3] when "extra"); none with "tty"
                       {"op": "file", "id", "req": {...}} + fds [in, out]      (the file agent, files.py)
                       {"op": "signal", "id", "sig", "group"}
    init -> launcher   {"ev": "call_started", "id", "pid"} (+ the terminal's master fd with "tty")
                       {"ev": "call_failed", "id", "step", "error"}  (an isolation step failed: nothing ran)
                       {"ev": "call_exit", "id", "code" | "signal", "cpu_ns", "maxrss"}

A step that fails is reported and the call never runs: fail closed. A program that cannot be found or executed is
not a setup failure: it exits 127 or 126 with a shell's message, as `sh` would. If the zygote dies, init reaps the
calls it leaves (they are reparented to init) and starts a new zygote. When the launcher's end of `ctl` closes,
init exits and the kernel kills everything left in the pid namespace.
"""
from __future__ import annotations

import array
import errno
import fcntl
import json
import os
import select
import signal
import socket
import struct
import termios

from . import _fds as _fdpass, _libc, creds, files, landlock, rlimits, rootfs, seccomp
from .spec import RunSpec, sandbox_key

MAX_FDS = 8
TIOCSPTLCK = 0x40045431
TIOCGPTPEER = 0x5441
PAYLOAD_OOM_SCORE = "1000"


def serve(spec: RunSpec, ctl: socket.socket, report, cap_last: int, zygote_pair=None) -> int:
    """The session's main loop. `report` writes a status line to the launcher (setup, ready)."""
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    state = _Init(spec, ctl, cap_last)
    failure = state.spawn_zygote(zygote_pair)
    if failure:
        report(ev="setup_failed", step=failure.get("step"), error=failure.get("error"))
        return 1
    if spec.pooled:
        report(ev="pooled")
        try:
            if not state.await_claim():
                return 0
        except Exception as e:  # noqa: BLE001 - fail closed: the session never becomes ready
            report(ev="setup_failed", step="claim", error=f"{type(e).__name__}: {e}")
            return 1
    report(ev="ready", landlock=state.landlock)
    while True:
        try:
            ready, _, _ = select.select([ctl, wake_r] + ([state.zygote_sock] if state.zygote_sock else []), [], [])
        except InterruptedError:
            continue
        if wake_r in ready:
            _drain(wake_r)
            state.reap()
        if state.zygote_sock is not None and state.zygote_sock in ready:
            state.from_zygote()
        if ctl in ready:
            try:
                data, anc, _flags, _addr = ctl.recvmsg(1 << 20, socket.CMSG_SPACE(MAX_FDS * 4))
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data, anc = b"", []
            fds = _fds(anc)
            if not data:
                _close(fds)
                return 0
            try:
                state.command(json.loads(data), fds)
            except Exception as e:  # noqa: BLE001 - one bad command must not end the session
                _send(ctl, ev="call_failed", id="", step="init", error=f"{type(e).__name__}: {e}")
            finally:
                _close(fds)


class _Init:
    def __init__(self, spec: RunSpec, ctl: socket.socket, cap_last: int):
        self.spec, self.ctl, self.cap_last = spec, ctl, cap_last
        self.zygote = -1
        self.zygote_sock: socket.socket | None = None
        self.landlock = 0
        self.pids: dict[str, int] = {}      # call id -> pid (for signals, and to report calls the zygote left)
        self.calls: dict[int, str] = {}     # pid -> call id
        self.masters: dict[str, int] = {}   # call id -> terminal master, sent with call_started

    def await_claim(self) -> bool:
        """A pooled session sandbox, built up to its zygote, waits for the session that claims it: that
        session's spec (same uid and sandbox_key, checked here too) replaces the template's, its files are
        written as root into the fresh /work (no call has run yet), and the zygote gets the spec for the calls'
        rlimits. False if the launcher drained it instead."""
        msg, fds = _recv(self.ctl)
        if not msg:
            return False
        try:
            if msg.get("op") != "claim" or len(fds) != 1:
                raise ValueError(f"expected a claim with 1 fd, got {msg.get('op')!r} with {len(fds)}")
            os.lseek(fds[0], 0, os.SEEK_SET)
            spec = RunSpec.from_json(_read_all(fds[0]))
            template = self.spec
            if (not spec.session or spec.pooled or (spec.uid, spec.gid) != (template.uid, template.gid)
                    or sandbox_key(spec) != sandbox_key(template) or spec.landlock_min_abi != template.landlock_min_abi):
                raise ValueError("the session does not fit this pooled sandbox")
            rootfs.write_files(spec, spec.workdir)
            self.spec = spec
            _send(self.zygote_sock, [fds[0]], op="spec")
            answer, _ = _recv(self.zygote_sock)
            if answer.get("ev") != "spec":
                raise RuntimeError(f"the zygote did not take the session's spec: {answer}")
        finally:
            _close(fds)
        return True

    def spawn_zygote(self, pair=None) -> dict | None:
        ours, theirs = pair or socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            ours.close()
            self.ctl.close()
            _zygote(self.spec, theirs, self.cap_last)
        theirs.close()
        msg, _ = _recv(ours)   # {"ev": "zygote", "landlock": abi} or setup_failed
        if msg.get("ev") != "zygote":
            ours.close()
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            return msg or {"step": "zygote", "error": "the zygote exited during set-up"}
        self.zygote, self.zygote_sock, self.landlock = pid, ours, int(msg.get("landlock") or 0)
        return None

    def command(self, msg: dict, fds: list[int]) -> None:
        op, call = msg.get("op"), str(msg.get("id", ""))
        if op == "signal":
            pid = self.pids.get(call)
            if pid is not None:
                try:
                    (os.killpg if msg.get("group") else os.kill)(pid, int(msg["sig"]))
                except (ProcessLookupError, PermissionError):
                    pass
            return
        if op not in ("exec", "file") or not call or call in self.pids or call in self.masters:
            _send(self.ctl, ev="call_failed", id=call, step="init", error=f"bad command {op!r}")
            return
        send = list(fds)
        if op == "exec" and msg.get("tty"):
            master = os.open("/.sandboxd/pts/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
            fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
            slave = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY)  # the peer, without a path lookup
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", int(msg.get("rows") or 24),
                                                                 int(msg.get("cols") or 80), 0, 0))
            os.fchown(slave, self.spec.uid, self.spec.gid)
            self.masters[call] = master
            send = [slave]
            fds.append(slave)   # closed by the caller once sent
        elif op == "exec":
            if len(fds) < 3:
                raise ValueError(f"exec: expected 3 or 4 fds, got {len(fds)}")
            # The call owns its own pipes, so `echo > /dev/stdout` (a reopen through /proc) works as usual.
            for fd in fds[:3]:
                os.fchown(fd, self.spec.uid, self.spec.gid)
        elif len(fds) != 2:
            raise ValueError(f"file: expected 2 fds, got {len(fds)}")
        if self.zygote_sock is None:
            self._respawn()
        if self.zygote_sock is None:
            self._forward({"ev": "call_failed", "id": call, "step": "zygote", "error": "no zygote"})
            return
        _send(self.zygote_sock, send, **msg)

    def from_zygote(self) -> None:
        msg, fds = _recv(self.zygote_sock)
        _close(fds)
        if not msg:  # the zygote is gone; reap() notices and starts another
            return
        self._forward(msg)

    def _forward(self, msg: dict) -> None:
        ev, call = msg.get("ev"), str(msg.get("id", ""))
        master = self.masters.pop(call, -1) if ev in ("call_started", "call_failed") else -1
        if ev == "call_started":
            pid = int(msg.get("pid") or 0)
            self.pids[call], self.calls[pid] = pid, call
        elif ev == "call_exit":
            pid = self.pids.pop(call, None)
            self.calls.pop(pid, None)
        _send(self.ctl, [master] if master >= 0 and ev == "call_started" else [], **msg)
        if master >= 0:
            os.close(master)

    def reap(self) -> None:
        while True:
            try:
                pid, status, ru = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.zygote:
                self._zygote_died()
                continue
            call = self.calls.get(pid)
            if call is not None:  # a call the dead zygote left: init reports it
                self._forward(_exit_msg(call, status, ru))

    def _zygote_died(self) -> None:
        self.zygote = -1
        if self.zygote_sock is not None:
            self.zygote_sock.close()
            self.zygote_sock = None
        for call, master in list(self.masters.items()):
            self._forward({"ev": "call_failed", "id": call, "step": "zygote", "error": "the zygote died"})
        self._respawn()

    def _respawn(self) -> None:
        """A new zygote; if that fails now (e.g. no memory), the next call tries again: the session lives on."""
        try:
            if self.spawn_zygote():
                self.zygote_sock = None
        except OSError:
            self.zygote, self.zygote_sock = -1, None


def _zygote(spec: RunSpec, sock: socket.socket, cap_last: int) -> None:
    """Never returns. Enters the session's Landlock domain once, then forks every call."""
    code = 1
    try:
        _libc.prctl(_libc.PR_SET_PDEATHSIG, signal.SIGKILL)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        step = "oom_score_adj"
        try:
            # The OOM killer must pick a call's processes, never init or the zygote (a fork of the launcher's
            # Python, larger than most calls): the zygote keeps 0 and raises itself to 1000 only around each
            # fork, so every call inherits 1000. The descriptor is opened before Landlock, which checks paths
            # when they are opened and would refuse /proc afterwards.
            oom = os.open("/proc/self/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
            os.pwrite(oom, b"0", 0)
            step = "landlock"
            abi = landlock.apply(["/tmp", spec.workdir, "/dev/shm"], min_abi=spec.landlock_min_abi)
        except BaseException as e:  # noqa: BLE001 - fail closed: no call ever runs with less isolation
            _send(sock, ev="setup_failed", step=step, error=f"{type(e).__name__}: {e}")
            os._exit(1)
        _send(sock, ev="zygote", landlock=abi)
        calls: dict[int, str] = {}
        while True:
            try:
                ready, _, _ = select.select([sock, wake_r], [], [])
            except InterruptedError:
                continue
            if wake_r in ready:
                _drain(wake_r)
                while True:
                    try:
                        pid, status, ru = os.wait4(-1, os.WNOHANG)
                    except ChildProcessError:
                        break
                    if pid == 0:
                        break
                    if pid in calls:
                        _send(sock, **_exit_msg(calls.pop(pid), status, ru))
            if sock in ready:
                msg, fds = _recv(sock)
                if not msg:
                    code = 0
                    break
                if msg.get("op") == "spec":  # a pooled session's, once: init checked it fits
                    try:
                        os.lseek(fds[0], 0, os.SEEK_SET)
                        new = RunSpec.from_json(_read_all(fds[0]))
                        if not spec.pooled or (new.uid, new.gid) != (spec.uid, spec.gid):
                            raise ValueError("not a pooled zygote, or another uid")
                        spec = new
                        _send(sock, ev="spec")
                    except Exception as e:  # noqa: BLE001
                        _send(sock, ev="setup_failed", step="spec", error=f"{type(e).__name__}: {e}")
                    finally:
                        _close(fds)
                    continue
                try:
                    _fork_call(spec, sock, msg, fds, calls, cap_last, oom)
                except Exception as e:  # noqa: BLE001
                    _send(sock, ev="call_failed", id=str(msg.get("id", "")), step="zygote",
                          error=f"{type(e).__name__}: {e}")
                finally:
                    _close(fds)
    except BaseException:  # noqa: BLE001
        pass
    os._exit(code)


def _fork_call(spec: RunSpec, sock, msg: dict, fds: list[int], calls: dict, cap_last: int, oom: int) -> None:
    call = str(msg.get("id", ""))
    zygote_pid = os.getpid()
    if msg.get("op") == "exec":
        stdio = {0: fds[0], 1: fds[0], 2: fds[0]} if msg.get("tty") else {0: fds[0], 1: fds[1], 2: fds[2]}
        if not msg.get("tty") and msg.get("extra") and len(fds) > 3:
            stdio[3] = fds[3]
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    os.pwrite(oom, PAYLOAD_OOM_SCORE.encode(), 0)   # inherited by the call...
    try:
        pid = os.fork()
    finally:
        if os.getpid() == zygote_pid:
            os.pwrite(oom, b"0", 0)                     # ...not kept by the zygote
    if pid == 0:
        os.close(err_r)
        sock.close()
        if msg.get("op") == "exec":
            _exec_payload(spec, msg, stdio, err_w, cap_last)
        _file_payload(spec, msg, fds, err_w, cap_last, in_domain=True)
    os.close(err_w)
    failure = _read_all(err_r)
    os.close(err_r)
    if failure:
        try:
            detail = json.loads(failure)
        except ValueError:
            detail = {"step": "unknown", "error": failure[:200].decode(errors="replace")}
        _send(sock, ev="call_failed", id=call, step=detail.get("step"), error=detail.get("error"))
        return  # the child has exited or will; it is reaped without a report
    calls[pid] = call
    _send(sock, ev="call_started", id=call, pid=pid)


def _exit_msg(call: str, status: int, ru) -> dict:
    usage = {"cpu_ns": int((ru.ru_utime + ru.ru_stime) * 1e9), "maxrss": ru.ru_maxrss * 1024}
    if os.WIFSIGNALED(status):
        return {"ev": "call_exit", "id": call, "signal": os.WTERMSIG(status), **usage}
    return {"ev": "call_exit", "id": call, "code": os.WEXITSTATUS(status), **usage}


def _child_steps(spec: RunSpec, keep: set[int], cap_last: int, step: list) -> None:
    """A call's own isolation steps, in one-shot order (the zygote already applied oom score and Landlock)."""
    step[0] = "rlimits"
    rlimits.apply(spec.limits)
    step[0] = "credentials"
    creds.apply(spec.uid, spec.gid, cap_last)
    step[0] = "close_fds"
    _close_fds_except(keep)


def _exec_payload(spec: RunSpec, msg: dict, stdio: dict[int, int], err_w: int, cap_last: int) -> None:
    step = ["stdio"]
    try:
        _libc.prctl(_libc.PR_SET_PDEATHSIG, signal.SIGKILL)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        _install(stdio, err_w)
        _child_steps(spec, {*range(max(stdio) + 1), err_w}, cap_last, step)
        if msg.get("tty"):
            step[0] = "tty"
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        step[0] = "cwd"
        cwd = msg.get("cwd") or spec.workdir
        try:
            os.chdir(cwd)
        except OSError as e:
            os.write(2, f"sandboxd: cd: {cwd}: {e.strerror}\n".encode())
            os._exit(1)
        step[0] = "seccomp"
        seccomp.apply(spec.seccomp.bpf)
        step[0] = "exec"
        argv = [str(a) for a in msg["argv"]]
        env = {str(k): str(v) for k, v in msg.get("env", {}).items()}
    except BaseException as e:  # noqa: BLE001 - fail closed: report and never run the command
        try:
            os.write(err_w, json.dumps({"step": step[0], "error": f"{type(e).__name__}: {e}"}).encode()[:4000])
        finally:
            os._exit(127)
    try:
        os.execvpe(argv[0], argv, env)
    except BaseException as e:  # noqa: BLE001 - as a shell reports it: 127 not found, 126 not executable
        code = 127 if isinstance(e, FileNotFoundError) or getattr(e, "errno", 0) == errno.ENOTDIR else 126
        what = "command not found" if code == 127 and "/" not in argv[0] else getattr(e, "strerror", None) or str(e)
        try:
            os.close(err_w)
            os.write(2, f"sandboxd: {argv[0]}: {what}\n".encode(errors="replace"))
        finally:
            os._exit(code)


def _file_payload(spec: RunSpec, msg: dict, fds: list[int], err_w: int, cap_last: int,
                  in_domain: bool = False) -> None:
    """The file agent. `in_domain`: forked by the zygote (oom score and Landlock inherited); otherwise (a one-shot
    run's collection, forked by its init) it applies them itself."""
    step = ["stdio"]
    try:
        _libc.prctl(_libc.PR_SET_PDEATHSIG, signal.SIGKILL)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        in_fd, out_fd = fds
        if not in_domain:
            step[0] = "oom_score_adj"
            _write_proc("/proc/self/oom_score_adj", PAYLOAD_OOM_SCORE)
        _child_steps(spec, {in_fd, out_fd, err_w}, cap_last, step)
        if not in_domain:
            step[0] = "landlock"
            landlock.apply(["/tmp", spec.workdir, "/dev/shm"], min_abi=spec.landlock_min_abi)
        step[0] = "seccomp"
        seccomp.apply(spec.seccomp.bpf)
    except BaseException as e:  # noqa: BLE001
        try:
            os.write(err_w, json.dumps({"step": step[0], "error": f"{type(e).__name__}: {e}"}).encode()[:4000])
        finally:
            os._exit(127)
    code = 0
    try:
        os.close(err_w)
        files.serve(msg.get("req") or {}, in_fd, out_fd)
    except BaseException:  # noqa: BLE001
        code = 1
    os._exit(code)


def _drain(fd: int) -> None:
    """Empty a non-blocking wake-up pipe (signals only need to wake the loop)."""
    try:
        while os.read(fd, 256):
            pass
    except BlockingIOError:
        pass


def _write_proc(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


_fds = _fdpass.received


def _recv(sock: socket.socket) -> tuple[dict, list[int]]:
    while True:
        try:
            data, anc, _flags, _addr = sock.recvmsg(1 << 20, socket.CMSG_SPACE(MAX_FDS * 4))
            break
        except InterruptedError:
            continue
        except OSError:
            return {}, []
    fds = _fds(anc)
    if not data:
        _close(fds)
        return {}, []
    try:
        return json.loads(data), fds
    except ValueError:
        _close(fds)
        return {}, []


def _send(sock: socket.socket, fds: list[int] = (), **msg) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    try:
        sock.sendmsg([json.dumps(msg).encode()], anc)
    except OSError:
        pass


def _close(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _install(stdio: dict[int, int], err_w: int) -> None:
    """dup2 each source fd onto its target without clobbering a source not yet moved."""
    top = max(max(stdio) + 1, 3) + 16
    moved = {}
    for target, fd in stdio.items():
        moved[target] = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, max(top, err_w + 1))
    for target, fd in moved.items():
        os.dup2(fd, target, inheritable=True)
    for fd in moved.values():
        os.close(fd)


_close_fds_except = _fdpass.close_all_except


_read_all = _fdpass.read_all
