"""The store and its hash chain, on real SQLite files. Tampering is done the way an attacker would: with the sqlite3
module on the file, dropping the append-only triggers first (they guard against bugs, not against root)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from sandboxd import store
from sandboxd.store import GENESIS, Store, StoreError, verify

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "audit.db"
    s = Store(path)
    yield s
    s.close()


def request(**over) -> dict:
    record = {"received_at": "2026-01-01T00:00:00Z", "principal": "alice", "auth_method": "peercred",
              "peer": {"uid": 1000, "pid": 42}, "agent": {"name": "coder", "version": "1.2"}, "runner": "python",
              "image": "host", "code_sha256": "ab" * 32, "limits": {"wall_time": 10.0}}
    record.update(over)
    return record


def result(**over) -> dict:
    r = {"outcome": "ok", "exit_code": 0, "signal": None, "cpu_seconds": 0.25, "wall_seconds": 1.5,
         "peak_memory_bytes": 1 << 20, "stdout_bytes": 12, "stderr_bytes": 0, "stdout_sha256": "cd" * 32}
    r.update(over)
    return r


def fill(s: Store, runs: int = 3) -> None:
    s.append("config.loaded", {"path": "/etc/sandboxd.toml", "sha256": "00" * 32})
    for i in range(runs):
        s.run_requested(f"r{i}", request())
        s.run_started(f"r{i}", {"pid": 100 + i})
        s.run_finished(f"r{i}", result(exit_code=i))


def tamper(path, *statements, params=()) -> None:
    con = sqlite3.connect(path, isolation_level=None)
    for trigger in ("events_no_update", "events_delete_below_checkpoint"):
        con.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    for sql in statements:
        con.execute(sql, params) if params else con.execute(sql)
    con.close()


# -- the chain -----------------------------------------------------------------------------------------------------

def test_append_and_verify_round_trip(db):
    first = db.append("config.loaded", {"é": [1, 2.5, None], "b": True})
    assert (first.seq, first.prev_hash, first.run_id) == (1, GENESIS, None)
    assert first.ts.endswith("Z") and len(first.ts) == len("2026-01-01T00:00:00.000000Z")
    fill(db)
    second = db.append("custom.kind", {"x": 1}, run_id="r0")      # unknown kinds are logged, not folded
    assert second.seq == 12
    res = verify(db.path)
    assert res.ok and res.checked == 12 and res.first_bad_seq is None, res
    assert db.head() == (12, second.hash)


def test_hash_is_the_documented_definition(db):
    """An external verifier needs nothing but hashlib and a JSON encoder; this is that verifier."""
    db.append("config.loaded", {"z": 1, "a": "ünï", "n": [1.5, None]})
    db.run_requested("r1", request())
    con = sqlite3.connect(db.path)
    prev = "0" * 64
    for seq, ts, kind, run_id, data, prev_hash, h in con.execute("SELECT * FROM events ORDER BY seq"):
        assert data == json.dumps(json.loads(data), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        fields = ["sandboxd.event/1", seq, ts, kind, run_id, data, prev_hash]
        text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert prev_hash == prev and hashlib.sha256(text.encode()).hexdigest() == h
        prev = h
    con.close()


def test_reopen_after_close_keeps_the_chain(tmp_path):
    path = tmp_path / "audit.db"
    with Store(path) as s:
        fill(s, 2)
        head = s.head()
    with Store(path) as s:
        e = s.append("config.loaded", {"again": True})
        assert (e.seq, e.prev_hash) == (head[0] + 1, head[1])
        assert s.get_run("r1")["exit_code"] == 1
    assert verify(path).ok
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_appends_are_refused_loudly(db):
    with pytest.raises(TypeError):
        db.append("config.loaded", ["not", "a", "dict"])
    with pytest.raises(ValueError):
        db.append("config.loaded", {"x": float("nan")})
    with pytest.raises(ValueError):
        db.append("run.started", {})                       # run kinds need a run id
    with pytest.raises(ValueError):
        db.append("config.loaded", {"x": "\ud800"})         # a lone surrogate cannot be hashed as UTF-8
    assert db.head() == (0, GENESIS)
    db.append("config.loaded", {})
    with pytest.raises(sqlite3.IntegrityError):      # the trigger: our own bugs cannot rewrite history
        db._db.execute("UPDATE events SET data = '{\"x\":1}'")
    assert db.head()[0] == 1 and verify(db.path).ok


@pytest.mark.parametrize("statements, bad_seq", [
    (["UPDATE events SET data = '{\"path\":\"/evil\",\"sha256\":\"00\"}' WHERE seq = 1"], 1),  # edit a field
    (["DELETE FROM events WHERE seq = 5"], 5),                                                 # delete a middle row
    (["UPDATE events SET data = (SELECT data FROM events WHERE seq = 7) WHERE seq = 4",        # swap two rows' data
      "UPDATE events SET data = (SELECT data FROM events WHERE seq = 3) WHERE seq = 7"], 4),
    (["INSERT INTO events VALUES (11, '2026-01-01T00:00:00.000000Z', 'run.finished', 'r9', '{}',"
      " (SELECT hash FROM events WHERE seq = 10), 'f00d')"], 11),                              # forged row, bad hash
    (["UPDATE events SET seq = seq + 100 WHERE seq >= 6",                                      # insert in the middle
      "INSERT INTO events SELECT 6, ts, kind, run_id, data, prev_hash, hash FROM events WHERE seq = 106",
      "UPDATE events SET seq = seq - 99 WHERE seq >= 106"], 7),
    (["UPDATE events SET seq = 99 WHERE seq = 2", "UPDATE events SET seq = 2 WHERE seq = 3",   # reorder rows
      "UPDATE events SET seq = 3 WHERE seq = 99"], 2),
    (["DELETE FROM events WHERE seq = 1"], 1),                                                 # cut the head off
])
def test_tampering_is_detected_at_the_first_bad_seq(db, statements, bad_seq):
    fill(db)
    tamper(db.path, *statements)
    res = verify(db.path)
    assert not res.ok and res.first_bad_seq == bad_seq, res
    assert res.checked == bad_seq - 1


def test_forged_runs_row_is_detected(db):
    fill(db)
    tamper(db.path, "UPDATE runs SET outcome = 'ok', exit_code = 0 WHERE run_id = 'r2'")
    res = verify(db.path)
    assert not res.ok and res.first_bad_seq == 10 and "r2" in res.reason
    tamper(db.path, "UPDATE runs SET outcome = NULL, exit_code = 2 WHERE run_id = 'r2'",
           "INSERT INTO runs (run_id, record) VALUES ('ghost', '{}')")
    res = verify(db.path)
    assert not res.ok and "ghost" in res.reason


def test_anchored_head_catches_a_cut_tail(db):
    fill(db)
    db.append("config.loaded", {"last": True})
    anchor = db.head()
    assert verify(db.path, head=anchor).ok
    tamper(db.path, f"DELETE FROM events WHERE seq = {anchor[0]}")
    assert verify(db.path).ok                        # a chain alone cannot see its tail go
    res = verify(db.path, head=anchor)
    assert not res.ok and res.first_bad_seq == anchor[0] and "tail" in res.reason
    tamper(db.path, "INSERT INTO events SELECT 11, ts, kind, run_id, data, prev_hash, hash FROM events WHERE seq = 1")
    assert verify(db.path, head=anchor).first_bad_seq == 11


def test_verify_is_read_only_and_works_on_an_offline_copy(db, tmp_path):
    fill(db)
    assert verify(db.path).ok                         # live store, WAL and all
    db.close()
    copy = tmp_path / "copy.db"
    shutil.copy(db.path, copy)
    digest = hashlib.sha256(copy.read_bytes()).hexdigest()
    assert verify(copy).ok and verify(copy).checked == 10
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == digest
    missing = verify(tmp_path / "nope.db")
    assert not missing.ok and "cannot open" in missing.reason


def test_two_writers_never_interleave(tmp_path):
    path = tmp_path / "audit.db"
    with Store(path) as a, Store(path) as b:
        for i in range(20):
            (a if i % 2 else b).append("config.loaded", {"i": i})
    assert verify(path).checked == 20


# -- runs ----------------------------------------------------------------------------------------------------------

def test_run_lifecycle_fills_record_and_columns(db):
    db.run_requested("r1", request(principal={"id": "spiffe://x/alice", "kind": "spiffe"}))
    run = db.get_run("r1")
    assert run["outcome"] is None and run["finished_at"] is None
    assert run["received_at"] == "2026-01-01T00:00:00.000000Z" and run["principal"] == "spiffe://x/alice"
    db.run_started("r1", {"pid": 7})
    db.run_finished("r1", result(signal=9, outcome="signaled", exit_code=None, truncated={"stdout": True}))
    run = db.get_run("r1")
    assert (run["agent_name"], run["agent_version"], run["runner"], run["image"]) == ("coder", "1.2", "python", "host")
    assert (run["outcome"], run["signal"], run["exit_code"], run["cpu_seconds"]) == ("signaled", 9, None, 0.25)
    assert run["peer"] == {"uid": 1000, "pid": 42} and run["truncated"] == {"stdout": True} and run["pid"] == 7
    assert run["started_at"] <= run["finished_at"] and run["code_sha256"] == "ab" * 32
    assert db.get_run("nope") is None


def test_denied_run_is_rejected_with_its_reason(db):
    db.run_denied("d1", request(reason="runner 'bash' not allowed for alice"))
    run = db.get_run("d1")
    assert run["outcome"] == "rejected" and "bash" in run["reason"] and run["finished_at"]
    db.run_requested("d2", request())                # recorded first, refused after (audit.begin, then authorize)
    db.run_denied("d2", {"reason": "over quota"})
    run = db.get_run("d2")
    assert (run["outcome"], run["reason"], run["principal"]) == ("rejected", "over quota", "alice")
    assert db.mark_interrupted("restart") == []


def test_mark_interrupted_closes_only_open_runs(tmp_path):
    path = tmp_path / "audit.db"
    with Store(path) as s:
        fill(s, 1)
        s.run_requested("open1", request())
        s.run_requested("open2", request())
        s.run_started("open2", {})
        s.run_denied("denied", request(reason="no"))
    with Store(path) as s:                           # as at daemon start
        assert s.mark_interrupted("daemon restarted") == ["open1", "open2"]
        assert s.get_run("open2")["outcome"] == "interrupted"
        assert s.get_run("open2")["reason"] == "daemon restarted"
        assert s.get_run("r0")["outcome"] == "ok" and s.get_run("denied")["outcome"] == "rejected"
        assert s.mark_interrupted("again") == []
    assert verify(path).ok


def test_list_runs_filters_and_pages(db):
    t0 = datetime(2026, 3, 1, tzinfo=timezone.utc)
    for i in range(10):
        rid = f"run{i}"
        db.run_requested(rid, request(received_at=(t0 + timedelta(minutes=i)).isoformat(),
                                      principal="alice" if i % 2 else "bob",
                                      agent={"name": "a" if i < 5 else "b"}, runner="python" if i % 3 else "bash"))
        if i != 9:
            db.run_finished(rid, result(outcome="ok" if i % 4 else "timeout"))
    ids = lambda runs: [r["run_id"] for r in runs]
    assert ids(db.list_runs()) == [f"run{i}" for i in range(9, -1, -1)]
    assert ids(db.list_runs(principal="alice")) == ["run9", "run7", "run5", "run3", "run1"]
    assert ids(db.list_runs(agent="a", runner="bash")) == ["run3", "run0"]
    assert ids(db.list_runs(outcome="timeout")) == ["run8", "run4", "run0"]
    assert ids(db.list_runs(since=t0 + timedelta(minutes=3), until="2026-03-01T00:05:00Z")) == ["run4", "run3"]
    seen, after = [], None
    while page := db.list_runs(limit=3, after=after):
        seen += ids(page)
        after = page[-1]["cursor"]
    assert seen == ids(db.list_runs())
    db.run_requested("zz-same-time", request(received_at=(t0 + timedelta(minutes=9)).isoformat()))
    page = db.list_runs(limit=1)
    assert ids(page) == ["zz-same-time"] and ids(db.list_runs(limit=1, after=page[0]["cursor"])) == ["run9"]
    with pytest.raises(ValueError):
        db.list_runs(after="garbage")
    with pytest.raises(ValueError):
        db.list_runs(limit=0)
    with pytest.raises(ValueError):
        db.list_runs(since="last tuesday")


# -- pruning -------------------------------------------------------------------------------------------------------

def test_prune_keeps_verify_ok_and_checkpoint_tampering_is_detected(tmp_path):
    path = tmp_path / "audit.db"
    with Store(path) as s:
        fill(s, 2)                                   # seq 1..7, all finished
        time.sleep(0.002)
        cutoff = store._now()
        s.run_requested("late", request())
        cp = s.prune(cutoff)
        assert (cp.seq_upto, cp.pruned_count) == (7, 7)
        assert s.get_run("r0") is None and s.get_run("late") is not None
        assert s.export_jsonl(io.StringIO()) == 2    # run.requested of "late" and store.pruned
        s.run_finished("late", result())
        assert s.prune(cutoff).pruned_count == 0      # nothing older left
        assert verify(path).ok and verify(path).checked == 3

    for sql in ("UPDATE checkpoints SET hash_upto = 'x' || substr(hash_upto, 2)",
                "UPDATE checkpoints SET pruned_count = 1"):
        bad = tmp_path / "bad.db"
        shutil.copy(path, bad)
        tamper(bad, sql)
        res = verify(bad)
        assert not res.ok and res.first_bad_seq == 8 and "checkpoint" in res.reason, res

    # An attacker who also recomputes the checkpoint's own hash is caught by the store.pruned event.
    bad = tmp_path / "bad.db"
    shutil.copy(path, bad)
    forged = store.checkpoint_hash(7, cp.hash_upto, 3, cp.ts)
    tamper(bad, "UPDATE checkpoints SET pruned_count = 3, hash = ?", params=(forged,))
    res = verify(bad)
    assert not res.ok and "vouched" in res.reason

    shutil.copy(path, bad)
    tamper(bad, "DELETE FROM checkpoints")
    assert verify(bad).first_bad_seq == 1


def test_prune_never_cuts_an_unfinished_or_straddling_run(db):
    db.run_requested("open", request())
    fill(db, 2)
    assert db.prune(store._now()).pruned_count == 0  # "open" blocks the whole prefix
    with pytest.raises(ValueError):
        db.prune("yesterday")
    db.mark_interrupted("test")
    db.run_requested("a", request())
    db.run_requested("b", request())
    db.run_finished("a", result())
    time.sleep(0.002)
    cutoff = store._now()
    db.run_finished("b", result())                   # b straddles the cutoff: the cut stops before "a" starts
    cp = db.prune(cutoff)
    assert (cp.seq_upto, cp.pruned_count) == (9, 9)  # up to the interruption of "open"; a and b stay
    assert [r["run_id"] for r in db.list_runs()] == ["b", "a"]   # open, r0, r1 went with their events
    assert verify(db.path).ok
    with pytest.raises(sqlite3.IntegrityError):        # the trigger: only a checkpointed prefix may go
        db._db.execute("DELETE FROM events WHERE seq = ?", (db.head()[0],))
    everything = db.prune(datetime.now(timezone.utc) + timedelta(days=1))
    assert (everything.seq_upto, everything.pruned_count) == (14, 5) and db.list_runs() == []
    assert verify(db.path).checked == 1              # only the store.pruned event is left
    head = db.head()
    assert db.append("config.loaded", {}).prev_hash == head[1] and verify(db.path).checked == 2


# -- the database itself -------------------------------------------------------------------------------------------

def test_schema_is_versioned_and_newer_schemas_are_refused(tmp_path):
    path = tmp_path / "audit.db"
    Store(path).close()
    con = sqlite3.connect(path)
    assert con.execute("SELECT version FROM schema_version").fetchall() == [(len(store.MIGRATIONS),)]
    assert con.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    con.execute("UPDATE schema_version SET version = 99")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="99"):
        Store(path)


def test_writable_reports_a_held_write_lock(tmp_path):
    path = tmp_path / "audit.db"
    s = Store(path, busy_timeout=0.05)
    assert s.writable()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    assert not s.writable()
    other.execute("ROLLBACK")
    other.close()
    assert s.writable()
    s.close()
    assert not s.writable()


def test_export_jsonl_is_verifiable_on_its_own(db):
    fill(db, 2)
    out = io.StringIO()
    assert db.export_jsonl(out) == 7
    prev = GENESIS
    for line in out.getvalue().splitlines():
        e = json.loads(line)
        assert e["prev_hash"] == prev
        assert store.event_hash(e["seq"], e["ts"], e["kind"], e["run_id"], store.canon(e["data"]), prev) == e["hash"]
        prev = e["hash"]
    assert db.export_jsonl(io.StringIO(), since_seq=5) == 2


# -- crash safety --------------------------------------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys
    from sandboxd.store import Store, _now
    s = Store(sys.argv[1])
    i = 0
    while True:
        rid = f"{sys.argv[2]}-{i}"
        s.run_requested(rid, {"principal": "p", "n": i, "pad": "x" * 2000})
        s.run_started(rid, {"pid": i})
        s.run_finished(rid, {"outcome": "ok", "exit_code": 0})
        if i % 7 == 6:
            s.prune(_now())
        if i == 3:
            print("ready", flush=True)
        i += 1
""")


