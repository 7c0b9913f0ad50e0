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
    Outcome.SETUP_FAILED: pb.OUTCOME_SETUP_FAILED, Outcome.INTERRUPTED: pb.OUTCOME_INTERRUPTED,
}


def to_request(msg: pb.ExecuteRequest) -> RunRequest:
    lim = msg.limits
    limits = {"wall_time": lim.wall_time_seconds, "cpu_time": lim.cpu_time_seconds, "memory": lim.memory_bytes,
              "pids": lim.pids, "output": lim.output_bytes}
    return RunRequest(runner=msg.runner, code=msg.code.encode(), args=tuple(msg.args), stdin=msg.stdin,
                      env=tuple(sorted(msg.env.items())), files=tuple(sorted(msg.files.items())),
                      limits={k: v for k, v in limits.items() if v}, collect=tuple(msg.collect_files))


def limits_of(lim: pb.Limits) -> dict:
    limits = {"wall_time": lim.wall_time_seconds, "cpu_time": lim.cpu_time_seconds, "memory": lim.memory_bytes,
              "pids": lim.pids, "output": lim.output_bytes}
    return {k: v for k, v in limits.items() if v}


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
        limits=limits_msg(limits) if limits else None,
        files=[pb.CollectedFile(path=f["path"], size=len(f["data"]), mode=f["mode"], data=f["data"])
               for f in result.files], files_truncated=result.files_truncated))


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


# -- sessions ---------------------------------------------------------------------------------------------------
SESSION_STATES = {"starting": pb.SESSION_STATE_STARTING, "ready": pb.SESSION_STATE_READY,
                  "busy": pb.SESSION_STATE_BUSY, "closed": pb.SESSION_STATE_CLOSED}


def session_msg(s) -> pb.Session:
    state = "closed" if s.closing.is_set() else "busy" if s.state == "ready" and s.active else s.state
    return pb.Session(
        session_id=s.id, runner=s.runner.name, principal=s.principal.id, limits=limits_msg(s.spec.limits),
        created_at=s.created_at, last_used_at=s.last_used, expires_at=0.0 if s.state == "closed" else s.expires_at,
        state=SESSION_STATES[state], end_reason=s.end_reason, end_message=s.end_message,
        idle_timeout_seconds=s.idle_timeout, max_lifetime_seconds=s.max_lifetime, active_calls=max(s.active, 0),
        contexts=sorted(n for n, c in s.contexts.items() if c.kernel is not None and not c.kernel.finished.done()),
        agent_name=str(s.agent.get("name", "")), agent_version=str(s.agent.get("version", "")),
        policy=s.policy.name, closed_at=s.closed_at)


def session_record_msg(rec: dict) -> pb.Session:
    """A session known only from the record (closed, or from before a restart)."""
    def num(key):
        v = rec.get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0
    agent = rec.get("agent") or {}
    return pb.Session(
        session_id=rec.get("run_id", ""), runner=str(rec.get("runner") or ""), principal=str(rec.get("principal") or ""),
        created_at=num("created_at"), state=pb.SESSION_STATE_CLOSED if rec.get("finished_at") else pb.SESSION_STATE_READY,
        end_reason=str(rec.get("end_reason") or rec.get("outcome") or ""), end_message=str(rec.get("message") or ""),
        idle_timeout_seconds=num("idle_timeout"), max_lifetime_seconds=num("max_lifetime"),
        agent_name=str(agent.get("name", "")), agent_version=str(agent.get("version", "")),
        policy=str(rec.get("policy") or ""), closed_at=num("closed_at"))


def call_result_event(r, session_id: str) -> pb.ExecuteEvent:
    return pb.ExecuteEvent(result=pb.Result(
        run_id=r.call_id, outcome=OUTCOMES[r.outcome], exit_code=r.exit_code, signal=r.signal,
        cpu_time_seconds=r.cpu_seconds, wall_time_seconds=r.wall_seconds, peak_memory_bytes=r.peak_memory_bytes,
        stdout_bytes=r.stdout_bytes, stderr_bytes=r.stderr_bytes, stdout_truncated=r.stdout_truncated,
        stderr_truncated=r.stderr_truncated, message=r.message, session_id=session_id))


def cell_event(kind: str, value) -> pb.RunCodeEvent:
    if kind == "started":
        return pb.RunCodeEvent(started=pb.Started(run_id=value))
    if kind in ("stdout", "stderr"):
        return pb.RunCodeEvent(**{kind: pb.OutputChunk(data=value)})
    if kind == "result":
        return pb.RunCodeEvent(result=pb.MimeBundle(data=value["data"], kind=value["kind"]))
    if kind == "error":
        return pb.RunCodeEvent(error=pb.CodeError(name=value["name"], value=value["value"],
                                                  traceback=value["traceback"]))
    r = value
    return pb.RunCodeEvent(done=pb.CodeResult(
        call_id=r.call_id, outcome=OUTCOMES[r.outcome], execution_count=r.execution_count,
        wall_time_seconds=r.wall_seconds, message=r.message, kernel_restarted=r.kernel_restarted,
        stdout_bytes=r.stdout_bytes, stderr_bytes=r.stderr_bytes, stdout_truncated=r.stdout_truncated,
        stderr_truncated=r.stderr_truncated, error=r.error))


def file_info(d: dict) -> pb.FileInfo:
    return pb.FileInfo(name=str(d.get("name", "")), path=str(d.get("path", "")), type=str(d.get("type", "")),
                       size=int(d.get("size") or 0), mode=int(d.get("mode") or 0), mtime=float(d.get("mtime") or 0),
                       link_target=str(d.get("link_target", "")))


def file_result(d: dict) -> pb.FileResult:
    return pb.FileResult(path=str(d.get("path", "")), error=str(d.get("error") or ""),
                         message=str(d.get("message") or ""), size=int(d.get("size") or 0),
                         sha256=str(d.get("sha256") or ""))
