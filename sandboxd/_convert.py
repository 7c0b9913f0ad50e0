"""Wire conversion for the public clients: protobuf messages to the value types of sandboxd._types and back.

Shared by the blocking client (sandboxd.client) and the asyncio one (sandboxd.aio), so both speak the protocol
the same way; neither touches a protobuf type outside this module and its own RPC calls. Pure code: no I/O
except reading the file objects a caller hands over, one chunk at a time.
"""
from __future__ import annotations

import hashlib
import os
from typing import BinaryIO, Callable, Iterator, Mapping, Sequence, Union

import grpc

from ._types import (FILE_ERROR_CODES, CodeError, CodeResult, CodeRun, ExecResult, FileError, FileInfo, FileResult, ImportResult,
                     Output, Result, RichResult, RunnerInfo, SandboxdError, SessionInfo, Started)
from .v1 import sandbox_pb2 as pb

DEFAULT_TARGET = "unix:///run/sandboxd/sandboxd.sock"
CHUNK = 1 << 20   # file and tar transfers go in 1 MiB messages, well under the channel's message limits
OUTCOMES = {v.number: v.name[len("OUTCOME_"):].lower() for v in pb.Outcome.DESCRIPTOR.values}
SESSION_STATES = {v.number: v.name[len("SESSION_STATE_"):].lower() for v in pb.SessionState.DESCRIPTOR.values}
# A single-path call (stat, read, mkdir...) reports a failed path as a status; these are the ones about the path.
STATUS_FILE_ERRORS = {"NOT_FOUND": "not_found", "PERMISSION_DENIED": "permission_denied",
                      "ALREADY_EXISTS": "already_exists", "INVALID_ARGUMENT": "invalid_path",
                      "OUT_OF_RANGE": "too_large", "FAILED_PRECONDITION": "other"}

Data = Union[bytes, bytearray, memoryview, str, BinaryIO]


# ---- the channel -------------------------------------------------------------------------------------------

def _read_pem(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def channel_config(target: str | None, metadata: Sequence[tuple[str, str]], credentials, options: Sequence, *,
                   token, tls_ca, tls_cert, tls_key, agent_name, agent_version, agent_tool, session_id,
                   traceparent, allow_insecure_token, tls_server_name) -> tuple[str, object, list, tuple]:
    """(target, credentials or None, channel options, call metadata) from a client's constructor arguments."""
    target = target or os.environ.get("SANDBOXD_TARGET") or DEFAULT_TARGET
    opts = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 64 << 20), *options]
    if tls_server_name:
        opts.append(("grpc.ssl_target_name_override", tls_server_name))
    if credentials is None and (tls_ca or tls_cert):
        credentials = grpc.ssl_channel_credentials(root_certificates=_read_pem(tls_ca),
                                                   private_key=_read_pem(tls_key),
                                                   certificate_chain=_read_pem(tls_cert))
    md = list(metadata)
    token = token if token is not None else os.environ.get("SANDBOXD_TOKEN")
    if token:
        if not (credentials or target.startswith("unix") or allow_insecure_token):
            raise ValueError("refusing to send a token over plain TCP: pass tls_ca (or allow_insecure_token)")
        md.append(("authorization", f"Bearer {token}"))
    claims = {"x-agent-name": agent_name or os.environ.get("SANDBOXD_AGENT_NAME"),
              "x-agent-version": agent_version or os.environ.get("SANDBOXD_AGENT_VERSION"),
              "x-agent-tool": agent_tool, "x-session-id": session_id, "traceparent": traceparent}
    md += [(k, v) for k, v in claims.items() if v]
    return target, credentials, opts, tuple(md)


def rpc_error(e: grpc.RpcError) -> SandboxdError:
    retry = None
    for key, value in (e.trailing_metadata() or ()):
        if key == "grpc-retry-pushback-ms":
            retry = int(value) / 1000
    return SandboxdError(e.code().name, e.details() or "", retry)


def path_error(e: SandboxdError, path: str) -> SandboxdError:
    """A status from a single-path file call as a FileError when it is about the path (the code is kept).

    The daemon words such a status "<error>: <detail>" with the per-path error name; one about the session
    itself (unknown, ended) names the session and stays a plain SandboxdError."""
    if isinstance(e, FileError):
        return e
    name, sep, detail = e.message.partition(": ")
    if sep and name in FILE_ERROR_CODES:
        return FileError(path, name, detail, code=e.code)
    error = STATUS_FILE_ERRORS.get(e.code)
    if error is None or e.message.startswith("session "):
        return e
    if e.code == "FAILED_PRECONDITION":
        text = e.message.lower()
        error = ("not_a_directory" if "not a directory" in text else
                 "is_directory" if "is a directory" in text else "other")
    return FileError(path, error, e.message, code=e.code)


