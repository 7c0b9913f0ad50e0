"""The daemon's long-lived parts and how they are wired: configuration catalog, launcher, supervisor,
admission, store and metrics. Runs in the daemon.

The catalog (runners, images, compiled seccomp programs) is one immutable object swapped whole on reload, so
a run sees one consistent configuration from request to record. The store lives on one dedicated thread
(SQLite connections must not cross threads) and every write is awaited before the caller goes on.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import logging
import os
import pathlib
import socket
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from . import __version__, audit, config as config_mod, runners as runners_mod, tls as tls_mod
from .admission import Admission, RateLimiter, default_max_concurrent
from .auth import Authenticator, UnixPeerProxy
from .config import Config
from .egress.proxy import EgressProxy
from .egress.resolver import Resolver
from .errors import ConfigError, Stopped
from .metrics import Metrics
from .runners import Runner
from .sandbox import cgroups, landlock, namespaces, seccomp
from .sandbox.launcher import Launcher
from .sandbox.spec import ImageSpec, SeccompProgram
from .store import Store
from .pool import Pool
from .sessions import SessionManager
from .supervisor import ActiveRun, RunResult, Supervisor, UidPool

log = logging.getLogger("sandboxd")


@dataclass(frozen=True)
class Catalog:
    runners: dict[str, Runner]
    images: dict[str, ImageSpec]
    seccomp: dict[str, SeccompProgram]
    config_sha256: str


def build_catalog(cfg: Config) -> Catalog:
    profiles = {}
    if os.path.isdir(cfg.sandbox.seccomp_dir):
        runners_mod.require_trusted(cfg.sandbox.seccomp_dir, "seccomp profile directory")
    for path in sorted(pathlib.Path(cfg.sandbox.seccomp_dir).glob("*.toml")):
        runners_mod.require_trusted(path, "seccomp profile")
        try:
            program = seccomp.compile_profile(str(path))
        except Exception as e:  # noqa: BLE001 - any profile error is a config error naming the file
            raise ConfigError(f"{path}: {e}") from None
        profiles[program.name] = program
    if not profiles:
        raise ConfigError(f"{cfg.sandbox.seccomp_dir}: no seccomp profiles (*.toml)")
    images = runners_mod.load_images(cfg.sandbox.images_dir)
    runners = runners_mod.load_runners(cfg, images, set(profiles))
    digest = hashlib.sha256()
    for part in (repr(cfg), *(repr(r) for r in runners.values()), *(p.sha256 for p in profiles.values())):
        digest.update(part.encode())
    return Catalog(runners, images, profiles, digest.hexdigest())


@dataclass
class Tracked:
    """A run from acceptance to its record, so a stop can reach it whether it waits for a slot or runs."""

    principal: str
    run: ActiveRun | None = None
    stopped: str = ""           # "stopped by <who>: <reason>" once a stop reached it


# A session manager's stop: (principal, who asked, reason) -> how many sessions it closed.
StopHook = Callable[[str, str, str], Awaitable[int]]


def stop_message(who: str, reason: str) -> str:
    return f"stopped by {who}: {reason}" if reason else f"stopped by {who}"


class Daemon:
    STORED_OUTPUT = 256 << 10   # bytes of each stream kept in the record when the policy stores output

    def __init__(self, cfg: Config):
        self.config = cfg
        self.catalog = build_catalog(cfg)
        self.metrics = Metrics()
        self.namespaces = namespaces.NAMES
        self.hostname = socket.gethostname()
        self.launcher = Launcher(staging=os.path.join(cfg.server.runtime_dir, "root"),
                                 cgroup_parent_name=cfg.sandbox.cgroup_parent_name,
                                 cgroup_parent_path=cfg.sandbox.cgroup_parent_path or None,
                                 log_level=cfg.logging.level, log_format=cfg.logging.format)
        self.uids = UidPool(cfg.sandbox.uid_start, cfg.sandbox.uid_count)
        self.egress = EgressProxy(Resolver(cfg.egress.resolver, dict(cfg.egress.hosts)), self.record_event,
                                  self.metrics)
        self.pool = Pool(self)
        self.supervisor = Supervisor(self.launcher, self.uids, self.egress, self.pool)
        # Never more concurrent runs than uids to give them, keeping the uids live sessions may hold.
        slots = min(cfg.admission.max_concurrent or default_max_concurrent(), self._run_uids(cfg))
        self.admission = Admission(slots, cfg.admission.max_queue, cfg.admission.max_queue_wait,
                                   max_queue_per_principal=cfg.admission.max_queue_per_principal)
        self.metrics.active.set_function(lambda: self.admission.running)
        self.metrics.queue_depth.set_function(lambda: self.admission.queued)
        self.metrics.uids_quarantined.set_function(lambda: len(self.uids.quarantined))
        self.sessions = SessionManager(self)
        self._db = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sandboxd-store")
        self.store: Store | None = None
        self.checkpoints: audit.Checkpointer | None = None   # set once the store is open; used on its thread
        self.refusals = audit.RefusalSummary()                # event loop thread only
        self.rates = RateLimiter()
        self.proxy: UnixPeerProxy | None = None
        self.tls = tls_mod.Rotation(tls_mod.load(cfg.tls), cfg.tls.require_client_cert) if cfg.tls else None
        self.tracked: dict[str, Tracked] = {}
        self.stop_hooks: list[StopHook] = [self.sessions.close_principal]  # StopPrincipal and suspensions
        self._background: set[asyncio.Future] = set()
        abi, needed = landlock.abi_version(), cfg.sandbox.landlock_required_abi
        if abi < needed:
            log.warning("the kernel's Landlock ABI is %s but [sandbox] requires %d: every run will fail closed "
                        "(setup_failed, step landlock) until the kernel has it or require_landlock = false",
                        abi or "absent", needed)

    @staticmethod
    def _run_uids(cfg: Config) -> int:
        # Live sessions and the warm pool hold uids of the same range (at most half and a quarter of it).
        return max(1, cfg.sandbox.uid_count - min(cfg.sessions.max_live, cfg.sandbox.uid_count // 2)
                   - min(cfg.pool.max_total, cfg.sandbox.uid_count // 4))

    @property
    def authenticator(self) -> Authenticator:
        # Built per call from the current configuration, so a reload changes principals and tokens at once.
        return Authenticator(self.config.identity, self.proxy)

    async def read(self, fn):
        """Run a read of the store on its thread."""
        return await self._call(lambda: fn(self.store))

    async def start(self) -> None:
        # On cgroup v2 under systemd (Delegate=yes) the daemon's cgroup must become an inner node before the
        # launcher joins it: setup() moves only this process into a leaf, while it is still alone there.
        try:
            cgroups.detect(self.config.sandbox.cgroup_parent_name, self.config.sandbox.cgroup_parent_path or None).setup()
        except cgroups.CgroupError as e:
            raise ConfigError(f"cgroups: {e}") from None
        state_dir = self.config.server.state_dir
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        # The signing key and the anchor file before anything runs: a daemon that cannot vouch for its log
        # does not start.
        key = await asyncio.to_thread(audit.load_key, self.config.audit.key_file(state_dir), create=True)
        try:
            anchors = audit.Anchors(self.config.audit.anchor_directory(state_dir))
        except OSError as e:
            raise ConfigError(f"audit.anchor_dir: cannot open {e.filename}: {e.strerror}") from None
        # The launcher next: it must exist before any gRPC thread does (see sandbox/launcher.py).
        await self.launcher.start()
        self.store = await self._call(Store, os.path.join(state_dir, "sandboxd.db"))
        self.checkpoints = await self._call(audit.Checkpointer, self.store, key, anchors,
                                            self.config.audit.checkpoint_every)
        interrupted = await self._call(lambda: self.store.mark_interrupted("daemon restarted during the run"))
        if interrupted:
            log.warning("marked %d runs and sessions interrupted by a previous daemon's exit", len(interrupted))
            for run_id in interrupted:  # runs are counted like any other end of a run
                rec = await self._call(self.store.get_run, run_id) or {}
                if rec.get("kind") != "session":
                    self.metrics.runs.labels(str(rec.get("runner") or "-"), "interrupted").inc()
        self.sessions.start()
        self.pool.start()
        await self._call(self.store.append, "config.loaded", {
            "source": self.config.source, "config_sha256": self.catalog.config_sha256, "version": __version__,
            "runners": sorted(self.catalog.runners), "host": self.hostname})

    async def prune(self) -> None:
        """Retention: drop events older than store.retention, leaving a checkpoint so the chain still verifies."""
        retention = self.config.store.retention
        if not retention:
            return
        cutoff = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - retention)) + ".000000Z"
        cp = await self._call(self.store.prune, cutoff)
        if cp.pruned_count:
            log.info("retention: pruned %d events older than %s (checkpoint at seq %d)", cp.pruned_count, cutoff,
                     cp.seq_upto)

    async def checkpoint(self) -> None:
        """Sign and anchor the chain head now, if anything was appended since the last checkpoint."""
        if self.checkpoints is not None:
            await self._call(self.checkpoints.write)

    def refused(self, peer_address: str, reason: str) -> None:
        """Count an unauthenticated refusal for the next summary event: no durable write per request, so a
        flood of them cannot slow the store's thread for everyone else (metrics count each one)."""
        cred = None
        if self.proxy is not None and peer_address.startswith("unix-abstract:"):
            cred = self.proxy.lookup(peer_address[len("unix-abstract:"):])
        self.refusals.add(f"unix-uid:{cred.uid}" if cred else audit.peer_key(peer_address), reason)

    async def flush_refusals(self) -> None:
        data = self.refusals.take()
        if data:
            await self._call(self.store.append, audit.REFUSALS, data)
            log.warning("refused %d unauthenticated requests since %s (%s event)", data["total"], data["since"],
                        audit.REFUSALS)

    async def stop(self) -> None:
        await self.pool.stop()
        await self.sessions.stop()
        await self.launcher.stop()
        if self.store is not None:
            for last in (self.flush_refusals, self.checkpoint):   # the record of the end, signed
                try:
                    await last()
                except Exception:  # noqa: BLE001 - closing the store matters more
                    log.exception("audit: %s failed at shutdown", last.__name__)
            if self.checkpoints is not None:
                self.checkpoints.anchors.close()
                self.checkpoints = None
            await self._call(self.store.close)
        self._db.shutdown(wait=True)

    async def reload(self, path: str | None, overrides) -> bool:
        """Load the configuration again (SIGHUP). All or nothing: an invalid file is logged and counted, and
        the running configuration keeps serving. Running runs keep the RunSpec (and limits) they started with."""
        try:
            new = overrides(await asyncio.to_thread(config_mod.load, path))
            catalog = await asyncio.to_thread(build_catalog, new)
            tls = self._tls_reload(new)
            tls_material = await asyncio.to_thread(tls_mod.load, new.tls) if tls else None
        except ConfigError as e:
            log.error("configuration reload refused, keeping the running one: %s", e)
            self.metrics.reloads.labels("failure").inc()
            await self._call(self.store.append, "config.rejected", {"source": path or "<built-in default>",
                                                                     "error": str(e)})
            return False
        old = self.config
        # max_request_bytes also sizes gRPC's own message limit, which is fixed when the server starts.
        fixed = {"listen", "state_dir", "runtime_dir", "metrics_listen", "socket_mode", "max_request_bytes"}
        changed = [k for k in fixed if getattr(old.server, k) != getattr(new.server, k)]
        changed += [k for k in ("uid_start", "uid_count", "cgroup_parent_name", "cgroup_parent_path")
                    if getattr(old.sandbox, k) != getattr(new.sandbox, k)]
        changed += [f"audit.{k}" for k in ("key_path", "anchor_dir") if getattr(old.audit, k) != getattr(new.audit, k)]
        if changed:
            log.warning("reload: %s change only on restart; keeping the running values", ", ".join(sorted(changed)))
        self.config = dataclasses.replace(
            new, server=dataclasses.replace(new.server, **{k: getattr(old.server, k) for k in fixed}),
            sandbox=dataclasses.replace(new.sandbox, uid_start=old.sandbox.uid_start, uid_count=old.sandbox.uid_count,
                                        cgroup_parent_name=old.sandbox.cgroup_parent_name,
                                        cgroup_parent_path=old.sandbox.cgroup_parent_path),
            audit=dataclasses.replace(new.audit, key_path=old.audit.key_path, anchor_dir=old.audit.anchor_dir))
        if self.checkpoints is not None:
            self.checkpoints.every = new.audit.checkpoint_every
        self.catalog = catalog
        if tls_material is not None and self.tls.update(tls_material):
            log.info("reload: new TLS connections use the server certificate and client CA read now")
        self.egress.resolver = Resolver(new.egress.resolver, dict(new.egress.hosts))
        self.admission.reconfigure(min(new.admission.max_concurrent or default_max_concurrent(),
                                       self._run_uids(self.config)),
                                   new.admission.max_queue, new.admission.max_queue_wait,
                                   new.admission.max_queue_per_principal)
        logging.getLogger().setLevel(new.logging.level)
        self.pool.reconfigure()
        self.metrics.reloads.labels("success").inc()
        await self._call(self.store.append, "config.loaded", {
            "source": self.config.source, "config_sha256": catalog.config_sha256, "version": __version__,
            "runners": sorted(catalog.runners), "host": self.hostname, "reload": True})
        log.info("configuration reloaded from %s: %d runners", self.config.source, len(catalog.runners))
        for name in sorted(new.identity.suspended() - old.identity.suspended()):
            runs, sessions = await self.stop_principal(name, "configuration", "principal suspended",
                                                       kind="principal.suspended")
            log.warning("principal %s suspended: %d runs stopped, %d sessions closed", name, runs, sessions)
        for name in sorted(old.identity.suspended() - new.identity.suspended()):
            await self._call(self.store.append, "principal.unsuspended", {"principal": name, "by": "configuration",
                                                                          "host": self.hostname})
        return True

    # -- the stop button ----------------------------------------------------------------------------------
    def suspended(self, principal: str) -> bool:
        entry = self.config.identity.principal(principal)
        return entry is not None and entry.suspended

    async def stop_run(self, run_id: str, who: str, reason: str, *, record: bool = True) -> bool:
        """Stop one run wherever it is: a waiter leaves the queue, a running sandbox is killed. Either way its
        record ends as cancelled with the message naming who stopped it. False when it is not in flight."""
        t = self.tracked.get(run_id)
        if t is None or t.stopped:
            return False
        t.stopped = stop_message(who, reason)
        if record:
            await self._call(self.store.append, "run.stop", {"run_id": run_id, "principal": t.principal, "by": who,
                                                             "reason": reason, "host": self.hostname})
        if t.run is not None:
            t.run.stop_message = t.stopped
            await t.run.cancel("stopped", drain=False)  # its caller still reads: keep the end of the stream
        else:  # waiting for a slot (or just admitted: Execute checks t.stopped before it starts anything)
            self.admission.withdraw(run_id, Stopped(t.stopped))
        log.warning("run %s %s", run_id, t.stopped, extra={"run_id": run_id})
        return True

    async def stop_principal(self, principal: str, who: str, reason: str,
                             kind: str = "principal.stop") -> tuple[int, int]:
        """Stop every run of `principal` and let each stop hook (sessions) close what it holds. Recorded first,
        so the record says who asked even if a stop fails halfway."""
        await self._call(self.store.append, kind, {"principal": principal, "by": who, "reason": reason,
                                                   "host": self.hostname})
        runs = 0
        for run_id in [r for r, t in self.tracked.items() if t.principal == principal]:
            runs += await self.stop_run(run_id, who, reason, record=False)
        sessions = 0
        for hook in list(self.stop_hooks):
            try:
                sessions += await hook(principal, who, reason)
            except Exception:  # noqa: BLE001 - one failing hook must not keep the others from stopping
                log.exception("stop hook %r failed for principal %s", hook, principal)
        return runs, sessions

    def _tls_reload(self, new: Config) -> bool:
        """Whether the reload rotates TLS material. The listeners' TLS and require_client_cert are fixed at start:
        a change to them refuses the whole reload, naming the key, rather than being silently ignored."""
        old = self.config.tls
        if (old is None) != (new.tls is None):
            raise ConfigError(f"server.tls: {'adding' if old is None else 'removing'} TLS needs a restart "
                              f"(the listeners are created at start)")
        if old is not None and old.require_client_cert != new.tls.require_client_cert:
            raise ConfigError("server.tls.require_client_cert: changes only on restart")
        return new.tls is not None and self.tls is not None

    async def healthy(self) -> tuple[bool, str]:
        """Serving only when the launcher answers, cgroups are usable and the store takes writes."""
        if not self.launcher.alive:
            return False, "launcher not running"
        try:
            pong = await self.launcher.ping()
        except Exception as e:  # noqa: BLE001
            return False, f"launcher not answering: {e}"
        if not pong.get("usable", False):
            return False, "cgroups not usable"
        if not await self._call(self.store.writable):
            return False, "store not writable"
        return True, "ok"

    def cleanup_cgroups(self) -> None:
        """Last resort when no launcher can run: kill and remove what the dead one left (daemon side)."""
        try:
            driver = cgroups.detect(self.config.sandbox.cgroup_parent_name,
                                    self.config.sandbox.cgroup_parent_path or None)
            left = driver.recover()
            driver.teardown()
            if left:
                log.warning("removed the cgroups of %d runs the launcher left: %s", len(left), left)
        except cgroups.CgroupError as e:
            log.error("could not clean up cgroups: %s", e)

    def spawn(self, coro) -> None:
        """Run `coro` to the end in its own task, whatever happens to the caller (a record must not be lost
        because the RPC that wrote it was cancelled)."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._db, self._on_store_thread, fn, args)

    def _on_store_thread(self, fn, args):
        out = fn(*args)
        # Count-based checkpoints: after any write that brings the head checkpoint_every events past the last one.
        if self.checkpoints is not None and self.checkpoints.due():
            try:
                self.checkpoints.write()
            except Exception:  # noqa: BLE001 - the caller's event is already durable; retried on the next write
                log.exception("audit: could not write a signed checkpoint")
        return out

    async def record(self, method: str, run_id: str, data: dict) -> None:
        data = {**data, "daemon_version": __version__, "host": self.hostname}
        await self._call(getattr(self.store, method), run_id, data)

    async def record_event(self, kind: str, run_id: str | None, data: dict) -> None:
        """Append any event to the chain (durable before the caller goes on)."""
        data = {**data, "daemon_version": __version__, "host": self.hostname}
        await self._call(self.store.append, kind, data, run_id)

    async def finish(self, run_id: str, result: RunResult, runner: str) -> None:
        """Record the end of a run (durable before the caller sends the result) and count it."""
        record = result.as_record()
        record["finished_at"] = time.time()
        try:
            await self._call(self.store.run_finished, run_id, record)
        finally:
            self.metrics.run_finished(runner, result)
        log.info("run %s finished: %s %s", run_id, result.outcome.value, result.message,
                 extra={"run_id": run_id})

