"""Signed checkpoints, anchors and the verifier (sandboxd/audit.py) on real SQLite stores and real key files.
Each kind of damage is done the way someone with write access to the files would do it, and must get its own
verdict naming the first bad seq."""
from __future__ import annotations

import io
import json
import os
import sqlite3
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sandboxd import audit
from sandboxd.audit import Verdict
from sandboxd.errors import ConfigError
from sandboxd.store import Store, canon, event_hash
from tamper import rewrite, rows


@pytest.fixture
def logged(tmp_path):
    """A store with 3 runs and a signed checkpoint every 4 events, plus a final one: (db path, key, anchors)."""
    key = audit.load_key(str(tmp_path / "audit.key"), create=True)
    s = Store(tmp_path / "sandboxd.db")
    anchors = audit.Anchors(str(tmp_path / "anchors"))
    cp = audit.Checkpointer(s, key, anchors, every=4)
    s.append("config.loaded", {"source": "test"})
    for i in range(3):
        for kind, data in (("run.requested", {"code": f"print({i})", "runner": "python"}),
                           ("run.started", {"uid": 1000}), ("run.finished", {"outcome": "exited", "exit_code": i})):
            s.append(kind, data, f"r{i}")
            if cp.due():
                cp.write()
    cp.write()
    anchors.close()
    s.close()
    return str(tmp_path / "sandboxd.db"), key, audit.read_anchors(anchors.path, key.public_key())


def check(path, key, anchors=()):
    return audit.verify_store(path, key.public_key(), list(anchors))


def checkpoint_seqs(path):
    return [r[0] for r in rows(path) if r[2] == audit.CHECKPOINT]


def test_an_untouched_log_verifies_with_its_checkpoints_and_anchors(logged):
    path, key, anchors = logged
    cps = checkpoint_seqs(path)
    assert len(cps) >= 3 and len(anchors) == len(cps)
    r = check(path, key, anchors)
    assert r.verdict == Verdict.OK and r.checkpoints == len(cps) and r.anchors == len(anchors), r.reason
    # The anchors are the checkpoint events' data, and each signs the head just before its checkpoint.
    for a, seq in zip(anchors, cps):
        assert a["seq"] == seq - 1 and a["prev_checkpoint"] == ([0] + cps)[cps.index(seq)]
        assert audit.signature_problem(a, key.public_key()) is None


def test_the_signed_message_is_the_documented_one(logged):
    path, key, anchors = logged
    a = anchors[0]
    msg = canon(["sandboxd.signed-head/1", a["seq"], a["hash"], a["ts"], a["key_id"], a["prev_checkpoint"]])
    import base64
    key.public_key().verify(base64.b64decode(a["signature"]), msg.encode())
    import hashlib
    from cryptography.hazmat.primitives import serialization
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert a["key_id"] == hashlib.sha256(raw).hexdigest()[:16]


def test_an_edited_event_is_broken_at_its_seq(logged):
    path, key, anchors = logged
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("DROP TRIGGER events_no_update")
    db.execute("UPDATE events SET data = replace(data, 'print(1)', 'print(666)') WHERE kind = 'run.requested' "
               "AND run_id = 'r1'")
    seq, = db.execute("SELECT seq FROM events WHERE run_id = 'r1' AND kind = 'run.requested'").fetchone()
    db.close()
    r = check(path, key, anchors)
    assert (r.verdict, r.first_bad_seq) == (Verdict.BROKEN, seq), r.reason


def test_a_cut_tail_is_caught_by_the_anchors(logged):
    path, key, anchors = logged
    last = checkpoint_seqs(path)[-1]
    rewrite(path, lambda rs: rs[:last - 3])       # the events from seq last-2 on are gone, `runs` made to match
    assert check(path, key).verdict == Verdict.OK  # without anchors, a cut tail looks like a shorter log
    r = check(path, key, anchors)
    assert (r.verdict, r.first_bad_seq) == (Verdict.TAIL_CUT, last - 2), r.reason
    assert "tail was cut" in r.reason


def test_a_cut_of_only_the_final_checkpoint_is_a_cut_tail(logged):
    path, key, anchors = logged
    last = checkpoint_seqs(path)[-1]
    rewrite(path, lambda rs: rs[:-1])
    r = check(path, key, anchors)
    assert (r.verdict, r.first_bad_seq) == (Verdict.TAIL_CUT, last), r.reason


def test_a_rewritten_chain_fails_its_signatures(logged):
    path, key, anchors = logged
    first_cp = checkpoint_seqs(path)[0]

    def edit(rs):
        rs[0][4] = canon({"source": "forged"})      # config.loaded, then everything after it rehashed
        return rs
    rewrite(path, edit)
    for given in ([], anchors):
        r = check(path, key, given)
        assert (r.verdict, r.first_bad_seq) == (Verdict.SIGNATURE, first_cp), r.reason
        assert "rewritten without the key" in r.reason


def test_checkpoints_forged_with_another_key_fail(logged):
    path, key, anchors = logged
    mallory = Ed25519PrivateKey.generate()
    cps = checkpoint_seqs(path)

    def edit(rs):
        rs[0][4] = canon({"source": "forged"})
        prev = "0" * 64
        prev_cp = 0
        for seq, r in enumerate(rs, 1):        # re-sign every checkpoint over the forged chain
            if r[2] == audit.CHECKPOINT:
                r[4] = canon(audit.sign_head(mallory, seq - 1, prev, prev_cp))
                prev_cp = seq
            prev = event_hash(seq, r[1], r[2], r[3], r[4], prev)
        return rs
    rewrite(path, edit)
    assert audit.verify_store(path, mallory.public_key(), []).verdict == Verdict.OK   # consistent with itself
    r = check(path, key)
    assert (r.verdict, r.first_bad_seq) == (Verdict.SIGNATURE, cps[0]) and "not by the verifier's key" in r.reason


