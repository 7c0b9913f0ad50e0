"""The asyncio client for sandboxd: sandboxd.client's API over grpc.aio, for agents that live in an event loop.

    from sandboxd.aio import AsyncClient

    async with AsyncClient() as c:
        r = await c.run("print(6 * 7)")
        async for event in c.execute("print(1)"):
            ...
        async with c.session(runner="python") as s:      # or: s = await c.session(...); ...; await s.close()
            await s.write("data.csv", b"a,b\\n1,2\\n")
            (await s.exec(["wc", "-l", "data.csv"])).text
            (await s.run_code("1 + 1")).text              # '2'

Same constructor options, value types and errors as sandboxd.client (they are the same classes); every method
that talks to the daemon is a coroutine, every stream an async iterator. Binary file objects handed to write(),
import_() or read_to() are read and written synchronously, one 1 MiB chunk at a time.
"""
from __future__ import annotations

import io
import json
from typing import AsyncIterator, BinaryIO, Mapping, Sequence

import grpc
import grpc.aio

from . import _convert as _c
from ._convert import DEFAULT_TARGET  # noqa: F401
from ._types import (CodeError, CodeResult, CodeRun, ExecResult, FileError, FileInfo, FileResult, ImportResult,
                     Output, Result, RichResult, RunnerInfo, SandboxdError, SessionInfo, Started, StopResult)
from .v1 import sandbox_pb2 as pb
from .v1 import sandbox_pb2_grpc as pb_grpc

__all__ = ["AsyncClient", "AsyncSession", "AsyncProcess", "SandboxdError", "FileError", "Started", "Output",
           "Result", "RunnerInfo", "SessionInfo", "ExecResult", "RichResult", "CodeError", "CodeResult", "CodeRun",
           "FileResult", "FileInfo", "ImportResult", "StopResult"]

UNARY_TIMEOUT = 30.0


