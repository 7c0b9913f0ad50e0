"""File helpers shared by the drivers: cgroup file reads and writes that fail as CgroupError, polling,
directory removal, and the remove() loop every run cgroup uses. Runs in the launcher."""
from __future__ import annotations

import errno
import fcntl
import os
import re
import time
from typing import Callable

from .base import CgroupError, CgroupLimits

RUN_PREFIX = "run-"
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError as e:
        raise CgroupError(f"cannot read {path}: {e.strerror}") from e


def write(path: str, value: str) -> None:
    # One write(2) per value: cgroup files act on each write, so a buffered, split write would be two values.
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as e:
        raise CgroupError(f"cannot write {value!r} to {path}: {e.strerror}") from e


def keyed(path: str) -> dict[str, int]:
    """"key value" lines (cpu.stat, memory.events, memory.oom_control) -> {key: value}."""
    pairs = (line.split() for line in read(path).splitlines())
    return {p[0]: int(p[1]) for p in pairs if len(p) == 2 and p[1].lstrip("-").isdigit()}


def tasks(directory: str, name: str = "cgroup.procs") -> list[int]:
    """Ids listed in `name` of a cgroup and all its descendants; [] if it is gone."""
    ids = []
    for dirpath, _, files in os.walk(directory):
        if name in files:
            try:
                with open(os.path.join(dirpath, name)) as f:
                    ids.extend(int(x) for x in f.read().split())
            except FileNotFoundError:
                pass        # removed while we walked
    return ids


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
        interval = min(interval * 2, 0.05)
    return True


def mkdir(path: str) -> bool:
    """Create a cgroup directory; False if it was already there."""
    try:
        os.mkdir(path)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        raise CgroupError(f"cannot create cgroup {path}: {e.strerror}") from e


def rmdir_tree(path: str) -> None:
    """rmdir a cgroup and any cgroups the run made below it, deepest first. OSError if one is busy."""
    for dirpath, _, _ in sorted(os.walk(path), key=lambda entry: -entry[0].count("/")):
        try:
            os.rmdir(dirpath)
        except FileNotFoundError:
            pass


def check_run(run_id: str, limits: CgroupLimits | None = None) -> str:
    """The run's directory name; refuses ids that could escape the parent and limits that limit nothing."""
    if not _RUN_ID.fullmatch(run_id):
        raise CgroupError(f"run id {run_id!r} is not a valid cgroup name (letters, digits, '_.-', at most 128)")
    if limits is not None and not (limits.memory > 0 and limits.pids > 0 and limits.cpus > 0):
        raise CgroupError(f"cgroup limits must all be positive, got {limits}")
    return RUN_PREFIX + run_id


def run_ids(parent: str) -> list[str]:
    try:
        names = os.listdir(parent)
    except FileNotFoundError:
        return []
    return sorted(n[len(RUN_PREFIX):] for n in names
                  if n.startswith(RUN_PREFIX) and os.path.isdir(os.path.join(parent, n)))


def remove_run(run, directories: list[str], timeout: float) -> None:
    """The remove() of every driver: kill, wait until empty, rmdir; kill again if something is left."""
    deadline = time.monotonic() + timeout
    while True:
        why = " (tasks still running)"
        try:
            run.kill()
            if wait_until(run.empty, max(0.0, min(1.0, deadline - time.monotonic()))):
                for directory in directories:
                    rmdir_tree(directory)
                return
        except CgroupError as e:
            why = f": {e}"
        except OSError as e:
            why = f": {e.strerror}"
        if time.monotonic() >= deadline:
            raise CgroupError(f"run cgroup {directories[0]} could not be removed within {timeout}s{why}")
        time.sleep(0.01)


def try_remove_run(run, directories: list[str]) -> bool:
    """One non-blocking step of remove(): kill, and rmdir if already empty. False while tasks remain (dying,
    frozen, or stuck in the kernel), so the launcher can retry from its loop instead of sleeping in it."""
    try:
        run.kill()
        if not run.empty():
            return False
        for directory in directories:
            rmdir_tree(directory)
        return True
    except OSError as e:
        if e.errno in (errno.EBUSY, errno.ENOTEMPTY):   # emptied in the kernel's view a moment later
            return False
        raise CgroupError(f"run cgroup {directories[0]} could not be removed: {e.strerror}") from e


def claim(parent: str) -> int | None:
    """Lock the parent cgroup for this launcher's lifetime; None if it does not exist (nothing to guard yet).

    recover() kills every run-* under the parent, so two live launchers sharing one would kill each other's
    runs. A lock says "a live launcher owns this", and the kernel drops it when that process dies, exactly when
    its leftovers become fair game. A POSIX lock (lockf) rather than flock: forked children do not inherit it,
    so a run's processes outliving a crashed launcher cannot keep the parent from being recovered.
    """
    path = os.path.join(parent, "cgroup.procs")     # never opened otherwise: closing it would drop the lock
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CgroupError(f"cannot open {path} to lock it: {e.strerror}") from e
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            raise CgroupError(f"cannot lock {path}: {e.strerror}") from e
        raise CgroupError(f"parent cgroup {parent} is in use by another live sandboxd launcher: give each "
                          "daemon its own cgroup parent name (or parent_path)") from None
    return fd


def rmdir_parent(path: str) -> None:
    """Remove a parent cgroup at teardown; CgroupError if something other than runs is still in it."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        if e.errno in (errno.EBUSY, errno.ENOTEMPTY):
            inside = sorted(n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n)))
            raise CgroupError(f"parent cgroup {path} is busy (cgroups inside: {inside[:5] or 'none'})") from e
        raise CgroupError(f"cannot remove parent cgroup {path}: {e.strerror}") from e


def swap_on() -> bool:
    """True if the host has swap that a memory limit without swap accounting would let a run spill into."""
    try:
        with open("/proc/swaps") as f:
            return len(f.read().splitlines()) > 1
    except OSError:
        return True         # unknown: assume the worst
