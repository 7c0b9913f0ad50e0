"""The cgroup v2 driver: each run is one directory, <parent>/run-<id>, in the unified hierarchy, where
<parent> is "<this process's cgroup>/<parent name>" or the configured, delegated parent_path.

Runs in the launcher. v2 allows controllers to be enabled below a cgroup only while that cgroup holds no
processes (the root excepted), and a freshly started daemon sits in its own cgroup. So setup() moves this
process, and never any other, into the leaf "<own cgroup>/<parent name>-daemon" when it is alone there, and
refuses when it is not. Processes started after setup() (the launcher, if the daemon ran setup() before starting
it) inherit the leaf, and a driver built in the leaf uses the cgroup above it: daemon and launcher agree on the
parent.
"""
from __future__ import annotations

import errno
import os
import posixpath

from . import _fs
from .base import CgroupDriver, CgroupError, CgroupLimits, RunCgroup, Usage
from .mounts import V2_NEEDED, Hierarchy

CPU_PERIOD_US = 100_000
MIN_QUOTA_US = 1_000        # the kernel refuses smaller cpu.max quotas


class V2Run(RunCgroup):
    def __init__(self, run_id: str, path: str):
        self.run_id = run_id
        self.path = path
        self._has_peak = os.path.exists(self._file("memory.peak"))
        self._peak_seen = 0

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _sample_memory(self) -> None:
        # Before Linux 5.19 there is no memory.peak: sample memory.current whenever the launcher polls.
        if not self._has_peak:
            self._peak_seen = max(self._peak_seen, int(_fs.read(self._file("memory.current"))))

    def join_paths(self) -> list[str]:
        return [self._file("cgroup.procs")]

    def cpu_ns(self) -> int:
        self._sample_memory()
        return _fs.keyed(self._file("cpu.stat"))["usage_usec"] * 1000

    def usage(self) -> Usage:
        cpu = self.cpu_ns()
        peak = int(_fs.read(self._file("memory.peak"))) if self._has_peak else self._peak_seen
        return Usage(cpu_ns=cpu, peak_memory=peak,
                     oom_kills=_fs.keyed(self._file("memory.events")).get("oom_kill", 0))

    def kill(self) -> None:
        # cgroup.kill SIGKILLs every task of the subtree and makes forks in flight fail: nothing escapes.
        if os.path.isdir(self.path):
            _fs.write(self._file("cgroup.kill"), "1")

    def empty(self) -> bool:
        try:
            return _fs.keyed(self._file("cgroup.events"))["populated"] == 0
        except CgroupError:
            if os.path.isdir(self.path):
                raise
            return True

    def remove(self, timeout: float = 5.0) -> None:
        _fs.remove_run(self, [self.path], timeout)

    def try_remove(self) -> bool:
        return _fs.try_remove_run(self, [self.path])


def _busy(error: CgroupError) -> bool:
    return isinstance(error.__cause__, OSError) and error.__cause__.errno == errno.EBUSY


