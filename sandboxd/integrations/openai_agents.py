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
agent_name="openai-agents" and the SDK's version. PTY exec is not offered (supports_pty is False): sandboxd's
Exec has a tty option, but the SDK's PTY interface keeps processes open across tool calls by numeric id, which
this adapter does not implement yet.
"""
from __future__ import annotations

import importlib.metadata
import io
from pathlib import Path
from typing import Any, Callable, Literal

from agents.sandbox import Manifest
from agents.sandbox.errors import ExecTimeoutError, ExecTransportError, WorkspaceReadNotFoundError
from agents.sandbox.session.base_sandbox_session import BaseSandboxSession
from agents.sandbox.session.sandbox_client import BaseSandboxClient, BaseSandboxClientOptions
from agents.sandbox.session.sandbox_session import SandboxSession
from agents.sandbox.session.sandbox_session_state import SandboxSessionState
from agents.sandbox.snapshot import SnapshotBase, SnapshotSpec, resolve_snapshot
from agents.sandbox.types import ExecResult, User

from ..aio import AsyncClient, AsyncSession
from ..client import FileError, SandboxdError

AGENTS_VERSION = importlib.metadata.version("openai-agents")
WORKSPACE = "/work"     # every sandboxd session's workspace


class SandboxdSandboxClientOptions(BaseSandboxClientOptions):
    """What a new session asks sandboxd for (limits of 0: the runner's defaults)."""
    type: Literal["sandboxd"] = "sandboxd"
    runner: str = "python"
    memory: int = 0
    idle_timeout: float = 0


class SandboxdSandboxSessionState(SandboxSessionState):
    type: Literal["sandboxd"] = "sandboxd"
    sandboxd_session_id: str = ""
    runner: str = "python"
    memory: int = 0
    idle_timeout: float = 0


class SandboxdSandboxSession(BaseSandboxSession):
    """One sandboxd session behind the SDK's session interface."""

    state: SandboxdSandboxSessionState

    def __init__(self, *, state: SandboxdSandboxSessionState, connect: Callable[[], AsyncClient]):
        self.state = state
        self._connect = connect
        self._client: AsyncClient | None = None
        self._session: AsyncSession | None = None

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
                                            idle_timeout=options.idle_timeout)
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
