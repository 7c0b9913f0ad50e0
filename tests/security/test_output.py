"""THREATS.md, Output: whatever a run prints, the client gets exactly the cap and a flag, the daemon's memory stays
bounded, no gRPC message grows past its limit, output is data (never a log line or a record field), and closing
the streams does not stop the wall clock.

Already covered in tests/integration/test_limits.py (not repeated): 64KiB writes of 'x' on stdout, 0xfffe pairs
on stderr, exact binary passthrough, closing both streams then sleep.
"""
from __future__ import annotations

import hashlib
import json
import re
import uuid

import psutil
import pytest

from conftest import attack, record, script, still_serves


CAP = 100_000

# (id, code, stream(s) that must be cut). Each writes forever; the supervisor counts, delivers exactly CAP
# bytes of the stream, flags it and stops the run.
FLOODS = [
    ("print-lines", "while True: print('line of text')", ["stdout"]),
    ("no-newline-big-writes", "while True: os.write(1, b'y' * (1 << 20))", ["stdout"]),
    ("one-byte-writes", "while True: os.write(1, b'z')", ["stdout"]),
    ("invalid-utf8-stdout", "while True: os.write(1, b'\\xc3\\x28\\xa0\\xa1\\xe2\\x28\\xa1\\xf0\\x28\\x8c\\xbc')",
     ["stdout"]),
    ("nul-bytes", "while True: os.write(1, bytes(65536))", ["stdout"]),
    ("stderr-lines", "while True: print('err line', file=sys.stderr)", ["stderr"]),
    ("both-streams", "while True:\n    os.write(1, b'o' * 4096); os.write(2, b'e' * 4096)", ["stdout", "stderr"]),
    ("four-writer-processes",
     "for _ in range(3):\n    if os.fork() == 0: break\nwhile True: os.write(1, b'%d' % os.getpid() * 1000)",
     ["stdout"]),
    ("sendfile-dev-zero", "fd = os.open('/dev/zero', os.O_RDONLY)\nwhile True: os.sendfile(1, fd, None, 1 << 20)",
     ["stdout"]),
    ("reopened-dev-stdout", "f = open('/dev/stdout', 'wb')\nwhile True: f.write(b'w' * 65536)", ["stdout"]),
]


@pytest.mark.parametrize("code,streams", [f[1:] for f in FLOODS], ids=[f[0] for f in FLOODS])
def test_floods_are_cut_at_exactly_the_cap(sandbox, code, streams):
    r = attack(sandbox, code, output=CAP, wall_time=10)
    assert r.outcome == "output_limit", (r, r.stderr[-1000:])
    cut = []
    for name in ("stdout", "stderr"):
        data, written, truncated = getattr(r, name), getattr(r, f"{name}_bytes"), getattr(r, f"{name}_truncated")
        if truncated:  # a cut stream holds exactly the cap, whichever stream it is
            assert len(data) == CAP and written > CAP, (name, len(data), written)
            cut.append(name)
        else:
            assert len(data) == written <= CAP, (name, len(data), written)
    # The run stops as soon as one stream passes the cap; with two flooding streams, whether the other one's
    # next write lands before the kill is a race, so only "at least one of them, and nothing else" holds.
    assert cut and set(cut) <= set(streams), (cut, streams)
    if len(streams) == 1:
        assert cut == streams
    assert r.wall_time < 5
    # The record keeps sizes and hashes of what was delivered, never the bytes.
    rec = record(sandbox, r.run_id)
    assert rec["stdout_sha256"] == hashlib.sha256(r.stdout).hexdigest()
    assert rec["stderr_sha256"] == hashlib.sha256(r.stderr).hexdigest()


def test_no_grpc_message_over_its_limit(daemon):
    """Output is sent in chunks of at most 64KiB: a client that accepts messages of 80000 bytes at most gets a
    whole 1MiB-capped flood without a single oversized message."""
    with daemon.client(options=[("grpc.max_receive_message_length", 80_000)]) as c:
        sizes, result = [], None
        for event in c.execute(script("while True: os.write(1, b'q' * (4 << 20))"), output=1 << 20, wall_time=10):
            if hasattr(event, "data"):
                sizes.append(len(event.data))
            elif hasattr(event, "outcome"):
                result = event
    assert result.outcome == "output_limit" and sum(sizes) == 1 << 20, (result, sum(sizes))
    assert max(sizes) <= 64 << 10


