"""Names to addresses for the egress proxy: the daemon resolves, never the run (which has no resolver).

"system" asks the host's resolver (getaddrinfo in a thread); "static" answers only from the configured map,
which is how tests build an "internet" of their own and how a site can pin names.
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket


class ResolveError(Exception):
    pass


class Resolver:
    def __init__(self, kind: str = "system", hosts: dict[str, tuple[str, ...]] | None = None):
        self.kind, self.hosts = kind, dict(hosts or {})

    async def resolve(self, host: str, port: int) -> list:
        try:
            return [ipaddress.ip_address(host)]
        except ValueError:
            pass
        if self.kind == "static":
            if host not in self.hosts:
                raise ResolveError(f"{host}: not in the egress resolver's static map")
            return [ipaddress.ip_address(a) for a in self.hosts[host]]
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as e:
            raise ResolveError(f"{host}: {e}") from None
        seen = []
        for *_, addr in infos:
            ip = ipaddress.ip_address(addr[0].split("%")[0])
            if ip not in seen:
                seen.append(ip)
        return seen
