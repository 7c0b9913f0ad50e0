"""The processes of one run, in the order they are created. Runs in children of the launcher (never in the
daemon): the launcher is single-threaded, so Python after fork() is safe here.

    launcher
      `- keeper   joins the run cgroup, unshares the namespaces, forks init, waits
           `- init      pid 1 of the run: hostname, loopback, root filesystem, then forks the payload,
                `          reports "exec" (or why setup failed), reaps, relays the payload's status, exits
                `- payload  rlimits -> credentials -> close fds -> seccomp (last) -> execve

A run with network = "egress" gets two more steps in init after loopback: `egress_redirect` (transparent mode: a
default route through lo and the nftables rules that redirect every other TCP connection to the proxy and drop
anything else leaving loopback) and `egress` (the proxy's listeners are made inside the run's namespace and sent
to the launcher through `egress_fd`); see sandbox/egress.py. Both run before the payload exists.

A pooled sandbox (spec.pooled, the warm pool) is the same tree stopped after `rootfs`: init reports "pooled" and
waits on `extra_fd` for the one run it will serve (`_await_claim`: that run's spec and pipes), writes the run's
files into /work, and goes on exactly as above from the payload on.

When init exits, the kernel kills every other process of the pid namespace; the launcher then kills and removes
the cgroup, which catches anything that could have escaped the namespace. Each step runs through `_step`, so a
failure names the step and the run fails closed with outcome setup_failed: the payload is never exec'd with
less isolation than the spec asks for.

Init talks to the launcher through `status_fd` with one JSON object per line (each well under PIPE_BUF, so
lines never interleave): {"ev": "pooled"} (a pooled sandbox is ready), {"ev": "exec", "landlock": abi}, {"ev": "setup_failed", "step": ..., "error": ...},
{"ev": "exit", "code": n} or {"ev": "exit", "signal": n}. The payload tells init what it applied (the Landlock
ABI) and why it failed over its own close-on-exec pipe, one JSON object per line; EOF without a failure means
execve succeeded.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import resource
import select
import signal
import socket
import time

from . import _fds, _libc, creds, egress, files, init as session_init, landlock, namespaces, rlimits, rootfs, seccomp
from .spec import PRESTART_MAX_SCRIPT, RunSpec, prestart_key, prestart_script, sandbox_key

SETUP_FAILED = 121
PRESTART_TIMEOUT = 30.0   # seconds a prestarted interpreter may take to start up and open its script
# Used after pivot_root (one-shot collection, sessions), when the daemon's Python tree is out of sight: loaded now.
_PRELOADED = (files,)


class _StepFailed(Exception):
    pass


def _report(status_fd: int, **msg) -> None:
    os.write(status_fd, (json.dumps(msg) + "\n").encode()[:4000])


def _step(status_fd: int, name: str, fn, *args) -> None:
    try:
        fn(*args)
    except BaseException as e:  # noqa: BLE001 - every failure of a step is fatal and reported
        _report(status_fd, ev="setup_failed", step=name, error=f"{type(e).__name__}: {e}")
        raise _StepFailed(name) from e


close_fds_except = _fds.close_all_except


def _join_cgroup(paths: list[str]) -> None:
    for path in paths:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)


def keeper(spec: RunSpec, stdio: tuple[int, int, int], status_fd: int, join_paths: list[str], staging: str,
           cap_last: int, extra_fd: int = -1, egress_fd: int = -1) -> None:
    """Entry point right after the launcher's fork(). Never returns. `extra_fd` is the session's control
    socket (sessions) or the pipe collected files go to (one-shot runs with collect patterns); `egress_fd` the
    launcher's channel for the proxy listener (runs and sessions with egress)."""
    code = SETUP_FAILED
    try:
        _libc.prctl(_libc.PR_SET_PDEATHSIG, signal.SIGKILL)  # the launcher died: so does the run
        close_fds_except({*stdio, status_fd, extra_fd, egress_fd} - {-1})
        # Hold 0-2 on /dev/null so no later pipe or file lands there and is clobbered by the payload's dup2.
        while (fd := os.open("/dev/null", os.O_RDWR)) <= 2:
            pass
        os.close(fd)
        _step(status_fd, "cgroup", _join_cgroup, join_paths)
        # A session's init talks to its zygote over a socket made here, in the host's network namespace, so
        # nothing of sandboxd's shows in the session's own /proc/net/unix.
        zygote_pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) if spec.session else None
        _step(status_fd, "namespaces", namespaces.apply)
        pid = os.fork()
        if pid == 0:
            _init(spec, stdio, status_fd, staging, cap_last, extra_fd, egress_fd, zygote_pair)
        for fd in stdio:
            os.close(fd)
        for fd in (extra_fd, egress_fd):
            if fd >= 0:
                os.close(fd)
        for sock in zygote_pair or ():
            sock.close()
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status) & 0xFF
    except BaseException:  # noqa: BLE001
        pass
    os._exit(code)


