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

Errors from the daemon (unknown runner, bad limits, overload, unauthenticated...) raise SandboxdError with the
gRPC status code name and the daemon's message. What the script did is never an error: it is Result.outcome.
This module's names are the stable API; everything else in the package may change.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import grpc

from .v1 import sandbox_pb2 as pb
from .v1 import sandbox_pb2_grpc as pb_grpc

__all__ = ["Client", "SandboxdError", "Started", "Output", "Result", "RunnerInfo", "DEFAULT_TARGET"]

DEFAULT_TARGET = "unix:///run/sandboxd/sandboxd.sock"
OUTCOMES = {v.number: v.name[len("OUTCOME_"):].lower() for v in pb.Outcome.DESCRIPTOR.values}


class SandboxdError(Exception):
    """The daemon refused or could not serve a request. `code` is the gRPC status name (e.g. "NOT_FOUND",
    "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAVAILABLE"); `retry_after` is set when the daemon is
    overloaded and suggests when to try again (seconds)."""

    def __init__(self, code: str, message: str, retry_after: float | None = None):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.retry_after = code, message, retry_after


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
    outcome: str         # exited, signaled, timeout, memory_limit, output_limit, cancelled, rejected, setup_failed
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


def _limits_dict(msg: pb.Limits) -> dict:
    return {"wall_time": msg.wall_time_seconds, "cpu_time": msg.cpu_time_seconds, "memory": msg.memory_bytes,
            "pids": msg.pids, "output": msg.output_bytes}


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def _error(e: grpc.RpcError) -> SandboxdError:
    retry = None
    for key, value in (e.trailing_metadata() or ()):
        if key == "grpc-retry-pushback-ms":
            retry = int(value) / 1000
    return SandboxdError(e.code().name, e.details() or "", retry)


