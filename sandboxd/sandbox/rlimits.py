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


def apply(limits: Limits) -> None:
    for which, soft, hard in plan(limits):
        resource.setrlimit(which, (soft, hard))
