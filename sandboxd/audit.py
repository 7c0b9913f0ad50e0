r"""Signed checkpoints and anchors: what makes the hash chain (store.py) prove that it is complete, and the
verifier that checks all of it, on a store or on an export. Runs in the daemon (on the store's thread) and in
`sandboxd audit`.

Why: a hash chain shows that no stored event was edited, not that none is missing. Its tail can be cut, or the
whole chain recomputed by anyone who can write the file. So the daemon signs the chain head with an Ed25519 key
every `audit.checkpoint_every` events, every `audit.checkpoint_interval` and at shutdown, appends the signature
to the chain as an `audit.checkpoint` event, and writes the same line to an append-only anchor file and to its
log. A chain recomputed without the key fails the signatures; a cut tail or a removed checkpoint disagrees with
the anchors, which live (and are best shipped) outside the database.

A signed checkpoint, for an external verifier (the anchor line and the event's data are the same object):

    {"seq": S, "hash": H, "ts": T, "key_id": K, "prev_checkpoint": P, "signature": SIG}
    S, H       the head signed: the seq and hash of the newest event before this checkpoint
    T          when it was signed, RFC 3339 UTC with microseconds
    K          key_id(public key) = the first 16 hex digits of sha256(the 32 raw public key bytes)
    P          the seq of the previous audit.checkpoint event, 0 for the first one (so removing one shows)
    SIG        base64 of Ed25519(canon(["sandboxd.signed-head/1", S, H, T, K, P]) as UTF-8)

The checkpoint event itself is seq S+1. canon() is store.canon.

These verdicts are also `sandboxd audit verify`'s exit statuses, one per kind of damage (docs/identity.md).
"""
from __future__ import annotations

import base64
import enum
import hashlib
import json
import logging
import os
import sqlite3
import stat
import urllib.parse
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import ConfigError
from .store import GENESIS, Event, Store, canon, event_hash, verify as verify_chain, _now

log = logging.getLogger("sandboxd.audit")

CHECKPOINT = "audit.checkpoint"          # signed heads; the store's retention "checkpoints" table is another thing
REFUSALS = "auth.refused_summary"
ANCHOR_FILE = "anchors.jsonl"
EXPORT_FORMAT = "sandboxd.audit-export/1"


class Verdict(enum.IntEnum):
    OK = 0
    BROKEN = 1              # an event edited, deleted, inserted or reordered, or `runs` disagrees with the events
    UNUSABLE = 2            # nothing to verify, or an input that cannot be read (store, key, anchors, export)
    TAIL_CUT = 3            # events that the anchors vouch for are missing from the end
    SIGNATURE = 4           # a signature fails or a signed head is not the chain's: rewritten without the key
    CHECKPOINT_REMOVED = 5  # a signed checkpoint the anchors or a later checkpoint name is gone


@dataclass
class Report:
    verdict: Verdict
    first_bad_seq: int | None
    reason: str
    events: int = 0
    checkpoints: int = 0
    anchors: int = 0
    notes: list[str] = field(default_factory=list)


# -- keys -----------------------------------------------------------------------------------------------------

def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_pem(public: Ed25519PublicKey) -> str:
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def load_public(pem: str | bytes, where: str) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    except ValueError as e:
        raise ConfigError(f"{where}: not a PEM public key: {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{where}: expected an Ed25519 public key, got {type(key).__name__}")
    return key