def _init(spec: RunSpec, stdio: tuple[int, int, int], status_fd: int, staging: str, cap_last: int,
          extra_fd: int = -1, egress_fd: int = -1, zygote_pair=None) -> None:
    code = SETUP_FAILED
    try:
        _libc.prctl(_libc.PR_SET_PDEATHSIG, signal.SIGKILL)
        _step(status_fd, "hostname", namespaces.set_hostname, spec.hostname)
        _step(status_fd, "loopback", namespaces.loopback_up)
        _step(status_fd, "egress_redirect", setup_redirect, spec)
        _step(status_fd, "egress", setup_egress, spec, egress_fd)
        _step(status_fd, "rootfs", rootfs.apply, spec, staging)
        if spec.session:
            for fd in stdio:
                os.close(fd)
            ctl = socket.socket(fileno=extra_fd)
            ctl.setblocking(True)
            code = session_init.serve(spec, ctl, lambda **m: _report(status_fd, **m), cap_last, zygote_pair)
            os._exit(code)
        if spec.pooled:
            template, prestarted = spec, []
            if spec.prestart:
                _step(status_fd, "prestart", _prestart, spec, stdio, cap_last, prestarted)
            for fd in stdio:
                os.close(fd)
            claim = []
            _step(status_fd, "claim", _await_claim, spec, status_fd, extra_fd, claim, prestarted)
            spec, stdio, extra_fd = claim
            if prestarted and spec.prestart:
                main, fifo, applied = prestarted
                _step(status_fd, "prestart", _feed, template, spec, main, fifo)
                _report(status_fd, ev="exec", **applied)
                code = _reap_until(main, status_fd, report=True)
                if extra_fd >= 0:
                    _collect(spec, extra_fd, cap_last)
                os._exit(code)
            if prestarted:  # a run the interpreter cannot serve (args, env...): a fresh payload instead
                _step(status_fd, "prestart", _discard, template, *prestarted[:2])
                _step(status_fd, "claim", rootfs.write_files, spec, spec.workdir)
        main, failure, applied = _spawn_payload(spec, stdio, cap_last)
        for fd in stdio:
            os.close(fd)
        if failure:
            _report(status_fd, ev="setup_failed", **failure)
        else:
            _report(status_fd, ev="exec", **applied)
        code = _reap_until(main, status_fd, report=not failure)
        if extra_fd >= 0 and not failure:
            _collect(spec, extra_fd, cap_last)
    except BaseException:  # noqa: BLE001
        pass
    os._exit(code)


def _await_claim(template: RunSpec, status_fd: int, ctl_fd: int, claim: list, prestarted: list) -> None:
    """A pooled sandbox's init, built up to its root filesystem, waits for the one run it will serve: its spec
    (a sealed memfd) and its stdin, stdout, stderr (and collect pipe), from the launcher over `ctl_fd`. Then it
    is a cold run's init from the payload on. A run that uses the prestarted interpreter brings no stdio (the
    interpreter has the pool's) and its files are written by _feed. The end of `ctl_fd` without a claim
    (drained), or the prestarted interpreter's death, ends the sandbox."""
    _report(status_fd, ev="pooled")
    ctl = socket.socket(fileno=ctl_fd)
    ctl.setblocking(True)
    if prestarted:
        pidfd = os.pidfd_open(prestarted[0])
        readable, _, _ = select.select([ctl, pidfd], [], [])
        if pidfd in readable and ctl not in readable:
            os._exit(0)
        os.close(pidfd)
    msg, fds = session_init._recv(ctl)
    ctl.close()
    if not msg:
        os._exit(0)
    if not fds:
        raise ValueError("claim: no spec")
    os.lseek(fds[0], 0, os.SEEK_SET)
    spec = RunSpec.from_json(_read_all(fds[0]))
    os.close(fds[0])
    # The launcher checked this already; a sandbox built for one uid and shape never serves another.
    if (spec.pooled or spec.session or (spec.uid, spec.gid) != (template.uid, template.gid)
            or sandbox_key(spec) != sandbox_key(template)):
        raise ValueError("claim: the run does not fit this pooled sandbox")
    if spec.prestart:
        if not prestarted or len(fds) not in (1, 2):
            raise ValueError(f"claim: no prestarted interpreter, or {len(fds)} fds for one")
        claim[:] = [spec, (), fds[1] if len(fds) == 2 else -1]
        return
    if len(fds) not in (4, 5):
        raise ValueError(f"claim: expected 4 or 5 fds, got {len(fds)}")
    claim[:] = [spec, tuple(fds[1:4]), fds[4] if len(fds) == 5 else -1]
    if not prestarted:
        rootfs.write_files(spec, spec.workdir)


