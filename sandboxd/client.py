"""The public Python client for sandboxd. Agent code imports this; sandboxctl is a thin shell over it.

    from sandboxd.client import Client

    with Client() as c:                                  # SANDBOXD_TARGET or unix:///run/sandboxd/sandboxd.sock
        result = c.run("print(6 * 7)")                   # waits, collects output
        print(result.outcome, result.exit_code, result.stdout)

        for event in c.execute("for i in range(3): print(i)", runner="python", wall_time=5):
            if isinstance(event, Output):                # streamed as the script produces it
                print(event.stream, event.data)
            elif isinstance(event, Result):
                print(event.outcome)

        with c.session(runner="python") as s:            # one sandbox kept for many calls (docs/sessions.md)
            s.write("data.csv", b"a,b\\n1,2\\n")
            s.exec(["wc", "-l", "data.csv"]).text        # '2 data.csv\\n'
            s.run_code("import csv; rows = list(csv.reader(open('data.csv')))")
            s.run_code("len(rows)").text                 # '2': state survives between cells

Errors from the daemon (unknown runner, bad limits, overload, unauthenticated...) raise SandboxdError with the
gRPC status code name and the daemon's message; a file operation that fails for its path raises FileError (a
SandboxdError). What the code did is never an error: it is Result.outcome, ExecResult.outcome, CodeRun.error.
This module's names are the stable API (sandboxd.aio mirrors them for asyncio); everything else in the package
may change.
"""
from __future__ import annotations

import io
import json
import queue
from typing import BinaryIO, Iterator, Mapping, Sequence

import grpc

from . import _convert as _c
from ._convert import DEFAULT_TARGET, OUTCOMES  # noqa: F401  (public since the first release)
from ._types import (CodeError, CodeResult, CodeRun, ExecResult, FileError, FileInfo, FileResult, ImportResult,
                     Output, Result, RichResult, RunnerInfo, SandboxdError, SessionInfo, Started, StopResult)
from .v1 import sandbox_pb2 as pb
from .v1 import sandbox_pb2_grpc as pb_grpc

__all__ = ["Client", "Session", "Process", "SandboxdError", "FileError", "Started", "Output", "Result",
           "RunnerInfo", "SessionInfo", "ExecResult", "RichResult", "CodeError", "CodeResult", "CodeRun",
           "FileResult", "FileInfo", "ImportResult", "StopResult", "DEFAULT_TARGET"]

UNARY_TIMEOUT = 30.0   # seconds; the deadline of calls that move no payload (stat, list, close...)


