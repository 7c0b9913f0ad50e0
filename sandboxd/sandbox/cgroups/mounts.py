"""Which cgroup hierarchies this host has, where this process sits in them, and which driver fits.

Pure functions over the text of /proc/self/mountinfo and /proc/self/cgroup (tests/unit/test_cgroup_detect.py
feeds them sample text); detect() in __init__.py does the reading. Runs in the launcher, once, at start-up.
"""
from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

from .base import CgroupError

# Real v1 controllers; anything else in a v1 mount's super options is a mount option (rw, xattr, ...).
V1_CONTROLLERS = frozenset({"blkio", "cpu", "cpuacct", "cpuset", "devices", "freezer", "hugetlb", "memory",
                            "misc", "net_cls", "net_prio", "perf_event", "pids", "rdma"})
V2_NEEDED = frozenset({"memory", "pids", "cpu"})
V1_LIMITS = ("memory", "pids", "cpu", "cpuacct")     # hybrid and v1 limit and account with these
KILL_KERNEL = (5, 14)                                # cgroup.kill appeared in Linux 5.14


@dataclass(frozen=True)
class Mount:
    fstype: str              # "cgroup" (v1) or "cgroup2"
    root: str                # the cgroup mounted here, as a path inside its hierarchy
    mountpoint: str
    writable: bool
    super_options: frozenset[str]


@dataclass(frozen=True)
class Hierarchy:
    version: int                     # 1 or 2
    controllers: frozenset[str]      # v1: the controllers (and name=...) of this hierarchy; v2: empty
    mountpoint: str
    root: str                        # see Mount.root
    own: str                         # this process's cgroup, as a path inside the hierarchy
    writable: bool = True

    def dir(self, cgroup: str) -> str:
        """The directory of `cgroup` (a path inside the hierarchy, below the mounted root)."""
        rel = posixpath.relpath(cgroup, self.root)
        if rel.startswith(".."):
            raise CgroupError(f"cgroup {cgroup!r} is outside the part of the hierarchy mounted at "
                              f"{self.mountpoint} ({self.root!r})")
        return self.mountpoint if rel == "." else posixpath.join(self.mountpoint, rel)


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """The cgroup and cgroup2 mounts in /proc/<pid>/mountinfo text, in mount order."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 6 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        mounts.append(Mount(fstype=tail[0], root=_unescape(fields[3]), mountpoint=_unescape(fields[4]),
                            writable="rw" in fields[5].split(","),
                            super_options=frozenset(tail[2].split(","))))
    return mounts


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/<pid>/cgroup text -> {controller: cgroup path}; the v2 line ("0::/path") is under key ""."""
    paths = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        path = path.removesuffix(" (deleted)")
        if parts[0] == "0" and not controllers:
            paths[""] = path
        else:
            for controller in controllers.split(","):
                paths[controller] = path
    return paths


def _inside(path: str, root: str) -> bool:
    return root == "/" or path == root or path.startswith(root.rstrip("/") + "/")


def hierarchies(mounts: list[Mount], cgroups: dict[str, str]) -> list[Hierarchy]:
    """Each hierarchy once, through the first mount that shows this process's own cgroup."""
    found: dict[tuple[int, frozenset[str]], Hierarchy] = {}
    for m in mounts:
        if m.fstype == "cgroup2":
            version, controllers, own = 2, frozenset(), cgroups.get("")
        else:
            controllers = frozenset(o for o in m.super_options if o in V1_CONTROLLERS or o.startswith("name="))
            version = 1
            own = next((cgroups[c] for c in sorted(controllers) if c in cgroups), None)
        key = (version, controllers)
        # A mount of another part of the hierarchy (a container's bind mount) cannot reach our cgroup.
        if own is None or key in found or not _inside(own, m.root):
            continue
        found[key] = Hierarchy(version, controllers, m.mountpoint, m.root, own, m.writable)
    return list(found.values())


def kernel_version(release: str) -> tuple[int, int]:
    """"6.1.0-18-amd64" -> (6, 1)."""
    match = re.match(r"(\d+)\.(\d+)", release)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def choose_kind(found: list[Hierarchy], v2_controllers: frozenset[str], kernel: tuple[int, int]) -> str:
    """"v2", "hybrid" or "v1". `v2_controllers`: cgroup.controllers at the cgroup2 mount (empty if none).

    A controller lives in exactly one hierarchy, so memory, pids and cpu on cgroup2 mean pure v2 whatever else is
    mounted. Otherwise limits come from v1, and a writable cgroup2 mount on a kernel with cgroup.kill makes it
    hybrid: v1 for limits, v2 for the kill that no fork can escape.
    """
    v2 = next((h for h in found if h.version == 2), None)
    v1_controllers = frozenset().union(*(h.controllers for h in found if h.version == 1))
    if v2 is not None and V2_NEEDED <= v2_controllers:
        return "v2"
    if set(V1_LIMITS) <= v1_controllers:
        if v2 is not None and v2.writable and kernel >= KILL_KERNEL:
            return "hybrid"
        if "freezer" in v1_controllers:
            return "v1"
        raise CgroupError("cgroup v1 without the freezer controller and no usable cgroup2 mount: "
                          "runs could not be killed reliably")
    if v2 is not None:
        return "v2"      # V2Driver.setup() names the controllers that are missing
    raise CgroupError("no usable cgroups: need cgroup2 with memory, pids and cpu, or cgroup v1 with "
                      f"{', '.join(V1_LIMITS)} (found v1 controllers: {sorted(v1_controllers) or 'none'})")
