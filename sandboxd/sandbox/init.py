"""pid 1 of a session: a small command server that starts each call's process inside the sandbox it keeps alive.

Runs in the session's init (forked by the keeper, see child.py), after hostname, loopback and the root filesystem
are in place. Instead of one payload it serves commands from the launcher over `ctl` (a SOCK_SEQPACKET socket
inherited before any untrusted code existed; no payload ever holds it):

    launcher -> init   {"op": "exec", "id", "argv", "env", "cwd", "tty", "rows", "cols", "extra"}
                            + fds [stdin, stdout, stderr] (+ [fd 3] when "extra"); none with "tty"
                       {"op": "file", "id", "req": {...}} + fds [in, out]      (the file agent, files.py)
                       {"op": "signal", "id", "sig", "group"}
    init -> launcher   {"ev": "call_started", "id", "pid"} (+ the terminal's master fd with "tty")
                       {"ev": "call_failed", "id", "step", "error"}  (an isolation step failed: nothing ran)
                       {"ev": "call_exit", "id", "code" | "signal", "cpu_ns", "maxrss"}

Every call's process goes through the same steps as a one-shot payload, in the same order: oom_score_adj,
rlimits, credentials (its own session and process group), closed descriptors, Landlock, seccomp, then exec (or,
for the file agent, our own code). A step that fails is reported and the call never runs: fail closed. A program
that cannot be found or executed is not a setup failure: it exits 127 or 126 with a shell's message, as `sh`
would. Init reaps every process of the session (orphans are reparented to it); when the launcher's end of `ctl`
closes, init exits and the kernel kills everything left in the pid namespace.
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

from . import _libc, creds, files, landlock, rlimits, seccomp
from .spec import RunSpec

MAX_FDS = 8
TIOCSPTLCK = 0x40045431
TIOCGPTPEER = 0x5441
PAYLOAD_OOM_SCORE = "1000"


def serve(spec: RunSpec, ctl: socket.socket, report, cap_last: int) -> int:
    """The session's main loop. `report` writes a status line to the launcher (setup, ready)."""
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    calls: dict[int, str] = {}     # pid -> call id
    pids: dict[str, int] = {}      # call id -> pid
    report(ev="ready")
    while True:
        try:
            ready, _, _ = select.select([ctl, wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in ready:
            try:
                while os.read(wake_r, 256):
                    pass
            except BlockingIOError:
                pass
            _reap(ctl, calls, pids)
        if ctl in ready:
            try:
                data, anc, _flags, _addr = ctl.recvmsg(1 << 20, socket.CMSG_SPACE(MAX_FDS * 4))
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data, anc = b"", []
            fds = _fds(anc)
            if not data:
                for fd in fds:
                    os.close(fd)
                return 0
            try:
                _handle(spec, ctl, json.loads(data), fds, calls, pids, cap_last)
            except Exception as e:  # noqa: BLE001 - one bad command must not end the session
                _send(ctl, ev="call_failed", id="", step="init", error=f"{type(e).__name__}: {e}")
            finally:
                for fd in fds:
                    try:
                        os.close(fd)
                    except OSError:
                        pass


def _fds(anc) -> list[int]:
    out = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(payload[: len(payload) - len(payload) % a.itemsize])
            out.extend(a)
    return out


def _send(ctl: socket.socket, fds: list[int] = (), **msg) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    try:
        ctl.sendmsg([json.dumps(msg).encode()], anc)
    except OSError:
        pass


def _reap(ctl, calls: dict, pids: dict) -> None:
    while True:
        try:
            pid, status, ru = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        call = calls.pop(pid, None)
        if call is None:
            continue
        pids.pop(call, None)
        usage = {"cpu_ns": int((ru.ru_utime + ru.ru_stime) * 1e9), "maxrss": ru.ru_maxrss * 1024}
        if os.WIFSIGNALED(status):
            _send(ctl, ev="call_exit", id=call, signal=os.WTERMSIG(status), **usage)
        else:
            _send(ctl, ev="call_exit", id=call, code=os.WEXITSTATUS(status), **usage)


def _handle(spec, ctl, msg: dict, fds: list[int], calls: dict, pids: dict, cap_last: int) -> None:
    op, call = msg.get("op"), str(msg.get("id", ""))
    if op == "signal":
        pid = pids.get(call)
        if pid is not None:
            try:
                (os.killpg if msg.get("group") else os.kill)(pid, int(msg["sig"]))
            except ProcessLookupError:
                pass
        return
    if op not in ("exec", "file") or not call or call in pids:
        _send(ctl, ev="call_failed", id=call, step="init", error=f"bad command {op!r}")
        return
    master = -1
    if op == "exec" and msg.get("tty"):
        master = os.open("/.sandboxd/pts/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
        slave = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY)  # the peer, without a path lookup
        _winsize(master, msg.get("rows") or 24, msg.get("cols") or 80)
        os.fchown(slave, spec.uid, spec.gid)
        stdio = {0: slave, 1: slave, 2: slave}
        fds.append(slave)
    elif op == "exec":
        if len(fds) < 3:
            raise ValueError(f"exec: expected 3 or 4 fds, got {len(fds)}")
        stdio = {0: fds[0], 1: fds[1], 2: fds[2]}
        if msg.get("extra") and len(fds) > 3:
            stdio[3] = fds[3]
    else:
        if len(fds) != 2:
            raise ValueError(f"file: expected 2 fds, got {len(fds)}")
        stdio = {}
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(err_r)
        try:
            ctl.close()
        except OSError:
            pass
        if op == "exec":
            _exec_payload(spec, msg, stdio, err_w, cap_last)
        _file_payload(spec, msg, fds, err_w, cap_last)
    os.close(err_w)
    failure = _read_all(err_r)
    os.close(err_r)
    if failure:
        try:
            detail = json.loads(failure)
        except ValueError:
            detail = {"step": "unknown", "error": failure[:200].decode(errors="replace")}
        _send(ctl, ev="call_failed", id=call, step=detail.get("step"), error=detail.get("error"))
        if master >= 0:
            os.close(master)
        return  # the child has exited or will; it is reaped without a report
    calls[pid], pids[call] = call, pid
    _send(ctl, [master] if master >= 0 else [], ev="call_started", id=call, pid=pid)
    if master >= 0:
        os.close(master)


def _winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", int(rows), int(cols), 0, 0))


def _common_steps(spec: RunSpec, keep: set[int], cap_last: int, step: list) -> None:
    """The payload's isolation steps, in one-shot order; `step[0]` names the step in progress."""
    step[0] = "oom_score_adj"
    # The OOM killer must pick a call's processes, never init: the session survives its calls.
    fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, PAYLOAD_OOM_SCORE.encode())
    finally:
        os.close(fd)
    step[0] = "rlimits"
    rlimits.apply(spec.limits)
    step[0] = "credentials"
    creds.apply(spec.uid, spec.gid, cap_last)
    step[0] = "close_fds"
    _close_fds_except(keep)
    step[0] = "landlock"
    landlock.apply(["/tmp", spec.workdir, "/dev/shm"], min_abi=spec.landlock_min_abi)


def _exec_payload(spec: RunSpec, msg: dict, stdio: dict[int, int], err_w: int, cap_last: int) -> None:
    step = ["stdio"]
    try:
        _libc.prctl(_libc.PR_SET_PDEATHSIG, signal.SIGKILL)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        _install(stdio, err_w)
        if not msg.get("tty"):
            for target in (0, 1, 2):  # the call owns its pipes: `echo > /dev/stdout` works as usual
                os.fchown(target, spec.uid, spec.gid)
        keep = {*range(max(stdio) + 1), err_w}
        _common_steps(spec, keep, cap_last, step)
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


def _file_payload(spec: RunSpec, msg: dict, fds: list[int], err_w: int, cap_last: int) -> None:
    step = ["stdio"]
    try:
        _libc.prctl(_libc.PR_SET_PDEATHSIG, signal.SIGKILL)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        in_fd, out_fd = fds
        _common_steps(spec, {in_fd, out_fd, err_w}, cap_last, step)
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


def _close_fds_except(keep: set[int]) -> None:
    low = 0
    for fd in sorted(keep):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except InterruptedError:
            continue
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