# ---- runs ----------------------------------------------------------------------------------------------------

def limits_dict(msg: pb.Limits) -> dict:
    return {"wall_time": msg.wall_time_seconds, "cpu_time": msg.cpu_time_seconds, "memory": msg.memory_bytes,
            "pids": msg.pids, "output": msg.output_bytes}


def limits_msg(wall_time: float = 0, cpu_time: float = 0, memory: int = 0, pids: int = 0,
               output: int = 0) -> pb.Limits:
    return pb.Limits(wall_time_seconds=wall_time, cpu_time_seconds=cpu_time, memory_bytes=memory, pids=pids,
                     output_bytes=output)


def execute_request(code: str, runner: str, *, args: Sequence[str] = (), stdin: bytes = b"",
                    env: Mapping[str, str] | None = None, files: Mapping[str, bytes] | None = None,
                    wall_time: float = 0, cpu_time: float = 0, memory: int = 0, pids: int = 0, output: int = 0,
                    collect_files: Sequence[str] = ()) -> pb.ExecuteRequest:
    if isinstance(collect_files, str):
        collect_files = [collect_files]
    return pb.ExecuteRequest(runner=runner, code=code, args=list(args), stdin=stdin, env=dict(env or {}),
                             files=dict(files or {}), collect_files=list(collect_files),
                             limits=limits_msg(wall_time, cpu_time, memory, pids, output))


def result(r: pb.Result) -> Result:
    return Result(run_id=r.run_id, outcome=OUTCOMES.get(r.outcome, "unspecified"), exit_code=r.exit_code,
                  signal=r.signal, cpu_time=r.cpu_time_seconds, wall_time=r.wall_time_seconds,
                  peak_memory=r.peak_memory_bytes, stdout_bytes=r.stdout_bytes, stderr_bytes=r.stderr_bytes,
                  stdout_truncated=r.stdout_truncated, stderr_truncated=r.stderr_truncated, message=r.message,
                  limits=limits_dict(r.limits), files={f.path: f.data for f in r.files},
                  files_truncated=r.files_truncated, session_id=r.session_id)


def execute_event(event: pb.ExecuteEvent) -> Started | Output | Result | None:
    """None for an event kind this client does not know (a newer daemon may add some)."""
    kind = event.WhichOneof("event")
    if kind == "started":
        return Started(event.started.run_id)
    if kind in ("stdout", "stderr"):
        return Output(kind, getattr(event, kind).data)
    if kind == "result":
        return result(event.result)
    return None


class OutputCollector:
    """Keeps a call's output while its events go by, to build the collected result at the end."""

    def __init__(self):
        self.out: dict[str, list[bytes]] = {"stdout": [], "stderr": []}

    def add(self, event) -> None:
        if isinstance(event, Output):
            self.out[event.stream].append(event.data)

    def text(self, stream: str) -> bytes:
        return b"".join(self.out[stream])

    def run_result(self, r: Result | None) -> Result:
        if r is None:
            raise SandboxdError("INTERNAL", "the stream ended without a result")
        return Result(**{**r.__dict__, "stdout": self.text("stdout"), "stderr": self.text("stderr")})

    def exec_result(self, r: Result | None) -> ExecResult:
        if r is None:
            raise SandboxdError("INTERNAL", "the stream ended without a result")
        return ExecResult(call_id=r.run_id, outcome=r.outcome, exit_code=r.exit_code, signal=r.signal,
                          stdout=self.text("stdout"), stderr=self.text("stderr"), wall_time=r.wall_time,
                          cpu_time=r.cpu_time, peak_memory=r.peak_memory, stdout_truncated=r.stdout_truncated,
                          stderr_truncated=r.stderr_truncated, message=r.message)


def runner_info(r: pb.Runner) -> RunnerInfo:
    return RunnerInfo(name=r.name, image=r.image, command=tuple(r.command), extensions=tuple(r.file_extensions),
                      available=r.available, unavailable_reason=r.unavailable_reason, description=r.description,
                      default_limits=limits_dict(r.default_limits), max_limits=limits_dict(r.max_limits))


# ---- sessions ------------------------------------------------------------------------------------------------

def session_info(s: pb.Session) -> SessionInfo:
    return SessionInfo(session_id=s.session_id, runner=s.runner, principal=s.principal,
                       limits=limits_dict(s.limits), created_at=s.created_at, last_used_at=s.last_used_at,
                       expires_at=s.expires_at, state=SESSION_STATES.get(s.state, "unspecified"),
                       end_reason=s.end_reason, end_message=s.end_message, idle_timeout=s.idle_timeout_seconds,
                       max_lifetime=s.max_lifetime_seconds, active_calls=s.active_calls,
                       contexts=tuple(s.contexts), agent_name=s.agent_name, agent_version=s.agent_version,
                       policy=s.policy, closed_at=s.closed_at)


