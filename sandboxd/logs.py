"""Logging set-up: text or JSON lines, with the run id on every line about a run (pass extra={"run_id": ...}).
Output from scripts never reaches these logs; messages that quote request values use %r, so escape sequences
and fake log lines stay inert data."""
from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                 "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        if getattr(record, "run_id", None):
            entry["run_id"] = record.run_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=True)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        run_id = getattr(record, "run_id", None)
        line = line if not run_id or run_id in line else f"{line} run_id={run_id}"
        # One record, one line: a newline in a message can never forge a second log line.
        return line.encode("unicode_escape").decode("ascii") if "\n" in line and not record.exc_info else line


def setup(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
