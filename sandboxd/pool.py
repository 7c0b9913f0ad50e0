"""The warm pool: per runner, single-use sandboxes built ahead of time, off the request's path. Daemon side.

A pooled sandbox is a one-shot run stopped half way: the launcher has made its cgroup (the runner's default
limits), the keeper has unshared its namespaces, and its init has set the hostname, brought up loopback and built
the root filesystem, then waits (child._await_claim). That is the ~20 ms of a cold start that does not depend on
the request. A run claims one when its plan has the same sandbox_key (spec.py: same image, mounts and their
sizes, cgroup limits, no egress) as the runner's template; everything else is the claiming run's own and is
applied exactly as on the cold path: init writes the run's files into the fresh /work as root (nothing untrusted
has run there yet), then forks the payload, which applies rlimits, credentials, Landlock and seccomp and execs
the run's argv with its env. From the claim on the launcher knows it only as that run (same outcome, usage,
deadline, teardown, record). A miss, an empty pool, or a runner without a pool takes the cold path.

Accounting: each pooled sandbox holds a uid of the shared UidPool (given back, like a run's, only once its
cgroup is gone), counts the runner's default memory against the sessions' memory budget, and the daemon keeps
max_total uids out of the admission slots. Building is bounded by refill_concurrency and max_total; a failed
build backs the runner's refill off for BACKOFF seconds. A reload drains (kills) the ready sandboxes of runners
whose template changed and builds new ones.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import secrets
import time
from dataclasses import dataclass

from . import policy
from .errors import Overloaded
from .sandbox.launcher import LauncherError, RunHandle
from .sandbox.spec import RunSpec, sandbox_key

log = logging.getLogger("sandboxd.pool")
BACKOFF = 5.0        # seconds before a runner whose build failed is tried again
BUILD_TIMEOUT = 60.0
# A claim sets the run's own memory limit on the pooled cgroup, which already holds init (~10 MiB of Python);
# a limit this close to that takes the cold path, where the limit is in place before anything joins.
MIN_CLAIM_MEMORY = 32 << 20


@dataclass(eq=False)
class Pooled:
    runner: str
    spec: RunSpec             # the template, with this sandbox's pool id and uid
    handle: RunHandle
    claimed: bool = False


class Pool:
    def __init__(self, daemon):
        self.d = daemon
        self.templates: dict[str, RunSpec] = {}
        self.ready: dict[str, list[Pooled]] = collections.defaultdict(list)
        self.building: collections.Counter[str] = collections.Counter()
        self.building_memory = 0
        self.backoff: dict[str, float] = {}
        self.stopping = False
        self._tasks: set[asyncio.Task] = set()

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self.reconfigure()

    def reconfigure(self) -> None:
        """Take the current configuration and catalog: new templates, and the ready sandboxes of runners whose
        template changed (or whose pool is gone) drained."""
        cfg, cat = self.d.config, self.d.catalog
        templates = {}
        for name, runner in cat.runners.items():
            if cfg.pool.size_of(name) > 0 and runner.available:
                templates[name] = policy.plan_pooled(runner, cat.images, cat.seccomp, "pool",
                                                     cfg.sandbox.landlock_required_abi)
        self.templates = templates
        for name in list(self.ready):
            for entry in list(self.ready[name]):
                if not self._current(entry):
                    self._drain(entry)
        self.backoff.clear()
        self.refill()

    async def stop(self) -> None:
        self.stopping = True
        for entries in self.ready.values():
            for entry in list(entries):
                self._drain(entry)
        for task in list(self._tasks):
            task.cancel()

    # -- claims ------------------------------------------------------------------------------------------
    def claim(self, runner: str, spec: RunSpec) -> Pooled | None:
        """A ready sandbox the run fits, taken out of the pool (the caller owns its uid from now on), or None."""
        template = self.templates.get(runner)
        if template is None:
            return None
        hit = None
        if (not spec.session and not spec.pooled and spec.limits.memory >= MIN_CLAIM_MEMORY
                and sandbox_key(spec) == sandbox_key(template)):
            entries = self.ready[runner]
            while entries:
                entry = entries.pop(0)
                if not entry.handle.finished.done() and self._current(entry):
                    hit = entry
                    break
        self.d.metrics.pool_claims.labels(runner, "hit" if hit else "miss").inc()
        if hit is not None:
            hit.claimed = True
        self._gauge(runner)
        self.refill()
        return hit

    def memory(self) -> int:
        """Bytes of memory limits the pool holds (ready and being built), for the sessions' budget."""
        return sum(e.spec.limits.memory for entries in self.ready.values() for e in entries) + self.building_memory

    def held(self) -> int:
        return sum(len(e) for e in self.ready.values()) + sum(self.building.values())

    # -- refill ------------------------------------------------------------------------------------------
    def refill(self) -> None:
        """Start as many builds as the sizes, max_total, refill_concurrency, the memory budget and free uids allow."""
        if self.stopping or not self.d.launcher.alive:
            return
        cfg = self.d.config.pool
        now = time.monotonic()
        for name, template in self.templates.items():
            while (len(self.ready[name]) + self.building[name] < cfg.size_of(name) and self.held() < cfg.max_total
                   and sum(self.building.values()) < cfg.refill_concurrency and now >= self.backoff.get(name, 0)
                   and self._room(template.limits.memory)):
                try:
                    uid = self.d.uids.take()
                except Overloaded:
                    return
                self.building[name] += 1
                self.building_memory += template.limits.memory
                task = asyncio.create_task(self._build(name, template, uid))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def _room(self, memory: int) -> bool:
        return self.d.sessions.memory_held() + self.memory() + memory <= self.d.sessions.memory_budget()

    async def _build(self, name: str, template: RunSpec, uid: int) -> None:
        spec = dataclasses.replace(template, run_id=f"pool-{secrets.token_hex(8)}", uid=uid, gid=uid)
        began = time.monotonic()
        entry = None
        try:
            try:
                handle = await self.d.launcher.prepare(spec)
            except LauncherError as e:
                self.d.uids.give_back(uid, True)
                self._failed(name, str(e))
                return
            entry = Pooled(name, spec, handle)
            handle.finished.add_done_callback(lambda f, e=entry: self._ended(e, f))
            try:
                ready = await asyncio.wait_for(asyncio.shield(handle.started), BUILD_TIMEOUT)
            except asyncio.TimeoutError:
                ready = None
                self._drain(entry)
            if not ready:
                if not handle.finished.done():
                    self._drain(entry)
                fin = await asyncio.shield(handle.finished)
                self._failed(name, fin.setup_error or fin.kill_reason or "the sandbox ended while being built")
                return
            self.d.metrics.pool_refill.labels(name).observe(time.monotonic() - began)
            if self.stopping or handle.finished.done() or not self._current(entry):
                self._drain(entry)
                return
            self.ready[name].append(entry)
            self._gauge(name)
        finally:
            self.building[name] -= 1
            self.building_memory -= template.limits.memory
            self.refill()

    def _failed(self, name: str, why: str) -> None:
        log.warning("pool: a sandbox of runner %s could not be built: %s; retrying in %gs", name, why, BACKOFF)
        self.backoff[name] = time.monotonic() + BACKOFF
        asyncio.get_running_loop().call_later(BACKOFF, self.refill)

    def _ended(self, entry: Pooled, fut: asyncio.Future) -> None:
        """An unclaimed pooled sandbox is gone (drained, or lost with the launcher): its uid goes back as a run's
        would, once its cgroup is gone."""
        if entry.claimed:
            return
        entries = self.ready.get(entry.runner, [])
        if entry in entries:
            entries.remove(entry)
            self._gauge(entry.runner)
        fin = fut.result()
        self.d.uids.give_back(entry.spec.uid, fin.clean)
        self.refill()

    def _drain(self, entry: Pooled) -> None:
        entries = self.ready.get(entry.runner, [])
        if entry in entries:
            entries.remove(entry)
            self._gauge(entry.runner)
        if not entry.handle.finished.done():
            task = asyncio.ensure_future(entry.handle.kill("drained"))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def _current(self, entry: Pooled) -> bool:
        template = self.templates.get(entry.runner)
        return template is not None and dataclasses.replace(entry.spec, run_id="pool", uid=0, gid=0) == template

    def _gauge(self, runner: str) -> None:
        self.d.metrics.pool_ready.labels(runner).set(len(self.ready.get(runner, ())))
