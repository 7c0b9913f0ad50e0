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

Runners with `prestart` (python) go one step further: their pooled sandbox also starts the interpreter, with the
template's argv, env and the highest rlimits a request may have, blocked reading its script from a FIFO at the
script's path (child._prestart). A run whose argv, env, seccomp program and stack limit are the template's
(Pooled.fits_prestart) uses it: the daemon fills the interpreter's stdin memfd and reads its stdout and stderr
pipes (made here at build time), init writes the run's files, lowers the rlimits to the run's and writes the
script into the FIFO (child._feed). Any other run of that runner still claims the sandbox, and init replaces the
interpreter with a fresh payload (child._discard).

Sessions have pools of their own ([pool] sessions): a session sandbox built up to its zygote, whose init waits
for the session that claims it (init.serve), then takes that session's spec (limits, files) and reports ready.

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
import os
import secrets
import time
from dataclasses import dataclass

from . import policy
from .errors import Overloaded
from .sandbox import rlimits
from .sandbox.launcher import LauncherError, RunHandle, stdin_memfd
from .sandbox.spec import PRESTART_MAX_SCRIPT, RunSpec, prestart_key, prestart_script, sandbox_key

log = logging.getLogger("sandboxd.pool")
BACKOFF = 5.0        # seconds before a runner whose build failed is tried again
BUILD_TIMEOUT = 60.0
REFILL_DELAY = 0.5   # seconds after a claim at most before the pool starts its replacement
# A claim sets the run's own memory limit on the pooled cgroup, which already holds init (~10 MiB of Python);
# a limit this close to that takes the cold path, where the limit is in place before anything joins.
MIN_CLAIM_MEMORY = 32 << 20


@dataclass(eq=False)
class Pooled:
    runner: str
    spec: RunSpec             # the template, with this sandbox's pool id and uid
    handle: RunHandle
    claimed: bool = False
    # A prestarted interpreter's stdio, the daemon's ends: (stdin memfd, stdout read end, stderr read end).
    stdio: tuple[int, int, int] | None = None
    kind: str = "run"         # RUN or SESSION

    @property
    def key(self) -> tuple[str, str]:
        return (self.runner, self.kind)

    def fits_prestart(self, spec: RunSpec) -> bool:
        """Whether `spec` can use the prestarted interpreter: the same argv, env, seccomp, Landlock floor and
        stack limit it was started with, and a script small enough for its FIFO."""
        if self.stdio is None or not self.spec.prestart:
            return False
        script = prestart_script(dataclasses.replace(spec, prestart=self.spec.prestart))
        return (script is not None and len(script) <= PRESTART_MAX_SCRIPT
                and prestart_key(spec) == prestart_key(self.spec)
                and rlimits.changes(self.spec.limits, spec.limits) is not None)

    def take_stdio(self) -> tuple[int, int, int]:
        stdio, self.stdio = self.stdio, None
        return stdio

    def close_stdio(self) -> None:
        for fd in self.take_stdio() or ():
            os.close(fd)


RUN, SESSION = "run", "session"


