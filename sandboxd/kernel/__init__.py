"""Kernels that run inside a session's sandbox. The daemon never imports them: it ships their source into the
sandbox as a read-only file, and the image's own interpreter runs it (see python_kernel.py for the protocol)."""
from __future__ import annotations

import pathlib

_PYTHON_KERNEL = pathlib.Path(__file__).with_name("python_kernel.py")


def source() -> bytes:
    """The Python kernel's file, as the daemon copies it into a sandbox."""
    return _PYTHON_KERNEL.read_bytes()
