"""The audit log as an auditor meets it: `sandboxd audit verify` and `export` on real stores, tampering caught at
the first event touched, kill -9 of the daemon in the middle of runs (and under load), and retention.

Tampering happens on copies of a store written by a real daemon, with nothing but the sqlite3 module, the way
someone with write access to the file would do it (dropping the append-only triggers first: they guard against
our bugs, not against attackers; verify is the defence).
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import sqlite3
import subprocess
import sys
import threading
import time

import grpc
import pytest

from conftest import ROOT, Daemon, _check_stopped
from sandboxd.client import Client, Output, SandboxdError, Started
from sandboxd.store import GENESIS, canon, event_hash
from sandboxd.v1 import sandbox_pb2 as pb
from tamper import rewrite

BUSY = "[admission]\nmax_concurrent = 8\n"   # every run of these tests gets a slot at once


def audit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sandboxd.cli.daemon", "audit", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


def verify(state_dir) -> subprocess.CompletedProcess:
    return audit("verify", "--state-dir", str(state_dir))


def events(state_dir) -> list[tuple]:
    db = sqlite3.connect(f"file:{pathlib.Path(state_dir) / 'sandboxd.db'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT seq, ts, kind, run_id, data, prev_hash, hash FROM events ORDER BY seq").fetchall()
    finally:
        db.close()


def kill9(d: Daemon) -> None:
    d.proc.kill()
    d.expected_exit = -9
    d.proc.wait()


# -- verify and export ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A store written by a daemon that ran a few runs (one refused) and then stopped cleanly."""
    if os.geteuid() != 0:
        pytest.skip("sandboxd tests need root")
    d = Daemon(tmp_path_factory.mktemp("sandboxd"))
    try:
        with d.client() as c:
            run_ids = [c.run(f"print({i})").run_id for i in range(4)]
            with pytest.raises(SandboxdError):
                c.run("x", "nope")
        live = verify(d.state_dir)   # on the live store, while the daemon holds it open
        assert d.stop() == 0
    finally:
        _check_stopped(d)
    return d.state_dir, run_ids, live


def test_verify_counts_the_events_of_an_untouched_store(pristine):
    state_dir, _, live = pristine
    n = len(events(state_dir))
    assert n >= 4 * 3 + 1 + 1 + 1   # requested, started, finished per run; a denial; config.loaded; a checkpoint
    assert live.returncode == 0, live.stdout + live.stderr
    assert live.stdout.startswith(f"ok: {n - 1} events verified")   # before the checkpoint of the shutdown
    assert events(state_dir)[-1][2] == "audit.checkpoint"
    after = verify(state_dir)
    assert after.returncode == 0 and after.stdout.startswith(f"ok: {n} events verified"), after.stdout
    assert "(1 signed checkpoints, 1 anchors" in after.stdout


def test_export_jsonl_is_every_event_and_verifiable_on_its_own(pristine):
    state_dir, run_ids, _ = pristine
    p = audit("export", "--format", "jsonl", "--state-dir", str(state_dir))
    assert p.returncode == 0, p.stderr
    header, *lines = [json.loads(line) for line in p.stdout.splitlines()]
    key = audit("pubkey", "--state-dir", str(state_dir))
    assert header["format"] == "sandboxd.audit-export/1" and header["public_key"] == key.stdout
    assert len(lines) == len(events(state_dir)) and f"exported {len(lines)} events" in p.stderr
    prev = GENESIS
    for line in lines:
        assert {"seq", "kind", "hash", "prev_hash", "data", "ts", "run_id"} <= set(line)
        assert line["prev_hash"] == prev
        # canon(data) is the hashed string: the export needs neither the database nor the daemon to check.
        assert event_hash(line["seq"], line["ts"], line["kind"], line["run_id"], canon(line["data"]),
                          line["prev_hash"]) == line["hash"]
        prev = line["hash"]
    kinds = [line["kind"] for line in lines]
    assert kinds[0] == "config.loaded" and kinds.count("run.finished") == 4 and kinds.count("run.denied") == 1
    assert kinds[-1] == "audit.checkpoint"
    assert {line["run_id"] for line in lines if line["kind"] == "run.finished"} == set(run_ids)
    tail = audit("export", "--format", "jsonl", "--state-dir", str(state_dir), "--since-seq", str(len(lines) - 2))
    assert [json.loads(x).get("seq") for x in tail.stdout.splitlines()] == [None, len(lines) - 1, len(lines)]