def test_sigkill_mid_append_leaves_a_verifiable_chain(tmp_path):
    path = tmp_path / "audit.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = random.Random(1234)
    for attempt in range(4):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), f"a{attempt}"],
                                stdout=subprocess.PIPE, env=env)
        assert proc.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.0, 0.15))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        res = verify(path)
        assert res.ok, res
        with Store(path) as s:                       # the next daemon start
            s.mark_interrupted("killed")
            s.append("config.loaded", {"attempt": attempt})
        assert verify(path).ok


def test_a_runs_code_and_stored_output_are_stored_once(tmp_path):
    """Fault 9: the code was in the run.requested event and again in runs.record. The chain must hold it, so the
    events keep it and get_run reads it back from there."""
    path = tmp_path / "audit.db"
    code, out = "print('" + "unique-code-marker " * 500 + "')", "b3V0cHV0LW1hcmtlcg=="
    with Store(path) as s:
        s.run_requested("r1", request(code=code))
        s.run_finished("r1", result(stdout_stored_b64=out))
        run = s.get_run("r1")
        assert run["code"] == code and run["stdout_stored_b64"] == out
        assert "code" not in s.list_runs()[0]      # lists never carry megabytes of code
    con = sqlite3.connect(path)
    try:
        tables = {t: sum(text.count("unique-code-marker") for text, in con.execute(f"SELECT {c} FROM {t}"))
                  for t, c in (("events", "data"), ("runs", "record"))}
    finally:
        con.close()
    assert tables == {"events": 500, "runs": 0}
    assert verify(path).ok


def test_migration_2_drops_the_copied_code_from_old_records(tmp_path):
    path = tmp_path / "audit.db"
    with Store(path) as s:
        s.run_requested("r1", request(code="print(1)"))
        s.run_finished("r1", result())
    # What a version-1 store held: the code copied into runs.record.
    con = sqlite3.connect(path, isolation_level=None)
    record = json.loads(con.execute("SELECT record FROM runs").fetchone()[0])
    con.execute("UPDATE runs SET record = ?", (store.canon({**record, "code": "print(1)"}),))
    con.execute("UPDATE schema_version SET version = 1")
    con.close()
    assert not verify(path).ok
    with Store(path) as s:
        assert s.get_run("r1")["code"] == "print(1)"
    assert verify(path).ok