class Client:
    """A connection to sandboxd.

    target: "unix:///path.sock" or "host:port" (default $SANDBOXD_TARGET, else the standard unix socket).
    token: a bearer token (default $SANDBOXD_TOKEN); sent only over TLS or a unix socket unless
        allow_insecure_token is set.
    tls_ca / tls_cert / tls_key: PEM files for TLS to a TCP target (the CA to verify the server; a client
        certificate and key for mTLS).
    agent_name / agent_version / agent_tool / session_id / traceparent: claims recorded with every run
        (defaults: $SANDBOXD_AGENT_NAME, $SANDBOXD_AGENT_VERSION). Claims never replace the authenticated
        identity. (The session_id claim is the agent's own conversation id, not a sandboxd session.)
    """

    def __init__(self, target: str | None = None, metadata: Sequence[tuple[str, str]] = (),
                 credentials: grpc.ChannelCredentials | None = None, options: Sequence = (), *,
                 token: str | None = None, tls_ca: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None, agent_name: str | None = None, agent_version: str | None = None,
                 agent_tool: str | None = None, session_id: str | None = None, traceparent: str | None = None,
                 allow_insecure_token: bool = False, tls_server_name: str | None = None):
        self.target, credentials, opts, self.metadata = _c.channel_config(
            target, metadata, credentials, options, token=token, tls_ca=tls_ca, tls_cert=tls_cert,
            tls_key=tls_key, agent_name=agent_name, agent_version=agent_version, agent_tool=agent_tool,
            session_id=session_id, traceparent=traceparent, allow_insecure_token=allow_insecure_token,
            tls_server_name=tls_server_name)
        self.channel = (grpc.secure_channel(self.target, credentials, opts) if credentials
                        else grpc.insecure_channel(self.target, opts))
        self.stub = pb_grpc.SandboxStub(self.channel)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _unary(self, method: str, request, timeout: float | None):
        try:
            return getattr(self.stub, method)(request, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise _c.rpc_error(e) from None

    # ---- one-shot runs ---------------------------------------------------------------------------------------

    def execute(self, code: str, runner: str = "python", *, args: Sequence[str] = (), stdin: bytes = b"",
                env: Mapping[str, str] | None = None, files: Mapping[str, bytes] | None = None,
                wall_time: float = 0, cpu_time: float = 0, memory: int = 0, pids: int = 0, output: int = 0,
                collect_files: Sequence[str] = (), timeout: float | None = None) -> Iterator[Started | Output | Result]:
        """Stream one run: Started, then Output chunks as produced, then one Result. Limits of 0 mean the
        runner's default; a limit may be raised above it, up to the runner's maximum and the policy's ceiling.
        `collect_files` are glob patterns relative to /work whose matching files come back in Result.files (up to
        the daemon's total cap; Result.files_truncated says when some were left out). `timeout` is the RPC
        deadline: when it passes the daemon stops the run (outcome cancelled). Closing the iterator early cancels
        the run too."""
        request = _c.execute_request(code, runner, args=args, stdin=stdin, env=env, files=files,
                                     wall_time=wall_time, cpu_time=cpu_time, memory=memory, pids=pids,
                                     output=output, collect_files=collect_files)
        call = self.stub.Execute(request, timeout=timeout, metadata=self.metadata)
        try:
            for event in call:
                if (converted := _c.execute_event(event)) is not None:
                    yield converted
        except grpc.RpcError as e:
            raise _c.rpc_error(e) from None
        finally:
            call.cancel()

    def run(self, code: str, runner: str = "python", **kwargs) -> Result:
        """Run to the end and return the Result with stdout and stderr collected (at most the output cap)."""
        collected, result = _c.OutputCollector(), None
        for event in self.execute(code, runner, **kwargs):
            collected.add(event)
            if isinstance(event, Result):
                result = event
        return collected.run_result(result)

    def get_run(self, run_id: str, timeout: float | None = 10) -> dict:
        """The record of one run as a dict (see docs/identity.md for its keys). Admins read any run; others
        their own (another principal's run raises SandboxdError NOT_FOUND)."""
        return json.loads(self._unary("GetRun", pb.GetRunRequest(run_id=run_id), timeout).record_json)

    def list_runs(self, *, principal: str = "", agent: str = "", runner: str = "", outcome: str = "",
                  since: str = "", until: str = "", limit: int = 50, page_token: str = "",
                  timeout: float | None = 10) -> tuple[list[dict], str]:
        """(records newest first, next page token or ""). Times are RFC 3339."""
        msg = self._unary("ListRuns", pb.ListRunsRequest(principal=principal, agent=agent, runner=runner,
                                                         outcome=outcome, since=since, until=until, limit=limit,
                                                         page_token=page_token), timeout)
        return [json.loads(r.record_json) for r in msg.runs], msg.next_page_token

    def runners(self, timeout: float | None = 10) -> list[RunnerInfo]:
        return [_c.runner_info(r) for r in self._unary("ListRunners", pb.ListRunnersRequest(), timeout).runners]

    # ---- the stop button -------------------------------------------------------------------------------------

    def stop_run(self, run_id: str, reason: str = "", timeout: float | None = 10) -> StopResult:
        """Stop one run in flight (admins: any; others: their own). It ends with outcome cancelled and the
        message "stopped by <you>: <reason>". A run that is not in flight raises SandboxdError NOT_FOUND."""
        msg = self._unary("StopRun", pb.StopRunRequest(run_id=run_id, reason=reason), timeout)
        return StopResult(msg.runs_stopped, msg.sessions_closed, msg.message)

    def stop_principal(self, principal: str = "", reason: str = "", timeout: float | None = 10) -> StopResult:
        """Stop every run and session of `principal` (default: yourself; another principal needs the admin
        role, else SandboxdError PERMISSION_DENIED)."""
        msg = self._unary("StopPrincipal", pb.StopPrincipalRequest(principal=principal, reason=reason), timeout)
        return StopResult(msg.runs_stopped, msg.sessions_closed, msg.message)

    # ---- sessions --------------------------------------------------------------------------------------------

    def session(self, runner: str = "python", *, wall_time: float = 0, cpu_time: float = 0, memory: int = 0,
                pids: int = 0, output: int = 0, idle_timeout: float = 0, max_lifetime: float = 0,
                env: Mapping[str, str] | None = None, files: Mapping[str, bytes | str] | None = None,
                workspace_tar: bytes | BinaryIO | None = None, timeout: float | None = 120) -> "Session":
        """A new session: one sandbox kept for many calls until it is closed, idle for `idle_timeout` seconds
        or `max_lifetime` old (0: the configured defaults; a request may set them up to the configured maxima). The limits cover
        the whole session (memory, pids) and are the defaults of its calls (wall_time, output). `env` is the
        default environment of every call; `files` and `workspace_tar` fill /work before anything runs."""
        tar_file = workspace_tar if hasattr(workspace_tar, "read") else None
        request = _c.create_session_request(
            runner, wall_time=wall_time, cpu_time=cpu_time, memory=memory, pids=pids, output=output,
            idle_timeout=idle_timeout, max_lifetime=max_lifetime, env=env, files=files,
            workspace_tar=None if tar_file else workspace_tar)
        session = Session(self, _c.session_info(self._unary("CreateSession", request, timeout)))
        if tar_file is not None:  # streamed after creation rather than held whole in one request
            try:
                session.import_(tar_file)
            except BaseException:
                session.close()
                raise
        return session

    def attach(self, session_id: str, timeout: float | None = UNARY_TIMEOUT) -> "Session":
        """An existing session (created by this or another process of the same principal). A session that
        does not exist, ended, or is another principal's raises SandboxdError NOT_FOUND here, at once."""
        return Session(self, self.get_session(session_id, timeout=timeout))

    def get_session(self, session_id: str, timeout: float | None = UNARY_TIMEOUT) -> SessionInfo:
        return _c.session_info(self._unary("GetSession", pb.GetSessionRequest(session_id=session_id), timeout))

    def list_sessions(self, principal: str = "", include_closed: bool = False, limit: int = 100,
                      timeout: float | None = UNARY_TIMEOUT) -> list[SessionInfo]:
        """The caller's sessions (admins: every principal's, or `principal`'s); `include_closed` adds recently
        ended ones from the record."""
        msg = self._unary("ListSessions", pb.ListSessionsRequest(principal=principal, include_closed=include_closed,
                                                                 limit=limit), timeout)
        return [_c.session_info(s) for s in msg.sessions]

    def close_session(self, session_id: str, timeout: float | None = UNARY_TIMEOUT) -> SessionInfo:
        """Close a session (admins: any): its processes, kernels and workspace are gone. Returns its final state."""
        return _c.session_info(self._unary("CloseSession", pb.CloseSessionRequest(session_id=session_id),
                                           timeout))


_END = object()


class Process:
    """A command running in a session (Session.start). Iterate it for its events (Started, then Output chunks
    as produced, then one Result whose run_id is the call id), or call wait() for the collected ExecResult.
    write(), close_stdin() and resize() may be called from another thread while this one iterates. Leaving
    a `with` block, or cancel(), kills the command's process group if it is still running."""

    def __init__(self, stub, metadata, start: pb.ExecRequest, timeout: float | None = None):
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._requests.put(start)
        self._call = stub.Exec(self._outgoing(), timeout=timeout, metadata=metadata)
        self._collected = _c.OutputCollector()
        self._result: Result | None = None
        self._events = self._incoming()
        self.call_id = ""

    def _outgoing(self) -> Iterator[pb.ExecRequest]:
        while (msg := self._requests.get()) is not _END:
            yield msg

    def _incoming(self) -> Iterator[Started | Output | Result]:
        try:
            for event in self._call:
                converted = _c.execute_event(event)
                self._collected.add(converted)
                if isinstance(converted, Started):
                    self.call_id = converted.run_id
                elif isinstance(converted, Result):
                    self._result = converted
                if converted is not None:
                    yield converted
        except grpc.RpcError as e:
            raise _c.rpc_error(e) from None
        finally:
            self._finish()

    def _finish(self) -> None:
        self._requests.put(_END)   # ends the request stream, so gRPC's sending thread stops too
        self._call.cancel()

    def __iter__(self) -> Iterator[Started | Output | Result]:
        return self._events

    def __enter__(self) -> "Process":
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()

    def write(self, data: bytes | str) -> None:
        self._requests.put(_c.exec_stdin(data))

    def close_stdin(self) -> None:
        self._requests.put(_c.exec_close_stdin())

    def resize(self, rows: int, cols: int) -> None:
        self._requests.put(_c.exec_resize(rows, cols))

    def wait(self) -> ExecResult:
        """Read the remaining events and return the result with all the output this Process has seen."""
        for _ in self._events:
            pass
        return self._collected.exec_result(self._result)

    @property
    def result(self) -> Result | None:
        """The final event, once it arrived."""
        return self._result

    def cancel(self) -> None:
        """Stop the command (the daemon kills its process group); a no-op once it ended."""
        self._finish()


class Session:
    """One sandbox kept for many calls (Client.session or Client.attach). A context manager: leaving the block
    closes the session. Relative paths are relative to the workspace, /work."""

    def __init__(self, client: Client, info: SessionInfo):
        self.client, self.id, self.closed = client, info.session_id, False
        self._stub, self._md = client.stub, client.metadata

    def __repr__(self) -> str:
        return f"<Session {self.id}>"

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _unary(self, method: str, request, path: str | None = None, timeout: float | None = UNARY_TIMEOUT):
        try:
            return self.client._unary(method, request, timeout)
        except SandboxdError as e:
            raise (_c.path_error(e, path) if path is not None else e) from None

    def info(self) -> SessionInfo:
        return self.client.get_session(self.id)

    def close(self) -> SessionInfo | None:
        """Close the session: its processes, kernels and workspace are gone. A session that already ended (or
        was closed by someone else) is not an error: None is returned."""
        if self.closed:
            return None
        self.closed = True
        try:
            return self.client.close_session(self.id)
        except SandboxdError as e:
            if e.code == "NOT_FOUND":
                return None
            raise

    # ---- commands ----------------------------------------------------------------------------------------

    def start(self, cmd: Sequence[str] | str, *, cwd: str | None = None, env: Mapping[str, str] | None = None,
              timeout: float = 0, stdin: bytes | str | None = None, close_stdin: bool = False, output: int = 0,
              tty: bool = False, rows: int = 0, cols: int = 0) -> Process:
        """Start a command: `cmd` is an argv, or a str run with the image's `sh -c`. `timeout` is the call's
        wall-clock limit (0: the runner's default); stdin stays open for write() until close_stdin()."""
        start = _c.exec_start(self.id, cmd, cwd=cwd, env=env, timeout=timeout, stdin=stdin,
                              close_stdin=close_stdin, output=output, tty=tty, rows=rows, cols=cols)
        return Process(self._stub, self._md, start)

    def exec(self, cmd: Sequence[str] | str, *, cwd: str | None = None, env: Mapping[str, str] | None = None,
             timeout: float = 0, stdin: bytes | str | None = None, output: int = 0, tty: bool = False,
             rows: int = 0, cols: int = 0) -> ExecResult:
        """Run a command to its end with `stdin` (then end of file) and return its collected result. A missing
        program is an ordinary result (exit code 127), not an error."""
        with self.start(cmd, cwd=cwd, env=env, timeout=timeout, stdin=stdin or b"", close_stdin=True,
                        output=output, tty=tty, rows=rows, cols=cols) as process:
            return process.wait()

    # ---- code cells ------------------------------------------------------------------------------------------

    def run_code_stream(self, code: str, *, context: str = "default", timeout: float = 0,
                        output: int = 0) -> Iterator[Started | Output | RichResult | CodeError | CodeResult]:
        """A cell's events as they come: Started, Output, RichResult, at most one CodeError, one CodeResult.
        Closing the iterator early interrupts the cell."""
        call = self._stub.RunCode(_c.run_code_request(self.id, code, context, timeout, output),
                                  metadata=self._md)
        try:
            for event in call:
                if (converted := _c.code_event(event)) is not None:
                    yield converted
        except grpc.RpcError as e:
            raise _c.rpc_error(e) from None
        finally:
            call.cancel()

    def run_code(self, code: str, *, context: str = "default", timeout: float = 0, output: int = 0) -> CodeRun:
        """Run a cell in a kernel context and collect it: `.text` is its value's text/plain, `.error` what it
        raised. Cells of one context run one at a time; state (variables, imports) survives between them."""
        collected = _c.CodeCollector()
        for event in self.run_code_stream(code, context=context, timeout=timeout, output=output):
            collected.add(event)
        return collected.code_run()

    def interrupt(self, context: str = "default") -> bool:
        """Interrupt the context's running cell (it ends with KeyboardInterrupt). False: none was running."""
        return self._unary("InterruptCode", pb.InterruptCodeRequest(session_id=self.id, context=context)).interrupted

    def reset(self, context: str = "default") -> None:
        """Start the context afresh: its variables are gone; the workspace stays."""
        self._unary("ResetContext", pb.ResetContextRequest(session_id=self.id, context=context))

    # ---- files -----------------------------------------------------------------------------------------------

    def write_files(self, files: Mapping[str, _c.Data], mode: int = 0o644) -> list[FileResult]:
        """Write files (bytes, str as UTF-8, or binary file objects streamed in chunks), creating parent
        directories. Each path gets its own FileResult; nothing is raised for a path that failed."""
        try:
            resp = self._stub.PutFiles(_c.put_requests(self.id, files, mode), metadata=self._md)
        except grpc.RpcError as e:
            raise _c.rpc_error(e) from None
        return [_c.file_result(r) for r in resp.results]

    def write(self, path: str, data: _c.Data, mode: int = 0o644) -> FileResult:
        """Write one file (raises FileError when the path cannot be written)."""
        try:
            results = self.write_files({path: data}, mode)
        except SandboxdError as e:
            raise _c.path_error(e, path) from None
        _c.raise_for(results)
        return results[0] if results else FileResult(path)

    def _get(self, paths: Sequence[str], sink_for, max_bytes: int) -> Iterator[tuple[str, FileError | None]]:
        call = self._stub.GetFiles(pb.GetFilesRequest(session_id=self.id, paths=list(paths), max_bytes=max_bytes),
                                   metadata=self._md)
        receiver = _c.FileReceiver(sink_for)
        try:
            for chunk in call:
                if (done := receiver.feed(chunk)) is not None:
                    yield done
            receiver.finish()
        except grpc.RpcError as e:
            error = _c.rpc_error(e)
            raise (_c.path_error(error, paths[0]) if len(paths) == 1 else error) from None
        finally:
            call.cancel()

    def read_files(self, paths: Sequence[str], max_bytes: int = 0) -> dict[str, bytes | FileError]:
        """Read files: each path maps to its bytes, or to the FileError that says why it could not be read."""
        buffers: dict[str, io.BytesIO] = {}
        out: dict[str, bytes | FileError] = {}
        for path, error in self._get(paths, lambda p: buffers.setdefault(p, io.BytesIO()), max_bytes):
            out[path] = error or buffers.pop(path).getvalue()
            buffers.pop(path, None)
        return out

    def read(self, path: str, max_bytes: int = 0) -> bytes:
        """One file's bytes (raises FileError; a file larger than max_bytes or the daemon's transfer limit
        is too_large, never a short read)."""
        return self._read_into(path, io.BytesIO(), max_bytes).getvalue()

    def read_to(self, path: str, fileobj: BinaryIO, max_bytes: int = 0) -> int:
        """Stream one file into a binary file object, chunk by chunk; returns the bytes written. On an error
        part-way, what was written so far is not the file: discard it."""
        return self._read_into(path, _c.CountingSink(fileobj), max_bytes).written

    def _read_into(self, path: str, sink, max_bytes: int):
        for _, error in self._get([path], lambda p: sink, max_bytes):
            if error:
                raise error
            return sink
        raise FileError(path, "other", "the daemon sent nothing for this path")

    def stat(self, path: str) -> FileInfo:
        """What the path is (symlinks are not followed at the last step)."""
        return _c.file_info(self._unary("StatFile", pb.StatFileRequest(session_id=self.id, path=path), path))

    def list(self, path: str = ".", depth: int = 1) -> list[FileInfo]:
        """The entries of a directory, `depth` levels down (1: its own entries)."""
        msg = self._unary("ListFiles", pb.ListFilesRequest(session_id=self.id, path=path, depth=depth), path)
        return [_c.file_info(f) for f in msg.files]

    def remove(self, path_or_paths: str | Sequence[str], recursive: bool = False) -> list[FileResult]:
        """Remove files (directories too with recursive); raises FileError for the first path that failed,
        after the daemon tried them all."""
        paths = _c.as_paths(path_or_paths)
        msg = self._unary("RemoveFiles", pb.RemoveFilesRequest(session_id=self.id, paths=paths, recursive=recursive),
                          paths[0] if len(paths) == 1 else None)
        results = [_c.file_result(r) for r in msg.results]
        _c.raise_for(results)
        return results

    def mkdir(self, path: str, parents: bool = False, mode: int = 0o755) -> FileResult:
        result = _c.file_result(self._unary("MakeDir", pb.MakeDirRequest(session_id=self.id, path=path,
                                                                         parents=parents, mode=mode), path))
        _c.raise_for([result])
        return result

    def export_to(self, fileobj: BinaryIO, path: str = "") -> int:
        """Stream a tar of the workspace (or of `path` beneath it) into a binary file object; returns its size."""
        call = self._stub.ExportWorkspace(pb.ExportWorkspaceRequest(session_id=self.id, path=path),
                                          metadata=self._md)
        size = 0
        try:
            for chunk in call:
                fileobj.write(chunk.data)
                size += len(chunk.data)
        except grpc.RpcError as e:
            raise _c.path_error(_c.rpc_error(e), path or ".") from None
        finally:
            call.cancel()
        return size

    def export(self, path: str = "") -> bytes:
        """A tar of the workspace (or of `path` beneath it), whole in memory: prefer export_to for big ones."""
        buffer = io.BytesIO()
        self.export_to(buffer, path)
        return buffer.getvalue()

    def import_(self, tar: bytes | BinaryIO, path: str = "") -> ImportResult:
        """Unpack a tar (bytes, or a binary file object streamed in chunks) into the workspace or `path`.
        Absolute names, `..`, links out and device entries are refused by the daemon (INVALID_ARGUMENT)."""
        try:
            return _c.import_result(self._stub.ImportWorkspace(_c.import_requests(self.id, tar, path),
                                                               metadata=self._md))
        except grpc.RpcError as e:
            raise _c.rpc_error(e) from None
