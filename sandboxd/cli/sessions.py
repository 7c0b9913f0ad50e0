"""sandboxctl's session commands: `session create|list|show|close`, `exec`, `code` and `cp`.

Thin shells over sandboxd.client.Session with `run`'s exit-status rules (see sandboxd.cli.ctl).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import threading
import time

from ..client import (CodeError, CodeResult, FileError, Output, Result, RichResult, SandboxdError, Session,
                      SessionInfo)
from ..units import parse_duration, parse_size
from .ctl import EXIT_REFUSED, EXIT_TIMEOUT, _client, exit_status

# SESSION:PATH, as scp writes host:path: a name without "/" before the first ":". A local path with a colon
# is written ./a:b.
_REMOTE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]*):(.*)$", re.S)


class Refused(Exception):
    """A command cannot go on: one line for stderr, exit 125."""


def parse_location(arg: str) -> tuple[str | None, str]:
    """(session id, path) for SESSION:PATH, (None, path) for a local path."""
    m = _REMOTE.match(arg)
    return (m.group(1), m.group(2)) if m else (None, arg)


def _duration(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return parse_duration(text)


def _env(pairs: list[str] | None) -> dict[str, str]:
    env = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise Refused(f"--env {pair!r}: expected KEY=VALUE")
        env[key] = value
    return env


def _fail(message: str) -> int:
    print(f"sandboxctl: {message}", file=sys.stderr)
    return EXIT_REFUSED


def _guarded(fn):
    """Daemon refusals and bad arguments become one line on stderr and exit 125; ^C exits 130."""
    def run(args) -> int:
        try:
            return fn(args)
        except FileError as e:
            return _fail(f"{e.path}: {e.error}" + (f": {e.detail}" if e.detail else ""))
        except SandboxdError as e:
            return _fail(f"{e.code.lower()}: {e.message}")
        except (Refused, OSError, ValueError, tarfile.TarError) as e:
            return _fail(str(e))
        except KeyboardInterrupt:
            print("sandboxctl: interrupted; the call was cancelled", file=sys.stderr)
            return 130
    return run


# ---- session create|list|show|close ------------------------------------------------------------------------

def session_view(info: SessionInfo) -> dict:
    """A session as --json prints it: every field of the Session message, times as Unix seconds."""
    return {"id": info.session_id, **dataclasses.asdict(info), "contexts": list(info.contexts)}


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t else "-"


@_guarded
def cmd_create(args) -> int:
    with _client(args) as client:
        s = client.session(args.runner, memory=parse_size(args.memory) if args.memory else 0, pids=args.pids or 0,
                           wall_time=_duration(args.timeout) if args.timeout else 0,
                           idle_timeout=_duration(args.idle_timeout) if args.idle_timeout else 0,
                           max_lifetime=_duration(args.max_lifetime) if args.max_lifetime else 0, env=_env(args.env))
        info = s.info() if args.json else None
    print(json.dumps(session_view(info)) if args.json else s.id)
    return 0


@_guarded
def cmd_list(args) -> int:
    with _client(args) as client:
        sessions = client.list_sessions(principal=args.principal or "", include_closed=args.all, limit=args.limit)
    if args.json:
        print(json.dumps({"sessions": [session_view(s) for s in sessions]}))
        return 0
    print(f"{'SESSION ID':<30}{'RUNNER':<12}{'PRINCIPAL':<16}{'STATE':<8}{'CREATED':<22}{'EXPIRES/CLOSED':<22}")
    for s in sessions:
        end = _when(s.closed_at) + f" ({s.end_reason})" if s.state == "closed" else _when(s.expires_at)
        print(f"{s.session_id:<30}{s.runner:<12}{s.principal or '-':<16}{s.state:<8}{_when(s.created_at):<22}{end}")
    return 0


@_guarded
def cmd_show(args) -> int:
    with _client(args) as client:
        view = session_view(client.get_session(args.session))
    if args.json:
        print(json.dumps(view))
        return 0
    for key, value in view.items():
        if key == "session_id":
            continue
        if key.endswith("_at"):
            value = _when(value)
        print(f"{key:<16} {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return 0


@_guarded
def cmd_close(args) -> int:
    with _client(args) as client:
        info = client.close_session(args.session)
    if args.json:
        print(json.dumps(session_view(info)))
    return 0


# ---- exec ------------------------------------------------------------------------------------------------------

def _forward_stdin(process) -> None:
    """Copy sandboxctl's stdin to the command, then close it (on a thread, as the output streams meanwhile)."""
    try:
        while data := os.read(sys.stdin.fileno(), 1 << 16):
            process.write(data)
    except OSError:
        pass
    process.close_stdin()


