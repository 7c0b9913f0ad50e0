"""rlimits of the payload. Runs in the payload process, before credentials are dropped (so hard limits can be
lowered and never raised again) and before seccomp.

The cgroup is the real bound on memory, pids and CPU bandwidth; rlimits add per-process bounds the cgroup has
no notion of (core dumps, file size, descriptors, stack) and a CPU-time backstop the kernel enforces itself.
"""
from __future__ import annotations

import math
import resource

from .spec import Limits


def plan(limits: Limits) -> list[tuple[int, int, int]]:
    cpu = max(1, math.ceil(limits.cpu_time))
    return [
        (resource.RLIMIT_CORE, 0, 0),                       # a crash must not write a core file anywhere
        (resource.RLIMIT_FSIZE, limits.file_size, limits.file_size),
        (resource.RLIMIT_NOFILE, limits.open_files, limits.open_files),
        (resource.RLIMIT_STACK, limits.stack, limits.stack),
        # SIGXCPU at the limit, SIGKILL one second later if it is ignored.
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        # The uid is unique to this run, so NPROC counts only this run's tasks (the cgroup pids limit is the
        # primary bound; this one also holds if the cgroup were ever misconfigured).
        (resource.RLIMIT_NPROC, limits.pids, limits.pids),
        (resource.RLIMIT_MEMLOCK, 0, 0),
        (resource.RLIMIT_MSGQUEUE, 0, 0),
        # Set, not inherited: no real-time scheduling and no raised priority, whatever the launcher had.
        (resource.RLIMIT_RTPRIO, 0, 0),
        (resource.RLIMIT_NICE, 0, 0),
    ]


def changes(current: Limits, wanted: Limits) -> list[tuple[int, int, int]] | None:
    """The rlimits to set on a process started with `current` so it has exactly `wanted`'s, or None if that
    would raise one (raising a hard limit needs CAP_SYS_RESOURCE, and a prestarted interpreter must never have
    more than its run's). RLIMIT_STACK must already be equal: it shapes the process at execve only."""
    now = {which: (soft, hard) for which, soft, hard in plan(current)}
    out = []
    for which, soft, hard in plan(wanted):
        if (soft, hard) == now[which]:
            continue
        if which == resource.RLIMIT_STACK or soft > now[which][0] or hard > now[which][1]:
            return None
        out.append((which, soft, hard))
    return out


def apply(limits: Limits) -> None:
    for which, soft, hard in plan(limits):
        resource.setrlimit(which, (soft, hard))
