"""cgroup drivers behind one interface (base.py); detect() picks one at launcher start-up.

    driver = cgroups.detect()          # once; reads /proc/self/mountinfo and /proc/self/cgroup
    driver.setup()                     # parent cgroup(s); CgroupError names what is missing
    driver.recover()                   # runs a crashed launcher left behind
    run = driver.create(run_id, CgroupLimits(memory=..., pids=..., cpus=...))
    # child, before anything else: write "0" to each of run.join_paths(), in order
    run.cpu_ns() ... run.usage()       # while or after it runs, before remove()
    run.remove()                       # kill, wait until empty, rmdir
    driver.teardown()                  # at shutdown
"""
from __future__ import annotations

import os

from . import mounts
from .base import CgroupDriver, CgroupError, CgroupLimits, RunCgroup, Usage

__all__ = ["CgroupDriver", "CgroupError", "CgroupLimits", "RunCgroup", "Usage", "detect", "host_hierarchies",
           "make_driver"]


def make_driver(kind: str, found: list[mounts.Hierarchy], parent_name: str = "sandboxd",
                parent_path: str | None = None) -> CgroupDriver:
    """The driver of `kind` ("v2", "hybrid", "v1") over the hierarchies `found`; setup() is the caller's."""
    from .hybrid import HybridDriver
    from .v1 import V1Driver
    from .v2 import V2Driver

    if kind == "v2":
        v2 = next((h for h in found if h.version == 2), None)
        if v2 is None:
            raise CgroupError("no cgroup2 hierarchy is mounted")
        return V2Driver(v2, parent_name, parent_path)
    if kind == "hybrid":
        return HybridDriver(found, parent_name, parent_path)
    if kind == "v1":
        return V1Driver(found, parent_name, parent_path)
    raise CgroupError(f"unknown cgroup driver {kind!r}; expected v2, hybrid or v1")


def host_hierarchies(mountinfo: str = "/proc/self/mountinfo",
                     proc_cgroup: str = "/proc/self/cgroup") -> list[mounts.Hierarchy]:
    with open(mountinfo) as f:
        found_mounts = mounts.parse_mountinfo(f.read())
    with open(proc_cgroup) as f:
        own = mounts.parse_proc_cgroup(f.read())
    return mounts.hierarchies(found_mounts, own)


def detect(parent_name: str = "sandboxd", parent_path: str | None = None, mountinfo: str = "/proc/self/mountinfo",
           proc_cgroup: str = "/proc/self/cgroup") -> CgroupDriver:
    """Pick the driver for this host from /proc/self/mountinfo and /proc/self/cgroup.

    pure v2 (only a cgroup2 mount with controllers) -> V2Driver; v1 controllers plus a cgroup2 mount that
    can hold cgroups (systemd "hybrid") -> HybridDriver, which uses v1 for limits and cgroup.kill from v2;
    v1 only -> V1Driver. `parent_path` is a delegated parent (v2: a cgroup path below the mount) to use
    instead of "<own cgroup>/<parent_name>".
    """
    found = host_hierarchies(mountinfo, proc_cgroup)
    v2 = next((h for h in found if h.version == 2), None)
    v2_controllers = frozenset()
    if v2 is not None:
        try:
            with open(os.path.join(v2.mountpoint, "cgroup.controllers")) as f:
                v2_controllers = frozenset(f.read().split())
        except OSError:
            pass
    kind = mounts.choose_kind(found, v2_controllers, mounts.kernel_version(os.uname().release))
    return make_driver(kind, found, parent_name, parent_path)
