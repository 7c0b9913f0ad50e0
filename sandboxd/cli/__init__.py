"""Command-line entry points: `sandboxd` (daemon.py) and `sandboxctl` (ctl.py), and what both need."""
from __future__ import annotations

import os
import sys

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader went away


def quiet_on_broken_pipe(main):
    """`sandboxctl runs list | head` closes our stdout early; that ends the command, not with a traceback.
    stdout is pointed at /dev/null so the interpreter's final flush cannot raise again."""
    def run(argv: list[str] | None = None) -> int:
        try:
            code = main(argv)
            sys.stdout.flush()
            return code
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            return EXIT_BROKEN_PIPE
    return run


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """Columns as wide as their longest value (two spaces apart), so long names never run together."""
    widths = [max(len(v) for v in col) for col in zip(header, *rows)]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in (header, *rows)]
    return "\n".join(lines)
