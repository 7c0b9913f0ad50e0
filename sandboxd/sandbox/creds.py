"""Credentials of the payload: an unprivileged uid/gid of its own, no groups, no capabilities, no way back.

Runs in the payload process, after rlimits and before seccomp. Order matters: the bounding set can only be
dropped while CAP_SETPCAP is held (before setuid); setuid clears effective and permitted but not inheritable,
hence the final capset; no_new_privs makes setuid binaries and file capabilities inert.
"""
from __future__ import annotations

import os

from . import _libc

SECBIT_NOROOT = 1 << 0
SECBIT_NOROOT_LOCKED = 1 << 1
SECBIT_NO_SETUID_FIXUP = 1 << 2
SECBIT_NO_SETUID_FIXUP_LOCKED = 1 << 3
SECBIT_KEEP_CAPS_LOCKED = 1 << 5
SECBIT_NO_CAP_AMBIENT_RAISE = 1 << 6
SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED = 1 << 7


def last_cap() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def apply(uid: int, gid: int, cap_last: int) -> None:
    if uid <= 0 or gid <= 0:
        raise PermissionError(f"refusing to run the payload as uid {uid} gid {gid}")
    os.setsid()  # new session, no controlling terminal: TIOCSTI has no terminal to inject into
    for cap in range(cap_last + 1):
        _libc.prctl(_libc.PR_CAPBSET_DROP, cap)
    _libc.prctl(_libc.PR_CAP_AMBIENT, _libc.PR_CAP_AMBIENT_CLEAR_ALL)
    # Locked securebits: uid 0 would gain nothing even if reached again.
    _libc.prctl(_libc.PR_SET_SECUREBITS, SECBIT_NOROOT | SECBIT_NOROOT_LOCKED | SECBIT_NO_SETUID_FIXUP_LOCKED
                | SECBIT_KEEP_CAPS_LOCKED | SECBIT_NO_CAP_AMBIENT_RAISE | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    _libc.capset_clear()
    _libc.prctl(_libc.PR_SET_NO_NEW_PRIVS, 1)
    if os.getuid() != uid or os.geteuid() != uid or os.getgid() != gid or os.getgroups():
        raise PermissionError("credentials did not stick")
