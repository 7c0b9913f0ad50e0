"""Namespaces of a run: which ones, and the two things set inside them (hostname, loopback).

Runs in the run's first child (apply) and in its init (hostname, loopback). There is no user namespace: the
launcher is root in the initial user namespace and the payload drops to a plain unprivileged host uid, so the
kernel's permission checks are the ordinary ones and no user-namespace attack surface is opened.
"""
from __future__ import annotations

import fcntl
import socket
import struct

from . import _libc

# The payload gets its own view of processes, mounts, network, IPC, hostname and cgroups. NEWCGROUP must be
# unshared after the child has joined its run cgroup, so that cgroup becomes the sandbox's cgroup root.
FLAGS = (_libc.CLONE_NEWNS | _libc.CLONE_NEWPID | _libc.CLONE_NEWNET | _libc.CLONE_NEWIPC
         | _libc.CLONE_NEWUTS | _libc.CLONE_NEWCGROUP)
NAMES = ("mnt", "pid", "net", "ipc", "uts", "cgroup")

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


def apply() -> None:
    """Enter fresh namespaces; the next fork() becomes pid 1 of the run."""
    _libc.unshare(FLAGS)


def set_hostname(name: str) -> None:
    _libc.sethostname(name)


def loopback_up() -> None:
    """A new network namespace has only `lo`, down. Bring it up so local sockets work; nothing else exists,
    so the run has no route anywhere. (One ioctl here beats importing a netlink library into every child.)"""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH14s", b"lo", 0, b"")
        flags = struct.unpack("16sH14s", fcntl.ioctl(s, SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14s", b"lo", flags | IFF_UP, b""))