def test_daemon_memory_stays_bounded_while_output_is_drained(own_daemon):
    """With stop_on_output_limit = false the daemon reads on past the cap and drops the bytes: a run writing as fast
    as it can for seconds must not grow the daemon."""
    d = own_daemon("[sandbox]\nstop_on_output_limit = false")
    proc = psutil.Process(d.proc.pid)
    with d.client() as c:
        c.run("print(1)")
        rss_before = proc.memory_info().rss
        r = attack(c, "while True: os.write(1, b'm' * (1 << 20))", output=CAP, wall_time=3, memory=256 << 20)
        rss_after = proc.memory_info().rss
    assert r.outcome == "timeout" and r.stdout_truncated and len(r.stdout) == CAP, r
    assert r.stdout_bytes > 50 * CAP, r.stdout_bytes          # the run really did write far past the cap
    assert rss_after - rss_before < 32 << 20, (rss_before, rss_after)


def test_slow_client_does_not_grow_the_daemon(daemon):
    """A client that does not read: the bounded queue stops pulling from the pipes and the script blocks on
    write; the daemon does not buffer the flood."""
    proc = psutil.Process(daemon.proc.pid)
    rss_before = proc.memory_info().rss
    with daemon.client() as c:
        events = c.execute(script("while True: os.write(1, b's' * (1 << 20))"), output=16 << 20, wall_time=3)
        next(events)                                  # started
        import time
        time.sleep(2)                                 # nobody reads
        rss_during = proc.memory_info().rss
        rest = list(events)
    assert rss_during - rss_before < 48 << 20, (rss_before, rss_during)
    assert rest[-1].outcome in ("timeout", "output_limit"), rest[-1]


def test_escape_sequences_and_fake_log_lines_stay_data(daemon, sandbox):
    """Output that looks like terminal control or like the daemon's own log lines is delivered byte for byte and
    appears in neither the daemon's log nor the run's record (which keeps hashes of the output). The marker is
    assembled at run time, so only the output can carry it (the record keeps the script itself)."""
    marker = f"FAKE-{uuid.uuid4().hex}"
    payload = (f"\x1b[2J\x1b[H\x1b]0;{marker}\x07\r\n"
               f"2026-01-01 00:00:00,000 ERROR sandboxd.service: {marker} run escaped, daemon compromised\n"
               f'{{"ts":"2026","level":"ERROR","logger":"sandboxd","msg":"{marker}"}}\n').encode() + b"\xff\xfe\x00"
    env_marker = f"FAKE-{uuid.uuid4().hex}"
    r = attack(sandbox, f"""
        payload = {payload[::-1]!r}[::-1]
        sys.stdout.buffer.write(payload); sys.stdout.flush()
        sys.stderr.buffer.write(payload); sys.stderr.flush()
    """, env={"APP_NOTE": env_marker + "\n2026-01-01 00:00:00,000 ERROR sandboxd: fake"},
               args=[env_marker + "\n2026-01-01 00:00:00,000 ERROR sandboxd: fake", "\x1b[2J"])
    assert (r.outcome, r.exit_code) == ("exited", 0), r
    assert r.stdout == payload and r.stderr == payload
    log = daemon.log()
    assert marker not in log and env_marker not in log
    rec = record(sandbox, r.run_id)
    assert marker not in json.dumps(rec), "the run's output leaked into its record"
    assert rec["stdout_sha256"] == hashlib.sha256(payload).hexdigest()


def test_refused_requests_cannot_forge_log_lines(daemon, sandbox):
    """Names the daemon does log (refusals quote the offending value) are escaped: a runner name carrying a
    newline and a fake log line yields one log line, not two."""
    from sandboxd.client import SandboxdError
    marker = f"FAKE-{uuid.uuid4().hex}"
    with pytest.raises(SandboxdError) as e:
        sandbox.run("print(1)", runner=f"python\n2026-01-01 00:00:00,000 ERROR sandboxd: {marker}")
    assert e.value.code == "INVALID_ARGUMENT"
    lines = [line for line in daemon.log().splitlines() if marker in line]
    assert lines and all(re.search(r"refused|rejected", line) for line in lines), lines
    still_serves(sandbox)


CLOSED = [
    ("close-then-spin", "os.close(1); os.close(2)\nwhile True: pass"),
    ("devnull-then-sleep", "fd = os.open('/dev/null', os.O_WRONLY)\nos.dup2(fd, 1); os.dup2(fd, 2)\ntime.sleep(60)"),
    ("close-then-children-sleep",
     "os.close(1); os.close(2)\nfor _ in range(3):\n    if os.fork() == 0: break\ntime.sleep(60)"),
]


@pytest.mark.parametrize("code", [c[1] for c in CLOSED], ids=[c[0] for c in CLOSED])
def test_closed_streams_do_not_stop_the_wall_clock(sandbox, code):
    r = attack(sandbox, code, wall_time=2)
    assert r.outcome == "timeout" and 2 <= r.wall_time < 4, r