def load_key(path: str, *, create: bool) -> Ed25519PrivateKey:
    """The signing key at `path`, generated (owner-only, 0600) when absent and `create` is set. A key that
    others could read or replace is refused: a signature is worth no more than the secrecy of its key."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        if not create:
            raise ConfigError(f"{path}: no audit signing key here (the daemon creates it at its first start)") from None
        return _generate(path)
    except OSError as e:
        raise ConfigError(f"{path}: cannot open the audit signing key: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise ConfigError(f"{path}: the audit signing key must be a regular file owned by uid {os.geteuid()} "
                              f"with mode 0600, found uid {st.st_uid} mode {stat.S_IMODE(st.st_mode):04o}")
        data = f.read()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path}: not an unencrypted PEM private key: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: expected an Ed25519 private key, got {type(key).__name__}")
    return key


def _generate(path: str) -> Ed25519PrivateKey:
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    log.warning("generated the audit signing key %s (key id %s); keep a copy of `sandboxd audit pubkey` "
                "off this host", path, key_id(key.public_key()))
    return key


def signed_message(cp: dict) -> bytes:
    return canon(["sandboxd.signed-head/1", cp["seq"], cp["hash"], cp["ts"], cp["key_id"],
                  cp["prev_checkpoint"]]).encode("utf-8")


def sign_head(key: Ed25519PrivateKey, seq: int, head: str, prev_checkpoint: int) -> dict:
    cp = {"seq": seq, "hash": head, "ts": _now(), "key_id": key_id(key.public_key()),
          "prev_checkpoint": prev_checkpoint}
    cp["signature"] = base64.b64encode(key.sign(signed_message(cp))).decode()
    return cp


def signature_problem(cp: object, public: Ed25519PublicKey) -> str | None:
    """Why `cp` is not a checkpoint signed by `public`, or None when it is."""
    fields = {"seq": int, "hash": str, "ts": str, "key_id": str, "prev_checkpoint": int, "signature": str}
    if not isinstance(cp, dict) or any(not isinstance(cp.get(k), t) or isinstance(cp.get(k), bool)
                                       for k, t in fields.items()):
        return "is not a signed checkpoint (fields seq, hash, ts, key_id, prev_checkpoint, signature)"
    if cp["key_id"] != key_id(public):
        return f"is signed by key {cp['key_id']}, not by the verifier's key {key_id(public)}"
    try:
        public.verify(base64.b64decode(cp["signature"], validate=True), signed_message(cp))
    except (InvalidSignature, ValueError):
        return "has a signature that does not verify"
    return None


# -- the daemon side ------------------------------------------------------------------------------------------

class Anchors:
    """The append-only anchor file: one checkpoint per line, on disk before write() returns."""

    def __init__(self, directory: str):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.path = os.path.join(directory, ANCHOR_FILE)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)

    def write(self, cp: dict) -> None:
        os.write(self._fd, (canon(cp) + "\n").encode("utf-8"))
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


class Checkpointer:
    """Signs the store's head and anchors it. Used only on the store's thread, like the Store itself."""

    def __init__(self, store: Store, key: Ed25519PrivateKey, anchors: Anchors, every: int):
        self.store, self.key, self.anchors, self.every = store, key, anchors, every
        last = store.last_event(CHECKPOINT)
        self.last = last.seq if last else 0

    def due(self) -> bool:
        return self.store.head()[0] - self.last >= self.every

    def write(self) -> dict | None:
        """Sign the head and append the checkpoint, unless nothing happened since the last one. The chain gets it
        first, the anchors second: a crash in between leaves an anchor missing (harmless), never one too many."""
        if self.store.head()[0] == self.last:
            return None
        prev = self.last
        event = self.store.append_at_head(CHECKPOINT, lambda seq, h: sign_head(self.key, seq, h, prev))
        self.last = event.seq
        self.anchors.write(event.data)
        log.info("audit anchor: %s", canon(event.data))
        return event.data


class RefusalSummary:
    """Counts unauthenticated refusals in memory, per peer and reason, between flushes: a flood costs a dict
    update per request instead of a durable write, and still leaves a record (one event per interval)."""

    MAX_KEYS = 1000   # distinct (peer, reason) pairs kept per interval; the rest are counted together

    def __init__(self):
        self.counts: dict[tuple[str, str], int] = {}
        self.since = _now()

    def add(self, peer: str, reason: str) -> None:
        key = (peer[:128], reason[:200])
        if key not in self.counts and len(self.counts) >= self.MAX_KEYS:
            key = ("other", "other")
        self.counts[key] = self.counts.get(key, 0) + 1

    def take(self) -> dict | None:
        """The event data for what was counted since the last take, or None if nothing was."""
        if not self.counts:
            return None
        counts, self.counts = self.counts, {}
        since, self.since = self.since, _now()
        rows = [{"peer": p, "reason": r, "count": n} for (p, r), n in sorted(counts.items())]
        return {"since": since, "until": self.since, "total": sum(counts.values()), "refusals": rows}


def peer_key(address: str) -> str:
    """A peer without its port, so one host's reconnects count together."""
    for prefix in ("ipv4:", "ipv6:"):
        if address.startswith(prefix):
            return address.rpartition(":")[0] if address.count(":") > 1 else address
    return address


# -- verifying ------------------------------------------------------------------------------------------------