def test_a_removed_checkpoint_is_named(logged):
    path, key, anchors = logged
    cps = checkpoint_seqs(path)
    # Drop the first checkpoint and re-chain the rest: the next checkpoint names it as its predecessor.
    rewrite(path, lambda rs: [r for r in rs if r[0] != cps[0]])
    r = check(path, key)
    assert (r.verdict, r.first_bad_seq) == (Verdict.CHECKPOINT_REMOVED, cps[0]), r.reason


def test_a_removed_last_checkpoint_is_caught_by_the_anchors(logged):
    path, key, anchors = logged
    cps = checkpoint_seqs(path)
    # Drop the checkpoint before the final one and every later checkpoint (their signatures would betray the
    # re-chaining): only the anchors still know it existed.
    rewrite(path, lambda rs: [r for r in rs if r[0] not in cps[-2:]])
    assert check(path, key).verdict == Verdict.OK
    r = check(path, key, anchors)
    assert (r.verdict, r.first_bad_seq) == (Verdict.CHECKPOINT_REMOVED, cps[-2]), r.reason


def test_signed_checkpoints_need_a_public_key(logged):
    path, key, anchors = logged
    r = audit.verify_store(path, None, [])
    assert r.verdict == Verdict.UNUSABLE and "public key" in r.reason


def test_a_forged_anchor_line_is_refused(logged, tmp_path):
    path, key, anchors = logged
    forged = dict(anchors[-1], seq=anchors[-1]["seq"] + 100)
    f = tmp_path / "forged.jsonl"
    f.write_text(canon(forged) + "\n")
    with pytest.raises(ConfigError, match="signature that does not verify"):
        audit.read_anchors(str(f), key.public_key())
    f.write_text(canon(anchors[0]) + "\n" + canon(anchors[1])[:20])     # a torn last line is skipped
    assert audit.read_anchors(str(f), key.public_key()) == anchors[:1]


def test_the_key_file_is_owner_only_and_a_loose_one_is_refused(tmp_path):
    path = str(tmp_path / "k" / "audit.key")
    key = audit.load_key(path, create=True)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert audit.key_id(audit.load_key(path, create=False).public_key()) == audit.key_id(key.public_key())
    os.chmod(path, 0o640)
    with pytest.raises(ConfigError, match="mode 0600"):
        audit.load_key(path, create=False)
    with pytest.raises(ConfigError, match="no audit signing key"):
        audit.load_key(str(tmp_path / "none"), create=False)


def test_the_anchor_file_is_appended_never_rewritten(tmp_path):
    a = audit.Anchors(str(tmp_path / "anchors"))
    a.write({"seq": 1})
    a.close()
    b = audit.Anchors(str(tmp_path / "anchors"))
    b.write({"seq": 2})
    b.close()
    assert (tmp_path / "anchors" / audit.ANCHOR_FILE).read_text() == '{"seq":1}\n{"seq":2}\n'


def test_an_export_verifies_on_its_own_and_damage_shows(logged):
    path, key, anchors = logged
    out = io.StringIO()
    n = audit.export(path, out, key.public_key())
    lines = out.getvalue().splitlines()
    header = json.loads(lines[0])
    assert header["format"] == audit.EXPORT_FORMAT and header["key_id"] == audit.key_id(key.public_key())
    assert n == len(lines) - 1 == len(rows(path))
    r = audit.verify_export(iter(lines), None, anchors, "x")
    assert r.verdict == Verdict.OK and any("the export carries" in note for note in r.notes), r.reason
    assert audit.verify_export(iter(lines), key.public_key(), anchors, "x").verdict == Verdict.OK
    assert audit.verify_export(iter(lines[:-1]), key.public_key(), anchors, "x").verdict == Verdict.TAIL_CUT
    mallory = Ed25519PrivateKey.generate().public_key()
    assert audit.verify_export(iter(lines), mallory, [], "x").verdict == Verdict.SIGNATURE
    assert json.loads(lines[2])["seq"] == 2 and '"runner":"python"' in lines[2]
    edited = lines[:2] + [lines[2].replace('"runner":"python"', '"runner":"perl"')] + lines[3:]
    r = audit.verify_export(iter(edited), key.public_key(), [], "x")
    assert (r.verdict, r.first_bad_seq) == (Verdict.BROKEN, 2), r.reason
    # An export of the tail only still checks, from its first event on.
    out = io.StringIO()
    audit.export(path, out, key.public_key(), since_seq=6)
    r = audit.verify_export(iter(out.getvalue().splitlines()), key.public_key(), anchors, "x")
    assert r.verdict == Verdict.OK, r.reason


def test_refusal_summary_counts_per_peer_and_reason_and_is_bounded():
    s = audit.RefusalSummary()
    assert s.take() is None
    for _ in range(3):
        s.add(audit.peer_key("ipv4:10.0.0.1:5555"), "token not recognised")
    s.add(audit.peer_key("ipv6:[::1]:4444"), "no identity")
    data = s.take()
    assert data["total"] == 4 and data["refusals"] == [
        {"peer": "ipv4:10.0.0.1", "reason": "token not recognised", "count": 3},
        {"peer": "ipv6:[::1]", "reason": "no identity", "count": 1}]
    assert s.take() is None
    for i in range(s.MAX_KEYS + 50):
        s.add(f"ipv4:10.0.{i // 256}.{i % 256}", "x")
    data = s.take()
    assert len(data["refusals"]) == s.MAX_KEYS + 1 and data["total"] == s.MAX_KEYS + 50
