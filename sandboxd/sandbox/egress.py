"""The run's end of egress: listening sockets made inside the run's network namespace and handed out, and for
transparent mode the route and the nftables rules that send every other TCP connection to one of them.

Runs in init (pid 1 of the run, root in the run's network namespace, before the payload exists). A socket keeps
the namespace it was created in, so the daemon can accept() connections the run makes to 127.0.0.1:port without
any interface, address or route joining the run's namespace to the host's: the namespace holds only `lo`.
The sockets cross init -> launcher -> daemon with SCM_RIGHTS; init keeps no copy, so the payload never holds
a listener (it could otherwise accept its own connections and pose as the proxy to itself, harmlessly, or
stop the daemon from seeing them).

Transparent mode, for programs that ignore proxy settings: a connect() to an outside address needs a route to
get as far as netfilter, so the namespace gets a default route through `lo` (source 127.0.0.1). No interface
is added, so none needs a driver (kernels without CONFIG_DUMMY exist) and `lo` leads nowhere but back into the
run. The nftables table
below, in the run's own namespace, then redirects every IPv4 TCP connection that is not to loopback to the
transparent listener (the proxy learns the original address with SO_ORIGINAL_DST and the name from SNI or Host)
and drops every other packet that would leave loopback: UDP fails with EPERM, IPv6 has no route at all.
"""
from __future__ import annotations

import ctypes
import socket

from pyroute2 import IPRoute  # netlink; imported here so the launcher pays for it once, before any fork

BACKLOG = 64
TABLE = "sandboxd_egress"
RULES = """
table inet {table} {{
    chain to_proxy {{
        type nat hook output priority -100; policy accept;
        ip daddr != 127.0.0.0/8 meta l4proto tcp redirect to :{port}
    }}
    chain loopback_only {{
        type filter hook output priority 0; policy drop;
        ip daddr 127.0.0.0/8 accept
        ip6 daddr ::1 accept
    }}
}}
"""


def hand_over(egress, channel_fd: int) -> None:
    """Listen on 127.0.0.1:port (and transparent_port) here and send the listeners through channel_fd (a
    SOCK_SEQPACKET socket), explicit first."""
    ports = [egress.port] + ([egress.transparent_port] if egress.transparent else [])
    listeners = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in ports]
    try:
        for lst, port in zip(listeners, ports):
            lst.bind(("127.0.0.1", port))
            lst.listen(BACKLOG)
        with socket.socket(fileno=channel_fd) as ch:
            socket.send_fds(ch, [b"egress"], [lst.fileno() for lst in listeners])
    finally:
        for lst in listeners:
            lst.close()


def redirect(egress) -> None:
    """Transparent mode: the default route through lo, then the redirect and loopback-only rules. Either failing
    fails the run's setup (a run with a route and no rules would reach nothing, but must not be left that way)."""
    with IPRoute() as ipr:
        (lo,) = ipr.link_lookup(ifname="lo")
        ipr.route("add", dst="0.0.0.0/0", oif=lo, prefsrc="127.0.0.1")
    nft(RULES.format(table=TABLE, port=egress.transparent_port))


def nft(commands: str) -> None:
    """Run nftables commands in this namespace through libnftables (no helper process); RuntimeError with
    nft's own message when it refuses them."""
    try:
        lib = ctypes.CDLL("libnftables.so.1")
    except OSError as e:
        raise RuntimeError(f"libnftables is not installed (Debian: nftables): {e}") from None
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_buffer_error.argtypes = lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    ctx = lib.nft_ctx_new(0)
    if not ctx:
        raise RuntimeError("nft_ctx_new failed")
    try:
        lib.nft_ctx_buffer_error(ctx)
        if lib.nft_run_cmd_from_buffer(ctx, commands.encode()) != 0:
            raise RuntimeError("nftables: " + (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
                               .strip()[:1000])
    finally:
        lib.nft_ctx_free(ctx)
