"""sandboxd as a sandbox backend of the OpenAI Agents SDK (`agents.sandbox`, openai-agents 0.24).

    client = SandboxdSandboxClient(target="unix:///run/sandboxd/sandboxd.sock")
    result = await Runner.run(SandboxAgent(name="a", model=...), "task",
                              run_config=RunConfig(sandbox=SandboxRunConfig(client=client)))

Each SDK session is one sandboxd session (Client.session), whose workspace /work is the manifest's root. The
SDK's shell tool runs through Exec, its file reads and writes through GetFiles and PutFiles (which resolve paths
inside the sandbox's own root, so no symlink the code plants reaches the host), and persist_workspace /
hydrate_workspace are ExportWorkspace / ImportWorkspace tars. The serialized session state holds the sandboxd
session id and runner, never a credential: resume() reattaches to that session while it lives, and otherwise
creates a fresh one that the SDK hydrates from the state's snapshot. Calls carry the agent claims
agent_name="openai-agents" and the SDK's version.

PTY exec (supports_pty is True): the SDK's exec_command and write_stdin tools keep a process open across tool
calls under a numeric id. Each such process is one Exec call held open (on a pseudo-terminal when the tool asks
for tty, else on pipes with stdin closed); a task reads its events into a bounded buffer that the SDK's own
collect_pty_output drains for each tool call, and deleting or stopping the session cancels every call still open.
"""
from __future__ import annotations

import asyncio
import importlib.metadata
import io
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Literal

from agents.sandbox import Manifest
from agents.sandbox.errors import ExecTimeoutError, ExecTransportError, WorkspaceReadNotFoundError
from agents.sandbox.session.base_sandbox_session import BaseSandboxSession
from agents.sandbox.session.pty_output import collect_pty_output
from agents.sandbox.session.pty_types import (PTY_PROCESSES_MAX, PtyExecUpdate, allocate_pty_process_id,
                                              clamp_pty_yield_time_ms, process_id_to_prune_from_meta,
                                              resolve_pty_write_yield_time_ms)
from agents.sandbox.session.sandbox_client import BaseSandboxClient, BaseSandboxClientOptions
from agents.sandbox.session.sandbox_session import SandboxSession
from agents.sandbox.session.sandbox_session_state import SandboxSessionState
from agents.sandbox.snapshot import SnapshotBase, SnapshotSpec, resolve_snapshot
from agents.sandbox.types import ExecResult, User

from ..aio import AsyncClient, AsyncProcess, AsyncSession
from ..client import FileError, Output, Result, SandboxdError

AGENTS_VERSION = importlib.metadata.version("openai-agents")
WORKSPACE = "/work"     # every sandboxd session's workspace
PTY_BUFFER = 1 << 20    # unread output kept per open process; older bytes are dropped (and the drop is said)


class SandboxdSandboxClientOptions(BaseSandboxClientOptions):
    """What a new session asks sandboxd for (limits of 0: the runner's defaults)."""
    type: Literal["sandboxd"] = "sandboxd"
    runner: str = "python"
    memory: int = 0
    idle_timeout: float = 0
    pty_timeout: float = 0


class SandboxdSandboxSessionState(SandboxSessionState):
    type: Literal["sandboxd"] = "sandboxd"
    sandboxd_session_id: str = ""
    runner: str = "python"
    memory: int = 0
    idle_timeout: float = 0
    pty_timeout: float = 0


def _exit_code(result: Result) -> int:
    """The shell's numbers: a signal is 128+N (the sandbox's kills are SIGKILL), a timeout 124."""
    if result.outcome == "exited":
        return result.exit_code
    return 124 if result.outcome == "timeout" else 128 + (result.signal or 9)


