"""AutoGen code executor: the code blocks an AutoGen agent runs go to a sandboxd session.

    from autogen_agentchat.agents import CodeExecutorAgent
    from sandboxd.integrations.autogen import SandboxdCodeExecutor

    async with SandboxdCodeExecutor(runner="python") as executor:
        agent = CodeExecutorAgent("coder", model_client=..., code_executor=executor)
        await agent.run(task="...")

`SandboxdCodeExecutor` is autogen-core's `CodeExecutor` (0.7). Python blocks are cells of one kernel context of
the session, so variables and imports persist between blocks and between calls, as with AutoGen's Jupyter
executor; sh/bash/shell blocks are commands through Exec in the same session (workspace /work). Each block's
wall-time limit is enforced by the daemon (it interrupts the cell or kills the command's process group and
records the call as timed out), and the result is the command-line executors' CommandLineCodeResult with their
exit codes (124 on timeout). A cancelled CancellationToken cancels the running call, so the daemon interrupts the
cell or kills the command, and execute_code_blocks raises asyncio.CancelledError, as CodeExecutor specifies. The
client presents agent_name "autogen" and the installed autogen-core version.
"""
from __future__ import annotations

import asyncio
import posixpath
import re
from dataclasses import dataclass, field
from importlib.metadata import version as _version
from typing import Any, List, Optional

from autogen_core import CancellationToken, Component
from autogen_core.code_executor import CodeBlock, CodeExecutor
from autogen_ext.code_executors._common import CommandLineCodeResult   # the docker and local executors' result
from pydantic import BaseModel
from typing_extensions import Self

from ..aio import AsyncClient, AsyncSession
from ..client import CodeError, CodeResult as CellEnd, Output, Result, RichResult, SandboxdError

__all__ = ["SandboxdCodeExecutor", "SandboxdCodeResult", "AGENT_NAME"]

AGENT_NAME = "autogen"
PYTHON = {"python", "py", "python3"}
SHELLS = {"sh": None, "shell": None, "bash": "bash"}   # None: the image's `sh -c`
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# sandboxd's outcome -> the exit code AutoGen's command-line executors report for the same end.
_EXIT = {"timeout": 124, "memory_limit": 137}


@dataclass
class SandboxdCodeResult(CommandLineCodeResult):
    """CommandLineCodeResult plus what sandboxd adds: the last block's outcome (exited, timeout, memory_limit...),
    the call ids (each one a record: `sandboxctl runs show ID`) and the cells' MIME bundles (images included)."""
    outcome: str = "exited"
    call_ids: List[str] = field(default_factory=list)
    results: List[dict] = field(default_factory=list)


class SandboxdCodeExecutorConfig(BaseModel):
    """What dump_component() keeps: never a token or a client (the token comes from $SANDBOXD_TOKEN)."""
    runner: str = "python"
    target: Optional[str] = None
    session_id: Optional[str] = None
    context: str = "default"
    timeout: float = 60
    output: int = 0
    session_options: dict = {}