@_guarded
def cmd_exec(args) -> int:
    if bool(args.argv) == bool(args.shell):
        raise Refused("exec: give a command after -- or a command line with -c, not both")
    rows, cols = (0, 0)
    if args.tty:
        cols, rows = shutil.get_terminal_size()
    with _client(args) as client:
        session = client.attach(args.session)
        process = session.start(args.shell or args.argv, cwd=args.cwd, env=_env(args.env),
                                timeout=_duration(args.timeout) if args.timeout else 0, tty=args.tty,
                                rows=rows, cols=cols, close_stdin=not args.interactive)
        with process:
            if args.interactive:
                threading.Thread(target=_forward_stdin, args=(process,), daemon=True).start()
            result = None
            for event in process:
                if isinstance(event, Output):
                    stream = sys.stdout.buffer if event.stream == "stdout" else sys.stderr.buffer
                    stream.write(event.data)
                    stream.flush()
                elif isinstance(event, Result):
                    result = event
    if result is None:
        raise Refused("the daemon ended the stream without a result")
    if result.outcome != "exited":
        print(f"sandboxctl: call {result.run_id}: {result.outcome}: {result.message}", file=sys.stderr)
    elif result.stdout_truncated or result.stderr_truncated:
        print(f"sandboxctl: call {result.run_id}: output truncated at the cap", file=sys.stderr)
    return exit_status(result)


# ---- code ------------------------------------------------------------------------------------------------------

def code_exit_status(done: CodeResult) -> int:
    """0 when the cell ran, 1 when it raised, then `run`'s rules: 124 timeout, 137 killed for memory, 125 else."""
    if done.outcome == "exited":
        return 1 if done.error else 0
    if done.outcome == "timeout":
        return EXIT_TIMEOUT
    if done.outcome == "memory_limit":
        return 128 + 9
    return EXIT_REFUSED