class _PtyProcess:
    """One Exec call kept open between tool calls. A task moves its output into a bounded buffer as it comes,
    so a process that writes while nobody reads neither blocks the stream nor grows without bound."""

    def __init__(self, process: AsyncProcess, tty: bool):
        self.process, self.tty = process, tty
        self.pending = bytearray()
        self.dropped = 0
        self.exit_code: int | None = None
        self.last_used = time.monotonic()
        self.chunks: deque[bytes] = deque()    # collect_pty_output's queue: filled from pending when it polls
        self.lock = asyncio.Lock()
        self.notify = asyncio.Event()
        self.done = asyncio.Event()
        self.pump = asyncio.create_task(self._pump())

    def _append(self, data: bytes) -> None:
        self.pending += data
        if (over := len(self.pending) - PTY_BUFFER) > 0:
            del self.pending[:over]
            self.dropped += over
        self.notify.set()

    async def _pump(self) -> None:
        try:
            async for event in self.process:
                if isinstance(event, Output):
                    self._append(event.data)
                elif isinstance(event, Result):
                    if event.outcome not in ("exited", "signaled"):
                        self._append(f"\n[sandboxd: {event.outcome}: {event.message}]\n".encode())
                    self.exit_code = _exit_code(event)
            if self.exit_code is None:
                self._append(b"\n[sandboxd: the call ended without a result]\n")
        except SandboxdError as e:    # the daemon refused or lost the call: say so, like sandboxctl (125)
            self._append(f"\n[sandboxd: {e.code}: {e.message}]\n".encode())
        finally:
            if self.exit_code is None:
                self.exit_code = 125
            self.done.set()
            self.notify.set()

    async def poll(self, _deadline: float) -> None:
        if self.dropped:
            self.chunks.append(f"[... {self.dropped} bytes of output dropped ...]\n".encode())
            self.dropped = 0
        if self.pending:
            self.chunks.append(bytes(self.pending))
            self.pending.clear()

    async def collect(self, yield_time_ms: int, max_output_tokens: int | None) -> tuple[bytes, int | None, bool]:
        return await collect_pty_output(output_chunks=self.chunks, output_lock=self.lock, output_notify=self.notify,
                                        is_done=self.done.is_set, yield_time_ms=yield_time_ms,
                                        max_output_tokens=max_output_tokens, poll_output=self.poll)

    async def write(self, data: bytes) -> None:
        try:
            await self.process.write(data)
        except (SandboxdError, asyncio.InvalidStateError):
            pass    # it has ended (or is ending): the next collect reports how

    async def terminate(self) -> None:
        """Cancelling the call makes the daemon kill the command's process group."""
        self.process.cancel()
        self.pump.cancel()
        await asyncio.gather(self.pump, return_exceptions=True)


