"""Adapters that make sandboxd the code-execution backend of agent frameworks (docs/agents.md).

Each submodule imports its framework, which is an optional extra (`pip install 'sandboxd[deepagents]'`...):
import the submodule you need, e.g. `from sandboxd.integrations.deepagents import SandboxdBackend`. This
package imports none of them, so the core never needs a framework installed. Every adapter talks to the daemon
only through sandboxd.client or sandboxd.aio, presenting the framework's name and version as agent claims.
"""
