"""THREATS.md, Network (default: none): no route anywhere, only Unix and IP sockets can be created, the host's
loopback services and abstract sockets are out of reach, and the daemon's socket and state are not in the run's
filesystem.

Already covered in tests/integration/test_isolation.py (not repeated): only `lo`, up; a TCP listener of the host
on 127.0.0.1 (ECONNREFUSED); TCP to 1.1.1.1:53 and 10.0.0.1:80.
"""
from __future__ import annotations

import ipaddress
import socket
import uuid

import psutil
import pytest

from conftest import metrics_port, probe


def one(sandbox, expr: str, **limits):
    return probe(sandbox, f"out['r'] = {expr}", **limits)["r"]


def _host_addresses() -> list[str]:
    """The host's own non-loopback addresses: reachable from any process of the host, not from a run."""
    found = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                ip = ipaddress.ip_address(a.address.split("%")[0])
                if not ip.is_loopback and not ip.is_link_local:
                    found.append(str(ip))
    return found[:4]


# The network namespace holds only lo: anything not on 127.0.0.0/8 or ::1 has no route (ENETUNREACH).
OUTBOUND = [
    ("tcp-public-v4", "err(socket.create_connection, ('1.1.1.1', 443), timeout=2)", "ENETUNREACH"),
    ("udp-dns-v4", "err(socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto, b'x', ('8.8.8.8', 53))",
     "ENETUNREACH"),
    ("tcp-public-v6", "err(socket.create_connection, ('2606:4700:4700::1111', 443), timeout=2)", "ENETUNREACH"),
    ("udp-broadcast", "err(lambda: (lambda s: (s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1),"
                      " s.sendto(b'x', ('255.255.255.255', 67))))(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)))",
     "ENETUNREACH"),
    ("udp-multicast", "err(socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto, b'x', ('224.0.0.251', 5353))",
     "ENETUNREACH"),
    ("tcp-link-local-metadata", "err(socket.create_connection, ('169.254.169.254', 80), timeout=2)", "ENETUNREACH"),
    # ICMP "ping" sockets: net.ipv4.ping_group_range is "1 0" (nobody) in a fresh namespace.
    ("icmp-ping-socket", "err(socket.socket, socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)", "EACCES"),
]


@pytest.mark.parametrize("expr,expected", [o[1:] for o in OUTBOUND], ids=[o[0] for o in OUTBOUND])
def test_no_route_out(sandbox, expr, expected):
    assert one(sandbox, expr) == expected


def test_dns_resolves_nothing(sandbox):
    # glibc with an empty resolv.conf asks 127.0.0.1:53, the run's own loopback: nothing answers.
    s = probe(sandbox, """
        try:
            out['r'] = socket.getaddrinfo('example.com', 80)
        except socket.gaierror as e:
            out['r'] = 'gaierror'
        out['resolv'] = open('/etc/resolv.conf').read()
    """)
    assert s == {"r": "gaierror", "resolv": ""}


def test_the_hosts_own_addresses_are_unreachable(sandbox):
    addrs = _host_addresses()
    if not addrs:
        pytest.skip("the host has no non-loopback address")
    s = probe(sandbox, f"out = {{a: err(socket.create_connection, (a, 22), timeout=2) for a in {addrs!r}}}")
    assert s == {a: "ENETUNREACH" for a in addrs}


# Socket families. The profile allows socket() for AF_UNIX, AF_INET and AF_INET6 only, comparing the whole 64-bit
# argument. (seccomp) marks families an unprivileged process could otherwise open on this kernel (netlink, AF_ALG,
# vsock) and high-bit variants the kernel would truncate to an allowed family; raw and packet sockets would also
# need CAP_NET_RAW.
FAMILIES = [
    ("AF_PACKET-raw", 17, 3, 0x0300),
    ("AF_INET-raw", 2, 3, 1),                          # CAP_NET_RAW only: the profile allows AF_INET
    ("AF_INET6-raw", 10, 3, 58),
    ("AF_NETLINK-route (seccomp)", 16, 3, 0),
    ("AF_NETLINK-sock_diag (seccomp)", 16, 3, 4),
    ("AF_NETLINK-audit (seccomp)", 16, 3, 9),
    ("AF_NETLINK-uevent (seccomp)", 16, 3, 15),
    ("AF_NETLINK-generic (seccomp)", 16, 3, 16),
    ("AF_ALG (seccomp)", 38, 5, 0),
    ("AF_VSOCK (seccomp)", 40, 1, 0),
    ("AF_BLUETOOTH", 31, 1, 0),
    ("AF_KEY", 15, 3, 2),
    ("AF_CAN", 29, 3, 1),
    ("AF_TIPC", 30, 5, 0),
    ("AF_RDS", 21, 5, 0),
    ("AF_XDP", 44, 3, 0),
    ("AF_X25", 9, 5, 0),
    ("AF_QIPCRTR", 42, 2, 0),
    ("AF_SMC", 43, 1, 0),
    ("AF_MCTP", 45, 2, 0),
    ("AF_UNIX-high-bits (seccomp)", (1 << 32) | 1, 1, 0),
    ("AF_INET-high-bits (seccomp)", (1 << 32) | 2, 1, 0),
    ("AF_INET-sign-extended (seccomp)", 0xffffffff00000002, 1, 0),
]