def _read_code(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    with open(path, encoding="utf-8") as f:
        return f.read()


@_guarded
def cmd_code(args) -> int:
    try:
        code = _read_code(args.file)
    except (OSError, UnicodeDecodeError) as e:
        raise Refused(f"cannot read {args.file}: {e}") from None
    with _client(args) as client:
        session = client.attach(args.session)
        out = {"stdout": [], "stderr": []}
        results, error, done = [], None, None
        for event in session.run_code_stream(code, context=args.context,
                                             timeout=_duration(args.timeout) if args.timeout else 0):
            if isinstance(event, Output):
                if args.json:
                    out[event.stream].append(event.data)
                else:
                    stream = sys.stdout.buffer if event.stream == "stdout" else sys.stderr.buffer
                    stream.write(event.data)
                    stream.flush()
            elif isinstance(event, RichResult):
                results.append({"kind": event.kind, "data": event.data})
                if not args.json and "text/plain" in event.data:
                    print(event.data["text/plain"], flush=True)
            elif isinstance(event, CodeError):
                error = event
                if not args.json:
                    print("\n".join(event.traceback) if event.traceback else f"{event.name}: {event.value}",
                          file=sys.stderr, flush=True)
            elif isinstance(event, CodeResult):
                done = event
    if done is None:
        raise Refused("the daemon ended the stream without the cell's result")
    if args.json:
        print(json.dumps({
            "call_id": done.call_id, "outcome": done.outcome, "execution_count": done.execution_count,
            "stdout": b"".join(out["stdout"]).decode("utf-8", "replace"),
            "stderr": b"".join(out["stderr"]).decode("utf-8", "replace"), "results": results,
            "error": dataclasses.asdict(error) if error else None, "kernel_restarted": done.kernel_restarted,
            "duration_ms": round(done.wall_time * 1000, 3), "stdout_truncated": done.stdout_truncated,
            "stderr_truncated": done.stderr_truncated, "message": done.message}))
    else:
        if done.kernel_restarted:
            print(f"sandboxctl: context {args.context!r} started a fresh kernel: {done.message}", file=sys.stderr)
        if done.outcome != "exited":
            print(f"sandboxctl: cell {done.call_id}: {done.outcome}: {done.message}", file=sys.stderr)
    return code_exit_status(done)


# ---- cp --------------------------------------------------------------------------------------------------------

def remote_target(session: Session, path: str, name: str) -> str:
    """Where a file called `name` lands when copied to `path` in the session: into it if it is a directory."""
    if path in ("", ".") or path.endswith("/"):
        return f"{path}{name}" if path.endswith("/") else name
    try:
        is_dir = session.stat(path).type == "directory"
    except FileError as e:
        if e.error != "not_found":
            raise
        is_dir = False
    return f"{path.rstrip('/')}/{name}" if is_dir else path


def local_target(path: str, name: str) -> str:
    """Where a file called `name` lands when copied to the local `path`: into it if it is a directory."""
    return os.path.join(path, name) if path.endswith("/") or os.path.isdir(path) else path


def _basename(path: str) -> str:
    name = os.path.basename(path.rstrip("/"))
    if not name or name in (".", ".."):
        raise Refused(f"cp: {path!r} names no file; give the destination's name")
    return name


def _download(session: Session, src: str, dst: str, recursive: bool) -> None:
    if dst == "-":
        if recursive:
            raise Refused("cp: -r needs a directory, not -")
        session.read_to(src, sys.stdout.buffer)
        return
    target = local_target(dst, _basename(src))
    folder = os.path.dirname(os.path.abspath(target))
    # Into a temporary file first: a failed copy leaves the destination as it was.
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".sandboxctl-", delete=False) as tmp:
        try:
            if recursive:
                session.export_to(tmp, src)
            else:
                session.read_to(src, tmp)
        except BaseException:
            os.unlink(tmp.name)
            raise
    if not recursive:
        os.chmod(tmp.name, 0o666 & ~_umask())
        os.replace(tmp.name, target)
        return
    try:
        with tarfile.open(tmp.name) as tar:
            os.makedirs(target, exist_ok=True)
            tar.extractall(target, filter="data")   # no absolute names, .., links out or devices
    finally:
        os.unlink(tmp.name)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _upload(session: Session, src: str, dst: str, recursive: bool) -> None:
    if src == "-":
        if recursive:
            raise Refused("cp: -r needs a directory, not -")
        if not dst or dst.endswith("/"):
            raise Refused("cp: give the destination file's name when copying from -")
        session.write(dst, sys.stdin.buffer)
        return
    if os.path.isdir(src):
        if not recursive:
            raise Refused(f"cp: {src} is a directory (use -r)")
        target = remote_target(session, dst, _basename(src))
        with tempfile.TemporaryFile() as tmp:
            with tarfile.open(fileobj=tmp, mode="w") as tar:
                for entry in sorted(os.listdir(src)):
                    tar.add(os.path.join(src, entry), arcname=entry)
            tmp.seek(0)
            try:
                session.mkdir(target, parents=True)
            except FileError as e:
                if e.error != "already_exists":
                    raise
            session.import_(tmp, target)
        return
    with open(src, "rb") as f:
        session.write(remote_target(session, dst, _basename(src)), f, mode=os.fstat(f.fileno()).st_mode & 0o7777)


@_guarded
def cmd_cp(args) -> int:
    (src_session, src), (dst_session, dst) = parse_location(args.src), parse_location(args.dst)
    if bool(src_session) == bool(dst_session):
        raise Refused("cp: exactly one of SRC and DST must be SESSION:PATH")
    with _client(args) as client:
        session = client.attach(src_session or dst_session)
        if src_session:
            _download(session, src, dst, args.recursive)
        else:
            _upload(session, src, dst, args.recursive)
    return 0


