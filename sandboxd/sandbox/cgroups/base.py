"""The one cgroup interface. A driver is chosen once at launcher start-up (see detect() in __init__.py); call
sites never ask which cgroup version they are on.

Where it runs: the launcher (create, kill, usage, remove, recover) and the run's first child (join, before it
unshares the cgroup namespace, so the sandbox sees its own cgroup as the root).

Every run cgroup lives under "<daemon's own cgroup>/<parent name>/run-<run id>" (or under a configured,
delegated parent): never at a hierarchy root, so a run stays inside the accounting and limits of whatever
holds the daemon.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass


class CgroupError(Exception):
    """A cgroup could not be created, limited, joined, killed or removed. Runs fail closed on it."""


@dataclass(frozen=True)
class CgroupLimits:
    memory: int          # bytes; memory + swap together (swap can never extend the limit)
    pids: int            # tasks (processes and threads)
    cpus: float          # CPU bandwidth in CPUs (0.5 = half a CPU)


@dataclass(frozen=True)
class Usage:
    cpu_ns: int          # CPU time of every task the run ever had
    peak_memory: int     # bytes; high-water mark of memory (+swap where the kernel reports it)
    oom_kills: int       # tasks the kernel OOM-killed inside this cgroup


class RunCgroup(abc.ABC):
    """The cgroup(s) of one run. On v1 and hybrid hosts this is one directory per hierarchy."""

    run_id: str

    @abc.abstractmethod
    def join_paths(self) -> list[str]:
        """cgroup.procs files the child writes "0" to, to enter the run cgroup (launcher side: computed
        before fork so the child does no path logic)."""

    @abc.abstractmethod
    def cpu_ns(self) -> int:
        """CPU time used so far; the launcher polls it to enforce the CPU-time limit of multi-process runs."""

    @abc.abstractmethod
    def usage(self) -> Usage: ...

    @abc.abstractmethod
    def kill(self) -> None:
        """SIGKILL every task of the run, including ones that forked meanwhile (cgroup.kill on v2,
        freeze-kill-thaw on v1). Returns once nothing in the cgroup can run again."""

    @abc.abstractmethod
    def empty(self) -> bool: ...

    @abc.abstractmethod
    def remove(self, timeout: float = 5.0) -> None:
        """Kill what is left, wait until empty, rmdir. Raises CgroupError if it cannot."""

    @abc.abstractmethod
    def try_remove(self) -> bool:
        """Kill what is left and rmdir if empty, without waiting: True once the cgroup is gone, False while
        tasks remain (call again later). Raises CgroupError if it cannot."""


class CgroupDriver(abc.ABC):
    name: str            # "v2", "v1" or "hybrid"

    @abc.abstractmethod
    def setup(self) -> None:
        """Create the parent cgroup and check the controllers; raise CgroupError naming what is missing."""

    @abc.abstractmethod
    def create(self, run_id: str, limits: CgroupLimits) -> RunCgroup:
        """Create the run's cgroup with every limit applied (a failure to limit is an error, not a warning)."""

    @abc.abstractmethod
    def relimit(self, run: RunCgroup, limits: CgroupLimits) -> None:
        """Set every limit again on a live run's cgroup: a pooled sandbox's, for the run that claims it."""

    @abc.abstractmethod
    def recover(self) -> list[str]:
        """Kill and remove run cgroups a crashed launcher left behind; return their run ids."""

    @abc.abstractmethod
    def teardown(self) -> None:
        """Remove the parent cgroup (after recover()) at shutdown."""

    def usable(self) -> bool:
        """For health checks: can a run cgroup be created right now?"""
        return True
