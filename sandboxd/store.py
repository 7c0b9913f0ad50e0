r"""The embedded SQLite store: a hash-chained, append-only event log, and the `runs` table derived from it.

Where it runs: the daemon, on ONE dedicated thread (a single-thread executor). A Store owns one sqlite3 connection
bound to the thread that created it (sqlite3's check_same_thread guard makes use from any other thread fail loudly
instead of corrupting state), so the class is deliberately not thread-safe: create it on that thread too. Other
processes (the `sandboxd audit` CLI, a second daemon started by mistake) may open the same file: every write is one
BEGIN IMMEDIATE transaction that reads the chain head and appends under SQLite's write lock, so writers queue and
never interleave.

Why a hash chain: each event's hash covers its content and the previous event's hash, so editing, deleting,
inserting or reordering rows breaks the chain at the first seq touched, and `verify()` finds it offline with nothing
but the file. What a chain alone cannot show: its tail cut off, or the whole
chain recomputed by someone with write access (there is no secret in the hash). audit.py closes both: signed
checkpoints (`audit.checkpoint` events, not to be confused with the retention checkpoints below) and anchors kept
outside the file; `verify(head=...)` remains for a head anchored by other means.

The hash of an event, for an external verifier:

    canon(v)   = JSON text of v: keys sorted, separators (",", ":"), non-ASCII kept as is (ensure_ascii=False),
                 NaN and Infinity refused; hashed as its UTF-8 bytes.
    data       = canon(the event's dict), stored verbatim in events.data
    hash       = sha256_hex(canon(["sandboxd.event/1", seq, ts, kind, run_id, data, prev_hash]))

`data` enters the hash as the stored string, so a verifier never re-canonicalizes JSON (number formatting differs
between languages): the array holds only integers, strings and null, and needs only Python's string escaping:
\" \\ \b \f \n \r \t, other control characters as \u00xx (lowercase hex), every other character literal (no escaping
of /, <, >, &, U+2028). `run_id` is null when absent, `ts` is RFC 3339 UTC with microseconds ("...T12:00:00.000000Z").
The first event's prev_hash is 64 "0"s; after pruning, the first remaining event's prev_hash is the latest
checkpoint's hash_upto. A checkpoint's own hash is sha256_hex(canon(["sandboxd.checkpoint/1", seq_upto, hash_upto,
pruned_count, ts])), and the `store.pruned` event appended in the same transaction carries those fields and that
hash, so a checkpoint edited after the fact no longer matches the chain that vouches for it.

Durability: WAL with synchronous=NORMAL. An append is in the WAL file when the call returns, so it survives a crash
of the daemon (kill -9 at any point leaves each transaction whole or absent) without an fsync per event; the WAL is
fsynced at each checkpoint. A power loss or kernel crash can lose the last transactions committed since the last
checkpoint (never a torn one: the chain stays valid, it just ends earlier).
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import sqlite3
import urllib.parse
from dataclasses import astuple, dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, TextIO

GENESIS = "0" * 64
# Events of these kinds need a run_id and are folded into `runs`. Any other kind (config.loaded, store.pruned, and
# whatever the identity work adds) is logged and chained, and does not touch `runs`.
RUN_KINDS = frozenset({"run.requested", "run.denied", "run.started", "run.finished", "run.interrupted",
                       "session.created", "session.closed", "session.call"})
# Sessions are rows of `runs` too (record "kind": "session"): session.created opens the row and session.closed
# finishes it, so listing, retention and the restart's "interrupted" treat a session like a run. Each exec or code
# cell in a session is one session.call event: a finished row of its own (kind "exec" or "code", with session_id).
# File operations and refused calls on a session are session.* events under the session's id, outside `runs`.

# Columns of `runs` after run_id, in table order. `record` (the full merged JSON) comes last.
COLUMNS = ("received_at", "started_at", "finished_at", "principal", "auth_method", "agent_name", "agent_version",
           "runner", "image", "outcome", "exit_code", "signal", "cpu_seconds", "wall_seconds", "peak_memory_bytes",
           "stdout_bytes", "stderr_bytes", "code_sha256")

# Migration N takes the schema from version N to N+1. Append new ones; never edit a released one, because a store
# records its version and is upgraded in place (later columns and tables are added, the history is kept).
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE events (seq INTEGER PRIMARY KEY, ts TEXT NOT NULL, kind TEXT NOT NULL, run_id TEXT,
           data TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL)""",
        "CREATE INDEX events_run ON events (run_id, seq)",
        # Guards against our own bugs, not attackers (they can drop triggers; verify() is the defence there):
        # events never change, and only prune() deletes them, below a checkpoint it has already written.
        """CREATE TRIGGER events_no_update BEFORE UPDATE ON events
           BEGIN SELECT RAISE(ABORT, 'events are append-only'); END""",
        """CREATE TRIGGER events_delete_below_checkpoint BEFORE DELETE ON events
           WHEN OLD.seq > (SELECT COALESCE(MAX(seq_upto), 0) FROM checkpoints)
           BEGIN SELECT RAISE(ABORT, 'events are append-only: only a checkpointed prefix may be pruned'); END""",
        """CREATE TABLE runs (run_id TEXT PRIMARY KEY, received_at TEXT, started_at TEXT, finished_at TEXT,
           principal TEXT, auth_method TEXT, agent_name TEXT, agent_version TEXT, runner TEXT, image TEXT,
           outcome TEXT, exit_code INTEGER, signal, cpu_seconds REAL, wall_seconds REAL,
           peak_memory_bytes INTEGER, stdout_bytes INTEGER, stderr_bytes INTEGER, code_sha256 TEXT,
           record TEXT NOT NULL)""",
        "CREATE INDEX runs_newest ON runs (received_at DESC, run_id DESC)",
        "CREATE INDEX runs_principal ON runs (principal, received_at)",
        "CREATE INDEX runs_open ON runs (run_id) WHERE finished_at IS NULL",
        """CREATE TABLE checkpoints (seq_upto INTEGER PRIMARY KEY, hash_upto TEXT NOT NULL,
           pruned_count INTEGER NOT NULL, ts TEXT NOT NULL, hash TEXT NOT NULL)""",
    ),
    # 1 -> 2: a run's code and stored output live in its events only (they were copied into runs.record).
    (lambda db: _drop_bulky(db),),
)