# ---- the parsers -----------------------------------------------------------------------------------------------

def add_parsers(sub) -> None:
    sp = sub.add_parser("session", help="create, list, show and close sessions (sandboxes kept for many calls)")
    ss = sp.add_subparsers(dest="session_cmd", required=True)
    c = ss.add_parser("create", help="start a session; prints its id alone on the first line")
    c.add_argument("--runner", default="python", help="runner name (default: python)")
    c.add_argument("--memory", metavar="SIZE", help="memory of the whole session, e.g. 256MiB (up to the runner's maximum and the policy's ceiling)")
    c.add_argument("--pids", type=int, help="processes of the whole session (up to the runner's maximum and the policy's ceiling)")
    c.add_argument("--timeout", metavar="SECONDS", help="default wall-clock limit of each call")
    c.add_argument("--idle-timeout", metavar="SECONDS", help="close after this long without a call")
    c.add_argument("--max-lifetime", metavar="SECONDS", help="close this long after creation")
    c.add_argument("--env", action="append", metavar="KEY=VALUE", help="default environment of every call")
    c.add_argument("--json", action="store_true", help="print the session as one JSON object")
    c.set_defaults(fn=cmd_create)
    ls = ss.add_parser("list", help="live sessions (admins: everyone's)")
    ls.add_argument("--all", action="store_true", help="recently closed sessions too")
    ls.add_argument("--principal", help="admins: only this principal's")
    ls.add_argument("--limit", type=int, default=100)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(fn=cmd_list)
    sh = ss.add_parser("show", help="one session: state, limits, expiry, kernel contexts")
    sh.add_argument("session", metavar="SESSION")
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(fn=cmd_show)
    cl = ss.add_parser("close", help="close a session: its processes, kernels and workspace are gone")
    cl.add_argument("session", metavar="SESSION")
    cl.add_argument("--json", action="store_true", help="print the closed session")
    cl.set_defaults(fn=cmd_close)

    e = sub.add_parser("exec", help="run a command in a session: exec SESSION [options] -- ARGV...",
                       description="Run a command in a session and stream its output. Exit status as `run`.")
    e.add_argument("session", metavar="SESSION")
    e.add_argument("-c", dest="shell", metavar="CMDLINE", help="a command line for the image's sh -c instead of ARGV")
    e.add_argument("--cwd", help="working directory, relative to /work (default /work)")
    e.add_argument("--env", action="append", metavar="KEY=VALUE")
    e.add_argument("--timeout", metavar="SECONDS", help="wall-clock limit of this call")
    e.add_argument("-i", "--interactive", action="store_true", help="forward sandboxctl's stdin to the command")
    e.add_argument("-t", "--tty", action="store_true", help="run on a pseudo-terminal (of this terminal's size)")
    e.add_argument("argv", nargs="*", metavar="ARGV", help="the program and its arguments, after --")
    e.set_defaults(fn=cmd_exec)

    k = sub.add_parser("code", help="run a code cell (FILE, or - for stdin) in a session's kernel",
                       description="Run a cell in a session's kernel: output streams, each result's text/plain "
                                   "goes to stdout, a traceback to stderr. Exit 1 when the cell raised; else "
                                   "`run`'s rules.")
    k.add_argument("session", metavar="SESSION")
    k.add_argument("file", metavar="FILE|-")
    k.add_argument("--context", default="default", help="kernel context name (default: default)")
    k.add_argument("--timeout", metavar="SECONDS", help="wall-clock limit of the cell")
    k.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    k.set_defaults(fn=cmd_code)

    p = sub.add_parser("cp", help="copy files between here and a session: cp SRC DST, one side SESSION:PATH",
                       description="Copy a file into a session (cp FILE SESSION:PATH) or out of it (cp SESSION:PATH "
                                   "FILE); a destination directory gets the source's name. - is stdin or stdout. "
                                   "-r copies directories (as a tar).")
    p.add_argument("-r", "--recursive", action="store_true", help="copy a directory")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.set_defaults(fn=cmd_cp)