class Pool:
    """Keyed by (runner, kind): kind RUN serves Execute (a one-shot run), SESSION serves CreateSession."""

    def __init__(self, daemon):
        self.d = daemon
        self.templates: dict[tuple[str, str], RunSpec] = {}
        self.ready: dict[tuple[str, str], list[Pooled]] = collections.defaultdict(list)
        self.building: collections.Counter[tuple[str, str]] = collections.Counter()
        self.building_memory = 0
        self.backoff: dict[tuple[str, str], float] = {}
        self.stopping = False
        self._tasks: set[asyncio.Task] = set()

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self.reconfigure()

    def reconfigure(self) -> None:
        """Take the current configuration and catalog: new templates, and the ready sandboxes of runners whose
        template changed (or whose pool is gone) drained."""
        from .sessions import kernel_files
        cfg, cat = self.d.config, self.d.catalog
        templates = {}
        for name, runner in cat.runners.items():
            if not runner.available:
                continue
            if cfg.pool.size_of(name) > 0:
                templates[(name, RUN)] = policy.plan_pooled(runner, cat.images, cat.seccomp, "pool",
                                                            cfg.sandbox.landlock_required_abi)
            if cfg.pool.sessions_of(name) > 0 and cfg.sessions.max_live > 0:
                templates[(name, SESSION)] = policy.plan_pooled_session(
                    runner, cat.images, cat.seccomp, "pool", kernel_files(runner), cfg.sandbox.landlock_required_abi)
        self.templates = templates
        for key in list(self.ready):
            for entry in list(self.ready[key]):
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
        """A ready sandbox the run (or, spec.session, the session) fits, taken out of the pool (the caller owns
        its uid from now on), or None."""
        kind = SESSION if spec.session else RUN
        template = self.templates.get((runner, kind))
        if template is None:
            return None
        hit = None
        if not spec.pooled and spec.limits.memory >= MIN_CLAIM_MEMORY and sandbox_key(spec) == sandbox_key(template):
            entries = self.ready[(runner, kind)]
            while entries:
                entry = entries.pop(0)
                if not entry.handle.finished.done() and self._current(entry):
                    hit = entry
                    break
        claims = self.d.metrics.pool_session_claims if kind == SESSION else self.d.metrics.pool_claims
        claims.labels(runner, "hit" if hit else "miss").inc()
        if hit is not None:
            hit.claimed = True
        self._gauge((runner, kind))
        # Not now: a build costs ~20 ms of CPU, which on a small machine the claiming request would share.
        # The run's end (Supervisor) or the session's start refills; this timer only bounds the wait.
        asyncio.get_running_loop().call_later(REFILL_DELAY, self.refill)
        return hit

    def claimable_memory(self, spec: RunSpec) -> int:
        """The memory reservation of the ready sandbox `spec` (a session's or a run's plan) would claim, or 0."""
        for (runner, kind), template in self.templates.items():
            if (kind == (SESSION if spec.session else RUN) and self.ready.get((runner, kind))
                    and spec.limits.memory >= MIN_CLAIM_MEMORY and sandbox_key(spec) == sandbox_key(template)):
                return template.limits.memory
        return 0

    def reclaim(self, needed: int) -> int:
        """Drain ready sandboxes (run sandboxes first, the newest first) until `needed` bytes of memory
        reservation are freed or none is left; returns what was freed. The pool refills once there is room."""
        freed = 0
        for kind in (RUN, SESSION):
            for key in [k for k in self.ready if k[1] == kind]:
                while self.ready[key] and freed < needed:
                    entry = self.ready[key][-1]
                    freed += entry.spec.limits.memory
                    self._drain(entry)
        if freed:
            log.info("pool: drained %d bytes of ready sandboxes to make room for a session", freed)
        return freed

    def memory(self) -> int:
        """Bytes of memory limits the pool holds (ready and being built), for the sessions' budget."""
        return sum(e.spec.limits.memory for entries in self.ready.values() for e in entries) + self.building_memory

    def held(self) -> int:
        return sum(len(e) for e in self.ready.values()) + sum(self.building.values())

    # -- refill ------------------------------------------------------------------------------------------
    def _size(self, key: tuple[str, str]) -> int:
        pool = self.d.config.pool
        return pool.sessions_of(key[0]) if key[1] == SESSION else pool.size_of(key[0])

    def refill(self) -> None:
        """Start as many builds as the sizes, max_total, refill_concurrency, the memory budget and free uids allow."""
        if self.stopping or not self.d.launcher.alive:
            return
        cfg = self.d.config.pool
        now = time.monotonic()
        for key, template in self.templates.items():
            while (len(self.ready[key]) + self.building[key] < self._size(key) and self.held() < cfg.max_total
                   and sum(self.building.values()) < cfg.refill_concurrency and now >= self.backoff.get(key, 0)
                   and self._room(template.limits.memory)):
                try:
                    uid = self.d.uids.take()
                except Overloaded:
                    return
                self.building[key] += 1
                self.building_memory += template.limits.memory
                task = asyncio.create_task(self._build(key, template, uid))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def _room(self, memory: int) -> bool:
        return self.d.sessions.memory_held() + self.memory() + memory <= self.d.sessions.memory_budget()

    async def _build(self, key: tuple[str, str], template: RunSpec, uid: int) -> None:
        spec = dataclasses.replace(template, run_id=f"pool-{secrets.token_hex(8)}", uid=uid, gid=uid)
        began = time.monotonic()
        entry = None
        try:
            stdio = ours = None
            if spec.prestart:  # the interpreter's stdio: the daemon keeps stdin's memfd and the read ends
                out_r, out_w = os.pipe2(os.O_CLOEXEC)
                err_r, err_w = os.pipe2(os.O_CLOEXEC)
                stdin = stdin_memfd()
                stdio, ours = (stdin, out_w, err_w), (stdin, out_r, err_r)
            try:
                handle = await self.d.launcher.prepare(spec, stdio)
            except LauncherError as e:
                for fd in {*(stdio or ()), *(ours or ())}:
                    os.close(fd)
                self.d.uids.give_back(uid, True)
                self._failed(key, str(e))
                return
            finally:
                if stdio:
                    os.close(stdio[1])
                    os.close(stdio[2])
            entry = Pooled(key[0], spec, handle, stdio=ours, kind=key[1])
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
                self._failed(key, fin.setup_error or fin.kill_reason or "the sandbox ended while being built")
                return
            self.d.metrics.pool_refill.labels(key[0]).observe(time.monotonic() - began)
            if self.stopping or handle.finished.done() or not self._current(entry):
                self._drain(entry)
                return
            self.ready[key].append(entry)
            self._gauge(key)
        finally:
            self.building[key] -= 1
            self.building_memory -= template.limits.memory
            self.refill()

    def _failed(self, key: tuple[str, str], why: str) -> None:
        log.warning("pool: a %s sandbox of runner %s could not be built: %s; retrying in %gs", key[1], key[0], why,
                    BACKOFF)
        self.backoff[key] = time.monotonic() + BACKOFF
        asyncio.get_running_loop().call_later(BACKOFF, self.refill)

    def _ended(self, entry: Pooled, fut: asyncio.Future) -> None:
        """An unclaimed pooled sandbox is gone (drained, or lost with the launcher): its uid goes back as a run's
        would, once its cgroup is gone."""
        if entry.claimed:
            return
        entry.close_stdio()
        entries = self.ready.get(entry.key, [])
        if entry in entries:
            entries.remove(entry)
            self._gauge(entry.key)
        fin = fut.result()
        self.d.uids.give_back(entry.spec.uid, fin.clean)
        self.refill()

    def _drain(self, entry: Pooled) -> None:
        entries = self.ready.get(entry.key, [])
        if entry in entries:
            entries.remove(entry)
            self._gauge(entry.key)
        if not entry.handle.finished.done():
            task = asyncio.ensure_future(entry.handle.kill("drained"))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def _current(self, entry: Pooled) -> bool:
        template = self.templates.get(entry.key)
        return template is not None and dataclasses.replace(entry.spec, run_id="pool", uid=0, gid=0) == template

    def _gauge(self, key: tuple[str, str]) -> None:
        gauge = self.d.metrics.pool_sessions_ready if key[1] == SESSION else self.d.metrics.pool_ready
        gauge.labels(key[0]).set(len(self.ready.get(key, ())))
