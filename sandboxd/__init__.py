"""sandboxd: run untrusted scripts for AI agents in fresh Linux sandboxes, and keep a verifiable record of every run."""

__version__ = "0.1.0"
