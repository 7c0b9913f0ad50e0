"""Sessions as a user drives them: issue 8's "What a user does" with sandboxctl and sandboxd.client, the same
from a second client (attach) and from sandboxd.aio, and Execute's collect_files. Real daemon, real kernel."""
from __future__ import annotations

import asyncio
import io
import json
import os
import pathlib
import subprocess
import sys
import tarfile
import threading

import pytest

from sandboxd.aio import AsyncClient
from sandboxd.client import FileError, Output, RichResult, SandboxdError

ROOT = pathlib.Path(__file__).resolve().parents[2]


def ctl(daemon, *args, stdin: str = "", cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sandboxd.cli.ctl", "--target", daemon.target, *args],
                          input=stdin, capture_output=True, text=True, timeout=120, cwd=cwd or ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture
def session_id(daemon, sandbox):
    """A session made by `sandboxctl session create`, closed after the test whatever happened."""
    p = ctl(daemon, "session", "create", "--runner", "python")
    assert p.returncode == 0, p.stderr
    sid = p.stdout.splitlines()[0]
    assert sid and sid == sid.strip()
    yield sid
    try:
        sandbox.close_session(sid)
    except SandboxdError as e:
        assert e.code == "NOT_FOUND"


# ---- sandboxctl ---------------------------------------------------------------------------------------------

def test_sandboxctl_workflow_of_the_issue(daemon, session_id, tmp_path):
    sid = session_id
    (tmp_path / "data.csv").write_text("a,b\n1,2\n")
    p = ctl(daemon, "cp", "data.csv", f"{sid}:data.csv", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    p = ctl(daemon, "exec", sid, "--", "wc", "-l", "data.csv")
    assert (p.returncode, p.stdout.split()) == (0, ["2", "data.csv"]), p.stderr
    p = ctl(daemon, "code", sid, "-", stdin='import csv; rows = list(csv.reader(open("data.csv")))\n')
    assert (p.returncode, p.stdout) == (0, ""), p.stderr
    p = ctl(daemon, "code", sid, "-", stdin="len(rows)\n")
    assert (p.returncode, p.stdout) == (0, "2\n"), p.stderr
    p = ctl(daemon, "exec", sid, "--", "sh", "-c", "mkdir -p out && echo 'two rows' > out/report.txt")
    assert p.returncode == 0, p.stderr
    p = ctl(daemon, "cp", f"{sid}:out/report.txt", ".", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "report.txt").read_text() == "two rows\n"
    p = ctl(daemon, "session", "list")
    assert p.returncode == 0 and sid in p.stdout
    p = ctl(daemon, "session", "close", sid)
    assert p.returncode == 0, p.stderr
    assert sid not in ctl(daemon, "session", "list").stdout
    p = ctl(daemon, "exec", sid, "--", "true")
    assert p.returncode == 125 and len(p.stderr.strip().splitlines()) == 1 and "not_found" in p.stderr


def test_session_create_json_show_and_list_all(daemon, sandbox):
    p = ctl(daemon, "session", "create", "--runner", "python", "--json", "--memory", "128MiB",
            "--idle-timeout", "300")
    assert p.returncode == 0, p.stderr
    created = json.loads(p.stdout)
    sid = created["id"]
    try:
        assert (created["runner"], created["state"], created["limits"]["memory"]) == ("python", "ready", 128 << 20)
        assert 0 < created["idle_timeout"] <= 300
        shown = json.loads(ctl(daemon, "session", "show", sid, "--json").stdout)
        assert (shown["id"], shown["principal"]) == (sid, created["principal"])
        listed = json.loads(ctl(daemon, "session", "list", "--json").stdout)["sessions"]
        assert sid in [s["id"] for s in listed]
    finally:
        assert ctl(daemon, "session", "close", sid).returncode == 0
    closed = json.loads(ctl(daemon, "session", "list", "--all", "--json").stdout)["sessions"]
    [mine] = [s for s in closed if s["id"] == sid]
    assert (mine["state"], mine["end_reason"]) == ("closed", "closed")
    assert ctl(daemon, "session", "show", sid).returncode == 125


@pytest.mark.parametrize("argv,status", [
    (["sh", "-c", "exit 3"], 3),
    (["sh", "-c", "kill -SEGV $$"], 128 + 11),
    (["--timeout", "1", "--", "sleep", "30"], 124),
    (["no-such-program"], 127),
])
def test_exec_exit_status_follows_run(daemon, session_id, argv, status):
    args = argv if argv[0] == "--timeout" else ["--", *argv]
    p = ctl(daemon, "exec", session_id, *args)
    assert p.returncode == status, (p.stdout, p.stderr)


def test_exec_options_stdin_and_shell_string(daemon, session_id):
    p = ctl(daemon, "exec", session_id, "-i", "--", "wc", "-c", stdin="12345")
    assert (p.returncode, p.stdout.strip()) == (0, "5"), p.stderr
    p = ctl(daemon, "exec", session_id, "--cwd", "sub", "--env", "GREETING=hi", "-c", "pwd; echo $GREETING")
    assert p.returncode != 0  # no such directory yet
    ctl(daemon, "exec", session_id, "--", "mkdir", "sub")
    p = ctl(daemon, "exec", session_id, "--cwd", "sub", "--env", "GREETING=hi", "-c", "pwd; echo $GREETING")
    assert (p.returncode, p.stdout) == (0, "/work/sub\nhi\n"), p.stderr


def test_code_error_goes_to_stderr_and_exits_1(daemon, session_id):
    p = ctl(daemon, "code", session_id, "-", stdin="print('before')\n1/0\n")
    assert p.returncode == 1
    assert p.stdout == "before\n" and "ZeroDivisionError" in p.stderr
    p = ctl(daemon, "code", session_id, "--json", "-", stdin="x = 5\nx * 2\n")
    out = json.loads(p.stdout)
    assert p.returncode == 0 and out["results"][0]["data"]["text/plain"] == "10" and out["error"] is None


def test_cp_round_trips_bytes_and_directories(daemon, session_id, tmp_path):
    blob = os.urandom(3 << 20)  # several chunks
    (tmp_path / "blob.bin").write_bytes(blob)
    assert ctl(daemon, "cp", str(tmp_path / "blob.bin"), f"{session_id}:in/").returncode == 0
    assert ctl(daemon, "cp", f"{session_id}:in/blob.bin", str(tmp_path / "back.bin")).returncode == 0
    assert (tmp_path / "back.bin").read_bytes() == blob
    p = ctl(daemon, "cp", f"{session_id}:in/missing", str(tmp_path))
    assert p.returncode == 125 and "not_found" in p.stderr and not (tmp_path / "missing").exists()
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "sub" / "f.txt").write_text("deep\n")
    assert ctl(daemon, "cp", "-r", str(tmp_path / "tree"), f"{session_id}:").returncode == 0
    p = ctl(daemon, "exec", session_id, "--", "cat", "tree/sub/f.txt")
    assert p.stdout == "deep\n", p.stderr
    assert ctl(daemon, "cp", "-r", f"{session_id}:tree", str(tmp_path / "copy")).returncode == 0
    assert (tmp_path / "copy" / "sub" / "f.txt").read_text() == "deep\n"


# ---- the Python client --------------------------------------------------------------------------------------

def test_python_example_of_the_issue(sandbox):
    with sandbox.session(runner="python") as s:
        s.write("data.csv", b"a,b\n1,2\n")
        r = s.exec(["sh", "-c", "wc -l data.csv"])
        assert (r.outcome, r.exit_code, r.stdout, r.stderr, r.ok) == ("exited", 0, b"2 data.csv\n", b"", True)
        s.run_code("import csv; rows = list(csv.reader(open('data.csv')))")
        r = s.run_code("len(rows)")
        assert r.results[0]["text/plain"] == "2" and r.text == "2" and r.error is None
        assert s.read("data.csv") == b"a,b\n1,2\n"
        assert "data.csv" in [f.name for f in s.list(".")]
        s.remove("data.csv")
        with pytest.raises(FileError) as e:
            s.read("data.csv")
        assert (e.value.path, e.value.error) == ("data.csv", "not_found")
    with pytest.raises(SandboxdError) as e:
        sandbox.get_session(s.id)
    assert e.value.code == "NOT_FOUND"
    [closed] = [i for i in sandbox.list_sessions(include_closed=True) if i.id == s.id]
    assert (closed.state, closed.end_reason) == ("closed", "closed")


def test_session_calls(sandbox):
    with sandbox.session(runner="python", files={"seed.txt": "seed"}, env={"FROM_SESSION": "yes"}) as s:
        assert s.info().state in ("ready", "busy") and s.info().runner == "python"
        assert s.exec("cat seed.txt; echo \" $FROM_SESSION\"").text == "seed yes\n"   # a str runs with sh -c
        assert s.exec(["cat"], stdin=b"piped").stdout == b"piped"
        r = s.exec(["sh", "-c", "echo out; echo err >&2; exit 4"])
        assert (r.stdout, r.stderr, r.exit_code, r.ok) == (b"out\n", b"err\n", 4, False)
        with s.start(["cat"]) as p:                                  # interactive stdin
            p.write(b"one ")
            p.write("two")
            p.close_stdin()
            assert p.wait().stdout == b"one two"
        s.mkdir("a/b", parents=True)
        with pytest.raises(FileError) as e:
            s.mkdir("a/b")
        assert e.value.error == "already_exists"
        assert s.stat("a/b").type == "directory"
        big = os.urandom((2 << 20) + 3)
        assert s.write("a/b/big.bin", io.BytesIO(big)).size == len(big)
        sink = io.BytesIO()
        assert s.read_to("a/b/big.bin", sink) == len(big) and sink.getvalue() == big
        got = s.read_files(["seed.txt", "nope.txt"])
        assert got["seed.txt"] == b"seed" and isinstance(got["nope.txt"], FileError)
        results = s.write_files({"ok.txt": b"x", "a/b": b"not a file"})
        assert [r.ok for r in results] == [True, False]
        with pytest.raises(FileError):
            s.remove("a")                                           # a directory, without recursive
        s.remove("a", recursive=True)
        tar = s.export()
        assert "seed.txt" in [os.path.basename(n) for n in tarfile.open(fileobj=io.BytesIO(tar)).getnames()]
    with sandbox.session(runner="python", workspace_tar=io.BytesIO(tar)) as restored:
        assert restored.read("seed.txt") == b"seed"


def test_code_cells_stream_interrupt_and_reset(sandbox):
    with sandbox.session(runner="python") as s:
        events = list(s.run_code_stream("print('a', flush=True)\n40 + 2"))
        assert b"".join(e.data for e in events if isinstance(e, Output)) == b"a\n"   # chunks may split
        assert [e.data["text/plain"] for e in events if isinstance(e, RichResult)] == ["42"]
        r = s.run_code("undefined_name")
        assert r.error.name == "NameError" and not r.ok
        s.run_code("y = 1", context="other")
        assert s.run_code("y", context="other").text == "1"
        assert s.run_code("'y' in dir()").text == "False"            # contexts are apart
        done = []
        cell = threading.Thread(target=lambda: done.append(s.run_code("import time; time.sleep(60)")))
        cell.start()
        while not s.interrupt():                                      # until the cell is running
            pass
        cell.join()
        assert done[0].error.name == "KeyboardInterrupt"
        s.reset("other")
        assert s.run_code("y", context="other").error.name == "NameError"


def test_attach_from_a_second_client(daemon, sandbox):
    with pytest.raises(SandboxdError) as e:
        sandbox.attach("no-such-session")
    assert e.value.code == "NOT_FOUND"
    with sandbox.session(runner="python") as s, daemon.client() as other:
        s.run_code("x = 41")
        t = other.attach(s.id)
        assert t.id == s.id and t.run_code("x + 1").text == "42"
        t.write("from_other.txt", "hi")
        assert s.read("from_other.txt") == b"hi"
        s.close()
        with pytest.raises(SandboxdError) as e:
            t.read("from_other.txt")             # the session ended: not a FileError about the path
        assert e.value.code == "NOT_FOUND" and not isinstance(e.value, FileError)
    with pytest.raises(SandboxdError) as e:
        sandbox.attach(s.id)
    assert e.value.code == "NOT_FOUND"


def test_aio_client_does_the_same(daemon, sandbox):
    async def main():
        async with AsyncClient(daemon.target) as c:
            assert (await c.run("print(6 * 7)")).stdout == b"42\n"
            assert "python" in [r.name for r in await c.runners()]
            async with c.session(runner="python") as s:
                await s.write("data.csv", b"a,b\n1,2\n")
                r = await s.exec(["sh", "-c", "wc -l data.csv"])
                assert (r.exit_code, r.stdout) == (0, b"2 data.csv\n")
                await s.run_code("import csv; rows = list(csv.reader(open('data.csv')))")
                assert (await s.run_code("len(rows)")).results[0]["text/plain"] == "2"
                assert await s.read("data.csv") == b"a,b\n1,2\n"
                assert "data.csv" in [f.name for f in await s.list(".")]
                p = await s.start(["cat"])
                await p.write(b"async")
                await p.close_stdin()
                assert (await p.wait()).stdout == b"async"
                same = await c.attach(s.id)                       # not `async with`: that would close it
                assert (await same.run_code("rows[1]")).text == "['1', '2']"
                await s.remove("data.csv")
                with pytest.raises(FileError):
                    await s.read("data.csv")
            sid = s.id
            assert sid not in [i.id for i in await c.list_sessions()]
            with pytest.raises(SandboxdError) as e:
                await c.attach(sid)
            assert e.value.code == "NOT_FOUND"
    asyncio.run(main())


# ---- Execute's collect_files ----------------------------------------------------------------------------------

def test_execute_collects_files(sandbox):
    code = ("import os\nos.makedirs('/work/out/deep')\nopen('/work/out/a.txt', 'w').write('A')\n"
            "open('/work/out/deep/b.png', 'wb').write(b'\\x89PNG')\nopen('/work/skip.txt', 'w').write('no')\n")
    r = sandbox.run(code, collect_files=["out/*.txt", "**/*.png"])
    assert r.ok, r.stderr
    assert r.files == {"out/a.txt": b"A", "out/deep/b.png": b"\x89PNG"} and not r.files_truncated
    assert sandbox.run("print(1)", collect_files=["*.none"]).files == {}