class SandboxdSandboxSession(BaseSandboxSession):
    """One sandboxd session behind the SDK's session interface."""

    state: SandboxdSandboxSessionState

    def __init__(self, *, state: SandboxdSandboxSessionState, connect: Callable[[], AsyncClient]):
        self.state = state
        self._connect = connect
        self._client: AsyncClient | None = None
        self._session: AsyncSession | None = None
        self._pty: dict[int, _PtyProcess] = {}
        self._pty_lock = asyncio.Lock()

    async def _sandboxd(self) -> AsyncSession:
        if self._session is None:
            await self._ensure_backend_started()
        assert self._session is not None
        return self._session

    async def _ensure_backend_started(self) -> None:
        """Reattach to the state's sandboxd session while it lives; otherwise start a new one (the SDK then
        restores the workspace from the snapshot, if the state has one)."""
        if self._session is not None:
            return
        self._client = self._client or self._connect()
        if self.state.sandboxd_session_id:
            try:
                self._session = await self._client.attach(self.state.sandboxd_session_id)
                self._set_start_state_preserved(True)
                return
            except SandboxdError as e:
                if e.code != "NOT_FOUND":
                    raise
        self._session = await self._client.session(self.state.runner, memory=self.state.memory,
                                                    idle_timeout=self.state.idle_timeout)
        self.state.sandboxd_session_id = self._session.id
        self.state.workspace_root_ready = False
        self._set_start_state_preserved(False)

    async def _exec_internal(self, *command: str | Path, timeout: float | None = None) -> ExecResult:
        session = await self._sandboxd()
        argv = [str(c) for c in command]
        result = await session.exec(argv, cwd=WORKSPACE, timeout=timeout or 0)
        if result.outcome == "timeout":
            raise ExecTimeoutError(command=argv, timeout_s=timeout)
        if result.outcome not in ("exited", "signaled", "memory_limit", "output_limit"):
            raise ExecTransportError(command=argv, context={"outcome": result.outcome,
                                                            "message": result.message})
        exit_code = result.exit_code if result.outcome == "exited" else 128 + (result.signal or 9)
        return ExecResult(stdout=result.stdout, stderr=result.stderr, exit_code=exit_code)

    def supports_pty(self) -> bool:
        return True

    async def pty_exec_start(self, *command: str | Path, timeout: float | None = None,
                             shell: bool | list[str] = True, user: str | User | None = None, tty: bool = False,
                             yield_time_s: float | None = None, max_output_tokens: int | None = None) -> PtyExecUpdate:
        """Starts the command as an Exec call that outlives this tool call. Its wall time is `timeout`, else the
        state's pty_timeout, else the session's per-call wall_time: an open process is ended when it runs out."""
        session = await self._sandboxd()
        argv = self._prepare_exec_command(*command, shell=shell, user=user)
        try:
            process = await session.start(argv, cwd=WORKSPACE, timeout=timeout or self.state.pty_timeout, tty=tty,
                                          close_stdin=not tty)
        except SandboxdError as e:     # nothing ran: the SDK may retry a non-tty command as a one-shot exec
            raise ExecTransportError(command=argv, context={"retry_safe": True, "message": str(e)}) from e
        entry = _PtyProcess(process, tty)
        async with self._pty_lock:
            process_id = allocate_pty_process_id(set(self._pty))
            pruned = self._prune_pty()
            self._pty[process_id] = entry
        if pruned is not None:
            await pruned.terminate()
        yield_ms = 10_000 if yield_time_s is None else int(yield_time_s * 1000)
        return await self._pty_update(process_id, entry, clamp_pty_yield_time_ms(yield_ms), max_output_tokens)

    async def pty_write_stdin(self, *, session_id: int, chars: str, yield_time_s: float | None = None,
                              max_output_tokens: int | None = None) -> PtyExecUpdate:
        async with self._pty_lock:
            entry = self._resolve_pty_session_entry(pty_processes=self._pty, session_id=session_id)
        if chars:
            if not entry.tty:
                raise RuntimeError("stdin is not available for this process")    # the SDK's words, it matches them
            await entry.write(chars.encode())
        yield_ms = 250 if yield_time_s is None else int(yield_time_s * 1000)
        entry.last_used = time.monotonic()
        return await self._pty_update(session_id, entry, resolve_pty_write_yield_time_ms(
            yield_time_ms=yield_ms, input_empty=chars == ""), max_output_tokens)

    async def _pty_update(self, process_id: int, entry: _PtyProcess, yield_ms: int,
                          max_output_tokens: int | None) -> PtyExecUpdate:
        output, tokens, closed = await entry.collect(yield_ms, max_output_tokens)
        if not closed:
            return PtyExecUpdate(process_id=process_id, output=output, exit_code=None, original_token_count=tokens)
        async with self._pty_lock:
            self._pty.pop(process_id, None)
        await entry.terminate()
        return PtyExecUpdate(process_id=None, output=output, exit_code=entry.exit_code, original_token_count=tokens)

    def _prune_pty(self) -> _PtyProcess | None:
        """The SDK's rule at its limit of open processes: the least recently used that has ended, else any
        but the most recent few."""
        if len(self._pty) < PTY_PROCESSES_MAX:
            return None
        victim = process_id_to_prune_from_meta([(pid, e.last_used, e.done.is_set()) for pid, e in self._pty.items()])
        return None if victim is None else self._pty.pop(victim)

    async def pty_terminate_all(self) -> None:
        async with self._pty_lock:
            entries, self._pty = list(self._pty.values()), {}
        for entry in entries:
            await entry.terminate()

    async def read(self, path: Path, *, user: str | User | None = None) -> io.IOBase:
        target = await self._validate_path_access(path)
        try:
            return io.BytesIO(await (await self._sandboxd()).read(str(target)))
        except FileError as e:
            if e.error == "not_found":
                raise WorkspaceReadNotFoundError(path=target) from None
            raise

    async def write(self, path: Path, data: io.IOBase, *, user: str | User | None = None) -> None:
        target = await self._validate_path_access(path, for_write=True)
        payload = data.read()
        await (await self._sandboxd()).write(str(target), payload.encode() if isinstance(payload, str) else payload)

    async def running(self) -> bool:
        if self._session is None:
            return False
        try:
            return (await self._session.info()).state != "closed"
        except SandboxdError:
            return False

    async def persist_workspace(self) -> io.IOBase:
        return io.BytesIO(await (await self._sandboxd()).export())

    async def hydrate_workspace(self, data: io.IOBase) -> None:
        await (await self._sandboxd()).import_(data.read())

    async def _shutdown_backend(self) -> None:
        await self.pty_terminate_all()      # client.delete() comes straight here, past the SDK's shutdown()
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._client is not None:
            await self._client.close()
            self._client = None