class SandboxdCodeExecutor(CodeExecutor, Component[SandboxdCodeExecutorConfig]):
    """An AutoGen CodeExecutor over a sandboxd session.

    runner: the runner of a session this executor creates (its image needs python3 for python blocks, bash for
        bash blocks).
    client / target / token / client_options: as sandboxd.aio.AsyncClient; a client made here (in start(), in
        the event loop that uses it) presents agent_name "autogen" and the autogen-core version. A given client is
        used as it is and not closed.
    session_id: run in an existing session of the same principal, left open by stop(); otherwise start() creates
        a session with session_options (memory, idle_timeout, env, files...: AsyncClient.session's arguments) and
        stop() closes it.
    context: the kernel context python blocks run in.
    timeout: each block's wall-time limit in seconds (0: the runner's default).
    output: each block's per-stream output cap in bytes (0: the runner's).
    """

    component_config_schema = SandboxdCodeExecutorConfig
    component_provider_override = "sandboxd.integrations.autogen.SandboxdCodeExecutor"

    def __init__(self, runner: str = "python", *, client: AsyncClient | None = None, target: str | None = None,
                 token: str | None = None, session_id: str | None = None, context: str = "default",
                 timeout: float = 60, output: int = 0, client_options: dict[str, Any] | None = None,
                 **session_options: Any):
        if timeout < 0:
            raise ValueError("timeout must be >= 0 (0: the runner's default)")
        self.runner, self.context, self.timeout, self.output = runner, context, timeout, output
        self._target, self._token, self._client_options = target, token, dict(client_options or {})
        self._given_client, self._session_id, self._session_options = client, session_id, session_options
        self.client: AsyncClient | None = client
        self.session: AsyncSession | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and create (or attach to) the session; a second start() does nothing."""
        if self.session is not None:
            return
        if self.client is None:
            self.client = AsyncClient(self._target, token=self._token, agent_name=AGENT_NAME,
                                      agent_version=_version("autogen-core"), **self._client_options)
        try:
            self.session = await (self.client.attach(self._session_id) if self._session_id
                                  else self.client.session(self.runner, **self._session_options))
            self.runner = (await self.session.info()).runner
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Close the session if this executor created it, and the client if it made it."""
        session, self.session = self.session, None
        try:
            if session is not None and not self._session_id:
                await session.close()
        finally:
            if self.client is not None and self._given_client is None:
                client, self.client = self.client, None
                await client.close()

    async def restart(self) -> None:
        """Start the python context afresh (its variables are gone); the workspace's files stay, as a restarted
        container keeps its filesystem."""
        await self._started().reset(self.context)

    def _started(self) -> AsyncSession:
        if self.session is None:
            raise ValueError("the sandboxd executor is not started: use `async with SandboxdCodeExecutor(...)` "
                             "or await start() first")
        return self.session

    # ---- code ------------------------------------------------------------------------------------------------

    async def execute_code_blocks(self, code_blocks: List[CodeBlock],
                                  cancellation_token: CancellationToken) -> SandboxdCodeResult:
        """Run the blocks in order and stop at the first that fails, as AutoGen's executors do. Raises
        asyncio.CancelledError when cancellation_token is cancelled (the running call is cancelled first)."""
        session = self._started()
        outputs: list[str] = []
        result = SandboxdCodeResult(exit_code=0, output="", code_file=None)
        for block in code_blocks:
            task = asyncio.ensure_future(self._block(session, block, result))
            cancellation_token.link_future(task)
            exit_code, text = await task   # cancelled: the call's stream is closed, which stops it in the daemon
            outputs.append(text)
            result.exit_code = exit_code
            if exit_code != 0:
                break
        # One block's output after the other, on a line of its own.
        result.output = "".join(t if not t or t.endswith("\n") or i == len(outputs) - 1 else t + "\n"
                                for i, t in enumerate(outputs))
        return result

    async def _block(self, session: AsyncSession, block: CodeBlock, result: SandboxdCodeResult) -> tuple[int, str]:
        lang = block.language.strip().lower()
        code = block.code
        if lang not in PYTHON and lang not in SHELLS:
            return 1, (f"Unsupported language {block.language!r}: the sandboxd executor runs python "
                       f"({', '.join(sorted(PYTHON))}) and shell ({', '.join(sorted(SHELLS))}) blocks")
        first = code.split("\n", 1)[0]
        if first.startswith("# filename:"):   # AutoGen's convention: save the block as that file of the workspace
            name = first.split(":", 1)[1].strip()
            try:
                await session.write(name, code, mode=0o755 if lang in SHELLS else 0o644)
            except SandboxdError as e:
                return 1, f"Could not save {name!r} in the workspace: {e}"
            if result.code_file is None:
                result.code_file = posixpath.join("/work", name)
        if lang in PYTHON:
            return await self._cell(session, code, result)
        return await self._command(session, code, SHELLS[lang], result)

    async def _cell(self, session: AsyncSession, code: str, result: SandboxdCodeResult) -> tuple[int, str]:
        parts: list[str] = []
        error: CodeError | None = None
        end: CellEnd | None = None
        async for event in session.run_code_stream(code, context=self.context, timeout=self.timeout,
                                                   output=self.output):
            if isinstance(event, Output):
                parts.append(event.data.decode("utf-8", "replace"))
            elif isinstance(event, RichResult):
                result.results.append(event.data)
                text = event.data.get("text/plain", "")
                image = next((m for m in ("image/png", "image/jpeg", "image/svg+xml") if m in event.data), None)
                text = f"[{image} result] {text}" if image else text
                parts.append(text if not text or text.endswith("\n") else text + "\n")
            elif isinstance(event, CodeError):
                error = event
            elif isinstance(event, CellEnd):
                end = event
            else:
                result.call_ids.append(event.run_id)
        outcome = end.outcome if end is not None else "interrupted"
        result.outcome = outcome
        if end is not None and end.kernel_restarted:
            parts.insert(0, f"[sandboxd: {end.message or 'the kernel was restarted'}: earlier variables are gone]\n")
        if error is not None:
            parts.append(_ANSI.sub("", "\n".join(error.traceback)) or f"{error.name}: {error.value}")
        if outcome != "exited":
            parts.append(_ending(outcome, end.message if end is not None else "no result from the daemon"))
            return _EXIT.get(outcome, 1), "".join(parts)
        return (1 if error is not None else 0), "".join(parts)

    async def _command(self, session: AsyncSession, code: str, shell: str | None,
                       result: SandboxdCodeResult) -> tuple[int, str]:
        if not code.strip():
            return 0, ""
        parts: list[str] = []
        end: Result | None = None
        process = await session.start([shell, "-c", code] if shell else code, timeout=self.timeout,
                                      close_stdin=True, output=self.output)
        async with process:   # leaving it early (cancelled) cancels the call: the daemon kills the process group
            async for event in process:
                if isinstance(event, Output):
                    parts.append(event.data.decode("utf-8", "replace"))
                elif isinstance(event, Result):
                    end = event
                else:
                    result.call_ids.append(event.run_id)
        outcome = end.outcome if end is not None else "interrupted"
        result.outcome = outcome
        if outcome == "exited":
            return end.exit_code, "".join(parts)
        if outcome == "signaled":
            return 128 + end.signal, "".join(parts)
        parts.append(_ending(outcome, end.message if end is not None else "no result from the daemon"))
        return _EXIT.get(outcome, 1), "".join(parts)

    # ---- component -------------------------------------------------------------------------------------------

    def _to_config(self) -> SandboxdCodeExecutorConfig:
        return SandboxdCodeExecutorConfig(runner=self.runner, target=self._target, session_id=self._session_id,
                                          context=self.context, timeout=self.timeout, output=self.output,
                                          session_options=self._session_options)

    @classmethod
    def _from_config(cls, config: SandboxdCodeExecutorConfig) -> Self:
        return cls(config.runner, target=config.target, session_id=config.session_id, context=config.context,
                   timeout=config.timeout, output=config.output, **config.session_options)


def _ending(outcome: str, message: str) -> str:
    """The line the model reads when sandboxd ended the block, in the words AutoGen's executors use for a
    timeout ("Timeout") followed by sandboxd's own."""
    head = "Timeout" if outcome == "timeout" else f"sandboxd: {outcome}"
    return f"\n{head}: {message}" if message else f"\n{head}"
