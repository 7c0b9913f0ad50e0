"""The allowlist and the address checks of egress. Pure logic, daemon side (config validation and the proxy).

A destination passes twice: its name and port against the policy's `egress_allow`, then every address it was
resolved to against the ranges nobody reaches by default (loopback, private, link-local and so the cloud
metadata service, multicast, reserved...) unless the policy's `egress_allow_networks` names them. The second
check runs on the addresses the proxy itself resolved and then connects to, so a name that re-binds to
127.0.0.1 or 169.254.169.254 is refused without a connection attempt.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

HOST_RE = re.compile(r"^(\*\.)?([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\Z")
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Rule:
    host: str            # a lower-case name, "*.suffix", or an address literal (v6 without brackets)
    port: int
    text: str

    def matches(self, host: str, port: int) -> bool:
        if port != self.port:
            return False
        if self.host.startswith("*."):
            return host.endswith(self.host[1:]) and len(host) > len(self.host) - 1
        return host == self.host


def normalize_host(host: str) -> str:
    """Lower case, no trailing dot, no brackets; an address literal in its canonical form."""
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def split_host_port(text: str) -> tuple[str, int]:
    """"host:port" or "[v6]:port" -> (host, port); ValueError naming what is wrong."""
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d{1,5})|([^:\[\]\s]+):(\d{1,5})", text.strip())
    if not m:
        raise ValueError(f"{text!r}: expected host:port or [v6]:port")
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    port = int(port)
    if not 0 < port < 65536:
        raise ValueError(f"{text!r}: port {port} is out of range")
    return normalize_host(host), port


def parse_rule(text: str) -> Rule:
    host, port = split_host_port(text)
    if not is_address(host) and not HOST_RE.match(host):
        raise ValueError(f"{text!r}: expected a DNS name, *.suffix, or an IP address before the port")
    return Rule(host, port, text)


def parse_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{text!r}: expected a network like 10.0.0.0/8 or an address") from None


def is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def match(rules: tuple[Rule, ...], host: str, port: int) -> Rule | None:
    return next((r for r in rules if r.matches(host, port)), None)


def address_refusal(ip: Address, networks: tuple) -> str | None:
    """Why `ip` may not be reached (a short name for the record), or None. `networks` opens ranges on purpose."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    if any(ip.version == n.version and ip in n for n in networks):
        return None
    for name in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
        if getattr(ip, f"is_{name}"):
            return name.replace("_", "-")
    if not ip.is_global:
        return "not-global"
    return None