class AsyncClient:
    """A grpc.aio connection to sandboxd; the arguments are sandboxd.client.Client's. Create it inside the
    event loop that uses it."""

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
        self.channel = (grpc.aio.secure_channel(self.target, credentials, opts) if credentials
                        else grpc.aio.insecure_channel(self.target, opts))
        self.stub = pb_grpc.SandboxStub(self.channel)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def _unary(self, method: str, request, timeout: float | None):
        try:
            return await getattr(self.stub, method)(request, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise _c.rpc_error(e) from None

    # ---- one-shot runs ---------------------------------------------------------------------------------------

    async def execute(self, code: str, runner: str = "python", *, args: Sequence[str] = (), stdin: bytes = b"",
                      env: Mapping[str, str] | None = None, files: Mapping[str, bytes] | None = None,
                      wall_time: float = 0, cpu_time: float = 0, memory: int = 0, pids: int = 0, output: int = 0,
                      collect_files: Sequence[str] = (),
                      timeout: float | None = None) -> AsyncIterator[Started | Output | Result]:
        """Client.execute as an async iterator: closing it early cancels the run."""
        request = _c.execute_request(code, runner, args=args, stdin=stdin, env=env, files=files,
                                     wall_time=wall_time, cpu_time=cpu_time, memory=memory, pids=pids,
                                     output=output, collect_files=collect_files)
        call = self.stub.Execute(request, timeout=timeout, metadata=self.metadata)
        try:
            async for event in call:
                if (converted := _c.execute_event(event)) is not None:
                    yield converted
        except grpc.RpcError as e:
            raise _c.rpc_error(e) from None
        finally:
            call.cancel()

    async def run(self, code: str, runner: str = "python", **kwargs) -> Result:
        collected, result = _c.OutputCollector(), None
        async for event in self.execute(code, runner, **kwargs):
            collected.add(event)
            if isinstance(event, Result):
                result = event
        return collected.run_result(result)

    async def get_run(self, run_id: str, timeout: float | None = 10) -> dict:
        return json.loads((await self._unary("GetRun", pb.GetRunRequest(run_id=run_id), timeout)).record_json)

    async def list_runs(self, *, principal: str = "", agent: str = "", runner: str = "", outcome: str = "",
                        since: str = "", until: str = "", limit: int = 50, page_token: str = "",
                        timeout: float | None = 10) -> tuple[list[dict], str]:
        msg = await self._unary("ListRuns", pb.ListRunsRequest(principal=principal, agent=agent, runner=runner,
                                                               outcome=outcome, since=since, until=until,
                                                               limit=limit, page_token=page_token), timeout)
        return [json.loads(r.record_json) for r in msg.runs], msg.next_page_token

    async def runners(self, timeout: float | None = 10) -> list[RunnerInfo]:
        return [_c.runner_info(r) for r in (await self._unary("ListRunners", pb.ListRunnersRequest(),
                                                              timeout)).runners]

    async def stop_run(self, run_id: str, reason: str = "", timeout: float | None = 10) -> StopResult:
        """Client.stop_run, for asyncio."""
        msg = await self._unary("StopRun", pb.StopRunRequest(run_id=run_id, reason=reason), timeout)
        return StopResult(msg.runs_stopped, msg.sessions_closed, msg.message)

    async def stop_principal(self, principal: str = "", reason: str = "", timeout: float | None = 10) -> StopResult:
        """Client.stop_principal, for asyncio."""
        msg = await self._unary("StopPrincipal", pb.StopPrincipalRequest(principal=principal, reason=reason),
                                timeout)
        return StopResult(msg.runs_stopped, msg.sessions_closed, msg.message)

    # ---- sessions --------------------------------------------------------------------------------------------

    def session(self, runner: str = "python", *, wall_time: float = 0, cpu_time: float = 0, memory: int = 0,
                pids: int = 0, output: int = 0, idle_timeout: float = 0, max_lifetime: float = 0,
                env: Mapping[str, str] | None = None, files: Mapping[str, bytes | str] | None = None,
                workspace_tar: bytes | BinaryIO | None = None, timeout: float | None = 120) -> "_Opening":
        """Client.session: `await c.session(...)`, or `async with c.session(...) as s` to close it at the end."""
        async def create() -> AsyncSession:
            tar_file = workspace_tar if hasattr(workspace_tar, "read") else None
            request = _c.create_session_request(
                runner, wall_time=wall_time, cpu_time=cpu_time, memory=memory, pids=pids, output=output,
                idle_timeout=idle_timeout, max_lifetime=max_lifetime, env=env, files=files,
                workspace_tar=None if tar_file else workspace_tar)
            session = AsyncSession(self, _c.session_info(await self._unary("CreateSession", request, timeout)))
            if tar_file is not None:
                try:
                    await session.import_(tar_file)
                except BaseException:
                    await session.close()
                    raise
            return session
        return _Opening(create())

    def attach(self, session_id: str, timeout: float | None = UNARY_TIMEOUT) -> "_Opening":
        """Client.attach: NOT_FOUND at once for a session that does not exist, ended, or is someone else's."""
        async def attach() -> AsyncSession:
            return AsyncSession(self, await self.get_session(session_id, timeout=timeout))
        return _Opening(attach())

    async def get_session(self, session_id: str, timeout: float | None = UNARY_TIMEOUT) -> SessionInfo:
        return _c.session_info(await self._unary("GetSession", pb.GetSessionRequest(session_id=session_id),
                                                 timeout))

    async def list_sessions(self, principal: str = "", include_closed: bool = False, limit: int = 100,
                            timeout: float | None = UNARY_TIMEOUT) -> list[SessionInfo]:
        msg = await self._unary("ListSessions", pb.ListSessionsRequest(
            principal=principal, include_closed=include_closed, limit=limit), timeout)
        return [_c.session_info(s) for s in msg.sessions]

    async def close_session(self, session_id: str, timeout: float | None = UNARY_TIMEOUT) -> SessionInfo:
        return _c.session_info(await self._unary("CloseSession", pb.CloseSessionRequest(session_id=session_id),
                                                 timeout))


class _Opening:
    """A session on its way: awaitable (gives the AsyncSession) and an async context manager (closes it)."""

    def __init__(self, coro):
        self._coro, self._session = coro, None

    def __await__(self):
        return self._coro.__await__()

    async def __aenter__(self) -> "AsyncSession":
        self._session = await self._coro
        return self._session

    async def __aexit__(self, *exc) -> None:
        await self._session.close()


class AsyncProcess:
    """sandboxd.client.Process for asyncio: `async for event in process`, `await process.wait()`."""

    def __init__(self, call):
        self._call = call
        self._collected = _c.OutputCollector()
        self._result: Result | None = None
        self._events = self._incoming()
        self.call_id = ""

    async def _incoming(self) -> AsyncIterator[Started | Output | Result]:
        try:
            async for event in self._call:
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
            self._call.cancel()

    def __aiter__(self) -> AsyncIterator[Started | Output | Result]:
        return self._events

    async def __aenter__(self) -> "AsyncProcess":
        return self

    async def __aexit__(self, *exc) -> None:
        self.cancel()

    async def _send(self, msg: pb.ExecRequest) -> None:
        try:
            await self._call.write(msg)
        except grpc.RpcError as e:
            raise _c.rpc_error(e) from None

    async def write(self, data: bytes | str) -> None:
        await self._send(_c.exec_stdin(data))

    async def close_stdin(self) -> None:
        await self._send(_c.exec_close_stdin())

    async def resize(self, rows: int, cols: int) -> None:
        await self._send(_c.exec_resize(rows, cols))

    async def wait(self) -> ExecResult:
        async for _ in self._events:
            pass
        return self._collected.exec_result(self._result)

    @property
    def result(self) -> Result | None:
        return self._result

    def cancel(self) -> None:
        self._call.cancel()


class AsyncSession:
    """sandboxd.client.Session for asyncio: the same methods, as coroutines."""

    def __init__(self, client: AsyncClient, info: SessionInfo):
        self.client, self.id, self.closed = client, info.session_id, False
        self._stub, self._md = client.stub, client.metadata

    def __repr__(self) -> str:
        return f"<AsyncSession {self.id}>"

    async def __aenter__(self) -> "AsyncSession":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _unary(self, method: str, request, path: str | None = None, timeout: float | None = UNARY_TIMEOUT):
        try:
            return await self.client._unary(method, request, timeout)
        except SandboxdError as e:
            raise (_c.path_error(e, path) if path is not None else e) from None

    async def info(self) -> SessionInfo:
        return await self.client.get_session(self.id)

    async def close(self) -> SessionInfo | None:
        if self.closed:
            return None
        self.closed = True
        try:
            return await self.client.close_session(self.id)
        except SandboxdError as e:
            if e.code == "NOT_FOUND":
                return None
            raise

    # ---- commands ----------------------------------------------------------------------------------------

    async def start(self, cmd: Sequence[str] | str, *, cwd: str | None = None,
                    env: Mapping[str, str] | None = None, timeout: float = 0, stdin: bytes | str | None = None,
                    close_stdin: bool = False, output: int = 0, tty: bool = False, rows: int = 0,
                    cols: int = 0) -> AsyncProcess:
        start = _c.exec_start(self.id, cmd, cwd=cwd, env=env, timeout=timeout, stdin=stdin,
                              close_stdin=close_stdin, output=output, tty=tty, rows=rows, cols=cols)
        process = AsyncProcess(self._stub.Exec(metadata=self._md))
        await process._send(start)
        return process

    async def exec(self, cmd: Sequence[str] | str, *, cwd: str | None = None,
                   env: Mapping[str, str] | None = None, timeout: float = 0, stdin: bytes | str | None = None,
                   output: int = 0, tty: bool = False, rows: int = 0, cols: int = 0) -> ExecResult:
        async with await self.start(cmd, cwd=cwd, env=env, timeout=timeout, stdin=stdin or b"", close_stdin=True,
                                    output=output, tty=tty, rows=rows, cols=cols) as process:
            return await process.wait()

    # ---- code cells ------------------------------------------------------------------------------------------

    async def run_code_stream(self, code: str, *, context: str = "default", timeout: float = 0,
                              output: int = 0) -> AsyncIterator[Started | Output | RichResult | CodeError | CodeResult]:
        call = self._stub.RunCode(_c.run_code_request(self.id, code, context, timeout, output), metadata=self._md)
        try:
            async for event in call:
                if (converted := _c.code_event(event)) is not None:
                    yield converted
        except grpc.RpcError as e:
            raise _c.rpc_error(e) from None
        finally:
            call.cancel()

    async def run_code(self, code: str, *, context: str = "default", timeout: float = 0,
                       output: int = 0) -> CodeRun:
        collected = _c.CodeCollector()
        async for event in self.run_code_stream(code, context=context, timeout=timeout, output=output):
            collected.add(event)
        return collected.code_run()

    async def interrupt(self, context: str = "default") -> bool:
        return (await self._unary("InterruptCode", pb.InterruptCodeRequest(session_id=self.id,
                                                                           context=context))).interrupted

    async def reset(self, context: str = "default") -> None:
        await self._unary("ResetContext", pb.ResetContextRequest(session_id=self.id, context=context))

    # ---- files -----------------------------------------------------------------------------------------------

    async def write_files(self, files: Mapping[str, _c.Data], mode: int = 0o644) -> list[FileResult]:
        try:
            resp = await self._stub.PutFiles(_c.put_requests(self.id, files, mode), metadata=self._md)
        except grpc.RpcError as e:
            raise _c.rpc_error(e) from None
        return [_c.file_result(r) for r in resp.results]

    async def write(self, path: str, data: _c.Data, mode: int = 0o644) -> FileResult:
        try:
            results = await self.write_files({path: data}, mode)
        except SandboxdError as e:
            raise _c.path_error(e, path) from None
        _c.raise_for(results)
        return results[0] if results else FileResult(path)

    async def _get(self, paths: Sequence[str], sink_for, max_bytes: int) -> AsyncIterator[tuple[str, FileError | None]]:
        call = self._stub.GetFiles(pb.GetFilesRequest(session_id=self.id, paths=list(paths), max_bytes=max_bytes),
                                   metadata=self._md)
        receiver = _c.FileReceiver(sink_for)
        try:
            async for chunk in call:
                if (done := receiver.feed(chunk)) is not None:
                    yield done
            receiver.finish()
        except grpc.RpcError as e:
            error = _c.rpc_error(e)
            raise (_c.path_error(error, paths[0]) if len(paths) == 1 else error) from None
        finally:
            call.cancel()

    async def read_files(self, paths: Sequence[str], max_bytes: int = 0) -> dict[str, bytes | FileError]:
        buffers: dict[str, io.BytesIO] = {}
        out: dict[str, bytes | FileError] = {}
        async for path, error in self._get(paths, lambda p: buffers.setdefault(p, io.BytesIO()), max_bytes):
            out[path] = error or buffers.pop(path).getvalue()
            buffers.pop(path, None)
        return out

    async def read(self, path: str, max_bytes: int = 0) -> bytes:
        return (await self._read_into(path, io.BytesIO(), max_bytes)).getvalue()

    async def read_to(self, path: str, fileobj: BinaryIO, max_bytes: int = 0) -> int:
        return (await self._read_into(path, _c.CountingSink(fileobj), max_bytes)).written

    async def _read_into(self, path: str, sink, max_bytes: int):
        files = self._get([path], lambda p: sink, max_bytes)
        try:
            async for _, error in files:
                if error:
                    raise error
                return sink
        finally:
            await files.aclose()
        raise FileError(path, "other", "the daemon sent nothing for this path")

    async def stat(self, path: str) -> FileInfo:
        return _c.file_info(await self._unary("StatFile", pb.StatFileRequest(session_id=self.id, path=path), path))

    async def list(self, path: str = ".", depth: int = 1) -> list[FileInfo]:
        msg = await self._unary("ListFiles", pb.ListFilesRequest(session_id=self.id, path=path, depth=depth), path)
        return [_c.file_info(f) for f in msg.files]

    async def remove(self, path_or_paths: str | Sequence[str], recursive: bool = False) -> list[FileResult]:
        paths = _c.as_paths(path_or_paths)
        msg = await self._unary("RemoveFiles", pb.RemoveFilesRequest(session_id=self.id, paths=paths,
                                                                     recursive=recursive),
                                paths[0] if len(paths) == 1 else None)
        results = [_c.file_result(r) for r in msg.results]
        _c.raise_for(results)
        return results

    async def mkdir(self, path: str, parents: bool = False, mode: int = 0o755) -> FileResult:
        result = _c.file_result(await self._unary("MakeDir", pb.MakeDirRequest(
            session_id=self.id, path=path, parents=parents, mode=mode), path))
        _c.raise_for([result])
        return result

    async def export_to(self, fileobj: BinaryIO, path: str = "") -> int:
        call = self._stub.ExportWorkspace(pb.ExportWorkspaceRequest(session_id=self.id, path=path),
                                          metadata=self._md)
        size = 0
        try:
            async for chunk in call:
                fileobj.write(chunk.data)
                size += len(chunk.data)
        except grpc.RpcError as e:
            raise _c.path_error(_c.rpc_error(e), path or ".") from None
        finally:
            call.cancel()
        return size

    async def export(self, path: str = "") -> bytes:
        buffer = io.BytesIO()
        await self.export_to(buffer, path)
        return buffer.getvalue()

    async def import_(self, tar: bytes | BinaryIO, path: str = "") -> ImportResult:
        try:
            return _c.import_result(await self._stub.ImportWorkspace(_c.import_requests(self.id, tar, path),
                                                                     metadata=self._md))
        except grpc.RpcError as e:
            raise _c.rpc_error(e) from None

