"""The value types of the public clients (sandboxd.client and sandboxd.aio), defined once for both.

Callers import them from sandboxd.client (or sandboxd.aio); this module's location is private. Everything here
is plain data: no gRPC, no protobuf.
"""
from __future__ import annotations

from dataclasses import dataclass, field


class SandboxdError(Exception):
    """The daemon refused or could not serve a request. `code` is the gRPC status name (e.g. "NOT_FOUND",
    "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAVAILABLE"); `retry_after` is set when the daemon is
    overloaded and suggests when to try again (seconds)."""

    def __init__(self, code: str, message: str, retry_after: float | None = None):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.retry_after = code, message, retry_after


# The gRPC status that goes with each per-path file error, for callers that only look at SandboxdError.code.
FILE_ERROR_CODES = {"not_found": "NOT_FOUND", "permission_denied": "PERMISSION_DENIED",
                    "is_directory": "FAILED_PRECONDITION", "not_a_directory": "FAILED_PRECONDITION",
                    "already_exists": "ALREADY_EXISTS", "invalid_path": "INVALID_ARGUMENT",
                    "too_large": "OUT_OF_RANGE", "other": "UNKNOWN"}


class FileError(SandboxdError):
    """A file operation in a session failed for one path. `error` is the daemon's per-path code: not_found,
    permission_denied, is_directory, not_a_directory, already_exists, invalid_path, too_large or other; `code`
    is the matching gRPC status name, so `except SandboxdError` still catches it."""

    def __init__(self, path: str, error: str, message: str = "", code: str | None = None):
        SandboxdError.__init__(self, code or FILE_ERROR_CODES.get(error, "UNKNOWN"),
                               f"{path}: {error}" + (f": {message}" if message else ""))
        self.path, self.error, self.detail = path, error, message


@dataclass(frozen=True)
class Started:
    run_id: str


@dataclass(frozen=True)
class Output:
    stream: str          # "stdout" or "stderr"
    data: bytes


@dataclass(frozen=True)
class Result:
    run_id: str
    outcome: str         # exited, signaled, timeout, memory_limit, output_limit, cancelled, rejected, setup_failed,
                         # interrupted (the sandbox was lost after the code started)
    exit_code: int
    signal: int
    cpu_time: float      # seconds
    wall_time: float     # seconds
    peak_memory: int     # bytes
    stdout_bytes: int
    stderr_bytes: int
    stdout_truncated: bool
    stderr_truncated: bool
    message: str
    limits: dict = field(default_factory=dict)
    stdout: bytes = b""  # filled by Client.run(), empty when streaming with execute()
    stderr: bytes = b""
    files: dict = field(default_factory=dict)   # path (relative to /work) -> bytes: Execute's collect_files
    files_truncated: bool = False                # some matching files were left out (the daemon's total cap)
    session_id: str = ""                         # set for a command run in a session

    @property
    def ok(self) -> bool:
        return self.outcome == "exited" and self.exit_code == 0


@dataclass(frozen=True)
class RunnerInfo:
    name: str
    image: str
    command: tuple[str, ...]
    extensions: tuple[str, ...]
    available: bool
    unavailable_reason: str
    description: str
    default_limits: dict
    max_limits: dict


@dataclass(frozen=True)
class SessionInfo:
    """A session as the daemon describes it. Times are Unix seconds (0: not set); state is starting, ready,
    busy or closed; end_reason says why a closed session ended (closed, idle_timeout, max_lifetime,
    daemon_shutdown, interrupted, stopped, failed, setup_failed)."""
    session_id: str
    runner: str
    principal: str
    limits: dict
    created_at: float
    last_used_at: float
    expires_at: float
    state: str
    end_reason: str
    end_message: str
    idle_timeout: float
    max_lifetime: float
    active_calls: int
    contexts: tuple[str, ...]
    agent_name: str
    agent_version: str
    policy: str
    closed_at: float

    @property
    def id(self) -> str:
        return self.session_id


@dataclass(frozen=True)
class ExecResult:
    """A command's end in a session, with its output collected (at most the call's output cap)."""
    call_id: str
    outcome: str
    exit_code: int
    signal: int
    stdout: bytes
    stderr: bytes
    wall_time: float
    cpu_time: float
    peak_memory: int
    stdout_truncated: bool
    stderr_truncated: bool
    message: str

    @property
    def ok(self) -> bool:
        return self.outcome == "exited" and self.exit_code == 0

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", "replace")


@dataclass(frozen=True)
class RichResult:
    """A MIME bundle from a cell: data["text/plain"] is always there; image/png is base64 text, as in Jupyter.
    kind is "execute_result" (the cell's final expression) or "display_data" (display(), figures)."""
    data: dict
    kind: str


@dataclass(frozen=True)
class CodeError:
    """The exception a cell raised (or KernelDied when the kernel itself died), with its traceback lines."""
    name: str
    value: str
    traceback: tuple[str, ...] = ()


@dataclass(frozen=True)
class CodeResult:
    """The last event of a cell. outcome is "exited" when the cell ran to its end, raised or not (see error)."""
    call_id: str
    outcome: str
    execution_count: int
    wall_time: float
    message: str
    kernel_restarted: bool
    stdout_bytes: int
    stderr_bytes: int
    stdout_truncated: bool
    stderr_truncated: bool
    error: bool


@dataclass(frozen=True)
class CodeRun:
    """A whole cell: its output decoded, its rich results in order, its error if it raised."""
    call_id: str
    outcome: str
    stdout: str
    stderr: str
    results: list
    error: CodeError | None
    execution_count: int
    kernel_restarted: bool
    wall_time: float
    message: str
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    result_kinds: tuple[str, ...] = ()   # the kind of each of results: execute_result or display_data

    @property
    def ok(self) -> bool:
        return self.outcome == "exited" and self.error is None

    @property
    def text(self) -> str:
        """The text/plain of the cell's value (its last execute_result), or ""."""
        for data, kind in reversed(list(zip(self.results, self.result_kinds))):
            if kind == "execute_result":
                return data.get("text/plain", "")
        return ""


@dataclass(frozen=True)
class FileResult:
    """One path of a batch file call: error is "" when it worked."""
    path: str
    error: str = ""
    message: str = ""
    size: int = 0
    sha256: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


@dataclass(frozen=True)
class FileInfo:
    name: str
    path: str
    type: str            # file, directory, symlink, fifo, socket, char_device, block_device, other
    size: int
    mode: int            # permission bits
    mtime: float
    link_target: str = ""


@dataclass(frozen=True)
class ImportResult:
    files: int
    bytes: int
    sha256: str          # of the tar as the daemon received it


# Callers know these as sandboxd.client's (tracebacks and reprs say so; pickles resolve there too).
for _cls in (SandboxdError, FileError, Started, Output, Result, RunnerInfo, SessionInfo, ExecResult, RichResult,
             CodeError, CodeResult, CodeRun, FileResult, FileInfo, ImportResult):
    _cls.__module__ = "sandboxd.client"
del _cls


@dataclass(frozen=True)
class StopResult:
    """What Client.stop_run / stop_principal stopped."""

    runs_stopped: int
    sessions_closed: int
    message: str