def create_session_request(runner: str, *, wall_time: float = 0, cpu_time: float = 0, memory: int = 0,
                           pids: int = 0, output: int = 0, idle_timeout: float = 0, max_lifetime: float = 0,
                           env: Mapping[str, str] | None = None, files: Mapping[str, bytes | str] | None = None,
                           workspace_tar: bytes | None = None) -> pb.CreateSessionRequest:
    return pb.CreateSessionRequest(
        runner=runner, limits=limits_msg(wall_time, cpu_time, memory, pids, output),
        idle_timeout_seconds=idle_timeout, max_lifetime_seconds=max_lifetime, env=dict(env or {}),
        files={p: _as_bytes(d) for p, d in (files or {}).items()}, workspace_tar=workspace_tar or b"")


def exec_start(session_id: str, cmd: Sequence[str] | str, *, cwd: str | None = None,
               env: Mapping[str, str] | None = None, timeout: float = 0, stdin: bytes | str | None = None,
               close_stdin: bool = False, output: int = 0, tty: bool = False, rows: int = 0,
               cols: int = 0) -> pb.ExecRequest:
    """The first message of Exec: a str is a command line for the image's `sh -c`, a sequence an argv."""
    if isinstance(cmd, (bytes, bytearray)):
        raise TypeError("cmd must be a str (a shell command line) or a sequence of str (an argv)")
    argv, shell = ([], cmd) if isinstance(cmd, str) else (list(cmd), "")
    if not argv and not shell:
        raise ValueError("an empty command")
    start = pb.ExecStart(session_id=session_id, argv=argv, shell=shell, cwd=cwd or "", env=dict(env or {}),
                         timeout_seconds=timeout, output_bytes=output, tty=tty,
                         stdin=_as_bytes(stdin) if stdin is not None else b"", close_stdin=close_stdin)
    if tty and (rows or cols):
        start.window.CopyFrom(pb.WindowSize(rows=rows, cols=cols))
    return pb.ExecRequest(start=start)


def exec_stdin(data: bytes | str) -> pb.ExecRequest:
    return pb.ExecRequest(stdin=_as_bytes(data))


def exec_close_stdin() -> pb.ExecRequest:
    return pb.ExecRequest(close_stdin=True)


def exec_resize(rows: int, cols: int) -> pb.ExecRequest:
    return pb.ExecRequest(resize=pb.WindowSize(rows=rows, cols=cols))


def run_code_request(session_id: str, code: str, context: str = "default", timeout: float = 0,
                     output: int = 0) -> pb.RunCodeRequest:
    return pb.RunCodeRequest(session_id=session_id, code=code, context=context or "default",
                             timeout_seconds=timeout, output_bytes=output)


def code_event(event: pb.RunCodeEvent) -> Started | Output | RichResult | CodeError | CodeResult | None:
    kind = event.WhichOneof("event")
    if kind == "started":
        return Started(event.started.run_id)
    if kind in ("stdout", "stderr"):
        return Output(kind, getattr(event, kind).data)
    if kind == "result":
        return RichResult(dict(event.result.data), event.result.kind or "execute_result")
    if kind == "error":
        e = event.error
        return CodeError(e.name, e.value, tuple(e.traceback))
    if kind == "done":
        d = event.done
        return CodeResult(call_id=d.call_id, outcome=OUTCOMES.get(d.outcome, "unspecified"),
                          execution_count=d.execution_count, wall_time=d.wall_time_seconds, message=d.message,
                          kernel_restarted=d.kernel_restarted, stdout_bytes=d.stdout_bytes,
                          stderr_bytes=d.stderr_bytes, stdout_truncated=d.stdout_truncated,
                          stderr_truncated=d.stderr_truncated, error=d.error)
    return None


class CodeCollector(OutputCollector):
    """Builds a CodeRun from a cell's events."""

    def __init__(self):
        super().__init__()
        self.results: list[RichResult] = []
        self.error: CodeError | None = None
        self.done: CodeResult | None = None
        self.call_id = ""

    def add(self, event) -> None:
        super().add(event)
        if isinstance(event, Started):
            self.call_id = event.run_id
        elif isinstance(event, RichResult):
            self.results.append(event)
        elif isinstance(event, CodeError):
            self.error = event
        elif isinstance(event, CodeResult):
            self.done = event

    def code_run(self) -> CodeRun:
        d = self.done
        if d is None:
            raise SandboxdError("INTERNAL", "the stream ended without the cell's result")
        return CodeRun(call_id=d.call_id or self.call_id, outcome=d.outcome,
                       stdout=self.text("stdout").decode("utf-8", "replace"),
                       stderr=self.text("stderr").decode("utf-8", "replace"),
                       results=[r.data for r in self.results], error=self.error,
                       execution_count=d.execution_count, kernel_restarted=d.kernel_restarted,
                       wall_time=d.wall_time, message=d.message, stdout_truncated=d.stdout_truncated,
                       stderr_truncated=d.stderr_truncated, result_kinds=tuple(r.kind for r in self.results))