@pytest.mark.parametrize("family,type_,proto", [f[1:] for f in FAMILIES], ids=[f[0] for f in FAMILIES])
def test_socket_families_denied(sandbox, family, type_, proto):
    assert one(sandbox, f"sc('socket', {family}, {type_}, {proto})") == "EPERM"


@pytest.mark.parametrize("family", [2, 10, 16, (1 << 32) | 1])
def test_socketpair_is_unix_only(sandbox, family):
    assert one(sandbox, f"sc('socketpair', {family}, 1, 0, (ctypes.c_int * 2)())") == "EPERM"


def test_the_daemons_loopback_services_are_unreachable(sandbox, daemon):
    """The metrics HTTP port listens on the host's 127.0.0.1; so do a TCP listener on 0.0.0.0, one on ::1, and
    a UDP socket opened here. The run's 127.0.0.1 is its own."""
    tcp_any = socket.socket()
    tcp_any.bind(("0.0.0.0", 0))
    tcp_any.listen()
    tcp6 = socket.socket(socket.AF_INET6)
    tcp6.bind(("::1", 0))
    tcp6.listen()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(0.5)
    try:
        s = probe(sandbox, f"""
            out['metrics'] = err(socket.create_connection, ('127.0.0.1', {metrics_port(daemon)}), timeout=2)
            out['tcp-any'] = err(socket.create_connection, ('127.0.0.1', {tcp_any.getsockname()[1]}), timeout=2)
            out['tcp6'] = err(socket.create_connection, ('::1', {tcp6.getsockname()[1]}), timeout=2)
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            out['udp-sent'] = err(u.sendto, b'from the run', ('127.0.0.1', {udp.getsockname()[1]}))
            out['tcp-listeners'] = open('/proc/net/tcp').read().count('\\n') - 1
        """)
        try:
            received = udp.recvfrom(100)
        except socket.timeout:
            received = None
    finally:
        for sock in (tcp_any, tcp6, udp):
            sock.close()
    assert s == {"metrics": "ECONNREFUSED", "tcp-any": "ECONNREFUSED", "tcp6": "ECONNREFUSED", "udp-sent": "ok",
                 "tcp-listeners": 0}
    assert received is None


def test_abstract_unix_sockets_of_the_host_are_unreachable(sandbox):
    """Abstract Unix addresses belong to a network namespace (and Landlock scopes them too). The test listens on
    a fresh abstract name; the host's own abstract sockets (the daemon's peer relay binds some) are tried too."""
    name = f"sandboxd-security-{uuid.uuid4().hex}"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind("\0" + name)
    listener.listen()
    host_names = []
    with open("/proc/net/unix") as f:
        for line in f.read().splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 8 and parts[7].startswith("@") and parts[5] == "01":   # listening
                host_names.append(parts[7][1:])
    host_names = [n for n in host_names if n != name][:8]
    try:
        s = probe(sandbox, f"""
            for n in [{name!r}] + {host_names!r}:
                out[n] = err(socket.socket(socket.AF_UNIX).connect, '\\0' + n)
            out['visible'] = [l.split()[-1] for l in open('/proc/net/unix').read().splitlines()[1:]]
        """)
    finally:
        listener.close()
    assert s.pop("visible") == []
    assert s == {n: "ECONNREFUSED" for n in [name] + host_names}


def test_the_daemons_socket_and_state_are_not_in_the_run(sandbox, daemon):
    """The API socket, the state directory (the record store), the runtime directory and the default locations
    do not exist inside; and no socket inode at all is reachable in the run's filesystem."""
    paths = [daemon.socket, str(daemon.state_dir), str(daemon.runtime_dir), str(daemon.workdir),
             "/run/sandboxd", "/var/lib/sandboxd", "/run", "/var/run", "/tmp/.X11-unix", "/run/systemd"]
    s = probe(sandbox, f"""
        import stat
        out['exists'] = {{p: os.path.exists(p) for p in {paths!r}}}
        out['connect'] = err(socket.socket(socket.AF_UNIX).connect, {daemon.socket!r})
        sockets = []
        for top, dirs, files in os.walk('/'):
            if top == '/':
                dirs[:] = [d for d in dirs if d != 'proc']
            for f in files:
                try:
                    if stat.S_ISSOCK(os.lstat(os.path.join(top, f)).st_mode):
                        sockets.append(os.path.join(top, f))
                except OSError:
                    pass
        out['sockets'] = sockets
    """, wall_time=20)
    assert not any(s["exists"].values()), s["exists"]
    assert s["connect"] == "ENOENT"
    assert s["sockets"] == []
