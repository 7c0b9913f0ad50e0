"""Tampering with a store the way someone with write access but without the signing key would: on the file, with
nothing but sqlite3, dropping the append-only triggers (they guard against bugs, not attackers). Shared by the
unit and integration tests of the audit log."""
from __future__ import annotations

import json
import sqlite3

from sandboxd.store import COLUMNS, RUN_KINDS, Event, _columns, _fold, canon, event_hash


def rows(path):
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT seq, ts, kind, run_id, data, prev_hash, hash FROM events ORDER BY seq").fetchall()
    finally:
        db.close()


def rewrite(path, edit):
    """Someone without the key: change the events with `edit(list of rows) -> rows`, then renumber, recompute
    every hash from the first change on and rebuild `runs`, so that the chain and the table verify again."""
    old = rows(path)
    new = edit([list(r) for r in old])
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("DROP TRIGGER events_no_update")
        db.execute("DROP TRIGGER events_delete_below_checkpoint")
        db.execute("DELETE FROM events")
        db.execute("DELETE FROM runs")
        prev, runs = "0" * 64, {}
        for seq, r in enumerate(new, 1):
            _, ts, kind, run_id, data, _, _ = r
            h = event_hash(seq, ts, kind, run_id, data, prev)
            db.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?)", (seq, ts, kind, run_id, data, prev, h))
            if run_id and kind in RUN_KINDS:
                runs[run_id] = _fold(runs.get(run_id), Event(seq, ts, kind, run_id, json.loads(data), prev, h))
            prev = h
        for run_id, rec in runs.items():
            values = _columns(rec)
            db.execute(f"INSERT INTO runs (run_id, {', '.join(COLUMNS)}, record) VALUES "
                       f"({', '.join('?' * (len(COLUMNS) + 2))})", (run_id, *(values[c] for c in COLUMNS), canon(rec)))
    finally:
        db.close()
