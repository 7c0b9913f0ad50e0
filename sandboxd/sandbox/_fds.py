"""File-descriptor plumbing shared by the launcher, a run's processes and the daemon's side of the launcher:
descriptors passed over unix sockets (SCM_RIGHTS), closing all but a few, reading a pipe to its end."""
from __future__ import annotations

import array
import os
import socket


def received(ancdata) -> list[int]:
    """The descriptors in recvmsg()'s ancillary data (a truncated last one is ignored)."""
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(payload[: len(payload) - len(payload) % a.itemsize])
            fds.extend(a)
    return fds


def close_all_except(keep: set[int]) -> None:
    low = 0
    for fd in sorted(keep):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)


def read_all(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except InterruptedError:
            continue
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
