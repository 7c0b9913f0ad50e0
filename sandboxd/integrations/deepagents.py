"""deepagents backend: a sandboxd session as the sandbox of a deep agent.

    from deepagents import create_deep_agent
    from sandboxd.integrations.deepagents import SandboxdBackend

    with SandboxdBackend(runner="python") as backend:
        agent = create_deep_agent(model=..., backend=backend)

`SandboxdBackend` is deepagents' `BaseSandbox` over one sandboxd session: `execute` is an Exec in the session,
`upload_files` / `download_files` and `ls` are sandboxd's own file calls (they run inside the sandbox with the
session's credentials), and read, write, edit, grep and glob are BaseSandbox's, built on those, so they behave
exactly as in deepagents' other sandboxes. The client presents agent_name "deepagents" and the installed
deepagents version, so every call is recorded with them next to the caller's authenticated identity.
"""
from __future__ import annotations

import datetime
import posixpath
from importlib.metadata import version as _version
from typing import Any

from deepagents.backends.protocol import ExecuteResponse, FileDownloadResponse, FileUploadResponse, LsResult
from deepagents.backends.sandbox import BaseSandbox

from sandboxd.client import Client, FileError, Output, Result, SandboxdError, Session

__all__ = ["SandboxdBackend"]

AGENT_NAME = "deepagents"
# Where execute puts a `python` command when the image has only python3: agents write `python -c ...` all the
# time, and deepagents' own sandboxes (python images) have one.
SHIM_DIR = "/tmp/.sandboxd-bin"
# sandboxd's per-path error codes in deepagents' vocabulary (FileOperationError); the rest pass through as
# backend-specific strings (too_large, already_exists, other).
_FILE_ERRORS = {"not_found": "file_not_found", "permission_denied": "permission_denied",
                "is_directory": "is_directory", "invalid_path": "invalid_path", "not_a_directory": "invalid_path"}
_SIGNAL_OUTCOMES = {"memory_limit": 137}


def _file_error(error: FileError | str) -> str:
    code = error.error if isinstance(error, FileError) else error
    return _FILE_ERRORS.get(code, code or "other")