def _prestart(template: RunSpec, stdio: tuple[int, int, int], cap_last: int, out: list) -> None:
    """Start the interpreter of a pooled sandbox before its run exists: the payload's every step (rlimits,
    credentials, closed fds, Landlock, seccomp) with the template's values, then execve of the runner's own
    command line. The script's path is a FIFO, so the interpreter, once started, blocks reading it until _feed
    writes the run's script there. Its stdio are the pool's pipes and stdin memfd, which the daemon holds.

    Only the image's own interpreter runs until the claim, on no input of the request's; nothing untrusted has
    run when _feed writes the run's files."""
    path = os.path.join(template.workdir, template.prestart)
    os.mkfifo(path, 0o600)
    os.chown(path, template.uid, template.gid)
    main, failure, applied = _spawn_payload(template, stdio, cap_last)
    if failure:
        raise RuntimeError(f"{failure['step']}: {failure['error']}")
    # Ready only once the interpreter has opened its script: the claim takes the FIFO off the path, which must
    # not happen before that open. A writer's non-blocking open succeeds exactly when a reader has the FIFO open
    # (or waits in open for a writer); the interpreter then waits in read() for the script.
    deadline = time.monotonic() + PRESTART_TIMEOUT
    while True:
        try:
            fifo = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            break
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
        if os.waitpid(main, os.WNOHANG) != (0, 0) or time.monotonic() > deadline:
            raise RuntimeError(f"the interpreter did not open {path} (it exited, or took over {PRESTART_TIMEOUT}s)")
        time.sleep(0.001)
    os.set_blocking(fifo, True)
    fcntl.fcntl(fifo, fcntl.F_SETPIPE_SZ, PRESTART_MAX_SCRIPT)
    out[:] = [main, fifo, applied]


def _feed(template: RunSpec, spec: RunSpec, main: int, fifo: int) -> None:
    """The claiming run's turn in a prestarted sandbox: the FIFO leaves the script's path, the run's files
    (its script among them) are written as on the cold path, its rlimits replace the template's, and the
    script goes through the FIFO; the interpreter reads it to EOF and runs it as `__main__` from that path, so
    tracebacks and __file__ find the same file a cold run has."""
    if prestart_key(spec) != prestart_key(template) or spec.prestart != template.prestart:
        raise ValueError("the run does not fit the prestarted interpreter (argv, env, seccomp or stack differ)")
    script = prestart_script(spec)
    if script is None or len(script) > PRESTART_MAX_SCRIPT:
        raise ValueError("the run's script is missing or too large for the prestarted interpreter")
    lower = rlimits.changes(template.limits, spec.limits)
    if lower is None:
        raise ValueError("the run's rlimits are above the prestarted interpreter's")
    if os.waitpid(main, os.WNOHANG) != (0, 0):
        raise RuntimeError("the prestarted interpreter is gone")
    os.unlink(os.path.join(spec.workdir, spec.prestart))
    rootfs.write_files(spec, spec.workdir)
    if lower:
        _lower_rlimits(main, spec.uid, spec.gid, lower)
    view = memoryview(script)
    while view:
        view = view[os.write(fifo, view):]
    os.close(fifo)


def _lower_rlimits(pid: int, uid: int, gid: int, lower: list[tuple[int, int, int]]) -> None:
    """prlimit() on the interpreter, which runs as the run's uid. Without CAP_SYS_RESOURCE (often not in the
    daemon's bounding set) the kernel allows it only to a caller whose real uid and gid are the target's, so
    init takes those as its real ids for the calls (its effective ids, and so its capabilities, stay root's)
    and back. Lowering needs no capability. Nothing but the image's interpreter, blocked on its FIFO, runs as
    that uid meanwhile."""
    os.setresgid(gid, 0, 0)
    os.setresuid(uid, 0, 0)
    try:
        for which, soft, hard in lower:
            resource.prlimit(pid, which, (soft, hard))
    finally:
        os.setresuid(0, 0, 0)
        os.setresgid(0, 0, 0)


def _discard(template: RunSpec, main: int, fifo: int) -> None:
    """The prestarted interpreter cannot serve the claiming run: kill it before anything of the run exists and
    free the script's path for the cold steps (the payload gets pid 3 instead of 2; nothing else differs)."""
    os.kill(main, signal.SIGKILL)
    os.waitpid(main, 0)
    os.close(fifo)
    path = os.path.join(template.workdir, template.prestart)
    os.unlink(path)