class Client:
    """A connection to sandboxd.

    target: "unix:///path.sock" or "host:port" (default $SANDBOXD_TARGET, else the standard unix socket).
    token: a bearer token (default $SANDBOXD_TOKEN); sent only over TLS or a unix socket unless
        allow_insecure_token is set.
    tls_ca / tls_cert / tls_key: PEM files for TLS to a TCP target (the CA to verify the server; a client
        certificate and key for mTLS).
    agent_name / agent_version / agent_tool / session_id / traceparent: claims recorded with every run
        (defaults: $SANDBOXD_AGENT_NAME, $SANDBOXD_AGENT_VERSION). Claims never replace the authenticated
        identity.
    """

    def __init__(self, target: str | None = None, metadata: Sequence[tuple[str, str]] = (),
                 credentials: grpc.ChannelCredentials | None = None, options: Sequence = (), *,
                 token: str | None = None, tls_ca: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None, agent_name: str | None = None, agent_version: str | None = None,
                 agent_tool: str | None = None, session_id: str | None = None, traceparent: str | None = None,
                 allow_insecure_token: bool = False, tls_server_name: str | None = None):
        self.target = target or os.environ.get("SANDBOXD_TARGET") or DEFAULT_TARGET
        opts = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 64 << 20), *options]
        if tls_server_name:
            opts.append(("grpc.ssl_target_name_override", tls_server_name))
        if credentials is None and (tls_ca or tls_cert):
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(tls_ca), private_key=_read(tls_key), certificate_chain=_read(tls_cert))
        self.channel = (grpc.secure_channel(self.target, credentials, opts) if credentials
                        else grpc.insecure_channel(self.target, opts))
        self.stub = pb_grpc.SandboxStub(self.channel)
        md = list(metadata)
        token = token if token is not None else os.environ.get("SANDBOXD_TOKEN")
        if token:
            if not (credentials or self.target.startswith("unix") or allow_insecure_token):
                raise ValueError("refusing to send a token over plain TCP: pass tls_ca (or allow_insecure_token)")
            md.append(("authorization", f"Bearer {token}"))
        claims = {"x-agent-name": agent_name or os.environ.get("SANDBOXD_AGENT_NAME"),
                  "x-agent-version": agent_version or os.environ.get("SANDBOXD_AGENT_VERSION"),
                  "x-agent-tool": agent_tool, "x-session-id": session_id, "traceparent": traceparent}
        md += [(k, v) for k, v in claims.items() if v]
        self.metadata = tuple(md)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def execute(self, code: str, runner: str = "python", *, args: Sequence[str] = (), stdin: bytes = b"",
                env: Mapping[str, str] | None = None, files: Mapping[str, bytes] | None = None,
                wall_time: float = 0, cpu_time: float = 0, memory: int = 0, pids: int = 0, output: int = 0,
                timeout: float | None = None) -> Iterator[Started | Output | Result]:
        """Stream one run: Started, then Output chunks as produced, then one Result. Limits of 0 mean the
        runner's default; a limit may be raised above it, up to the runner's maximum and the policy's ceiling.
        `timeout` is the RPC deadline: when it passes the daemon stops the run (outcome cancelled). Closing the
        iterator early cancels the run too."""
        request = pb.ExecuteRequest(
            runner=runner, code=code, args=list(args), stdin=stdin, env=dict(env or {}), files=dict(files or {}),
            limits=pb.Limits(wall_time_seconds=wall_time, cpu_time_seconds=cpu_time, memory_bytes=memory,
                             pids=pids, output_bytes=output))
        call = self.stub.Execute(request, timeout=timeout, metadata=self.metadata)
        try:
            for event in call:
                kind = event.WhichOneof("event")
                if kind == "started":
                    yield Started(event.started.run_id)
                elif kind in ("stdout", "stderr"):
                    yield Output(kind, getattr(event, kind).data)
                elif kind == "result":
                    r = event.result
                    yield Result(run_id=r.run_id, outcome=OUTCOMES.get(r.outcome, "unspecified"),
                                 exit_code=r.exit_code, signal=r.signal, cpu_time=r.cpu_time_seconds,
                                 wall_time=r.wall_time_seconds, peak_memory=r.peak_memory_bytes,
                                 stdout_bytes=r.stdout_bytes, stderr_bytes=r.stderr_bytes,
                                 stdout_truncated=r.stdout_truncated, stderr_truncated=r.stderr_truncated,
                                 message=r.message, limits=_limits_dict(r.limits))
        except grpc.RpcError as e:
            raise _error(e) from None
        finally:
            call.cancel()

    def run(self, code: str, runner: str = "python", **kwargs) -> Result:
        """Run to the end and return the Result with stdout and stderr collected (at most the output cap)."""
        out: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        result = None
        for event in self.execute(code, runner, **kwargs):
            if isinstance(event, Output):
                out[event.stream].append(event.data)
            elif isinstance(event, Result):
                result = event
        if result is None:
            raise SandboxdError("INTERNAL", "the stream ended without a result")
        return Result(**{**result.__dict__, "stdout": b"".join(out["stdout"]), "stderr": b"".join(out["stderr"])})

    def get_run(self, run_id: str, timeout: float | None = 10) -> dict:
        """The record of one run as a dict (see docs/identity.md for its keys). Admins read any run; others
        their own (another principal's run raises SandboxdError NOT_FOUND)."""
        try:
            msg = self.stub.GetRun(pb.GetRunRequest(run_id=run_id), timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise _error(e) from None
        return json.loads(msg.record_json)

    def list_runs(self, *, principal: str = "", agent: str = "", runner: str = "", outcome: str = "",
                  since: str = "", until: str = "", limit: int = 50, page_token: str = "",
                  timeout: float | None = 10) -> tuple[list[dict], str]:
        """(records newest first, next page token or ""). Times are RFC 3339."""
        try:
            msg = self.stub.ListRuns(pb.ListRunsRequest(principal=principal, agent=agent, runner=runner,
                                                        outcome=outcome, since=since, until=until, limit=limit,
                                                        page_token=page_token),
                                     timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise _error(e) from None
        return [json.loads(r.record_json) for r in msg.runs], msg.next_page_token

    def runners(self, timeout: float | None = 10) -> list[RunnerInfo]:
        try:
            resp = self.stub.ListRunners(pb.ListRunnersRequest(), timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise _error(e) from None
        return [RunnerInfo(name=r.name, image=r.image, command=tuple(r.command),
                           extensions=tuple(r.file_extensions), available=r.available,
                           unavailable_reason=r.unavailable_reason, description=r.description,
                           default_limits=_limits_dict(r.default_limits), max_limits=_limits_dict(r.max_limits))
                for r in resp.runners]
