"""File operations on a session happen inside its sandbox, with its own credentials: what issue 8's security
section asks, each point against the real daemon and kernel.

The attack is always the same shape: the session's own code plants something in its workspace (a symlink, a
hard link, a FIFO, a growing file, a crafted tar), then the client asks the daemon to read, write, list or
unpack there. The daemon must answer with the sandbox's own view or a clear error, never host data, never
hang, never write outside the sandbox, and keep serving.
"""
from __future__ import annotations

import io
import tarfile
import threading
import time

import pytest

from sandboxd.client import FileError, SandboxdError

from conftest import still_serves

SHADOW = "/etc/shadow"


@pytest.fixture
def session(daemon):
    with daemon.client() as c:
        with c.session(runner="python") as s:
            yield s
        still_serves(c)
    assert not daemon.wait_no_leftovers()


def _host(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("target", [SHADOW, "/etc/passwd", "/proc/1/root/etc/shadow", "/proc/self/root/etc/shadow",
                                    "../../../../etc/shadow", "/proc/1/environ", "/proc/self/cwd/../../etc/shadow"])
def test_a_planted_symlink_never_yields_host_data(session, target):
    session.exec(["ln", "-s", target, "link"])
    try:
        data = session.read("link")
    except FileError as e:
        assert e.error in ("not_found", "invalid_path", "permission_denied", "other"), e
        return
    # Only the sandbox's own view may come back: its generated /etc/passwd, never the host's files.
    assert data != _host("/etc/passwd") and data != _host(SHADOW)
    assert target.endswith("passwd") and b"sandbox:x:" in data, (target, data[:200])


def test_an_absolute_symlink_resolves_inside_the_sandbox(session):
    session.write("real.txt", b"inside")
    session.exec(["ln", "-s", "/work/real.txt", "abs-link"])
    assert session.read("abs-link") == b"inside"
    # Writing through it writes the sandbox's file, as the session's user would.
    session.write("abs-link", b"changed")
    assert session.exec(["cat", "real.txt"]).stdout == b"changed"


@pytest.mark.parametrize("target", ["/etc/passwd", "/usr/bin/python3", "/proc/1/root/tmp/x"])
def test_writing_through_a_symlink_cannot_leave_the_workspace(session, target):
    before = _host("/etc/passwd")
    session.exec(["ln", "-s", target, "out"])
    with pytest.raises(FileError) as e:
        session.write("out", b"pwned")
    assert e.value.error in ("permission_denied", "invalid_path", "not_found"), e.value
    assert _host("/etc/passwd") == before


def test_a_read_only_file_is_refused_as_it_would_be_inside(session):
    session.write("ro.txt", b"keep")
    session.exec(["chmod", "0444", "ro.txt"])
    with pytest.raises(FileError) as e:
        session.write("ro.txt", b"x")
    assert e.value.error == "permission_denied"
    assert session.read("ro.txt") == b"keep"


def test_a_hard_link_to_a_host_file_cannot_be_planted(session):
    r = session.exec(["ln", "/etc/passwd", "hard"])
    assert r.exit_code != 0  # another filesystem (EXDEV) or refused: the workspace is its own tmpfs
    with pytest.raises(FileError):
        session.read("hard")


def test_a_fifo_where_a_file_is_expected_does_not_hang_the_daemon(session):
    session.exec(["mkfifo", "pipe"])
    start = time.monotonic()
    with pytest.raises(FileError) as e:
        session.read("pipe")
    assert e.value.error == "other" and time.monotonic() - start < 10
    with pytest.raises(FileError):
        session.write("pipe", b"x")
    assert time.monotonic() - start < 20
    assert [f.type for f in session.list() if f.name == "pipe"] == ["fifo"]


def test_a_file_larger_than_the_transfer_limit_is_too_large_never_short(own_daemon):
    d = own_daemon("[sessions]\ntransfer_limit = \"1MiB\"\n")
    with d.client() as c, c.session(runner="python") as s:
        s.exec(["sh", "-c", "head -c 2000000 /dev/zero > big"])
        with pytest.raises(FileError) as e:
            s.read("big")
        assert e.value.error == "too_large"
        with pytest.raises(FileError) as e:
            s.write("up", b"x" * (3 << 20))
        assert e.value.error == "too_large"
        assert "up" not in [f.name for f in s.list()]  # no partial file left


def test_a_file_growing_while_read_is_cut_consistently_or_too_large(own_daemon):
    d = own_daemon("[sessions]\ntransfer_limit = \"1MiB\"\n")
    with d.client() as c, c.session(runner="python") as s:
        s.exec(["sh", "-c", "(while true; do head -c 65536 /dev/zero >> grow; done) >/dev/null 2>&1 &"])
        seen = []
        for _ in range(20):
            try:
                data = s.read("grow")
                seen.append(len(data))
                assert len(data) <= 1 << 20
            except FileError as e:
                assert e.error == "too_large", e
                break
        else:
            pytest.fail(f"the file never passed the limit: {seen}")


def test_another_sessions_workspace_and_processes_are_out_of_reach(daemon):
    with daemon.client() as c, c.session(runner="python") as a, c.session(runner="python") as b:
        a.write("secret.txt", b"only-a")
        a.exec(["sh", "-c", "sleep 300 >/dev/null 2>&1 &"])
        procs = b.exec(["sh", "-c", "ls /proc | grep -E '^[0-9]+$' | wc -l"]).stdout
        assert int(procs) <= 4, procs  # its own shell, ls, grep, wc
        r = b.exec(["sh", "-c", "cat /work/secret.txt; grep -rl only-a /proc/*/root/work 2>/dev/null; "
                                "kill -9 -1; echo done"])
        assert b"only-a" not in r.stdout and b"done" in r.stdout
        assert a.read("secret.txt") == b"only-a"
        one_shot = c.run("import glob; print(glob.glob('/proc/*/root/work/*'), open('/work/main.py').read()[:5])")
        assert b"secret" not in one_shot.stdout


def _tar(members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for info, data in members:
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _member(name, kind=tarfile.REGTYPE, data=b"x", link=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, (data if kind == tarfile.REGTYPE else None)


@pytest.mark.parametrize("member,what", [
    (_member("/tmp/abs.txt"), "absolute"),
    (_member("../escape.txt"), ".."),
    (_member("a/../../escape.txt"), ".."),
    (_member("evil", tarfile.SYMTYPE, link="/etc"), "link"),
    (_member("evil2", tarfile.SYMTYPE, link="../../etc"), "link"),
    (_member("hl", tarfile.LNKTYPE, link="../outside"), "link"),
    (_member("dev", tarfile.CHRTYPE), "device"),
    (_member("fifo", tarfile.FIFOTYPE), "FIFO"),
], ids=["absolute", "dotdot", "nested-dotdot", "symlink-abs", "symlink-up", "hardlink-up", "chardev", "fifo"])
def test_a_bad_tar_is_refused_naming_the_problem(session, member, what):
    with pytest.raises(SandboxdError) as e:
        session.import_(_tar([_member("fine.txt", data=b"ok"), member]), path="dest")
    assert e.value.code == "INVALID_ARGUMENT" and what in e.value.message, e.value
    listing = session.exec(["sh", "-c", "ls -a /tmp /work; ls -R /work"]).stdout
    assert b"escape" not in listing and b"abs.txt" not in listing


def test_a_tar_bomb_stops_at_the_workspace_size(own_daemon):
    d = own_daemon()
    with d.client() as c, c.session(runner="python", memory=256 << 20) as s:
        size = s.info().limits.get("work_size") or (64 << 20)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as t:
            for i in range(3):
                info = tarfile.TarInfo(f"big{i}")
                info.size = 40 << 20
                t.addfile(info, io.BytesIO(b"\0" * info.size))
        with pytest.raises(SandboxdError) as e:
            s.import_(buf.getvalue())
        assert e.value.code in ("RESOURCE_EXHAUSTED", "FAILED_PRECONDITION"), e.value
        assert s.exec(["true"]).ok  # the session and the daemon serve on
        assert size


@pytest.mark.parametrize("path", ["a\0b", "x" * 300, ""])
def test_malformed_paths_are_invalid(session, path):
    with pytest.raises(SandboxdError) as e:
        session.write(path, b"x") if path else session.read(path)
    assert isinstance(e.value, FileError) or e.value.code == "INVALID_ARGUMENT", e.value


def test_unknown_and_closed_sessions_are_not_found(daemon):
    with daemon.client() as c:
        with pytest.raises(SandboxdError) as e:
            c.attach("0" * 28)
        assert e.value.code == "NOT_FOUND"
        s = c.session(runner="python")
        s.close()
        with pytest.raises(SandboxdError) as e:
            s.read("x")
        assert e.value.code == "NOT_FOUND" and "ended" in e.value.message


def test_concurrent_file_operations_keep_the_daemon_bounded(session):
    session.exec(["sh", "-c", "head -c 8000000 /dev/urandom > blob"])
    errors = []

    def read():
        try:
            assert len(session.read("blob")) == 8000000
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=read) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