def _collect(spec: RunSpec, out_fd: int, cap_last: int) -> None:
    """Hand back the files a one-shot run asked for, read by the file agent with the run's own credentials and
    filters, while the sandbox still exists. Other processes of the run may still be running; the launcher's
    deadline bounds this like the rest of the run."""
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(err_r)
        session_init._file_payload(spec, {"req": {"op": "collect", "patterns": list(spec.collect),
                                                  "max_bytes": spec.collect_max}},
                                   [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC), out_fd], err_w, cap_last)
    os.close(err_w)
    os.close(out_fd)
    _read_all(err_r)
    os.close(err_r)
    while True:
        try:
            done, _ = os.waitpid(-1, 0)
        except ChildProcessError:
            return
        if done == pid:
            return
def setup_egress(spec: RunSpec, egress_fd: int) -> None:
    """The network step after loopback, also for a session's init: a run with egress hands its proxy listener
    out (and must have a channel for it); any other run keeps a namespace with `lo` only."""
    if spec.network == "none":
        return
    if spec.network != "egress" or spec.egress is None or egress_fd < 0:
        raise ValueError(f"network {spec.network!r}: expected \"none\", or \"egress\" with an egress channel")
    egress.hand_over(spec.egress, egress_fd)


def setup_redirect(spec: RunSpec) -> None:
    """Transparent egress: TCP of programs that ignore proxy settings goes to the proxy, nothing else leaves lo."""
    if spec.network == "egress" and spec.egress is not None and spec.egress.transparent:
        egress.redirect(spec.egress)


def _reap_until(main: int, status_fd: int, report: bool) -> int:
    """Reap every child (orphans are reparented to us) until the main process is gone, then relay its
    status. Returning ends init, and with it every process left in the namespace."""
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return SETUP_FAILED
        if pid == main:
            if report:
                if os.WIFSIGNALED(status):
                    _report(status_fd, ev="exit", signal=os.WTERMSIG(status))
                else:
                    _report(status_fd, ev="exit", code=os.WEXITSTATUS(status))
            return 0


def _payload(spec: RunSpec, stdio: tuple[int, int, int], err_w: int, cap_last: int) -> None:
    step = "stdio"
    try:
        for target, fd in enumerate(stdio):
            os.dup2(fd, target, inheritable=True)
            # The run owns its own pipes, so `echo > /dev/stdout` (a reopen through /proc) works as usual.
            os.fchown(target, spec.uid, spec.gid)
        # The OOM killer must pick the payload's processes, never the init that reports on them. Raising a
        # score needs no capability (lowering init's would need CAP_SYS_RESOURCE, not always granted).
        step = "oom_score_adj"
        _write_file("/proc/self/oom_score_adj", "1000")
        step = "rlimits"
        rlimits.apply(spec.limits)
        step = "credentials"
        creds.apply(spec.uid, spec.gid, cap_last)
        step = "close_fds"
        close_fds_except({0, 1, 2, err_w})
        # A second, independent wall: even if a mount were writable by mistake, nothing outside the run's
        # tmpfs can be written. Unsupported kernels: apply() does nothing and the record says so.
        step = "landlock"
        abi = landlock.apply(["/tmp", spec.workdir, "/dev/shm"], min_abi=spec.landlock_min_abi)
        os.write(err_w, json.dumps({"landlock": abi}).encode() + b"\n")
        step = "seccomp"
        seccomp.apply(spec.seccomp.bpf)
        step = "exec"
        os.execve(spec.argv[0], list(spec.argv), dict(spec.env))
    except BaseException as e:  # noqa: BLE001
        try:
            os.write(err_w, json.dumps({"step": step, "error": f"{type(e).__name__}: {e}"[:3000]}).encode() + b"\n")
        finally:
            os._exit(127)


def _spawn_payload(spec: RunSpec, stdio: tuple[int, int, int], cap_last: int) -> tuple[int, dict | None, dict]:
    """Fork the payload and wait for its execve (or its failure): (pid, failure or None, what it applied)."""
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(err_r)
        _payload(spec, stdio, err_w, cap_last)
    os.close(err_w)
    failure, applied = _payload_report(_read_all(err_r))
    os.close(err_r)
    return pid, failure, applied


def _payload_report(data: bytes) -> tuple[dict | None, dict]:
    """The payload's lines -> (its failure or None, what it applied). Nothing untrusted has run yet when these
    are written (the pipe closes on execve), so they are the payload's own word."""
    failure, applied = None, {}
    for line in data.splitlines():
        msg = json.loads(line)
        if "step" in msg:
            failure = {"step": msg["step"], "error": msg.get("error")}
        else:
            applied.update(msg)
    return failure, applied


def _write_file(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


_read_all = _fds.read_all