def copy_store(state_dir: pathlib.Path, to: pathlib.Path) -> pathlib.Path:
    """The database and its signing key; not the anchors (the tests name those explicitly)."""
    to.mkdir()
    shutil.copy(state_dir / "audit.key", to / "audit.key")
    for suffix in ("", "-wal", "-shm"):
        if (state_dir / f"sandboxd.db{suffix}").exists():
            shutil.copy(state_dir / f"sandboxd.db{suffix}", to / f"sandboxd.db{suffix}")
    return to


def test_export_reads_a_store_in_any_directory(pristine, tmp_path):
    state_dir, _, _ = pristine
    odd = copy_store(state_dir, tmp_path / "audit#2")
    p = audit("export", "--format", "jsonl", "--state-dir", str(odd))
    assert not (tmp_path / "audit").exists(), "export created a database at a truncated path"
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.splitlines()) == 1 + len(events(state_dir))


def test_export_without_a_store_says_so(tmp_path):
    p = audit("export", "--format", "jsonl", "--state-dir", str(tmp_path / "missing"))
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    assert "sandboxd.db" in p.stderr


def _middle_finished(db) -> int:
    seqs = [s for s, in db.execute("SELECT seq FROM events WHERE kind = 'run.finished' ORDER BY seq")]
    return seqs[len(seqs) // 2]


def edit_data(db) -> int:
    k = _middle_finished(db)
    db.execute("DROP TRIGGER events_no_update")
    db.execute("UPDATE events SET data = replace(data, '\"exit_code\":0', '\"exit_code\":1') WHERE seq = ?", (k,))
    return k


def delete_row(db) -> int:
    k = _middle_finished(db)
    db.execute("DROP TRIGGER events_delete_below_checkpoint")
    db.execute("DELETE FROM events WHERE seq = ?", (k,))
    return k


def reorder(db) -> int:
    """Swap two neighbours whole (everything but seq): each row is intact, only their order changed."""
    k = _middle_finished(db)
    db.execute("DROP TRIGGER events_no_update")
    cols = "ts, kind, run_id, data, prev_hash, hash"
    a = db.execute(f"SELECT {cols} FROM events WHERE seq = ?", (k,)).fetchone()
    b = db.execute(f"SELECT {cols} FROM events WHERE seq = ?", (k + 1,)).fetchone()
    sets = "ts = ?, kind = ?, run_id = ?, data = ?, prev_hash = ?, hash = ?"
    db.execute(f"UPDATE events SET {sets} WHERE seq = ?", (*b, k))
    db.execute(f"UPDATE events SET {sets} WHERE seq = ?", (*a, k + 1))
    return k


def insert_forged(db) -> int:
    """A careful forger: makes room after seq k and inserts an event whose own hash and link are correct. The
    forged row itself verifies; the next (original) event no longer links to its predecessor."""
    k = _middle_finished(db)
    db.execute("DROP TRIGGER events_no_update")
    db.execute("UPDATE events SET seq = -seq WHERE seq > ?", (k,))
    db.execute("UPDATE events SET seq = 1 - seq WHERE seq < 0")
    ts, run_id, prev = db.execute("SELECT ts, run_id, hash FROM events WHERE seq = ?", (k,)).fetchone()
    data = canon({"outcome": "exited", "exit_code": 0, "note": "nothing to see"})
    db.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?)",
               (k + 1, ts, "run.finished", run_id, data, prev, event_hash(k + 1, ts, "run.finished", run_id, data,
                                                                          prev)))
    return k + 2


def rewrite_runs_row(db) -> int:
    """Only the derived `runs` table: the chain is intact, the record disagrees with its events."""
    k = _middle_finished(db)
    run_id, = db.execute("SELECT run_id FROM events WHERE seq = ?", (k,)).fetchone()
    db.execute("UPDATE runs SET outcome = 'timeout' WHERE run_id = ?", (run_id,))
    return db.execute("SELECT MAX(seq) FROM events WHERE run_id = ?", (run_id,)).fetchone()[0]


@pytest.mark.parametrize("tamper", [edit_data, delete_row, reorder, insert_forged, rewrite_runs_row])
def test_verify_names_the_first_event_touched(pristine, tmp_path, tamper):
    state_dir, _, _ = pristine
    copy = copy_store(state_dir, tmp_path / "state")
    db = sqlite3.connect(copy / "sandboxd.db", isolation_level=None)
    try:
        bad = tamper(db)
    finally:
        db.close()
    p = verify(copy)
    assert p.returncode == 1, p.stdout
    assert p.stdout.startswith(f"FAILED (broken) at seq {bad}:"), p.stdout
    assert verify(state_dir).returncode == 0   # the original is untouched


