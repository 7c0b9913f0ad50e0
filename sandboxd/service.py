"""The gRPC servicer: the whole request pipeline in one readable method, and errors -> statuses in one place.

    Execute: authenticate -> authorize -> plan -> record "requested" -> admit -> launch -> stream
             -> record "finished" -> result

A refused request (not allowed, rate limited, invalid) is recorded too, before its status goes back; an
unauthenticated one is counted (metrics) and recorded in a periodic summary event instead, so that callers who
cannot even authenticate cannot make the store write for each request. A run whose client goes away is stopped
(outcome cancelled) and still recorded: the finishing step runs in its own task, so cancelling the RPC cannot
cancel the record.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import math
import logging
import time
import uuid

import grpc

from . import policy, sessions as sessions_mod, wire
from .auth import Principal, Unauthenticated, claims_of
from .config import ENV_NAME_RE
from .errors import (InvalidRequest, NotAllowed, NotFound, Overloaded, SandboxError, SetupFailed, ShuttingDown,
                     Stopped, Suspended, TooLarge, Unavailable)
from .state import Daemon, Tracked
from .supervisor import Outcome, RunResult
from .v1 import sandbox_pb2 as pb
from .v1 import sandbox_pb2_grpc as pb_grpc

log = logging.getLogger("sandboxd.service")

STATUS = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    TooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.FAILED_PRECONDITION,
    NotAllowed: grpc.StatusCode.PERMISSION_DENIED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    SetupFailed: grpc.StatusCode.INTERNAL,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
}
# Per-path file errors, as the status of a single-path call (StatFile, ListFiles, ExportWorkspace...).
FILE_STATUS = {"not_found": grpc.StatusCode.NOT_FOUND, "permission_denied": grpc.StatusCode.PERMISSION_DENIED,
               "is_directory": grpc.StatusCode.FAILED_PRECONDITION,
               "not_a_directory": grpc.StatusCode.FAILED_PRECONDITION,
               "already_exists": grpc.StatusCode.ALREADY_EXISTS, "invalid_path": grpc.StatusCode.INVALID_ARGUMENT,
               "too_large": grpc.StatusCode.RESOURCE_EXHAUSTED, "other": grpc.StatusCode.FAILED_PRECONDITION}
MAX_ARGV = 4096
MAX_PATHS = 1024


def new_run_id() -> str:
    """Time-ordered (sorts by start) and unique: 12 hex digits of milliseconds, then 16 random ones."""
    return f"{int(time.time() * 1000):012x}{uuid.uuid4().hex[:16]}"


def status_of(err: SandboxError) -> grpc.StatusCode:
    for cls in type(err).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return grpc.StatusCode.INTERNAL


async def abort(context: grpc.aio.ServicerContext, err: SandboxError) -> None:
    if isinstance(err, Overloaded):
        context.set_trailing_metadata((("grpc-retry-pushback-ms", str(int(err.retry_after * 1000))),))
    await context.abort(status_of(err), str(err))


# -- sessions ---------------------------------------------------------------------------------------------------
# Each RPC below is its own short pipeline: authenticate -> find the session and check its owner -> act -> record.
# A session id grants nothing: a session of another principal is NOT_FOUND (and the attempt is recorded).

class SessionService:
    """Mixed into SandboxService: the session, code-cell and file RPCs."""

    d: Daemon

    async def _refused(self, what: str, run_id: str, record: dict, err: SandboxError, context) -> None:
        """Count, record and answer a refused Execute or CreateSession. An unauthenticated one is summarised in
        memory (Daemon.refused), never one durable write each: anyone who can connect can send those."""
        record.setdefault("peer", {"address": context.peer()})
        self.d.metrics.rejected(err.reason)
        if isinstance(err, Unauthenticated):
            self.d.refused(record["peer"]["address"], str(err))
            log.debug("unauthenticated %s request refused: %s", what, err)
        else:
            await self.d.record("run_denied", run_id, {**record, "outcome": "rejected", "reason": err.reason,
                                                       "message": str(err)})
            log.info("%s %s refused (%s): %s", what, run_id, err.reason, err, extra={"run_id": run_id})
        await abort(context, err)

    async def _principal(self, context) -> Principal:
        try:
            principal = self.d.authenticator.authenticate(context)
            self._check_suspended(principal)
            return principal
        except (Unauthenticated, Suspended) as err:
            self.d.metrics.rejected(err.reason)
            if isinstance(err, Unauthenticated):
                self.d.refused(context.peer() or "", str(err))
            await abort(context, err)

    async def _session(self, context, session_id: str, action: str):
        principal = await self._principal(context)
        d = self.d
        if not session_id or len(session_id) > 64:
            await abort(context, InvalidRequest(f"session_id: expected a session id, got {session_id[:64]!r}"))
        s = d.sessions.sessions.get(session_id)
        if s is not None and not (principal.is_admin or s.principal.id == principal.id):
            await d.record_event("session.refused", session_id, {
                "action": action, "principal": principal.as_record(), "auth_method": principal.method,
                "owner": s.principal.id, "agent": claims_of(context.invocation_metadata())})
            d.metrics.rejected("permission_denied")
            log.warning("session %s: %s refused to %s (owned by %s)", session_id, action, principal.id,
                        s.principal.id, extra={"run_id": session_id})
            s = None
        elif s is None or s.state == "closed" or s.closing.is_set():
            message = d.sessions.ended_message(session_id, principal)
            if message is None:
                rec = await d.read(lambda st: st.get_run(session_id))
                if rec and rec.get("kind") == "session" and rec.get("finished_at") and (
                        principal.is_admin or rec.get("principal") == principal.id):
                    message = (f"session {session_id!r} ended at {rec.get('finished_at')}: "
                               f"{rec.get('end_reason') or rec.get('outcome')}"
                               + (f" ({rec.get('message') or rec.get('reason')})"
                                  if rec.get('message') or rec.get('reason') else ""))
            await abort(context, NotFound(message or f"session {session_id!r} not found"))
        if s is None:
            await abort(context, NotFound(f"session {session_id!r} not found"))
        return principal, s

    async def CreateSession(self, request: pb.CreateSessionRequest, context):
        d = self.d
        sid = new_run_id()
        catalog, cfg = d.catalog, d.config
        scfg = cfg.sessions
        agent = claims_of(context.invocation_metadata())
        record = {"kind": "session", "received_at": time.time(), "created_at": time.time(), "agent": agent,
                  "config_sha256": catalog.config_sha256, "runner": request.runner[:64]}
        try:
            principal = d.authenticator.authenticate(context)
            record.update(principal=principal.as_record(), auth_method=principal.method, peer=principal.peer)
            self._check_suspended(principal)
            if d.admission.closed is not None:   # shutting down: no new session either
                raise d.admission.closed
            allowed = policy.authorize(principal, request.runner, cfg.identity)
            record["policy"] = allowed.name
            if not allowed.sessions:
                raise NotAllowed(f"principal {principal.id!r} may not create sessions (policy {allowed.name!r})")
            idle_max = min(scfg.idle_timeout_max, allowed.session_idle_timeout or scfg.idle_timeout_max)
            life_max = min(scfg.max_lifetime_max, allowed.session_max_lifetime or scfg.max_lifetime_max)
            idle = _duration("idle_timeout_seconds", request.idle_timeout_seconds, min(scfg.idle_timeout, idle_max),
                             idle_max)
            lifetime = _duration("max_lifetime_seconds", request.max_lifetime_seconds,
                                 min(scfg.max_lifetime, life_max), life_max)
            env = _env(request.env)
            runner = catalog.runners.get(request.runner)
            spec = policy.plan_session(
                request.runner, catalog.runners, catalog.images, catalog.seccomp, sid, wire.limits_of(request.limits),
                allowed, lifetime, tuple(sorted(request.files.items())),
                sessions_mod.kernel_files(runner) if runner else (), cfg.server.max_request_bytes,
                landlock_min_abi=cfg.sandbox.landlock_required_abi)
            for name in env:
                if not runner.allows_session_env(name):
                    raise InvalidRequest(f"env: {name!r} may not be set in runner {runner.name!r}'s sessions")
            d.sessions.check_room(principal.id, allowed, spec.limits.memory, spec)
        except SandboxError as err:
            await self._refused("session", sid, record, err, context)
            return
        session = sessions_mod.Session(id=sid, principal=principal, policy=allowed, runner=runner, spec=spec,
                                       idle_timeout=idle, max_lifetime=lifetime, env=env, agent=agent)
        summary = spec.summary()
        record.update({"limits": summary["limits"], "image": spec.image.name, "idle_timeout": idle,
                       "max_lifetime": lifetime, "env_names": sorted(env),
                       "files": summary["files"], "workspace_tar_bytes": len(request.workspace_tar),
                       "workspace_tar_sha256": hashlib.sha256(request.workspace_tar).hexdigest(),
                       "sandbox_profile": {"namespaces": list(d.namespaces), "seccomp": spec.seccomp.name,
                                           "seccomp_sha256": spec.seccomp.sha256, "network": spec.network,
                                           "cgroup_driver": d.launcher.driver,
                                           "landlock": (f"required: ABI {spec.landlock_min_abi} or later"
                                                        if spec.landlock_min_abi else "not required")}})
        await d.record_event("session.created", sid, record)
        try:
            await d.sessions.create(session, spec.files, request.workspace_tar)
        except SandboxError as err:
            await abort(context, err)
            return
        log.info("session %s created: %s on %s under policy %s", sid, principal.id, runner.name, allowed.name,
                 extra={"run_id": sid})
        return wire.session_msg(session)

    async def GetSession(self, request: pb.GetSessionRequest, context):
        _, s = await self._session(context, request.session_id, "get")
        return wire.session_msg(s)

    async def ListSessions(self, request: pb.ListSessionsRequest, context):
        principal = await self._principal(context)
        who = request.principal or None
        if not principal.is_admin:
            if who not in (None, principal.id):
                await abort(context, NotAllowed("only principals with the admin role may list others' sessions"))
            who = principal.id
        live = [s for s in self.d.sessions.sessions.values() if who is None or s.principal.id == who]
        out = [wire.session_msg(s) for s in sorted(live, key=lambda s: s.created_at, reverse=True)]
        limit = min(request.limit or 100, 1000)
        if request.include_closed and len(out) < limit:
            ids = {m.session_id for m in out}
            rows = await self.d.read(lambda st: st.list_sessions(principal=who, limit=limit))
            out += [wire.session_record_msg(r) for r in rows if r.get("run_id") not in ids and r.get("finished_at")]
        return pb.ListSessionsResponse(sessions=out[:limit])

    async def CloseSession(self, request: pb.CloseSessionRequest, context):
        principal, s = await self._session(context, request.session_id, "close")
        who = "" if principal.id == s.principal.id else f" by {principal.id}"
        await self.d.sessions.close(s, "closed", f"closed{who}" if who else "")
        return wire.session_msg(s)

    async def _record_call(self, principal, context, s, kind: str, data: dict, result) -> None:
        rec = {"kind": kind, "session_id": s.id, "principal": principal.as_record(), "auth_method": principal.method,
               "agent": claims_of(context.invocation_metadata()), "runner": s.runner.name, "policy": s.policy.name,
               **data}
        if result is not None:
            rec.update({"outcome": result.outcome.value, "exit_code": result.exit_code, "signal": result.signal,
                        "cpu_seconds": result.cpu_seconds, "wall_seconds": result.wall_seconds,
                        "peak_memory_bytes": result.peak_memory_bytes, "stdout_bytes": result.stdout_bytes,
                        "stderr_bytes": result.stderr_bytes, "stdout_sha256": result.stdout_sha256,
                        "stderr_sha256": result.stderr_sha256, "message": result.message,
                        "finished_at": time.time()})
            self.d.metrics.session_call(kind, result.outcome.value)
        await self.d.record_event("session.call", result.call_id, rec)

    async def Exec(self, request_iterator, context):
        it = request_iterator.__aiter__()
        try:
            first = await it.__anext__()
        except StopAsyncIteration:
            await abort(context, InvalidRequest("Exec: expected a first message with `start`"))
        if first.WhichOneof("msg") != "start":
            await abort(context, InvalidRequest("Exec: the first message must be `start`"))
        st = first.start
        principal, s = await self._session(context, st.session_id, "exec")
        received = time.time()
        try:
            argv = _argv(st)
            env = s and self.d.sessions.call_env(s, _env(st.env))
            cwd = _cwd(st.cwd)
            timeout = _duration("timeout_seconds", st.timeout_seconds, s.spec.limits.wall_time, s.max_lifetime)
            output = int(st.output_bytes) or s.spec.limits.output
            if output > s.runner.max_limits.output:
                raise InvalidRequest(f"output_bytes: {output} is above the maximum {s.runner.max_limits.output}")
        except SandboxError as err:
            await abort(context, err)
        command = {"argv0": argv[0], "argv_sha256": hashlib.sha256("\0".join(argv).encode()).hexdigest(),
                   "cwd": cwd, "env_names": sorted(st.env), "tty": st.tty}
        if s.policy.store_code:
            command["argv"] = argv

        async def more():
            async for m in it:
                which = m.WhichOneof("msg")
                if which == "stdin":
                    yield "stdin", m.stdin
                elif which == "close_stdin" and m.close_stdin:
                    yield "close_stdin", None
                elif which == "resize":
                    yield "resize", (m.resize.rows or 24, m.resize.cols or 80)

        async def record(result) -> None:
            await self._record_call(principal, context, s, "exec", {"received_at": received, "command": command},
                                    result)
        events = self.d.sessions.exec(s, argv, env, cwd, timeout, output, tty=st.tty, rows=st.window.rows,
                                      cols=st.window.cols, stdin=st.stdin, close_stdin=st.close_stdin,
                                      requests=more(), on_result=record)
        try:
            async for kind, value in events:
                if kind == "started":
                    yield wire.started_event(value)
                elif kind == "result":
                    yield wire.call_result_event(value, s.id)
                else:
                    yield wire.output_event(kind, value)
        except SandboxError as err:
            await abort(context, err)
        finally:
            await events.aclose()

    async def RunCode(self, request: pb.RunCodeRequest, context):
        principal, s = await self._session(context, request.session_id, "code")
        received = time.time()
        try:
            if request.language not in ("", "python", "python3"):
                raise InvalidRequest(f"language: {request.language!r}: only python kernels exist")
            if s.runner.kernel != "python":
                raise InvalidRequest(f"runner {s.runner.name!r} has no Python kernel (use a python runner, or Exec)")
            ctx = self.d.sessions.context(s, request.context)
            timeout = _duration("timeout_seconds", request.timeout_seconds, s.spec.limits.wall_time, s.max_lifetime)
            output = int(request.output_bytes) or s.spec.limits.output
            if len(request.code.encode("utf-8", "surrogatepass")) > self.d.config.server.max_request_bytes:
                raise TooLarge("code: larger than server.max_request_bytes")
        except SandboxError as err:
            await abort(context, err)
        code = request.code.encode("utf-8", "surrogatepass")
        data = {"received_at": received, "context": ctx.name, "code_sha256": hashlib.sha256(code).hexdigest(),
                "code_bytes": len(code)}
        if s.policy.store_code:
            data["code"] = request.code
        async def record(result) -> None:
            data.update(execution_count=result.execution_count, kernel_restarted=result.kernel_restarted,
                        error=result.error)
            await self._record_call(principal, context, s, "code", data, result)
        events = self.d.sessions.run_code(s, ctx, request.code, timeout, output, on_result=record)
        try:
            async for kind, value in events:
                yield wire.cell_event(kind, value)
        except SandboxError as err:
            await abort(context, err)
        finally:
            await events.aclose()

    async def InterruptCode(self, request: pb.InterruptCodeRequest, context):
        _, s = await self._session(context, request.session_id, "interrupt")
        try:
            return pb.InterruptCodeResponse(interrupted=await self.d.sessions.interrupt(s, request.context))
        except SandboxError as err:
            await abort(context, err)

    async def ResetContext(self, request: pb.ResetContextRequest, context):
        _, s = await self._session(context, request.session_id, "reset")
        try:
            await self.d.sessions.reset(s, request.context)
        except SandboxError as err:
            await abort(context, err)
        return pb.ResetContextResponse()

    # -- files ---------------------------------------------------------------------------------------------------
    async def _file_event(self, principal, context, s, op: str, **data) -> None:
        await self.d.record_event("session.file", s.id, {
            "op": op, "principal": principal.as_record(), "auth_method": principal.method,
            "agent": claims_of(context.invocation_metadata()), **data})

    async def PutFiles(self, request_iterator, context):
        it = request_iterator.__aiter__()
        try:
            first = await it.__anext__()
        except StopAsyncIteration:
            await abort(context, InvalidRequest("PutFiles: expected at least one message"))
        principal, s = await self._session(context, first.session_id, "put")
        limit = self.d.config.sessions.transfer_limit
        over: dict[str, int] = {}
        bad: list[str] = []

        async def frames():
            msg, current, size, count = first, None, 0, 0
            while msg is not None:
                if msg.path:
                    if current is not None:
                        yield sessions_mod.frame(b"E", b"")
                    count += 1
                    if count > MAX_PATHS:
                        bad.append(f"PutFiles: more than {MAX_PATHS} files in one call")
                        return
                    current, size = msg.path, 0
                    yield sessions_mod.frame(b"J", json.dumps({"path": msg.path, "mode": msg.mode}).encode())
                elif current is None and msg.data:
                    bad.append("PutFiles: data before any path (the first message of a file names its path)")
                    return
                if msg.data and current is not None and current not in over:
                    size += len(msg.data)
                    if size > limit:
                        over[current] = size
                        yield sessions_mod.frame(b"X", b"")
                    else:
                        for i in range(0, len(msg.data), 256 << 10):
                            yield sessions_mod.frame(b"D", msg.data[i:i + (256 << 10)])
                try:
                    msg = await it.__anext__()
                except StopAsyncIteration:
                    msg = None
            if current is not None:
                yield sessions_mod.frame(b"E", b"")
        results = []
        try:
            async for kind, payload in self.d.sessions.file_op(s, {"op": "put"}, frames()):
                if kind == b"J":
                    results.append(json.loads(payload))
        except SandboxError as err:
            await abort(context, err)
        if bad:
            await abort(context, InvalidRequest(bad[0]))
        for r in results:
            if r.get("path") in over:
                r.update(error="too_large", message=f"{r['path']}: more than the transfer limit of {limit} bytes")
        total = sum(int(r.get("size") or 0) for r in results if not r.get("error"))
        self.d.metrics.file_bytes.labels("in").inc(total)
        await self._file_event(principal, context, s, "put", files=[
            {k: r.get(k) for k in ("path", "size", "sha256", "error")} for r in results])
        return pb.PutFilesResponse(results=[wire.file_result(r) for r in results])

    async def GetFiles(self, request: pb.GetFilesRequest, context):
        principal, s = await self._session(context, request.session_id, "get")
        if not request.paths or len(request.paths) > MAX_PATHS or not all(request.paths):
            await abort(context, InvalidRequest(f"paths: expected 1 to {MAX_PATHS} paths, none empty"))
        limit = self.d.config.sessions.transfer_limit
        max_bytes = min(request.max_bytes or limit, limit)
        current, sent, record = "", 0, []

        async def recorded(chunk: pb.GetFilesChunk) -> pb.GetFilesChunk:
            # Before the last file's last chunk goes out: a client may stop reading once it has it.
            if len(record) == len(request.paths):
                self.d.metrics.file_bytes.labels("out").inc(sent)
                await self._file_event(principal, context, s, "get", files=record)
            return chunk
        async for kind, payload in self.d.sessions.file_op(
                s, {"op": "get", "paths": list(request.paths), "max_bytes": max_bytes}):
            if kind == b"J":
                head = json.loads(payload)
                current = str(head.get("path", ""))
                if head.get("error"):
                    record.append({"path": current, "error": head["error"]})
                    yield await recorded(pb.GetFilesChunk(path=current, error=head["error"], eof=True,
                                                          message=str(head.get("message", ""))))
                elif head.get("eof"):
                    record.append({"path": current, "size": head.get("size"), "sha256": head.get("sha256")})
                    yield await recorded(pb.GetFilesChunk(path=current, eof=True, size=int(head.get("size") or 0),
                                                          sha256=str(head.get("sha256", ""))))
                else:
                    yield pb.GetFilesChunk(path=current, size=int(head.get("size") or 0),
                                           mode=int(head.get("mode") or 0))
            elif kind == b"D":
                sent += len(payload)
                yield pb.GetFilesChunk(path=current, data=payload)

    async def _single(self, context, s, req: dict) -> list[dict]:
        try:
            out = await self.d.sessions.simple_file_op(s, req)
        except SandboxError as err:
            await abort(context, err)
        for r in out:
            if r.get("error") and req["op"] in ("stat", "list", "mkdir"):
                await context.abort(FILE_STATUS.get(r["error"], grpc.StatusCode.FAILED_PRECONDITION),
                                    f"{r['error']}: {r.get('message', '')}")
        return out

    async def StatFile(self, request: pb.StatFileRequest, context):
        _, s = await self._session(context, request.session_id, "stat")
        out = await self._single(context, s, {"op": "stat", "path": request.path})
        return wire.file_info(out[0]) if out else pb.FileInfo()

    async def ListFiles(self, request: pb.ListFilesRequest, context):
        _, s = await self._session(context, request.session_id, "list")
        out = await self._single(context, s, {"op": "list", "path": request.path, "depth": request.depth or 1})
        return pb.ListFilesResponse(files=[wire.file_info(r) for r in out if "type" in r])

    async def RemoveFiles(self, request: pb.RemoveFilesRequest, context):
        principal, s = await self._session(context, request.session_id, "remove")
        if not request.paths or len(request.paths) > MAX_PATHS:
            await abort(context, InvalidRequest(f"paths: expected 1 to {MAX_PATHS} paths"))
        out = await self._single(context, s, {"op": "remove", "paths": list(request.paths),
                                              "recursive": request.recursive})
        await self._file_event(principal, context, s, "remove", files=[
            {"path": r.get("path"), "error": r.get("error")} for r in out], recursive=request.recursive)
        return pb.RemoveFilesResponse(results=[wire.file_result(r) for r in out])

    async def MakeDir(self, request: pb.MakeDirRequest, context):
        principal, s = await self._session(context, request.session_id, "mkdir")
        out = await self._single(context, s, {"op": "mkdir", "path": request.path, "parents": request.parents,
                                              "mode": request.mode})
        await self._file_event(principal, context, s, "mkdir", files=[{"path": request.path}])
        return wire.file_result(out[0]) if out else pb.FileResult(path=request.path)

    async def ExportWorkspace(self, request: pb.ExportWorkspaceRequest, context):
        principal, s = await self._session(context, request.session_id, "export")
        digest, total = hashlib.sha256(), 0
        async for kind, payload in self.d.sessions.file_op(s, {"op": "export", "path": request.path}):
            if kind == b"D":
                digest.update(payload)
                total += len(payload)
                yield pb.DataChunk(data=payload)
            elif kind == b"J":
                head = json.loads(payload)
                if head.get("error"):
                    await context.abort(FILE_STATUS.get(head["error"], grpc.StatusCode.FAILED_PRECONDITION),
                                        f"{head['error']}: {head.get('message', '')}")
        self.d.metrics.file_bytes.labels("out").inc(total)
        await self._file_event(principal, context, s, "export", path=request.path, bytes=total,
                               sha256=digest.hexdigest())

    async def ImportWorkspace(self, request_iterator, context):
        it = request_iterator.__aiter__()
        try:
            first = await it.__anext__()
        except StopAsyncIteration:
            await abort(context, InvalidRequest("ImportWorkspace: expected at least one message"))
        principal, s = await self._session(context, first.session_id, "import")

        async def chunks():
            yield first.data
            async for m in it:
                yield m.data
        try:
            res = await self.d.sessions.import_tar(s, chunks(), first.path)
        except SandboxError as err:
            await abort(context, err)
        await self._file_event(principal, context, s, "import", path=first.path, bytes=res.get("tar_bytes"),
                               sha256=res.get("sha256"), files=res.get("files"), error=res.get("error"))
        if res.get("error"):
            code = FILE_STATUS.get(res["error"], grpc.StatusCode.FAILED_PRECONDITION)
            await context.abort(code, f"{res['error']}: {res.get('message', '')}")
        self.d.metrics.file_bytes.labels("in").inc(int(res.get("bytes") or 0))
        return pb.ImportWorkspaceResponse(files=int(res.get("files") or 0), bytes=int(res.get("bytes") or 0),
                                          sha256=res.get("sha256", ""))


def _duration(name: str, value: float, default: float, maximum: float) -> float:
    if not math.isfinite(value) or value < 0:
        raise InvalidRequest(f"{name}: expected a positive number of seconds or 0 for the default, got {value}")
    if value == 0:
        return default
    if value > maximum:
        raise InvalidRequest(f"{name}: {value:g}s is above the maximum of {maximum:g}s")
    return value


def _env(env) -> dict:
    out = {}
    if len(env) > 1024:
        raise InvalidRequest("env: more than 1024 variables")
    for name, value in env.items():
        if not ENV_NAME_RE.match(name):
            raise InvalidRequest(f"env: {name!r} is not a valid variable name")
        if "\0" in value:
            raise InvalidRequest(f"env: {name}: value contains a NUL byte")
        out[name] = value
    return out


def _argv(st) -> list[str]:
    if bool(st.argv) == bool(st.shell):
        raise InvalidRequest("Exec: give exactly one of argv (a program and its arguments) or shell (a command "
                             "line for sh -c)")
    argv = list(st.argv) if st.argv else ["/bin/sh", "-c", st.shell]
    if len(argv) > MAX_ARGV or any("\0" in a for a in argv) or not argv[0]:
        raise InvalidRequest(f"argv: expected 1 to {MAX_ARGV} arguments without NUL bytes, the first not empty")
    return argv


def _cwd(cwd: str) -> str:
    if "\0" in cwd or len(cwd) > 4096:
        raise InvalidRequest(f"cwd: {cwd[:64]!r} is not a valid path")
    if not cwd:
        return "/work"
    return cwd if cwd.startswith("/") else f"/work/{cwd}"


class SandboxService(SessionService, pb_grpc.SandboxServicer):
    def __init__(self, daemon: Daemon):
        self.d = daemon

    async def ListRunners(self, request, context):
        await self._reader(context)
        return wire.runners_response(self.d.catalog.runners)

    async def Execute(self, request: pb.ExecuteRequest, context: grpc.aio.ServicerContext):
        d = self.d
        accepted = time.time()
        run_id = new_run_id()
        catalog, cfg = d.catalog, d.config  # one consistent view for the whole run, even across a reload
        summary = wire.request_summary(request)
        record = {"received_at": accepted, "agent": claims_of(context.invocation_metadata()),
                  "config_sha256": catalog.config_sha256, **summary}
        try:
            principal = d.authenticator.authenticate(context)
            record.update(principal=principal.as_record(), auth_method=principal.method, peer=principal.peer)
            self._check_suspended(principal)
            req = wire.to_request(request)
            allowed = policy.authorize(principal, req.runner, cfg.identity)
            record["policy"] = allowed.name
            d.rates.check(principal.id, allowed.runs_per_minute, time.monotonic())
            spec, dropped_env = policy.plan_run(
                req, catalog.runners, catalog.images, catalog.seccomp, run_id, cfg.server.max_request_bytes,
                cfg.sandbox.stop_on_output_limit, ceiling=allowed.limits, collect_max=cfg.sessions.collect_limit,
                landlock_min_abi=cfg.sandbox.landlock_required_abi, egress=allowed.egress)
        except SandboxError as err:
            await self._refused("run", run_id, record, err, context)
            return
        runner = catalog.runners[req.runner]
        spec_summary = spec.summary()
        record.update({
            "runner": runner.name, "image": spec.image.name, "dropped_env": list(dropped_env),
            "limits": spec_summary["limits"], "spec": spec_summary,
            "sandbox_profile": {"namespaces": list(d.namespaces), "seccomp": spec.seccomp.name,
                                "seccomp_sha256": spec.seccomp.sha256, "network": spec.network,
                                "cgroup_driver": d.launcher.driver,
                                # what the run demands; run.finished says what it applied (landlock_abi)
                                "landlock": (f"required: ABI {spec.landlock_min_abi} or later"
                                             if spec.landlock_min_abi else "not required")},
            "store_code": allowed.store_code, "store_output": allowed.store_output})
        if allowed.store_code:
            record["code"] = request.code
        await d.record("run_requested", run_id, record)
        log.info("run %s accepted: %s runs %s under policy %s", run_id, principal.id, runner.name, allowed.name,
                 extra={"run_id": run_id})
        t = d.tracked[run_id] = Tracked(principal.id)
        ended = False  # once True, the end of the run is recorded by whoever set it
        try:
            yield wire.started_event(run_id)
            async with d.admission.slot(principal.id, allowed.max_concurrent, key=run_id) as waited:
                d.metrics.queue_wait(waited)
                if t.stopped:
                    raise Stopped(t.stopped)
                ended = True
                async for event in self._run(spec, req.stdin, accepted, runner.name, allowed.store_output, t):
                    yield event
        except Stopped as err:  # stopped while it waited: nothing ran
            ended = True
            result = RunResult(run_id, Outcome.CANCELLED, message=str(err))
            await d.finish(run_id, result, runner.name)
            yield wire.result_event(result, spec.limits)
        except (Overloaded, ShuttingDown) as err:
            ended = True
            d.metrics.rejected(err.reason)
            await d.finish(run_id, RunResult(run_id, Outcome.REJECTED, message=str(err)), runner.name)
            await abort(context, err)
        finally:
            d.tracked.pop(run_id, None)
            if not ended:
                # The client went away or its deadline passed before a slot was granted: the record ends now,
                # in a task of its own (this one is being cancelled or closed).
                d.spawn(d.finish(run_id, RunResult(run_id, Outcome.CANCELLED, message="cancelled by the client "
                                                   "(gone or past its deadline) while waiting for a run slot"),
                                 runner.name))

    async def _run(self, spec, stdin: bytes, accepted: float, runner: str, store_output: bool, t: Tracked):
        d = self.d
        try:
            run = await d.supervisor.start(spec, stdin, accepted, keep_output=d.STORED_OUTPUT if store_output else 0,
                                           principal=t.principal, runner=runner)
        except SetupFailed as err:
            result = RunResult(spec.run_id, Outcome.SETUP_FAILED, message=str(err))
            await d.finish(spec.run_id, result, runner)
            yield wire.result_event(result, spec.limits)
            return
        t.run = run
        if t.stopped:  # a stop arrived while the sandbox was being built
            run.stop_message = t.stopped
            await run.cancel("stopped", drain=False)
        finisher = asyncio.ensure_future(self._finish(run, runner))
        streamed = False
        try:
            async for stream, data in run.output():
                yield wire.output_event(stream, data)
            streamed = True
        finally:
            if not streamed:
                # The client went away or its deadline passed: stop the run; the finisher still records it.
                await run.cancel("cancelled")
        result = await asyncio.shield(finisher)
        yield wire.result_event(result, spec.limits)

    async def _finish(self, run, runner: str) -> RunResult:
        exec_at = await run.started
        if exec_at:
            await self.d.record("run_started", run.spec.run_id, {"started_at": exec_at, "uid": run.spec.uid,
                                                                 "pooled": run.pooled,
                                                                 "prestarted": bool(run.spec.prestart)})
        result = await run.result
        await self.d.finish(run.spec.run_id, result, runner)
        return result

    def _check_suspended(self, principal: Principal) -> None:
        if self.d.suspended(principal.id):
            raise Suspended(f"principal {principal.id!r} is suspended (suspended = true in the configuration); "
                            f"ask an operator to lift the suspension")

    # -- records -----------------------------------------------------------------------------------------
    async def _reader(self, context) -> Principal:
        """Authenticated and not suspended, or the call ends here with the status saying why."""
        try:
            principal = self.d.authenticator.authenticate(context)
            self._check_suspended(principal)
            return principal
        except (Unauthenticated, Suspended) as err:
            self.d.metrics.rejected(err.reason)
            if isinstance(err, Unauthenticated):
                self.d.refused(context.peer() or "", str(err))
            await abort(context, err)

    async def GetRun(self, request: pb.GetRunRequest, context):
        principal = await self._reader(context)
        rec = await self.d.read(lambda s: s.get_run(request.run_id)) if request.run_id else None
        if rec is None or not (principal.is_admin or rec.get("principal") == principal.id):
            await abort(context, NotFound(f"run {request.run_id!r} not found"))
        return _record_msg(rec)

    async def ListRuns(self, request: pb.ListRunsRequest, context):
        principal = await self._reader(context)
        who = request.principal or None
        if not principal.is_admin:
            if who not in (None, principal.id):
                await abort(context, NotAllowed("only principals with the admin role may read others' runs"))
            who = principal.id
        limit = min(request.limit or 50, 1000)
        try:
            rows = await self.d.read(lambda s: s.list_runs(
                principal=who, agent=request.agent or None, runner=request.runner or None,
                outcome=request.outcome or None, since=request.since or None, until=request.until or None,
                limit=limit + 1, after=request.page_token or None))
        except ValueError as e:
            await abort(context, InvalidRequest(str(e)))
        more = len(rows) > limit
        rows = rows[:limit]
        return pb.ListRunsResponse(runs=[_record_msg(r) for r in rows],
                                   next_page_token=rows[-1]["cursor"] if more and rows else "")

    # -- the stop button: authenticate -> authorize -> act -> record (Daemon.stop_run / stop_principal) ----
    async def StopRun(self, request: pb.StopRunRequest, context):
        caller = await self._reader(context)
        t = self.d.tracked.get(request.run_id) if request.run_id else None
        if t is None or not (caller.is_admin or t.principal == caller.id):
            # Another principal's run reads as absent, as in GetRun: ids of others' runs leak nothing.
            await abort(context, NotFound(f"run {request.run_id!r} is not in flight (finished, unknown or not yours)"))
        stopped = await self.d.stop_run(request.run_id, caller.id, request.reason[:256])
        return pb.StopResponse(runs_stopped=int(stopped), message=(
            f"run {request.run_id} {t.stopped}" if stopped else f"run {request.run_id} was already stopping"))

    async def StopPrincipal(self, request: pb.StopPrincipalRequest, context):
        caller = await self._reader(context)
        target = request.principal or caller.id
        if target != caller.id and not caller.is_admin:
            self.d.metrics.rejected(NotAllowed.reason)
            await abort(context, NotAllowed(f"only principals with the admin role may stop another principal "
                                            f"({target!r}); you are {caller.id!r}"))
        runs, sessions = await self.d.stop_principal(target, caller.id, request.reason[:256])
        return pb.StopResponse(runs_stopped=runs, sessions_closed=sessions,
                               message=f"{target}: {runs} runs stopped, {sessions} sessions closed")


def _record_msg(rec: dict) -> pb.RunRecord:
    agent = rec.get("agent") or {}
    rec = {k: v for k, v in rec.items() if k != "cursor"}
    return pb.RunRecord(
        run_id=rec.get("run_id", ""), principal=str(rec.get("principal") or ""),
        auth_method=str(rec.get("auth_method") or ""), agent_name=str(agent.get("name", "")),
        agent_version=str(agent.get("version", "")), runner=str(rec.get("runner") or ""),
        outcome=str(rec.get("outcome") or ""), exit_code=int(rec.get("exit_code") or 0),
        received_at=str(rec.get("received_at") or ""), finished_at=str(rec.get("finished_at") or ""),
        policy=str(rec.get("policy") or ""), code_sha256=str(rec.get("code_sha256") or ""),
        record_json=json.dumps(rec, sort_keys=True, default=str))


class RequestGuard(grpc.aio.ServerInterceptor):
    """Serves every unary-request method as a stream-request one, so the handler reads its one message itself.

    Left to grpc.aio, a body that does not deserialize ends as UNKNOWN with a traceback in the log, and a body
    above gRPC's receive limit (server.max_request_bytes + 1 MiB) is refused before any handler runs: neither is
    counted or recorded. Read here, both become refusals like any other: a status that names the problem
    (INVALID_ARGUMENT, RESOURCE_EXHAUSTED), one log line, a count, and for Execute a run.denied record."""

    def __init__(self, daemon: Daemon, receive_limit: int):
        self.d, self.limit = daemon, receive_limit

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_streaming:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        deserialize = handler.request_deserializer
        if handler.response_streaming:
            behaviour = handler.unary_stream

            async def stream(_requests, context):
                request = await self._read(method, deserialize, context)
                async for event in behaviour(request, context):
                    yield event
            return grpc.stream_stream_rpc_method_handler(stream, response_serializer=handler.response_serializer)
        unary = handler.unary_unary

        async def call(_requests, context):
            return await unary(await self._read(method, deserialize, context), context)
        return grpc.stream_unary_rpc_method_handler(call, response_serializer=handler.response_serializer)

    async def _read(self, method: str, deserialize, context):
        try:
            raw = await context.read()
        except asyncio.CancelledError:
            # gRPC's core answered the caller itself (a body past its limit) and cancels this handler: the
            # refusal is still counted and recorded, from a task of its own.
            asyncio.ensure_future(self._refuse(method, context, TooLarge(
                f"no request message arrived: larger than the {self.limit}-byte limit gRPC enforces "
                f"(server.max_request_bytes + 1 MiB), or the client sent none"), answer=False))
            raise
        if raw is grpc.aio.EOF:
            err: SandboxError = TooLarge(
                f"no request message arrived: larger than the {self.limit}-byte limit gRPC enforces "
                f"(server.max_request_bytes + 1 MiB), or the client sent none")
        else:
            try:
                return deserialize(raw) if deserialize else raw
            except Exception as e:  # noqa: BLE001 - whatever the parser says, the caller sent a bad body
                err = InvalidRequest(f"the request body ({len(raw)} bytes) is not a valid {method} request: {e}")
        await self._refuse(method, context, err)

    async def _refuse(self, method: str, context, err: SandboxError, answer: bool = True) -> None:
        d = self.d
        d.metrics.rejected(err.reason)
        log.info("%s refused before it was read (%s): %s (peer %s)", method, err.reason, err, context.peer())
        if method == "Execute":
            run_id = new_run_id()
            record = {"received_at": time.time(), "agent": claims_of(context.invocation_metadata()),
                      "config_sha256": d.catalog.config_sha256, "peer": {"address": context.peer()}}
            try:
                principal = d.authenticator.authenticate(context)
                record.update(principal=principal.as_record(), auth_method=principal.method, peer=principal.peer)
            except Unauthenticated:
                pass
            # Shielded: if gRPC's core cancels this handler meanwhile, the record is still written.
            await asyncio.shield(asyncio.ensure_future(d.record("run_denied", run_id, {
                **record, "outcome": "rejected", "reason": err.reason, "message": str(err)})))
        if answer:
            await abort(context, err)
