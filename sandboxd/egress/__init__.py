"""Egress: the daemon's recording proxy for runs whose policy grants network = "egress" (docs/network.md).

rules.py (pure: allowlist and address checks), resolver.py (names -> addresses, the daemon's own resolution),
proxy.py (asyncio: serves each run's listener, enforces limits, records every attempt).
"""