# -- signed checkpoints and anchors --------------------------------------------------------------------------
SIGNED = '[audit]\ncheckpoint_every = 5\nrefusal_summary_interval = "1s"\n'


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    """A store whose daemon signed a checkpoint every 5 events and at shutdown: (state dir, public key file,
    anchor file copy, the daemon's log)."""
    if os.geteuid() != 0:
        pytest.skip("sandboxd tests need root")
    work = tmp_path_factory.mktemp("signed")
    d = Daemon(work, SIGNED)
    try:
        with d.client() as c:
            for i in range(5):
                c.run(f"print({i})")
        assert d.stop() == 0
    finally:
        _check_stopped(d)
    pub = work / "audit.pub"
    p = audit("pubkey", "--state-dir", str(d.state_dir))
    assert p.returncode == 0 and p.stdout.startswith("-----BEGIN PUBLIC KEY-----"), p.stderr
    pub.write_text(p.stdout)
    anchors = work / "anchors.jsonl"      # as shipped off the host
    shutil.copy(d.state_dir / "anchors" / "anchors.jsonl", anchors)
    return d.state_dir, pub, anchors, d.log()


def test_the_daemon_signs_and_anchors_its_head(signed):
    state_dir, pub, anchors, log = signed
    key = state_dir / "audit.key"
    assert oct(key.stat().st_mode & 0o777) == "0o600" and oct((state_dir / "anchors").stat().st_mode & 0o777) == "0o700"
    cps = [e for e in events(state_dir) if e[2] == "audit.checkpoint"]
    assert len(cps) >= 4 and events(state_dir)[-1][2] == "audit.checkpoint"     # every 5 events, and at stop
    lines = anchors.read_text().splitlines()
    assert lines == [cp[4] for cp in cps]       # the anchor line is the checkpoint event's data, verbatim
    assert [line.split("audit anchor: ", 1)[1] for line in log.splitlines() if "audit anchor: " in line] == lines
    for seq, line in zip([cp[0] for cp in cps], lines):
        a = json.loads(line)
        assert a["seq"] == seq - 1 and set(a) == {"seq", "hash", "ts", "key_id", "prev_checkpoint", "signature"}
    p = audit("verify", "--state-dir", str(state_dir), "--pubkey", str(pub), "--anchors", str(anchors))
    assert p.returncode == 0 and f"{len(cps)} signed checkpoints, {len(cps)} anchors" in p.stdout, p.stdout


def _tampered(signed, tmp_path, edit):
    state_dir, pub, anchors, _ = signed
    copy = copy_store(state_dir, tmp_path / "state")
    cps = [e[0] for e in events(copy) if e[2] == "audit.checkpoint"]
    rewrite(str(copy / "sandboxd.db"), lambda rs: edit(rs, cps))
    return audit("verify", "--state-dir", str(copy), "--pubkey", str(pub), "--anchors", str(anchors)), cps


def test_verify_catches_a_cut_tail(signed, tmp_path):
    p, cps = _tampered(signed, tmp_path, lambda rs, cps: rs[:cps[-2] - 3])
    assert p.returncode == 3, p.stdout
    assert p.stdout.startswith(f"FAILED (tail_cut) at seq {cps[-2] - 2}:") and "tail was cut" in p.stdout


def test_verify_catches_a_chain_rewritten_without_the_key(signed, tmp_path):
    def edit(rs, cps):
        rs[0][4] = canon({"source": "/etc/forged.toml"})   # config.loaded, and every later hash recomputed
        return rs
    p, cps = _tampered(signed, tmp_path, edit)
    assert p.returncode == 4, p.stdout
    assert p.stdout.startswith(f"FAILED (signature) at seq {cps[0]}:") and "rewritten" in p.stdout


def test_verify_catches_a_removed_checkpoint(signed, tmp_path):
    p, cps = _tampered(signed, tmp_path, lambda rs, cps: [r for r in rs if r[0] != cps[1]])
    assert p.returncode == 5, p.stdout
    assert p.stdout.startswith(f"FAILED (checkpoint_removed) at seq {cps[1]}:"), p.stdout


