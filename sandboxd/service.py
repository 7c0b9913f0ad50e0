"""The gRPC servicer: the whole request pipeline in one readable method, and errors -> statuses in one place.

    Execute: authenticate -> authorize -> plan -> record "requested" -> admit -> launch -> stream
             -> record "finished" -> result

A refused request (unauthenticated, not allowed, rate limited, invalid) is recorded too, before its status
goes back. A run whose client goes away is stopped (outcome cancelled) and still recorded: the finishing step
runs in its own task, so cancelling the RPC cannot cancel the record.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

import grpc

from . import policy, wire
from .auth import Principal, Unauthenticated, claims_of
from .errors import (InvalidRequest, NotAllowed, NotFound, Overloaded, SandboxError, SetupFailed, TooLarge,
                     Unavailable)
from .state import Daemon
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
}


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


class SandboxService(pb_grpc.SandboxServicer):
    def __init__(self, daemon: Daemon):
        self.d = daemon

    async def ListRunners(self, request, context):
        try:
            self.d.authenticator.authenticate(context)
        except Unauthenticated as err:
            self.d.metrics.rejected(err.reason)
            await abort(context, err)
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
            req = wire.to_request(request)
            allowed = policy.authorize(principal, req.runner, cfg.identity)
            record["policy"] = allowed.name
            d.rates.check(principal.id, allowed.runs_per_minute, time.monotonic())
            spec, dropped_env = policy.plan_run(
                req, catalog.runners, catalog.images, catalog.seccomp, run_id, cfg.server.max_request_bytes,
                cfg.sandbox.stop_on_output_limit, ceiling=allowed.limits)
        except SandboxError as err:
            if "peer" not in record:
                record["peer"] = {"address": context.peer()}
            d.metrics.rejected(err.reason)
            await d.record("run_denied", run_id, {**record, "outcome": "rejected", "reason": err.reason,
                                                  "message": str(err)})
            log.info("run %s refused (%s): %s", run_id, err.reason, err, extra={"run_id": run_id})
            await abort(context, err)
            return
        runner = catalog.runners[req.runner]
        spec_summary = spec.summary()
        record.update({
            "runner": runner.name, "image": spec.image.name, "dropped_env": list(dropped_env),
            "limits": spec_summary["limits"], "spec": spec_summary,
            "sandbox_profile": {"namespaces": list(d.namespaces), "seccomp": spec.seccomp.name,
                                "seccomp_sha256": spec.seccomp.sha256, "network": spec.network,
                                "cgroup_driver": d.launcher.driver, "landlock": d.landlock},
            "store_code": allowed.store_code, "store_output": allowed.store_output})
        if allowed.store_code:
            record["code"] = request.code
        await d.record("run_requested", run_id, record)
        log.info("run %s accepted: %s runs %s under policy %s", run_id, principal.id, runner.name, allowed.name,
                 extra={"run_id": run_id})
        yield wire.started_event(run_id)
        try:
            async with d.admission.slot(principal.id, allowed.max_concurrent) as waited:
                d.metrics.queue_wait(waited)
                async for event in self._run(spec, req.stdin, accepted, runner.name, allowed.store_output):
                    yield event
        except Overloaded as err:
            d.metrics.rejected(err.reason)
            await d.finish(run_id, RunResult(run_id, Outcome.REJECTED, message=str(err)), runner.name)
            await abort(context, err)

    async def _run(self, spec, stdin: bytes, accepted: float, runner: str, store_output: bool):
        d = self.d
        try:
            run = await d.supervisor.start(spec, stdin, accepted, keep_output=d.STORED_OUTPUT if store_output else 0)
        except SetupFailed as err:
            result = RunResult(spec.run_id, Outcome.SETUP_FAILED, message=str(err))
            await d.finish(spec.run_id, result, runner)
            yield wire.result_event(result, spec.limits)
            return
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
            await self.d.record("run_started", run.spec.run_id, {"started_at": exec_at, "uid": run.spec.uid})
        result = await run.result
        await self.d.finish(run.spec.run_id, result, runner)
        return result

    # -- records -----------------------------------------------------------------------------------------
    async def _reader(self, context) -> Principal:
        try:
            return self.d.authenticator.authenticate(context)
        except Unauthenticated as err:
            self.d.metrics.rejected(err.reason)
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


