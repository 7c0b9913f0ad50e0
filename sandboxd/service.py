"""The gRPC servicer: the whole request pipeline in one readable method, and errors -> statuses in one place.

    Execute: validate + plan -> record "requested" -> admit -> launch -> stream -> record "finished" -> result

A refused request is recorded too (outcome rejected) before its status goes back. A run whose client goes away
is stopped (outcome cancelled) and still recorded: the finishing step runs in its own task, so cancelling the
RPC cannot cancel the record.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc

from . import policy, wire
from .errors import InvalidRequest, NotFound, Overloaded, SandboxError, SetupFailed, TooLarge, Unavailable
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
}


def new_run_id() -> str:
    """Time-ordered (sorts by start) and unique: 12 hex digits of milliseconds, then 16 random ones."""
    return f"{int(time.time() * 1000):012x}{uuid.uuid4().hex[:16]}"


async def abort(context: grpc.aio.ServicerContext, err: SandboxError) -> None:
    code = STATUS.get(type(err), grpc.StatusCode.INTERNAL)
    if isinstance(err, Overloaded):
        context.set_trailing_metadata((("grpc-retry-pushback-ms", str(int(err.retry_after * 1000))),))
    await context.abort(code, str(err))


class SandboxService(pb_grpc.SandboxServicer):
    def __init__(self, daemon: Daemon):
        self.d = daemon

    async def ListRunners(self, request, context):
        return wire.runners_response(self.d.catalog.runners)

    async def Execute(self, request: pb.ExecuteRequest, context: grpc.aio.ServicerContext):
        d = self.d
        accepted = time.time()
        run_id = new_run_id()
        catalog = d.catalog  # one consistent view for the whole run, even if a reload lands meanwhile
        try:
            req = wire.to_request(request)
            spec, dropped_env = policy.plan_run(
                req, catalog.runners, catalog.images, catalog.seccomp, run_id, d.config.server.max_request_bytes,
                d.config.sandbox.stop_on_output_limit)
        except SandboxError as err:
            d.metrics.rejected(err.reason)
            await d.record("run_denied", run_id, {**wire.request_summary(request), "received_at": accepted,
                                                  "outcome": "rejected", "reason": err.reason, "message": str(err)})
            log.info("run %s rejected: %s", run_id, err, extra={"run_id": run_id})
            await abort(context, err)
            return
        runner = catalog.runners[req.runner]
        await d.record("run_requested", run_id, {
            "received_at": accepted, "runner": runner.name, "image": spec.image.name,
            "code_sha256": wire.request_summary(request)["code_sha256"],
            "stdin_sha256": wire.request_summary(request)["stdin_sha256"], "dropped_env": list(dropped_env),
            "limits": spec.summary()["limits"], "spec": spec.summary(), "config_sha256": catalog.config_sha256,
            "sandbox_profile": {"namespaces": list(d.namespaces), "seccomp": spec.seccomp.name,
                                "seccomp_sha256": spec.seccomp.sha256, "network": spec.network,
                                "cgroup_driver": d.launcher.driver}})
        log.info("run %s accepted: runner %s", run_id, runner.name, extra={"run_id": run_id})
        yield wire.started_event(run_id)
        try:
            async with d.admission.slot("") as waited:
                d.metrics.queue_wait(waited)
                async for event in self._run(spec, req.stdin, accepted, runner.name):
                    yield event
        except Overloaded as err:
            d.metrics.rejected(err.reason)
            await d.finish(run_id, RunResult(run_id, Outcome.REJECTED, message=str(err)), runner.name)
            await abort(context, err)

    async def _run(self, spec, stdin: bytes, accepted: float, runner: str):
        d = self.d
        try:
            run = await d.supervisor.start(spec, stdin, accepted)
        except (SetupFailed, Overloaded) as err:
            if isinstance(err, Overloaded):
                raise
            result = RunResult(spec.run_id, Outcome.SETUP_FAILED, message=str(err))
            await d.finish(spec.run_id, result, runner)
            yield wire.result_event(result, spec.limits)
            return
        finisher = asyncio.ensure_future(self._finish(run, runner))
        d.metrics.run_started(runner)
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
        result = await run.result
        await self.d.finish(run.spec.run_id, result, runner)
        return result