def test_verify_catches_an_edited_event_with_status_1(signed, tmp_path):
    state_dir, pub, anchors, _ = signed
    copy = copy_store(state_dir, tmp_path / "state")
    db = sqlite3.connect(copy / "sandboxd.db", isolation_level=None)
    try:
        bad = edit_data(db)
    finally:
        db.close()
    p = audit("verify", "--state-dir", str(copy), "--pubkey", str(pub), "--anchors", str(anchors))
    assert p.returncode == 1 and p.stdout.startswith(f"FAILED (broken) at seq {bad}:"), p.stdout


def test_an_export_verifies_on_another_host(signed, tmp_path):
    state_dir, pub, anchors, _ = signed
    out = tmp_path / "export.jsonl"
    p = audit("export", "--state-dir", str(state_dir))
    out.write_text(p.stdout)
    ok = audit("verify", "--export", str(out), "--pubkey", str(pub), "--anchors", str(anchors))
    assert ok.returncode == 0 and ok.stdout.startswith(f"ok: {len(events(state_dir))} events"), ok.stdout + ok.stderr
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(p.stdout.splitlines(keepends=True)[:-3]))
    p = audit("verify", "--export", str(cut), "--pubkey", str(pub), "--anchors", str(anchors))
    assert p.returncode == 3, p.stdout


def test_verify_help_documents_every_exit_status():
    p = audit("verify", "--help")
    for status in ("0  ok", "1  an event", "2  nothing", "3  the tail", "4  the chain", "5  a signed checkpoint"):
        assert status in p.stdout, p.stdout


def test_a_quiet_daemon_signs_its_head_after_the_interval_and_only_when_it_moved(start_daemon):
    d = start_daemon('[audit]\ncheckpoint_every = 100000\ncheckpoint_interval = "1s"\n')
    with d.client() as c:
        c.run("pass")

    def checkpoints() -> list[tuple]:
        return [e for e in events(d.state_dir) if e[2] == "audit.checkpoint"]
    deadline = time.monotonic() + 30
    while not checkpoints() and time.monotonic() < deadline:
        time.sleep(0.2)
    first = checkpoints()
    assert len(first) == 1 and first[0][0] == len(events(d.state_dir)), d.log()[-2000:]
    assert log_waits_for(d, "audit anchor: " + first[0][4])
    time.sleep(2.5)      # more intervals pass with nothing new: no checkpoint of a checkpoint
    assert checkpoints() == first
    assert d.stop() == 0
    assert checkpoints() == first         # nothing appended since: the shutdown has nothing to sign either


def log_waits_for(d: Daemon, text: str) -> bool:
    deadline = time.monotonic() + 10
    while text not in d.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    return text in d.log()


def test_unauthenticated_refusals_are_summarised_not_written_one_by_one(start_daemon):
    d = start_daemon(SIGNED)
    with Client(d.target, token="sbx_" + "A" * 43) as bad:
        for _ in range(20):
            with pytest.raises(SandboxdError) as e:
                bad.run("print('never')")
            assert e.value.code == "UNAUTHENTICATED"
        for _ in range(5):   # sessions refuse the same way
            with pytest.raises(grpc.RpcError) as e:
                bad.stub.CreateSession(pb.CreateSessionRequest(runner="python"), metadata=bad.metadata, timeout=30)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        for call in (bad.runners, bad.list_runs):   # and every other RPC, which never had a record of its own
            with pytest.raises(SandboxdError) as e:
                call()
            assert e.value.code == "UNAUTHENTICATED"
    before = [e for e in events(d.state_dir) if e[2] in ("run.denied", "auth.refused_summary")]
    assert d.stop() == 0
    summaries = [json.loads(e[4]) for e in events(d.state_dir) if e[2] == "auth.refused_summary"]
    assert not [e for e in before if e[2] == "run.denied"]
    assert sum(s["total"] for s in summaries) == 27
    rows = [r for s in summaries for r in s["refusals"]]
    assert {(r["peer"], r["reason"]) for r in rows} == {("unix-uid:0", "token not recognised")}


