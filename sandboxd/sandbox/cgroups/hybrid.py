"""The hybrid driver (systemd's "hybrid" layout: v1 controllers plus a cgroup2 mount without them): limits
and accounting from v1 (memory, pids, cpu, cpuacct), the kill from a parallel run directory in the cgroup2
mount, <unified parent>/run-<id>, which holds no controller but has cgroup.kill.

Runs in the launcher. The child joins the cgroup2 directory first, so every task of the run can be killed by
one write that also stops forks in flight, without the freezer's freeze-and-list dance.
"""
from __future__ import annotations

import os

from . import _fs
from .base import CgroupError
from .mounts import V1_LIMITS, Hierarchy
from .v1 import V1Driver, V1Run


class HybridRun(V1Run):
    def kill(self) -> None:
        unified = self.dirs["unified"]
        if os.path.isdir(unified):
            _fs.write(os.path.join(unified, "cgroup.kill"), "1")


class HybridDriver(V1Driver):
    name = "hybrid"
    hierarchy_keys = ("unified", *V1_LIMITS)        # join order: the kill domain first
    run_class = HybridRun

    @staticmethod
    def _hierarchy(found: list[Hierarchy], key: str) -> Hierarchy | None:
        if key == "unified":
            return next((h for h in found if h.version == 2), None)
        return V1Driver._hierarchy(found, key)

    def setup(self) -> None:
        super().setup()
        unified = self.parents["unified"]
        if not os.path.exists(os.path.join(unified, "cgroup.kill")):
            raise CgroupError(f"{unified} has no cgroup.kill: the hybrid driver needs Linux 5.14 or later")
