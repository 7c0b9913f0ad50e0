"""Every failure of sandboxd itself or of the caller's request is one of these; service.py maps them to gRPC
status codes in one place. What the *program* did (exit, signal, timeout, OOM) is never an exception: it is
an Outcome. Messages name the offending value and what was expected."""


class SandboxError(Exception):
    """Base class. `reason` is a bounded label for metrics and records."""

    reason = "error"


class InvalidRequest(SandboxError):
    """The request is malformed: a bad name, a negative or absurd limit, a limit above the allowed maximum."""

    reason = "invalid"


class NotFound(SandboxError):
    """The request names a runner (or run) that does not exist."""

    reason = "not_found"


class TooLarge(SandboxError):
    """The request is bigger than the configured maximum request size."""

    reason = "too_large"


class Unavailable(SandboxError):
    """The request is valid but cannot run here: the runner's interpreter is missing from its image."""

    reason = "unavailable"


class Overloaded(SandboxError):
    """Too many runs: the queue is full or the wait for a slot ran out. Carries a retry hint."""

    reason = "queue_full"

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class NotAllowed(SandboxError):
    """The caller is authenticated but no policy allows this (principal, runner)."""

    reason = "permission_denied"


class RateLimited(Overloaded):
    """The caller's policy allows only so many runs per minute."""

    reason = "rate_limited"


class SetupFailed(SandboxError):
    """The sandbox could not be built (the launcher is down, a cgroup could not be created)."""

    reason = "setup_failed"


class ConfigError(SandboxError):
    """A configuration file is invalid. The message names the file, the key and what was expected."""

    reason = "config"


class ShuttingDown(SandboxError):
    """The daemon is draining (SIGTERM): requests still waiting for a slot are turned away, never started."""

    reason = "shutting_down"


class Stopped(SandboxError):
    """An operator (or the caller itself) stopped the request while it waited for a slot (StopRun,
    StopPrincipal, a suspension). The run ends with outcome cancelled; the message names who stopped it."""

    reason = "stopped"


class Suspended(NotAllowed):
    """The caller's principal is suspended in the configuration (`suspended = true`)."""
