"""The in-sandbox kernels. Their files are shipped read-only into a session's sandbox (never imported here)."""
import pathlib


def source() -> bytes:
    return (pathlib.Path(__file__).parent / "python_kernel.py").read_bytes()
