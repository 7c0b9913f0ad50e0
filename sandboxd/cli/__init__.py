"""Command-line entry points: `sandboxd` (daemon.py) and `sandboxctl` (ctl.py)."""