def read_anchors(path: str, public: Ed25519PublicKey | None) -> list[dict]:
    """The anchor lines of `path`, each signature checked. A torn last line (a crash mid-write) is skipped."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read anchors: {e.strerror}") from None
    lines = data.split(b"\n")
    anchors = []
    for n, line in enumerate(lines[:-1], 1):
        try:
            cp = json.loads(line)
        except ValueError:
            raise ConfigError(f"{path}:{n}: not a JSON line") from None
        if public is not None and (why := signature_problem(cp, public)):
            raise ConfigError(f"{path}:{n}: the anchor {why}")
        anchors.append(cp)
    return anchors


@dataclass
class _Walk:
    """What the walk over the events keeps: only the heads the anchors ask about."""
    wanted: set[int]
    hashes: dict[int, str] = field(default_factory=dict)
    checkpoints: dict[int, dict] = field(default_factory=dict)


def check_events(events: Iterable[Event], start: tuple[int, str], public: Ed25519PublicKey | None,
                 anchors: list[dict]) -> Report:
    """The whole check of a run of events that starts after `start` = (seq, hash): links and hashes, every
    signed checkpoint (signature, link to the previous one, head), then each anchor against the chain."""
    base, prev = start
    seq, last_cp, checked, cps = base, None, 0, 0
    walk = _Walk({a["seq"] for a in anchors} | {a["seq"] + 1 for a in anchors})
    if base in walk.wanted:
        walk.hashes[base] = prev
    for ev in events:
        if ev.seq != seq + 1:
            why = f"seq {seq + 1} is missing (next is {ev.seq})" if ev.seq > seq + 1 else f"seq {ev.seq} is out of order"
            return Report(Verdict.BROKEN, min(ev.seq, seq + 1), why, checked, cps)
        if ev.prev_hash != prev:
            return Report(Verdict.BROKEN, ev.seq, f"seq {ev.seq}: prev_hash does not match the hash of seq {seq}",
                          checked, cps)
        if event_hash(ev.seq, ev.ts, ev.kind, ev.run_id, canon(ev.data), ev.prev_hash) != ev.hash:
            return Report(Verdict.BROKEN, ev.seq, f"seq {ev.seq}: hash does not match the event's content",
                          checked, cps)
        if ev.kind == CHECKPOINT:
            cps += 1
            if public is None:
                return Report(Verdict.UNUSABLE, ev.seq, f"seq {ev.seq} is a signed checkpoint and no public key "
                              f"was given to check it (--pubkey FILE, from `sandboxd audit pubkey`)", checked, cps)
            if why := signature_problem(ev.data, public):
                return Report(Verdict.SIGNATURE, ev.seq, f"seq {ev.seq}: the checkpoint {why}: the chain was "
                              f"rewritten without the key", checked, cps)
            p = ev.data["prev_checkpoint"]
            if p > (base if last_cp is None else last_cp):
                return Report(Verdict.CHECKPOINT_REMOVED, p, f"seq {p}: the signed checkpoint that seq {ev.seq} "
                              f"names as its predecessor is gone", checked, cps)
            if last_cp is not None and p != last_cp:
                return Report(Verdict.SIGNATURE, ev.seq, f"seq {ev.seq}: the checkpoint names seq {p} as its "
                              f"predecessor, but the previous checkpoint is seq {last_cp}", checked, cps)
            if (ev.data["seq"], ev.data["hash"]) != (seq, prev):
                after = f"after seq {last_cp}, the last checkpoint that matches" if last_cp else "from the start"
                return Report(Verdict.SIGNATURE, ev.seq, f"seq {ev.seq}: the checkpoint signed head seq "
                              f"{ev.data['seq']} {ev.data['hash'][:16]}..., the chain has seq {seq} {prev[:16]}...: "
                              f"events were rewritten without the key ({after})", checked, cps)
            last_cp = ev.seq
            if ev.seq in walk.wanted:
                walk.checkpoints[ev.seq] = ev.data
        if ev.seq in walk.wanted:
            walk.hashes[ev.seq] = ev.hash
        seq, prev, checked = ev.seq, ev.hash, checked + 1
    report = _check_anchors(anchors, walk, base, seq, checked, cps)
    if report is not None:
        return report
    notes = [] if cps else ["no signed checkpoints in this chain"]
    return Report(Verdict.OK, None, f"ok: {checked} events, head seq {seq}, {cps} signed checkpoints, "
                  f"{len(anchors)} anchors", checked, cps, len(anchors), notes)


def _check_anchors(anchors: list[dict], walk: _Walk, base: int, end: int, checked: int, cps: int) -> Report | None:
    for a in sorted(anchors, key=lambda a: a["seq"]):
        s = a["seq"]
        if s < base:
            continue                        # pruned by retention (or not exported): nothing left to compare
        if s + 1 > end:
            return Report(Verdict.TAIL_CUT, end + 1, f"seq {end + 1}: the chain ends at seq {end}, but an anchor "
                          f"vouches for a checkpoint at seq {s + 1}: the tail was cut", checked, cps, len(anchors))
        if walk.hashes.get(s) != a["hash"]:
            return Report(Verdict.SIGNATURE, s, f"seq {s}: its hash differs from the anchored one: the chain was "
                          f"rewritten without the key", checked, cps, len(anchors))
        if walk.checkpoints.get(s + 1) != a:
            return Report(Verdict.CHECKPOINT_REMOVED, s + 1, f"seq {s + 1}: the signed checkpoint an anchor "
                          f"records here is gone", checked, cps, len(anchors))
    return None


def verify_store(db_path: str, public: Ed25519PublicKey | None, anchors: list[dict]) -> Report:
    """The chain (store.verify: links, hashes, retention checkpoints, `runs`), then signatures and anchors."""
    chain = verify_chain(db_path)
    if not chain.ok:
        return Report(Verdict.BROKEN, chain.first_bad_seq, chain.reason, chain.checked)
    db = _open_ro(db_path)
    try:
        return check_events(_events(db, 0), _start(db, 0), public, anchors)
    finally:
        db.close()


def export(db_path: str, out, public: Ed25519PublicKey | None, since_seq: int = 0) -> int:
    """A header line (format, public key, where the events start), then every event after since_seq as
    canonical JSON ("data" as an object: canon(data) is the hashed string). Returns the number of events."""
    db = _open_ro(db_path)
    try:
        start = _start(db, since_seq)
        header = {"format": EXPORT_FORMAT, "after_seq": start[0], "after_hash": start[1],
                  "public_key": public_pem(public) if public else None,
                  "key_id": key_id(public) if public else None}
        out.write(canon(header) + "\n")
        count = 0
        for ev in _events(db, start[0]):
            out.write(canon({"seq": ev.seq, "ts": ev.ts, "kind": ev.kind, "run_id": ev.run_id, "data": ev.data,
                             "prev_hash": ev.prev_hash, "hash": ev.hash}) + "\n")
            count += 1
        return count
    finally:
        db.close()


def _open_ro(path: str) -> sqlite3.Connection:
    """Read-only, straight from the file: works offline and never takes the daemon's write lock."""
    return sqlite3.connect("file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro", uri=True)


