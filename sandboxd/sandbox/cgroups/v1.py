"""The cgroup v1 driver: each run is one directory, <parent>/run-<id>, in each hierarchy it uses (freezer,
memory, pids, cpu, cpuacct; co-mounted controllers share one directory), where <parent> is
"<this process's cgroup in that hierarchy>/<parent name>" or the configured parent_path.

Runs in the launcher. Without cgroup.kill the only way to kill every task of a run while some of them fork is
the freezer: freeze, SIGKILL what is listed, thaw. HybridDriver (hybrid.py) reuses all of this but kills
through a parallel cgroup2 directory instead of the freezer.
"""
from __future__ import annotations

import os
import posixpath
import signal

from . import _fs
from .base import CgroupDriver, CgroupError, CgroupLimits, RunCgroup, Usage
from .mounts import V1_LIMITS, Hierarchy
from .v2 import CPU_PERIOD_US, MIN_QUOTA_US

FREEZE_TIMEOUT = 2.0


class V1Run(RunCgroup):
    def __init__(self, run_id: str, dirs: dict[str, str]):
        self.run_id = run_id
        self.dirs = dirs                # hierarchy ("memory", "freezer", ...) -> run directory, in join order

    def _unique(self) -> list[str]:
        return list(dict.fromkeys(self.dirs.values()))

    def join_paths(self) -> list[str]:
        # The kill domain comes first: a task is killable from the moment it is in any run cgroup.
        return [os.path.join(d, "cgroup.procs") for d in self._unique()]

    def cpu_ns(self) -> int:
        return int(_fs.read(os.path.join(self.dirs["cpuacct"], "cpuacct.usage")))

    def usage(self) -> Usage:
        memory = self.dirs["memory"]
        peak = os.path.join(memory, "memory.memsw.max_usage_in_bytes")
        if not os.path.exists(peak):
            peak = os.path.join(memory, "memory.max_usage_in_bytes")
        return Usage(cpu_ns=self.cpu_ns(), peak_memory=int(_fs.read(peak)),
                     oom_kills=_fs.keyed(os.path.join(memory, "memory.oom_control")).get("oom_kill", 0))

    def kill(self) -> None:
        freezer = self.dirs.get("freezer")
        if freezer is None or not os.path.isdir(freezer):
            return
        state = os.path.join(freezer, "freezer.state")
        # Frozen tasks can neither fork nor exit, so the ids read below stay theirs until the thaw, and
        # SIGKILL pending at the thaw ends them before they run another instruction.
        _fs.write(state, "FROZEN")
        try:
            if not _fs.wait_until(lambda: _fs.read(state).strip() == "FROZEN", FREEZE_TIMEOUT):
                raise CgroupError(f"{freezer} did not freeze within {FREEZE_TIMEOUT}s (a task in uninterruptible "
                                  "sleep?); its tasks were not killed")
            for tid in _fs.tasks(freezer, "tasks"):
                try:
                    os.kill(tid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        finally:
            _fs.write(state, "THAWED")

    def empty(self) -> bool:
        return not any(_fs.tasks(d) for d in self._unique())

    def remove(self, timeout: float = 5.0) -> None:
        _fs.remove_run(self, self._unique(), timeout)

    def try_remove(self) -> bool:
        return _fs.try_remove_run(self, self._unique())


class V1Driver(CgroupDriver):
    name = "v1"
    hierarchy_keys: tuple[str, ...] = ("freezer", *V1_LIMITS)     # join order: the kill domain first
    run_class: type[V1Run] = V1Run

    def __init__(self, found: list[Hierarchy], parent_name: str = "sandboxd", parent_path: str | None = None):
        self.parents: dict[str, str] = {}
        self._missing = []
        for key in self.hierarchy_keys:
            hierarchy = self._hierarchy(found, key)
            if hierarchy is None:
                self._missing.append(key)
            else:
                self.parents[key] = hierarchy.dir(parent_path or posixpath.join(hierarchy.own, parent_name))
        # Parents named by us are ours to remove; a configured parent_path only where we created it.
        self._owned = set(self._unique_parents()) if parent_path is None else set()
        self._claim: int | None = None       # see _fs.claim(); taken by the first create() or recover()

    def _claimed(self) -> None:
        # One lock, on the kill domain's parent: the hierarchy most likely shared by daemons on one host.
        if self._claim is None and self.parents:
            self._claim = _fs.claim(self._unique_parents()[0])

    @staticmethod
    def _hierarchy(found: list[Hierarchy], key: str) -> Hierarchy | None:
        return next((h for h in found if h.version == 1 and key in h.controllers), None)

    def _unique_parents(self) -> list[str]:
        return list(dict.fromkeys(self.parents.values()))

    def setup(self) -> None:
        if self._missing:
            raise CgroupError(f"the {self.name} cgroup driver needs the hierarchies {self._missing}, "
                              "which are not mounted")
        for parent in self._unique_parents():
            if _fs.mkdir(parent):
                self._owned.add(parent)
        # Runs' memory must count against (and be limited by) the cgroups above too; only settable while the
        # parent has no children, and always on in Linux 6.x (where writing "1" is still accepted).
        use_hierarchy = os.path.join(self.parents["memory"], "memory.use_hierarchy")
        if os.path.exists(use_hierarchy) and _fs.read(use_hierarchy).strip() != "1":
            _fs.write(use_hierarchy, "1")

    def create(self, run_id: str, limits: CgroupLimits) -> V1Run:
        name = _fs.check_run(run_id, limits)
        dirs = {key: os.path.join(parent, name) for key, parent in self.parents.items()}
        self._claimed()
        made = []
        try:
            for directory in dict.fromkeys(dirs.values()):
                if not _fs.mkdir(directory):
                    raise CgroupError(f"run cgroup {directory} already exists")
                made.append(directory)
            self._limit(dirs, limits)
        except BaseException:
            for directory in made:
                _fs.rmdir_tree(directory)       # nothing can have joined yet
            raise
        return self.run_class(run_id, dirs)

    def relimit(self, run: V1Run, limits: CgroupLimits) -> None:
        _fs.check_run(run.run_id, limits)
        self._limit(run.dirs, limits)

    @staticmethod
    def _limit(dirs: dict[str, str], limits: CgroupLimits) -> None:
        memory = dirs["memory"]
        # OOM must kill inside the run; with the OOM killer disabled the run would hang at its limit instead.
        _fs.write(os.path.join(memory, "memory.oom_control"), "0")
        # cgroup v1 charges TCP socket buffers to a separate counter (memory.kmem.tcp), outside memory.usage;
        # without a limit there a run could pin hundreds of MiB in loopback buffers. Split the run's one budget
        # between the two counters so that together they never exceed it (v2 charges both to memory.current).
        tcp_path = os.path.join(memory, "memory.kmem.tcp.limit_in_bytes")
        tcp = min(max(limits.memory // 8, 1 << 20), 64 << 20, limits.memory // 2) if os.path.exists(tcp_path) else 0
        budget = limits.memory - tcp
        steps = [os.path.join(memory, "memory.limit_in_bytes")]
        memsw = os.path.join(memory, "memory.memsw.limit_in_bytes")
        if os.path.exists(memsw):
            steps.append(memsw)
            # The kernel keeps memsw >= the memory limit at every step: lower the limit first, raise memsw first
            # (a pooled sandbox's limits are set again for the run that claims it).
            if budget > int(_fs.read(steps[0])):
                steps.reverse()
        elif _fs.swap_on():
            raise CgroupError(f"{memory} has no memory.memsw.limit_in_bytes (swap accounting off) and swap is "
                              "on: swap would extend the memory limit")
        for path in steps:
            _fs.write(path, str(budget))
        if tcp:
            _fs.write(tcp_path, str(tcp))
        _fs.write(os.path.join(dirs["pids"], "pids.max"), str(limits.pids))
        cpu = dirs["cpu"]
        _fs.write(os.path.join(cpu, "cpu.cfs_period_us"), str(CPU_PERIOD_US))
        _fs.write(os.path.join(cpu, "cpu.cfs_quota_us"), str(max(MIN_QUOTA_US, round(limits.cpus * CPU_PERIOD_US))))

    def recover(self) -> list[str]:
        self._claimed()
        ids = sorted(set().union(*(_fs.run_ids(p) for p in self._unique_parents())))
        for run_id in ids:
            # Directories a crash never created, or a partial remove already took, count as empty.
            dirs = {key: os.path.join(parent, _fs.RUN_PREFIX + run_id) for key, parent in self.parents.items()}
            self.run_class(run_id, dirs).remove()
        return ids

    def teardown(self) -> None:
        self.recover()
        for parent in self._unique_parents():
            if parent in self._owned:
                _fs.rmdir_parent(parent)
        if self._claim is not None:
            os.close(self._claim)
            self._claim = None

    def usable(self) -> bool:
        return not self._missing and all(os.path.isdir(p) for p in self._unique_parents())