class SandboxdSandboxClient(BaseSandboxClient[SandboxdSandboxClientOptions | None]):
    """Creates and resumes sandboxd sessions for SandboxAgent runs. The keyword arguments are
    sandboxd.aio.AsyncClient's (target, token, TLS files...); the agent claims default to this SDK's."""

    backend_id = "sandboxd"
    supports_default_options = True

    def __init__(self, **client_kwargs: Any):
        client_kwargs.setdefault("agent_name", "openai-agents")
        client_kwargs.setdefault("agent_version", AGENTS_VERSION)
        self._client_kwargs = client_kwargs
        self._dependencies = None

    def _connect(self) -> AsyncClient:
        return AsyncClient(**self._client_kwargs)

    def _wrap(self, state: SandboxdSandboxSessionState) -> SandboxSession:
        return self._wrap_session(SandboxdSandboxSession(state=state, connect=self._connect))

    async def create(self, *, snapshot: SnapshotSpec | SnapshotBase | None = None, manifest: Manifest | None = None,
                     options: SandboxdSandboxClientOptions | None = None) -> SandboxSession:
        options = options or SandboxdSandboxClientOptions()
        manifest = (manifest or Manifest()).model_copy(update={"root": WORKSPACE}, deep=True)
        self._validate_manifest_for_create(manifest)
        state = SandboxdSandboxSessionState(manifest=manifest, snapshot=resolve_snapshot(snapshot, "sandboxd"),
                                            runner=options.runner, memory=options.memory,
                                            idle_timeout=options.idle_timeout, pty_timeout=options.pty_timeout)
        state.snapshot = resolve_snapshot(snapshot, str(state.session_id))
        return self._wrap(state)

    async def delete(self, session: SandboxSession) -> SandboxSession:
        inner = session._inner
        if not isinstance(inner, SandboxdSandboxSession):
            raise TypeError("SandboxdSandboxClient.delete expects a SandboxdSandboxSession")
        await inner._shutdown_backend()
        return session

    async def resume(self, state: SandboxSessionState) -> SandboxSession:
        if not isinstance(state, SandboxdSandboxSessionState):
            raise TypeError("SandboxdSandboxClient.resume expects a SandboxdSandboxSessionState")
        return self._wrap(state)

    def deserialize_session_state(self, payload: dict[str, object]) -> SandboxSessionState:
        return self._deserialize_session_state_payload(payload, SandboxdSandboxSessionState)