def _start(db: sqlite3.Connection, since_seq: int) -> tuple[int, str]:
    """(seq, hash) just before the first event to read: the newest retention checkpoint, or since_seq's event."""
    row = db.execute("SELECT seq_upto, hash_upto FROM checkpoints ORDER BY seq_upto DESC LIMIT 1").fetchone()
    base = (row[0], row[1]) if row else (0, GENESIS)
    if since_seq <= base[0]:
        return base
    row = db.execute("SELECT seq, hash FROM events WHERE seq <= ? ORDER BY seq DESC LIMIT 1", (since_seq,)).fetchone()
    return (row[0], row[1]) if row else base


def _events(db: sqlite3.Connection, after: int) -> Iterator[Event]:
    for s, ts, kind, run_id, text, prev_hash, h in db.execute(
            "SELECT seq, ts, kind, run_id, data, prev_hash, hash FROM events WHERE seq > ? ORDER BY seq", (after,)):
        yield Event(s, ts, kind, run_id, json.loads(text), prev_hash, h)


def verify_export(lines: Iterator[str], public: Ed25519PublicKey | None, anchors: list[dict],
                  where: str) -> Report:
    """An export checked on its own. Without `public`, the key the export carries is used (and said so)."""
    try:
        header = json.loads(next(lines))
    except (StopIteration, ValueError):
        return Report(Verdict.UNUSABLE, None, f"{where}: expected a header line ({EXPORT_FORMAT})")
    if not isinstance(header, dict) or header.get("format") != EXPORT_FORMAT:
        return Report(Verdict.UNUSABLE, None, f"{where}: the first line is not a {EXPORT_FORMAT} header")
    notes = []
    if public is None and header.get("public_key"):
        public = load_public(header["public_key"], f"{where}: public_key")
        notes.append(f"signatures checked against the key the export carries ({key_id(public)}); pass --pubkey "
                     f"to check against a key you trust")
        for a in anchors:
            if why := signature_problem(a, public):
                return Report(Verdict.SIGNATURE, a.get("seq"), f"an anchor {why}")

    def events() -> Iterator[Event]:
        for n, line in enumerate(lines, 2):
            try:
                e = json.loads(line)
                yield Event(e["seq"], e["ts"], e["kind"], e["run_id"], e["data"], e["prev_hash"], e["hash"])
            except (ValueError, KeyError, TypeError):
                raise ConfigError(f"{where}:{n}: not an exported event") from None
    try:
        report = check_events(events(), (header.get("after_seq", 0), header.get("after_hash", GENESIS)), public,
                              anchors)
    except ConfigError as e:
        return Report(Verdict.UNUSABLE, None, str(e))
    report.notes += notes
    return report
