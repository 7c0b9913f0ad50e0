"""The run's end of egress: a listening socket made inside the run's network namespace and handed out.

Runs in init (pid 1 of the run, root in the run's network namespace, before the payload exists). A socket keeps
the namespace it was created in, so the daemon can accept() connections the run makes to 127.0.0.1:port without
any interface, address or route joining the run's namespace to the host's: the namespace still holds only `lo`.
The socket crosses init -> launcher -> daemon with SCM_RIGHTS; init keeps no copy, so the payload never holds
the listener (it could otherwise accept its own connections and pose as the proxy to itself, harmlessly, or
stop the daemon from seeing them).
"""
from __future__ import annotations

import socket

BACKLOG = 64


def hand_over(port: int, channel_fd: int) -> None:
    """Listen on 127.0.0.1:port here and send the listener through channel_fd (a SOCK_SEQPACKET socket)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as lst, socket.socket(fileno=channel_fd) as ch:
        lst.bind(("127.0.0.1", port))
        lst.listen(BACKLOG)
        socket.send_fds(ch, [b"egress"], [lst.fileno()])
