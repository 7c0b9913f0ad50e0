"""protobuf <-> domain objects. With service.py, the only module that touches generated pb types; the rest
of sandboxd works on plain dataclasses, so the wire format can evolve without reaching into the mechanism."""
from __future__ import annotations

import hashlib

from .policy import RunRequest
from .runners import Runner
from .sandbox.spec import Limits
from .supervisor import Outcome, RunResult
from .v1 import sandbox_pb2 as pb

OUTCOMES = {
    Outcome.EXITED: pb.OUTCOME_EXITED, Outcome.SIGNALED: pb.OUTCOME_SIGNALED, Outcome.TIMEOUT: pb.OUTCOME_TIMEOUT,
    Outcome.MEMORY_LIMIT: pb.OUTCOME_MEMORY_LIMIT, Outcome.OUTPUT_LIMIT: pb.OUTCOME_OUTPUT_LIMIT,
    Outcome.CANCELLED: pb.OUTCOME_CANCELLED, Outcome.REJECTED: pb.OUTCOME_REJECTED,
    Outcome.SETUP_FAILED: pb.OUTCOME_SETUP_FAILED, Outcome.INTERRUPTED: pb.OUTCOME_CANCELLED,
}


def to_request(msg: pb.ExecuteRequest) -> RunRequest:
    lim = msg.limits
    limits = {"wall_time": lim.wall_time_seconds, "cpu_time": lim.cpu_time_seconds, "memory": lim.memory_bytes,
              "pids": lim.pids, "output": lim.output_bytes}
    return RunRequest(runner=msg.runner, code=msg.code.encode(), args=tuple(msg.args), stdin=msg.stdin,
                      env=tuple(sorted(msg.env.items())), files=tuple(sorted(msg.files.items())),
                      limits={k: v for k, v in limits.items() if v})


def limits_msg(limits: Limits) -> pb.Limits:
    return pb.Limits(wall_time_seconds=limits.wall_time, cpu_time_seconds=limits.cpu_time,
                     memory_bytes=limits.memory, pids=limits.pids, output_bytes=limits.output)


def started_event(run_id: str) -> pb.ExecuteEvent:
    return pb.ExecuteEvent(started=pb.Started(run_id=run_id))


def output_event(stream: str, data: bytes) -> pb.ExecuteEvent:
    chunk = pb.OutputChunk(data=data)
    return pb.ExecuteEvent(stdout=chunk) if stream == "stdout" else pb.ExecuteEvent(stderr=chunk)


def result_event(result: RunResult, limits: Limits | None) -> pb.ExecuteEvent:
    return pb.ExecuteEvent(result=pb.Result(
        run_id=result.run_id, outcome=OUTCOMES[result.outcome], exit_code=result.exit_code, signal=result.signal,
        cpu_time_seconds=result.cpu_seconds, wall_time_seconds=result.wall_seconds,
        peak_memory_bytes=result.peak_memory_bytes, stdout_bytes=result.stdout_bytes,
        stderr_bytes=result.stderr_bytes, stdout_truncated=result.stdout_truncated,
        stderr_truncated=result.stderr_truncated, message=result.message,
        limits=limits_msg(limits) if limits else None))


def runners_response(runners: dict[str, Runner]) -> pb.ListRunnersResponse:
    return pb.ListRunnersResponse(runners=[
        pb.Runner(name=r.name, image=r.image, command=list(r.command), default_limits=limits_msg(r.default_limits),
                  max_limits=limits_msg(r.max_limits), env_allowlist=list(r.env_allowlist),
                  seccomp_profile=r.seccomp, file_extension=(r.extensions[0] if r.extensions else ""),
                  available=r.available, file_extensions=list(r.extensions), description=r.description,
                  unavailable_reason=r.unavailable_reason)
        for r in sorted(runners.values(), key=lambda r: r.name)])


def request_summary(msg: pb.ExecuteRequest) -> dict:
    """What a record keeps of a request that may be invalid: sizes and hashes, never unbounded raw values."""
    return {"runner": msg.runner[:64], "code_sha256": hashlib.sha256(msg.code.encode()).hexdigest(),
            "code_bytes": len(msg.code.encode()), "stdin_sha256": hashlib.sha256(msg.stdin).hexdigest(),
            "args": len(msg.args), "env_names": sorted(k[:128] for k in msg.env)[:64],
            "files": sorted(k[:256] for k in msg.files)[:64]}