# -- crashes ------------------------------------------------------------------------------------------------
def test_kill_9_during_runs_marks_them_interrupted(start_daemon):
    d = start_daemon(BUSY)
    with d.client() as c:
        done = c.run("print('before')")
    ids: list[str] = []
    printed = [threading.Event() for _ in range(5)]
    errors: list[Exception] = []

    def run(i: int) -> None:
        try:
            with d.client() as c:
                for ev in c.execute("import time\nprint('up', flush=True)\ntime.sleep(30)"):
                    if isinstance(ev, Started):
                        ids.append(ev.run_id)
                    elif isinstance(ev, Output):
                        printed[i].set()
        except SandboxdError as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    assert all(p.wait(30) for p in printed), d.log()[-3000:]
    kill9(d)
    for t in threads:
        t.join(30)
    assert len(ids) == 5 and len(errors) == 5 and {e.code for e in errors} == {"UNAVAILABLE"}
    d2 = start_daemon(BUSY, workdir=d.workdir)
    with d2.client() as c:
        for run_id in ids:
            rec = c.get_run(run_id)
            assert rec["outcome"] == "interrupted" and rec["finished_at"], rec
            assert rec["reason"] == "daemon restarted during the run"
        before = c.get_run(done.run_id)
    assert before["outcome"] == "exited" and before["stdout_bytes"] == 7 and before["started_at"]
    kinds = [(e[2], e[3]) for e in events(d2.state_dir)]
    assert sorted(r for k, r in kinds if k == "run.interrupted") == sorted(ids)
    assert ("run.interrupted", done.run_id) not in kinds
    p = verify(d2.state_dir)
    assert p.returncode == 0, p.stdout


def test_kill_9_under_continuous_load(start_daemon):
    d = start_daemon(BUSY)
    seen: list[str] = []
    finished: list[str] = []
    stop = threading.Event()

    def submit() -> None:
        with d.client() as c:
            while not stop.is_set():
                try:
                    for ev in c.execute("import time\nprint('x', flush=True)\ntime.sleep(0.2)"):
                        if isinstance(ev, Started):
                            seen.append(ev.run_id)
                        elif not isinstance(ev, Output):
                            finished.append(ev.run_id)
                except SandboxdError:   # the daemon is gone (or going): expected, keep trying until told
                    time.sleep(0.01)

    threads = [threading.Thread(target=submit) for _ in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while len(finished) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    kill9(d)
    time.sleep(0.3)     # submissions keep failing against the dead daemon for a moment
    stop.set()
    for t in threads:
        t.join(30)
    assert len(finished) >= 6 and len(seen) > len(finished), (len(seen), len(finished))
    d2 = start_daemon(BUSY, workdir=d.workdir)
    with d2.client() as c:
        records = {run_id: c.get_run(run_id) for run_id in seen}
    assert all(rec["finished_at"] for rec in records.values())
    outcomes = {run_id: rec["outcome"] for run_id, rec in records.items()}
    assert set(outcomes.values()) <= {"exited", "interrupted"}, outcomes
    assert all(outcomes[r] == "exited" for r in finished)
    assert "interrupted" in outcomes.values()
    p = verify(d2.state_dir)
    assert p.returncode == 0, p.stdout


# -- retention ----------------------------------------------------------------------------------------------
def test_retention_prunes_old_events_and_the_chain_still_verifies(start_daemon):
    d = start_daemon('[store]\nretention = "1s"\nprune_interval = "1s"\n')
    with d.client() as c:
        old = [c.run(f"print({i})").run_id for i in range(3)]
    before = events(d.state_dir)
    first_run_seq = min(e[0] for e in before if e[3] == old[-1])
    deadline = time.monotonic() + 8
    while (after := events(d.state_dir))[0][0] <= first_run_seq and time.monotonic() < deadline:
        time.sleep(0.2)
    assert after[0][0] > first_run_seq, f"nothing pruned: {len(after)} events, first seq {after[0][0]}"
    assert len(after) < len(before)
    assert not {e[3] for e in after} & set(old)
    assert any(e[2] == "store.pruned" for e in after)
    db = sqlite3.connect(f"file:{d.state_dir / 'sandboxd.db'}?mode=ro", uri=True)
    try:
        seq_upto, hash_upto = db.execute("SELECT seq_upto, hash_upto FROM checkpoints "
                                         "ORDER BY seq_upto DESC").fetchone()
    finally:
        db.close()
    assert after[0][0] == seq_upto + 1 and after[0][5] == hash_upto   # the chain starts at the checkpoint
    with d.client() as c, pytest.raises(SandboxdError) as e:
        c.get_run(old[0])
    assert e.value.code == "NOT_FOUND"   # retention means the record is gone, not just its events
    p = verify(d.state_dir)
    assert p.returncode == 0, p.stdout