# ---- files ---------------------------------------------------------------------------------------------------

def _as_bytes(data) -> bytes:
    return data.encode("utf-8") if isinstance(data, str) else bytes(data)


def _chunks(data: Data) -> Iterator[bytes]:
    """A payload in CHUNK pieces; a file object is read one piece at a time, never whole."""
    if hasattr(data, "read"):
        while piece := data.read(CHUNK):
            yield _as_bytes(piece)
        return
    view = memoryview(_as_bytes(data) if isinstance(data, str) else data).cast("B")
    for i in range(0, len(view), CHUNK):
        yield bytes(view[i:i + CHUNK])


def put_requests(session_id: str, files: Mapping[str, Data] | Sequence[tuple[str, Data, int]],
                 mode: int = 0o644) -> Iterator[pb.PutFilesRequest]:
    """PutFiles' stream: per file, a message with its path and mode (and the first chunk), then data alone."""
    items = files.items() if isinstance(files, Mapping) else files
    first = True
    for item in items:
        path, data, file_mode = (*item, mode) if len(item) == 2 else item
        chunks = _chunks(data)
        head = next(chunks, b"")
        yield pb.PutFilesRequest(session_id=session_id if first else "", path=path, mode=file_mode, data=head)
        first = False
        for piece in chunks:
            yield pb.PutFilesRequest(data=piece)
    if first:  # no file at all: the daemon still needs to know the session
        yield pb.PutFilesRequest(session_id=session_id)


def file_result(r: pb.FileResult) -> FileResult:
    return FileResult(path=r.path, error=r.error, message=r.message, size=r.size, sha256=r.sha256)


def raise_for(results: Sequence[FileResult]) -> None:
    for r in results:
        if r.error:
            raise FileError(r.path, r.error, r.message)


def file_info(f: pb.FileInfo) -> FileInfo:
    return FileInfo(name=f.name, path=f.path, type=f.type, size=f.size, mode=f.mode, mtime=f.mtime,
                    link_target=f.link_target)


class FileReceiver:
    """Splits GetFiles' stream into files: each file's data goes to the sink `sink_for(path)` returns, and its
    SHA-256 is checked against the daemon's. feed() returns (path, None) when a file ended well, (path, FileError)
    when it could not be read, and None in between."""

    def __init__(self, sink_for: Callable[[str], BinaryIO]):
        self.sink_for = sink_for
        self.path: str | None = None
        self.sink: BinaryIO | None = None
        self.hash = hashlib.sha256()

    def feed(self, c: pb.GetFilesChunk) -> tuple[str, FileError | None] | None:
        if self.path is None:
            if not c.path:
                raise SandboxdError("INTERNAL", "GetFiles sent data before naming its file")
            if c.error:
                return c.path, FileError(c.path, c.error, c.message)
            self.path, self.sink, self.hash = c.path, self.sink_for(c.path), hashlib.sha256()
        if c.error:  # an error part-way (the file changed while read): what was written is not the file
            path, self.path = self.path, None
            return path, FileError(path, c.error, c.message)
        if c.data:
            self.sink.write(c.data)
            self.hash.update(c.data)
        if not c.eof:
            return None
        path, self.path = self.path, None
        if c.sha256 and c.sha256 != self.hash.hexdigest():
            return path, FileError(path, "other", "the data received does not match the daemon's SHA-256",
                                   code="DATA_LOSS")
        return path, None

    def finish(self) -> None:
        if self.path is not None:
            raise SandboxdError("DATA_LOSS", f"the stream ended in the middle of {self.path}")


class CountingSink:
    """Passes a file's chunks on to a caller's file object and counts them."""

    def __init__(self, fileobj: BinaryIO):
        self.fileobj, self.written = fileobj, 0

    def write(self, data: bytes) -> None:
        self.fileobj.write(data)
        self.written += len(data)


def import_requests(session_id: str, tar: Data, path: str = "") -> Iterator[pb.ImportWorkspaceRequest]:
    first = True
    for piece in _chunks(tar):
        yield pb.ImportWorkspaceRequest(session_id=session_id if first else "", path=path if first else "",
                                        data=piece)
        first = False
    if first:
        yield pb.ImportWorkspaceRequest(session_id=session_id, path=path)


def import_result(r: pb.ImportWorkspaceResponse) -> ImportResult:
    return ImportResult(files=r.files, bytes=r.bytes, sha256=r.sha256)


def as_paths(path_or_paths: str | Sequence[str]) -> list[str]:
    return [path_or_paths] if isinstance(path_or_paths, str) else list(path_or_paths)