class SandboxdBackend(BaseSandbox):
    """deepagents' SandboxBackendProtocol over a sandboxd session.

    runner: the sandboxd runner (its image and limits) of a session this backend creates.
    client: a sandboxd.client.Client to use as it is (its own agent claims); by default one is made from
        target / token / client_options with agent_name "deepagents" and the deepagents version.
    session_id: attach to an existing session (of the same principal) instead of creating one; the backend
        then leaves it open when it closes. A session it created is closed by close() / the `with` block.
    timeout: the default per-command wall-time limit in seconds (None: the runner's default); execute's own
        timeout argument overrides it, up to the runner's and the policy's maximum.
    output: the per-stream output cap of a command in bytes (0: the runner's default); past it the command is
        stopped and the response is marked truncated.
    session_options: more Client.session() arguments (memory, pids, idle_timeout, max_lifetime, env, files...).
    """

    def __init__(self, runner: str = "python", *, client: Client | None = None, target: str | None = None,
                 token: str | None = None, session_id: str | None = None, timeout: float | None = None,
                 output: int = 0, python_alias: bool = True, client_options: dict[str, Any] | None = None,
                 **session_options: Any):
        self._own_client = client is None
        self.client = client or Client(target, token=token, agent_name=AGENT_NAME,
                                       agent_version=_version("deepagents"), **(client_options or {}))
        self._own_session = session_id is None
        try:
            self.session: Session = (self.client.session(runner, **session_options) if session_id is None
                                     else self.client.attach(session_id))
            self.default_timeout, self.output = timeout, output
            self._env = self._install_python_alias() if python_alias else None
        except BaseException:
            self.close()
            raise

    def _install_python_alias(self) -> dict[str, str] | None:
        """A `python` next to the image's python3 when the image has none, first on every command's PATH."""
        r = self.session.exec(f'command -v python >/dev/null 2>&1 || {{ p=$(command -v python3) && '
                              f'mkdir -p {SHIM_DIR} && ln -sf "$p" {SHIM_DIR}/python; }}; printf %s "$PATH"')
        return {"PATH": f"{SHIM_DIR}:{r.stdout.decode()}"} if r.ok and r.stdout else None

    # ---- lifetime ---------------------------------------------------------------------------------------------

    def __enter__(self) -> "SandboxdBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the session if this backend created it, and the client if it made it."""
        try:
            if self._own_session and getattr(self, "session", None) is not None:
                self.session.close()
        finally:
            if self._own_client:
                self.client.close()

    @property
    def id(self) -> str:
        return self.session.id

    # ---- commands ---------------------------------------------------------------------------------------------

    def execute(self, command: str, *, timeout: int | None = None) -> ExecuteResponse:
        """Run `command` with the image's `sh -c` in the session. Output is stdout and stderr interleaved in the
        order the daemon sent them. Exit code: the command's, 128+N when killed by signal N, 124 on timeout (as
        deepagents' own shells report it), 137 when killed for memory."""
        limit = timeout if timeout is not None else self.default_timeout
        parts: list[bytes] = []
        result: Result | None = None
        with self.session.start(command, timeout=limit or 0, env=self._env, output=self.output, stdin=b"",
                                close_stdin=True) as process:
            for event in process:
                if isinstance(event, Output):
                    parts.append(event.data)
                elif isinstance(event, Result):
                    result = event
        output = b"".join(parts).decode("utf-8", errors="replace")
        if result is None:
            return ExecuteResponse(output=output + "\nError: the command ended without a result", exit_code=None)
        truncated = result.stdout_truncated or result.stderr_truncated or result.outcome == "output_limit"
        if result.outcome == "exited":
            code = result.exit_code
        elif result.outcome == "timeout":
            code = 124
            output += (f"\nError: Command timed out after {limit} seconds." if limit else
                       "\nError: Command timed out (the runner's wall-time limit). Pass a larger timeout.")
        elif result.signal:
            code = 128 + result.signal
        else:
            code = _SIGNAL_OUTCOMES.get(result.outcome, 1)
        if result.outcome not in ("exited", "timeout", "signaled") and result.message:
            output += f"\n[sandboxd: {result.outcome}: {result.message}]"
        return ExecuteResponse(output=output, exit_code=code, truncated=truncated)

    # ---- files ------------------------------------------------------------------------------------------------

    def upload_files(self, files: list[tuple[str, bytes]]) -> list[FileUploadResponse]:
        """Write files through sandboxd's PutFiles (parent directories created). Paths must be absolute, as
        deepagents requires: a relative one is invalid_path, never silently put under /work."""
        valid = [(p, data) for p, data in files if posixpath.isabs(p)]
        results = {r.path: r for r in self.session.write_files(dict(valid))} if valid else {}
        out = []
        for path, _ in files:
            r = results.get(path)
            error = ("invalid_path" if not posixpath.isabs(path) else
                     "other" if r is None else _file_error(r.error) if r.error else None)
            out.append(FileUploadResponse(path=path, error=error))
        return out

    def download_files(self, paths: list[str]) -> list[FileDownloadResponse]:
        """Read files through sandboxd's GetFiles; a file past the daemon's transfer limit is "too_large"."""
        valid = [p for p in paths if posixpath.isabs(p)]
        got = self.session.read_files(valid) if valid else {}
        out = []
        for path in paths:
            data = got.get(path) if posixpath.isabs(path) else FileError(path, "invalid_path", "")
            if isinstance(data, bytes):
                out.append(FileDownloadResponse(path=path, content=data))
            else:
                out.append(FileDownloadResponse(path=path, error=_file_error(data or "other")))
        return out

    def ls(self, path: str) -> LsResult:
        """A directory's entries through sandboxd's ListFiles (no interpreter started); symlinks are not
        followed (is_dir False), as BaseSandbox's ls reports them."""
        try:
            infos = self.session.list(path)
        except FileError as e:
            reason = {"not_found": "path_not_found"}.get(e.error, e.error)
            return LsResult(error=f"Path '{path}': {reason}")
        except SandboxdError as e:
            return LsResult(error=f"Path '{path}': {e.message}")
        return LsResult(entries=[{
            "path": posixpath.join(path, info.name), "is_dir": info.type == "directory", "size": info.size,
            "modified_at": datetime.datetime.fromtimestamp(info.mtime, datetime.timezone.utc).isoformat()}
            for info in infos])