# Record keys kept only in the events (get_run reads them back from there), not copied into `runs`: the code
# and output can be megabytes, and the chain must hold them anyway.
BULKY = ("code", "stdout_stored_b64", "stderr_stored_b64")


class StoreError(Exception):
    """The store cannot be opened as asked: a schema newer than this code, or no WAL on this filesystem."""


@dataclass(frozen=True)
class Event:
    seq: int
    ts: str
    kind: str
    run_id: str | None
    data: dict
    prev_hash: str
    hash: str


@dataclass(frozen=True)
class Checkpoint:
    seq_upto: int        # every event up to and including this seq is gone
    hash_upto: str       # the hash of event seq_upto: the prev_hash of the first event kept
    pruned_count: int
    ts: str
    hash: str


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    checked: int                 # events whose link and hash were confirmed
    first_bad_seq: int | None
    reason: str


def canon(value: Any) -> str:
    """The canonical JSON text every hash and every stored JSON column uses."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def event_hash(seq: int, ts: str, kind: str, run_id: str | None, data: str, prev_hash: str) -> str:
    return _sha256(["sandboxd.event/1", seq, ts, kind, run_id, data, prev_hash])


def checkpoint_hash(seq_upto: int, hash_upto: str, pruned_count: int, ts: str) -> str:
    return _sha256(["sandboxd.checkpoint/1", seq_upto, hash_upto, pruned_count, ts])


def _sha256(fields: list) -> str:
    return hashlib.sha256(canon(fields).encode("utf-8")).hexdigest()


class Store:
    """The audit store of one daemon. Not thread-safe: create and use it on one thread (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, *, busy_timeout: float = 10.0):
        self.path = os.fspath(path)
        with contextlib.suppress(FileExistsError):   # the record names callers and code: owner-only from birth
            os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        self._db = sqlite3.connect(self.path, timeout=busy_timeout, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        try:
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreError(f"{self.path}: journal_mode is {mode!r}, expected 'wal' (a local filesystem?)")
            self._db.execute("PRAGMA synchronous=NORMAL")   # see Durability above
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    # -- writing -------------------------------------------------------------------------------------------------

    def append(self, kind: str, data: dict, run_id: str | None = None) -> Event:
        """Append one event (and fold it into `runs` when it is a run.* event), durably, in one transaction."""
        with self._transaction():
            return self._append(kind, data, run_id)

    def append_at_head(self, kind: str, make: Callable[[int, str], dict]) -> Event:
        """Append the event `make(seq, hash)` builds from the current head, in the same transaction, so nothing
        can be appended between reading the head and chaining onto it (a signed checkpoint needs that)."""
        with self._transaction():
            return self._append(kind, make(*self._head()), None)

    def run_requested(self, run_id: str, record: dict) -> None:
        self.append("run.requested", record, run_id)

    def run_denied(self, run_id: str, record: dict) -> None:
        """A refused request; `record` should carry `reason`. Sets outcome "rejected" and finished_at."""
        self.append("run.denied", record, run_id)

    def run_started(self, run_id: str, data: dict) -> None:
        self.append("run.started", data, run_id)

    def run_finished(self, run_id: str, result: dict) -> None:
        self.append("run.finished", result, run_id)

    def mark_interrupted(self, reason: str) -> list[str]:
        """At daemon start: close every run the previous daemon never finished. Returns their ids, oldest first."""
        with self._transaction():
            ids = [r[0] for r in self._db.execute(
                "SELECT run_id FROM runs WHERE finished_at IS NULL ORDER BY received_at, run_id")]
            for run_id in ids:
                self._append("run.interrupted", {"reason": reason}, run_id)
        return ids

    def prune(self, before_ts: str | datetime) -> Checkpoint:
        """Delete the oldest events, up to the last point before `before_ts` where every run they touch is
        finished and has no later events, and record a checkpoint so the rest still verifies.

        Only a prefix of the chain can go (the checkpoint replaces it as the chain's start), so an unfinished
        run blocks pruning past its first event. The `runs` rows of the pruned runs go too: the table is a view
        of the events, and retention means the record is gone. When nothing can be pruned, nothing is written and
        the returned Checkpoint (pruned_count 0) describes the chain's current start.
        """
        cutoff = _parse_ts(before_ts)
        with self._transaction():
            last = dict(self._db.execute(
                "SELECT run_id, MAX(seq) FROM events WHERE run_id IS NOT NULL GROUP BY run_id").fetchall())
            closed = {r[0] for r in self._db.execute("SELECT run_id FROM runs WHERE finished_at IS NOT NULL")}
            cut, cut_hash, cut_runs, touched, need = None, None, 0, {}, 0    # touched: an ordered set
            rows = self._db.execute("SELECT seq, ts, run_id, hash FROM events ORDER BY seq")
            for seq, ts, run_id, h in rows:
                if ts >= cutoff or (run_id is not None and run_id not in closed):
                    break
                if run_id is not None:
                    touched[run_id] = None
                    need = max(need, last[run_id])
                if seq >= need:          # every run seen so far ends here or earlier: a clean place to cut
                    cut, cut_hash, cut_runs = seq, h, len(touched)
            rows.close()
            if cut is None:
                seq_upto, hash_upto = self._base()
                now = _now()
                return Checkpoint(seq_upto, hash_upto, 0, now, checkpoint_hash(seq_upto, hash_upto, 0, now))
            count = self._db.execute("SELECT COUNT(*) FROM events WHERE seq <= ?", (cut,)).fetchone()[0]
            now = _now()
            cp = Checkpoint(cut, cut_hash, count, now, checkpoint_hash(cut, cut_hash, count, now))
            self._db.execute("INSERT INTO checkpoints VALUES (?, ?, ?, ?, ?)", astuple(cp))
            self._db.execute("DELETE FROM events WHERE seq <= ?", (cut,))
            self._db.executemany("DELETE FROM runs WHERE run_id = ?", [(r,) for r in list(touched)[:cut_runs]])
            self._append("store.pruned", {"seq_upto": cp.seq_upto, "hash_upto": cp.hash_upto,
                                          "pruned_count": cp.pruned_count, "checkpoint_hash": cp.hash,
                                          "before": cutoff, "runs_pruned": cut_runs}, None)
            return cp

    # -- reading -------------------------------------------------------------------------------------------------

    def get_run(self, run_id: str) -> dict | None:
        """The merged record of a run, with the column values (normalized) laid over it, and its code and stored
        output read from its events (BULKY)."""
        row = self._db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            return None
        run = _run_dict(row)
        for text, in self._db.execute("SELECT data FROM events WHERE run_id = ? ORDER BY seq", (run_id,)):
            data = json.loads(text)
            run.update({k: data[k] for k in BULKY if k in data})
        return run

    def list_runs(self, principal: str | None = None, agent: str | None = None, runner: str | None = None,
                  outcome: str | None = None, since: str | datetime | None = None,
                  until: str | datetime | None = None, limit: int = 100, after: str | None = None) -> list[dict]:
        """Runs newest first (by received_at, then run_id). since <= received_at < until. Each dict carries a
        `cursor`; pass the last one as `after` for the next page (stable while runs are being added)."""
        if not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive integer, got {limit!r}")
        where, args = [], []
        for column, value in (("principal", principal), ("agent_name", agent), ("runner", runner),
                              ("outcome", outcome)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if since is not None:
            where.append("received_at >= ?")
            args.append(_parse_ts(since))
        if until is not None:
            where.append("received_at < ?")
            args.append(_parse_ts(until))
        if after is not None:
            at, run_id = _decode_cursor(after)
            where.append("(received_at < ? OR (received_at = ? AND run_id < ?))")
            args += [at, at, run_id]
        sql = "SELECT * FROM runs" + (" WHERE " + " AND ".join(where) if where else "")
        rows = self._db.execute(sql + " ORDER BY received_at DESC, run_id DESC LIMIT ?", (*args, limit))
        out = []
        for row in rows:
            run = _run_dict(row)
            run["cursor"] = base64.urlsafe_b64encode(canon([row["received_at"], row["run_id"]]).encode()).decode()
            out.append(run)
        return out

    def list_sessions(self, principal: str | None = None, limit: int = 100) -> list[dict]:
        """Session rows, newest first (live ones have no finished_at)."""
        sql = "SELECT * FROM runs WHERE json_extract(record, '$.kind') = 'session'"
        args: list = []
        if principal is not None:
            sql += " AND principal = ?"
            args.append(principal)
        rows = self._db.execute(sql + " ORDER BY received_at DESC, run_id DESC LIMIT ?", (*args, limit))
        return [_run_dict(r) for r in rows]

    def export_jsonl(self, out: TextIO, since_seq: int = 0) -> int:
        """Write events with seq > since_seq as canonical JSON lines ("data" as an object); returns the count.
        canon(line["data"]) reproduces the hashed string exactly, so the export is verifiable on its own."""
        count = 0
        for row in self._db.execute("SELECT * FROM events WHERE seq > ? ORDER BY seq", (since_seq,)):
            line = dict(row)
            line["data"] = json.loads(line["data"])
            out.write(canon(line) + "\n")
            count += 1
        return count

    def last_event(self, kind: str) -> Event | None:
        row = self._db.execute("SELECT * FROM events WHERE kind = ? ORDER BY seq DESC LIMIT 1", (kind,)).fetchone()
        return Event(row["seq"], row["ts"], row["kind"], row["run_id"], json.loads(row["data"]), row["prev_hash"],
                     row["hash"]) if row else None

    def head(self) -> tuple[int, str]:
        """(seq, hash) of the newest event: the value to anchor outside the file."""
        return self._head()

    def writable(self) -> bool:
        """Health check: can we take the write lock right now? (It cannot tell whether the disk has space.)"""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("ROLLBACK")
            return True
        except sqlite3.Error:
            with contextlib.suppress(sqlite3.Error):
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
            return False

    # -- internals -----------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        # IMMEDIATE takes the write lock before we read the head, so no other writer can append in between.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _migrate(self) -> None:
        with self._transaction():
            self._db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = self._db.execute("SELECT version FROM schema_version").fetchone()
            version = row[0] if row else 0
            if version > len(MIGRATIONS):
                raise StoreError(f"{self.path}: schema version {version} is newer than this sandboxd knows "
                                 f"({len(MIGRATIONS)}); refusing to open it")
            for statements in MIGRATIONS[version:]:
                for statement in statements:
                    statement(self._db) if callable(statement) else self._db.execute(statement)
            if row is None:
                self._db.execute("INSERT INTO schema_version VALUES (?)", (len(MIGRATIONS),))
            else:
                self._db.execute("UPDATE schema_version SET version = ?", (len(MIGRATIONS),))

    def _base(self) -> tuple[int, str]:
        row = self._db.execute("SELECT seq_upto, hash_upto FROM checkpoints ORDER BY seq_upto DESC LIMIT 1").fetchone()
        return (row[0], row[1]) if row else (0, GENESIS)

    def _head(self) -> tuple[int, str]:
        row = self._db.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
        return (row[0], row[1]) if row else self._base()

    def _append(self, kind: str, data: dict, run_id: str | None) -> Event:
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"event kind must be a non-empty string, got {kind!r}")
        if not isinstance(data, dict):
            raise TypeError(f"event data must be a dict, got {type(data).__name__}")
        if run_id is not None and (not isinstance(run_id, str) or not run_id):
            raise ValueError(f"run_id must be a non-empty string or None, got {run_id!r}")
        if kind in RUN_KINDS and run_id is None:
            raise ValueError(f"{kind} needs a run_id")
        text = canon(data)
        text.encode("utf-8")      # lone surrogates fail here, loudly, not in a verifier later
        seq, prev = self._head()
        ts = _now()
        event = Event(seq + 1, ts, kind, run_id, json.loads(text), prev,
                      event_hash(seq + 1, ts, kind, run_id, text, prev))
        self._db.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (event.seq, ts, kind, run_id, text, prev, event.hash))
        if run_id is not None and kind in RUN_KINDS:
            row = self._db.execute("SELECT record FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            record = _fold(json.loads(row[0]) if row else None, event)
            values = _columns(record)
            self._db.execute(f"INSERT OR REPLACE INTO runs (run_id, {', '.join(COLUMNS)}, record) "
                             f"VALUES ({', '.join('?' * (len(COLUMNS) + 2))})",
                             (run_id, *(values[c] for c in COLUMNS), canon(record)))
        return event


def _fold(record: dict | None, event: Event) -> dict:
    """The run record after one more event: later keys win. Pure, so verify() can rebuild `runs` from events."""
    rec = dict(record or {})
    rec.update((k, v) for k, v in event.data.items() if k not in BULKY)
    rec["run_id"] = event.run_id
    if _ts(rec.get("received_at")) is None:
        rec["received_at"] = event.ts
    if event.kind == "run.started":
        rec["started_at"] = event.data.get("started_at") or event.ts
    elif event.kind in ("run.denied", "run.finished", "run.interrupted", "session.closed", "session.call"):
        rec["finished_at"] = event.data.get("finished_at") or event.ts
    if event.kind == "run.denied":
        rec["outcome"] = "rejected"
    elif event.kind == "run.interrupted":
        rec["outcome"] = "interrupted"
    return rec


def _drop_bulky(db: sqlite3.Connection) -> None:
    rows = db.execute("SELECT run_id, record FROM runs").fetchall()
    for run_id, text in rows:
        record = json.loads(text)
        if any(k in record for k in BULKY):
            db.execute("UPDATE runs SET record = ? WHERE run_id = ?",
                       (canon({k: v for k, v in record.items() if k not in BULKY}), run_id))


def _columns(r: dict) -> dict:
    """Known record keys mapped to typed columns, coerced so they read back exactly as written (verify compares)."""
    agent = r.get("agent")      # {"name", "version", ...} or a plain name
    agent = agent if isinstance(agent, dict) else {"name": agent} if isinstance(agent, str) else {}
    signal = r.get("signal")    # a number or a name, as the supervisor reports it
    return {
        **{c: _ts(r.get(c)) for c in ("received_at", "started_at", "finished_at")},
        **{c: _name(r.get(c)) for c in ("principal", "auth_method", "runner", "image", "outcome", "code_sha256")},
        "agent_name": _name(agent.get("name", r.get("agent_name"))),
        "agent_version": _name(agent.get("version", r.get("agent_version"))),
        "signal": signal if isinstance(signal, (int, str)) and not isinstance(signal, bool) else None,
        **{c: _number(r.get(c), int) for c in ("exit_code", "peak_memory_bytes", "stdout_bytes", "stderr_bytes")},
        **{c: _number(r.get(c), float) for c in ("cpu_seconds", "wall_seconds")},
    }


def _name(value: Any) -> str | None:
    """A text column from a string, a number, or an object with an id or name (a principal, an image)."""
    if isinstance(value, dict):
        value = value.get("id", value.get("name"))
    if isinstance(value, bool) or value is None:
        return None
    return value if isinstance(value, str) else str(value) if isinstance(value, (int, float)) else None


def _number(value: Any, kind: type) -> int | float | None:
    return kind(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_ts(value: Any) -> str:
    """RFC 3339 UTC with microseconds, from an RFC 3339 string, a datetime or epoch seconds (naive means UTC).
    Fixed width, so timestamps compare correctly as text."""
    try:
        if isinstance(value, datetime):
            when = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            when = datetime.fromtimestamp(value, timezone.utc)
        else:
            when = datetime.fromisoformat(value)
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    except (TypeError, ValueError, OverflowError, OSError):
        raise ValueError(f"expected an RFC 3339 timestamp, a datetime or epoch seconds, got {value!r}") from None


def _ts(value: Any) -> str | None:
    """_parse_ts for record values: an unparseable string is kept as given rather than lost, other junk is None."""
    try:
        return _parse_ts(value)
    except ValueError:
        return value if isinstance(value, str) else None


def _run_dict(row: sqlite3.Row) -> dict:
    run = json.loads(row["record"])
    run.update({c: row[c] for c in COLUMNS})
    run["run_id"] = row["run_id"]
    return run


def _decode_cursor(cursor: str) -> tuple[str, str]:
    try:
        at, run_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        if isinstance(at, str) and isinstance(run_id, str):
            return at, run_id
    except (ValueError, TypeError, AttributeError):
        pass
    raise ValueError(f"invalid cursor {cursor!r}: pass the `cursor` of a run returned by list_runs")


def verify(path: str | os.PathLike, *, head: tuple[int, str] | None = None) -> VerifyResult:
    """Recompute the chain of the store at `path`, opened read-only (safe on a live store or an offline copy;
    copy the -wal file too if the store was not closed). Checks, in order: every checkpoint's own hash; that
    seqs are contiguous from the latest checkpoint (or 1); each prev_hash and hash; that the latest checkpoint is
    vouched for by a store.pruned event; that `runs` equals the events folded again; and, given an anchor
    `head=(seq, hash)` recorded earlier, that the chain still contains it (a cut tail is otherwise invisible)."""
    uri = "file:" + urllib.parse.quote(os.path.abspath(os.fspath(path))) + "?mode=ro"
    try:
        db = sqlite3.connect(uri, uri=True)
    except sqlite3.Error as e:
        return VerifyResult(False, 0, None, f"cannot open {os.fspath(path)} read-only: {e}")
    try:
        return _verify(db, head)
    except sqlite3.Error as e:
        return VerifyResult(False, 0, None, f"{os.fspath(path)}: {e}")
    finally:
        db.close()


def _verify(db: sqlite3.Connection, head: tuple[int, str] | None) -> VerifyResult:
    checkpoints = db.execute("SELECT seq_upto, hash_upto, pruned_count, ts, hash FROM checkpoints "
                             "ORDER BY seq_upto").fetchall()
    for seq_upto, hash_upto, count, ts, h in checkpoints:
        if checkpoint_hash(seq_upto, hash_upto, count, ts) != h:
            return VerifyResult(False, 0, seq_upto + 1, f"checkpoint seq_upto={seq_upto} does not match its hash")
    seq, prev = checkpoints[-1][:2] if checkpoints else (0, GENESIS)
    checked, runs, last_seq, vouchers = 0, {}, {}, []

    def bad(at: int, why: str) -> VerifyResult:
        return VerifyResult(False, checked, at, why)

    for s, ts, kind, run_id, text, prev_hash, h in db.execute(
            "SELECT seq, ts, kind, run_id, data, prev_hash, hash FROM events ORDER BY seq"):
        if s != seq + 1:
            why = f"seq {seq + 1} is missing (next is {s})" if s > seq + 1 else f"seq {s} lies below the checkpoint"
            return bad(min(s, seq + 1), why)
        if prev_hash != prev:
            return bad(s, f"seq {s}: prev_hash does not match the hash of seq {seq}")
        if event_hash(s, ts, kind, run_id, text, prev_hash) != h:
            return bad(s, f"seq {s}: hash does not match the row's content")
        if head is not None and s == head[0] and h != head[1]:
            return bad(s, f"seq {s}: hash differs from the anchored head")
        data = json.loads(text)
        if run_id is not None and kind in RUN_KINDS:
            runs[run_id] = _fold(runs.get(run_id), Event(s, ts, kind, run_id, data, prev_hash, h))
            last_seq[run_id] = s
        elif kind == "store.pruned":
            vouchers.append(data)
        seq, prev, checked = s, h, checked + 1
    if head is not None and head[0] > seq:
        return bad(seq + 1, f"the chain ends at seq {seq} but the anchored head is seq {head[0]} (tail cut)")
    if checkpoints:
        seq_upto, hash_upto, count, _, h = checkpoints[-1]
        claim = {"seq_upto": seq_upto, "hash_upto": hash_upto, "pruned_count": count, "checkpoint_hash": h}
        if not any(all(v.get(k) == claim[k] for k in claim) for v in vouchers):
            return bad(seq_upto + 1, f"checkpoint seq_upto={seq_upto} is not vouched for by any store.pruned event")
    db.row_factory = sqlite3.Row
    stored = {row["run_id"]: row for row in db.execute("SELECT * FROM runs")}
    for run_id in sorted(stored.keys() | runs.keys(), key=lambda r: last_seq.get(r, 0)):
        row, record = stored.get(run_id), runs.get(run_id)
        if record is None or row is None:
            return bad(last_seq.get(run_id), f"run {run_id!r} is in {'runs' if row else 'events'} only")
        values = _columns(record)
        if row["record"] != canon(record) or any(row[c] != values[c] for c in COLUMNS):
            return bad(last_seq[run_id], f"runs row {run_id!r} disagrees with its events")
    return VerifyResult(True, checked, None, f"ok: {checked} events, head seq {seq}")