class V2Driver(CgroupDriver):
    name = "v2"

    def __init__(self, hierarchy: Hierarchy, parent_name: str = "sandboxd", parent_path: str | None = None):
        self.hierarchy = hierarchy
        self.leaf_name = f"{parent_name}-daemon"
        if parent_path:
            self.base = None
            self.parent = hierarchy.dir(parent_path)
        else:
            own = hierarchy.own
            if posixpath.basename(own) == self.leaf_name:
                own = posixpath.dirname(own)        # we (or the process that started us) moved here in setup()
            self.base = hierarchy.dir(own)
            self.parent = os.path.join(self.base, parent_name)
        # A parent named by us is ours to remove; a configured parent_path only if we created it.
        self._owns_parent = parent_path is None
        self._claim: int | None = None       # see _fs.claim(); taken by the first create() or recover()

    def _claimed(self) -> None:
        if self._claim is None:
            self._claim = _fs.claim(self.parent)

    def setup(self) -> None:
        if self.base is not None:
            self._enable_in_base()
        if _fs.mkdir(self.parent):
            self._owns_parent = True
        try:
            self._enable(self.parent)
        except CgroupError as e:
            if _busy(e):
                raise CgroupError(f"parent cgroup {self.parent} holds processes, so controllers cannot be enabled "
                                  "below it (cgroup v2 no-internal-process rule): use an empty delegated cgroup")
            raise
        if not os.path.exists(os.path.join(self.parent, "cgroup.kill")):
            raise CgroupError(f"{self.parent} has no cgroup.kill: the v2 driver needs Linux 5.14 or later")

    def _enable(self, directory: str) -> None:
        available = set(_fs.read(os.path.join(directory, "cgroup.controllers")).split())
        missing = V2_NEEDED - available
        if missing:
            raise CgroupError(f"cgroup controllers {sorted(missing)} are not available in {directory}: the cgroup "
                              "above must delegate them (systemd Delegate=yes), or set parent_path to a "
                              "delegated cgroup")
        subtree = os.path.join(directory, "cgroup.subtree_control")
        todo = V2_NEEDED - set(_fs.read(subtree).split())
        if todo:
            _fs.write(subtree, " ".join(f"+{c}" for c in sorted(todo)))

    def _enable_in_base(self) -> None:
        try:
            return self._enable(self.base)
        except CgroupError as e:
            if not _busy(e):
                raise
        pids = [int(p) for p in _fs.read(os.path.join(self.base, "cgroup.procs")).split()]
        if pids != [os.getpid()]:
            raise CgroupError(
                f"cgroup {self.base} holds {len(pids)} processes besides or instead of sandboxd (pid {os.getpid()}), "
                "so cgroup v2 (no internal processes) cannot enable controllers below it: run sandboxd in a "
                "delegated cgroup of its own (systemd Delegate=yes) or set parent_path to an empty delegated cgroup")
        leaf = os.path.join(self.base, self.leaf_name)
        _fs.mkdir(leaf)
        _fs.write(os.path.join(leaf, "cgroup.procs"), str(os.getpid()))
        self._enable(self.base)

    def create(self, run_id: str, limits: CgroupLimits) -> V2Run:
        path = os.path.join(self.parent, _fs.check_run(run_id, limits))
        self._claimed()
        if not _fs.mkdir(path):
            raise CgroupError(f"run cgroup {path} already exists")
        try:
            self._limit(path, limits)
        except BaseException:
            _fs.rmdir_tree(path)        # nothing can have joined yet
            raise
        return V2Run(run_id, path)

    def relimit(self, run: V2Run, limits: CgroupLimits) -> None:
        _fs.check_run(run.run_id, limits)
        self._limit(run.path, limits)

    @staticmethod
    def _limit(path: str, limits: CgroupLimits) -> None:
        _fs.write(os.path.join(path, "memory.max"), str(limits.memory))
        swap = os.path.join(path, "memory.swap.max")
        if os.path.exists(swap):
            _fs.write(swap, "0")        # memory.max alone lets a run grow on into swap
        elif _fs.swap_on():
            raise CgroupError(f"{path} has no memory.swap.max (no swap accounting) and swap is on: "
                              "swap would extend the memory limit")
        _fs.write(os.path.join(path, "pids.max"), str(limits.pids))
        quota = max(MIN_QUOTA_US, round(limits.cpus * CPU_PERIOD_US))
        _fs.write(os.path.join(path, "cpu.max"), f"{quota} {CPU_PERIOD_US}")

    def recover(self) -> list[str]:
        self._claimed()
        ids = _fs.run_ids(self.parent)
        for run_id in ids:
            V2Run(run_id, os.path.join(self.parent, _fs.RUN_PREFIX + run_id)).remove()
        return ids

    def teardown(self) -> None:
        self.recover()
        if self._owns_parent:
            _fs.rmdir_parent(self.parent)
        if self._claim is not None:
            os.close(self._claim)
            self._claim = None

    def usable(self) -> bool:
        return os.path.isdir(self.parent)
