"""Adapters that make sandboxd the code-execution backend of agent frameworks (docs/agents.md).

Each module imports its framework and is installed with its extra (`pip install 'sandboxd[mcp]'`); nothing
else in sandboxd imports them. Every adapter talks to the daemon only through sandboxd.client or sandboxd.aio,
so its calls carry the caller's identity and the framework's name and version as agent claims.
"""
