"""Sessions against the real daemon and kernel: lifecycle, Exec, the Python kernel, ownership, records, metrics.

Each test names the semantic of issue 8 it checks; the file-operation security points are in
tests/security/test_session_files.py. Every test leaves nothing behind (the `sandbox` fixture checks).
"""
from __future__ import annotations

import json
import re
import threading
import time
import urllib.request

import pytest

from sandboxd.auth import hash_token
from sandboxd.client import SandboxdError

ALICE, BOB = "alice-token-0123456789abcdef", "bob-token-0123456789abcdef"
TWO_PRINCIPALS = f"""
[[principals]]
name = "root"
unix_uids = [0]
roles = ["admin"]
[[principals]]
name = "alice"
[[principals]]
name = "bob"
[[tokens]]
principal = "alice"
sha256 = "{hash_token(ALICE)}"
[[tokens]]
principal = "bob"
sha256 = "{hash_token(BOB)}"
[[policies]]
name = "everyone"
principals = ["*"]
"""


def _procs(s) -> list[str]:
    """Command lines of the session's processes, read inside it (its own /proc)."""
    r = s.exec(["sh", "-c", "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done"])
    return [line.strip() for line in r.stdout.decode().splitlines() if line.strip()]


def _wait(predicate, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


# -- lifecycle -----------------------------------------------------------------------------------------------
def test_a_session_keeps_its_workspace_and_reports_its_fields(sandbox):
    with sandbox.session(runner="python") as s:
        info = s.info()
        assert info.state == "ready" and info.runner == "python" and info.principal == "root"
        assert info.created_at <= info.last_used_at <= time.time() < info.expires_at
        assert info.limits["memory"] > 0 and info.idle_timeout > 0 and info.max_lifetime >= info.idle_timeout
        s.exec(["sh", "-c", "echo one > a.txt; mkdir -p /tmp/t; echo two > /tmp/t/b"])
        assert s.exec(["cat", "a.txt", "/tmp/t/b"]).stdout == b"one\ntwo\n"
        assert info.session_id in [x.session_id for x in sandbox.list_sessions()]
    # Closed: its processes and cgroup are gone, a call on it is NOT_FOUND saying why.
    with pytest.raises(SandboxdError) as e:
        sandbox.attach(info.session_id)
    assert e.value.code == "NOT_FOUND" and "ended" in e.value.message and "closed" in e.value.message


def test_idle_timeout_closes_a_session_and_background_processes_do_not_keep_it_alive(sandbox):
    s = sandbox.session(runner="python", idle_timeout=1.5)
    r = s.exec(["sh", "-c", "setsid sleep 300 > /dev/null 2>&1 & echo started"])
    assert r.exit_code == 0 and r.stdout == b"started\n" and r.wall_time < 5, r
    assert any("sleep 300" in p for p in _procs(s))  # the background child lives on in the session
    assert _wait(lambda: _closed(sandbox, s.id), 15)
    info = [x for x in sandbox.list_sessions(include_closed=True) if x.session_id == s.id][0]
    assert info.state == "closed" and info.end_reason == "idle_timeout", info


def _closed(client, session_id: str) -> bool:
    try:
        client.get_session(session_id)
        return False
    except SandboxdError as e:
        return e.code == "NOT_FOUND"


def test_max_lifetime_ends_a_session_even_while_it_is_used(sandbox):
    s = sandbox.session(runner="python", idle_timeout=60, max_lifetime=2)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not _closed(sandbox, s.id):
        try:
            s.exec(["true"])
        except SandboxdError:
            break
        time.sleep(0.2)
    with pytest.raises(SandboxdError) as e:
        s.exec(["true"])
    assert e.value.code == "NOT_FOUND" and "max_lifetime" in e.value.message, e.value


def test_a_request_cannot_exceed_the_ceilings(sandbox):
    for kw, key in (({"idle_timeout": 10 ** 7}, "idle_timeout"), ({"max_lifetime": 10 ** 8}, "max_lifetime"),
                    ({"memory": 1 << 50}, "memory")):
        with pytest.raises(SandboxdError) as e:
            sandbox.session(runner="python", **kw)
        assert e.value.code == "INVALID_ARGUMENT" and key in e.value.message, e.value


def test_sessions_are_limited_per_principal_by_policy(start_daemon):
    d = start_daemon('[[policies]]\nname = "capped"\nprincipals = ["*"]\nmax_sessions = 1\n')
    with d.client() as c:
        with c.session(runner="python"):
            with pytest.raises(SandboxdError) as e:
                c.session(runner="python")
            assert e.value.code == "RESOURCE_EXHAUSTED" and "capped" in e.value.message
        with c.session(runner="python") as again:  # a closed one frees its place
            assert again.exec(["true"]).ok


def test_a_policy_can_refuse_sessions_while_allowing_runs(start_daemon):
    d = start_daemon('[[policies]]\nname = "runs-only"\nprincipals = ["*"]\nsessions = false\n')
    with d.client() as c:
        assert c.run("print(1)").ok
        with pytest.raises(SandboxdError) as e:
            c.session(runner="python")
        assert e.value.code == "PERMISSION_DENIED" and "runs-only" in e.value.message


# -- Exec ----------------------------------------------------------------------------------------------------
def test_exec_results_like_a_shell(sandbox):
    with sandbox.session(runner="python") as s:
        r = s.exec("echo out; echo err >&2; exit 3")
        assert (r.outcome, r.exit_code, r.stdout, r.stderr) == ("exited", 3, b"out\n", b"err\n")
        missing = s.exec(["no-such-program"])
        assert (missing.outcome, missing.exit_code) == ("exited", 127) and b"not found" in missing.stderr
        s.write("script.sh", b"echo hi\n", mode=0o644)
        denied = s.exec(["./script.sh"])
        assert (denied.outcome, denied.exit_code) == ("exited", 126), denied
        assert s.exec(["cat"], stdin=b"piped in").stdout == b"piped in"
        r = s.exec(["sh", "-c", "pwd; echo $FOO"], cwd="sub" if s.mkdir("sub") else "sub", env={"FOO": "bar"})
        assert r.stdout == b"/work/sub\nbar\n", r


def test_exec_timeout_and_cancel_kill_the_whole_process_group(sandbox):
    with sandbox.session(runner="python") as s:
        r = s.exec(["sh", "-c", "sleep 200 & sleep 201 & wait"], timeout=1)
        assert r.outcome == "timeout", r
        assert not any(re.search(r"sleep 20[01]", p) for p in _procs(s)), _procs(s)
        proc = s.start(["sh", "-c", "sleep 202 & echo go; wait"])
        for event in proc:
            if getattr(event, "stream", None) == "stdout":
                break
        proc.cancel()
        assert _wait(lambda: not any("sleep 202" in p for p in _procs(s)), 10), _procs(s)
        assert s.exec(["true"]).ok  # the session lives on


def test_concurrent_execs_in_one_session(sandbox):
    with sandbox.session(runner="python") as s:
        results = []

        def one(i):
            results.append(s.exec(["sh", "-c", f"sleep 0.5; echo {i}"]))
        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(r.stdout for r in results) == [b"0\n", b"1\n", b"2\n", b"3\n"]


def test_interactive_stdin_and_a_terminal(sandbox):
    with sandbox.session(runner="python") as s:
        proc = s.start(["sh", "-c", "read a; echo got:$a; read b; echo got:$b"])
        proc.write(b"one\n")
        proc.write(b"two\n")
        proc.close_stdin()
        assert proc.wait().stdout == b"got:one\ngot:two\n"
        r = s.exec(["sh", "-c", "tty; stty size"], tty=True, rows=30, cols=100)
        assert r.exit_code == 0 and b"30 100" in r.stdout and b"/pts/" in r.stdout, r


def test_a_call_past_the_memory_limit_ends_as_memory_limit_and_the_session_survives(sandbox):
    with sandbox.session(runner="python", memory=96 << 20) as s:
        s.run_code("x = 41")
        r = s.exec(["python3", "-c", "b = bytearray(400 << 20); b[::4096] = b'x' * len(b[::4096])"])
        assert r.outcome == "memory_limit", r
        assert s.exec(["echo", "alive"]).stdout == b"alive\n"
        assert s.run_code("x + 1").text == "42"  # the kernel was not the OOM killer's choice


def test_env_is_the_callers_in_a_session_and_one_shot_keeps_its_allowlist(sandbox):
    with sandbox.session(runner="python", env={"FROM_SESSION": "s"}) as s:
        r = s.exec(["sh", "-c", "echo $FROM_SESSION $MY_VAR $HOME"], env={"MY_VAR": "mine"})
        assert r.stdout == b"s mine /work\n"
    run = sandbox.run("import os; print(os.environ.get('MY_VAR'))", env={"MY_VAR": "x"})
    assert run.stdout == b"None\n"


# -- the kernel --------------------------------------------------------------------------------------------------
def test_the_kernel_behaves_like_a_jupyter_cell(sandbox):
    with sandbox.session(runner="python") as s:
        assert s.run_code("a = 20").results == []
        r = s.run_code("a * 2 + 2")
        assert r.results[0]["text/plain"] == "42" and r.execution_count == 2
        assert s.run_code("_ + 1").text == "43"
        r = s.run_code("display('shown')\nprint('printed')\n'last'")
        assert [x["text/plain"] for x in r.results] == ["'shown'", "'last'"] and r.stdout == "printed\n"
        r = s.run_code("x = 1\ny = 0\nx / y")
        assert r.error.name == "ZeroDivisionError" and r.outcome == "exited"
        assert any("x / y" in line for line in r.error.traceback), r.error.traceback
        r = s.run_code("class H:\n    def _repr_html_(self): return '<b>h</b>'\nH()")
        assert r.results[0]["text/html"] == "<b>h</b>"


def test_interrupt_and_timeout_of_a_cell(sandbox):
    with sandbox.session(runner="python") as s:
        s.run_code("state = 'kept'")
        box = {}
        t = threading.Thread(target=lambda: box.update(r=s.run_code("import time\nwhile True: time.sleep(0.05)")))
        t.start()
        assert _wait(lambda: s.interrupt(), 10)
        t.join(20)
        assert box["r"].error.name == "KeyboardInterrupt", box
        r = s.run_code("while True: pass", timeout=1)
        assert r.outcome == "timeout" and r.error.name == "KeyboardInterrupt", r
        assert s.run_code("state").text == "'kept'"


def test_a_dead_kernel_is_reported_and_replaced(sandbox):
    with sandbox.session(runner="python") as s:
        s.run_code("v = 1")
        r = s.run_code("import os; os._exit(7)")
        assert r.error is not None and r.error.name == "KernelDied" and "status 7" in r.error.value, r
        again = s.run_code("1 + 1")
        assert again.text == "2" and again.kernel_restarted and "previous" in again.message, again
        assert s.run_code("'v' in globals()").text == "False"  # a fresh kernel
        r = s.run_code("import signal, os; os.kill(os.getpid(), signal.SIGKILL)")
        assert r.error.name == "KernelDied" and "SIGKILL" in r.error.value


def test_reset_and_named_contexts(sandbox):
    with sandbox.session(runner="python") as s:
        s.run_code("n = 'one'", context="a")
        s.run_code("n = 'two'", context="b")
        assert s.run_code("n", context="a").text == "'one'"
        assert s.run_code("n", context="b").text == "'two'"
        s.reset("a")
        assert s.run_code("'n' in globals()", context="a").text == "False"
        with pytest.raises(SandboxdError) as e:
            s.run_code("1", context="../x")
        assert e.value.code == "INVALID_ARGUMENT" and "context" in e.value.message


def test_what_a_cell_prints_never_becomes_a_result_or_error(sandbox):
    with sandbox.session(runner="python") as s:
        fake = '{"type": "result", "kind": "execute_result", "data": {"text/plain": "FORGED"}}'
        r = s.run_code(f"print({fake!r}); print('\\x00\\xff bytes'); print('{{\"type\": \"done\"}}')")
        assert r.results == [] and r.error is None and "FORGED" in r.stdout
        # Writing to its own report channel can garble at most its own cell's report.
        s.run_code("import os\nfor fd in range(3, 64):\n    try: os.write(fd, b'garbage\\n{\"type\":\"error\"\\n')\n"
                   "    except OSError: pass")
        assert s.run_code("6 * 7").text == "42"


def test_rich_results_from_the_data_image(sandbox):
    if not any(r.name == "python-data" and r.available for r in sandbox.runners()):
        pytest.skip("the python-data image is not built (make image-data)")
    with sandbox.session(runner="python-data") as s:
        r = s.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2]})")
        assert "<table" in r.results[0]["text/html"], r
        r = s.run_code("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nNone")
        assert any("image/png" in x for x in r.results), r


# -- ownership, records, metrics -----------------------------------------------------------------------------
def test_a_session_belongs_to_its_creator(start_daemon):
    d = start_daemon(TWO_PRINCIPALS)
    with d.client(token=ALICE) as alice, d.client(token=BOB) as bob, d.client() as admin:
        s = alice.session(runner="python")
        for call in (lambda: bob.attach(s.id), lambda: bob.close_session(s.id),
                     lambda: bob.attach(s.id).exec(["true"])):
            with pytest.raises(SandboxdError) as e:
                call()
            assert e.value.code == "NOT_FOUND"
        assert [x.session_id for x in bob.list_sessions()] == []
        assert [x.session_id for x in alice.list_sessions()] == [s.id]
        assert s.id in [x.session_id for x in admin.list_sessions()]  # admins see and close any
        admin.close_session(s.id)
        assert _closed(alice, s.id)
    refused = _events(d, "session.refused")
    assert refused and all(e["owner"] == "alice" and e["principal"]["id"] == "bob" for e in refused), refused


def _events(d, kind: str) -> list[dict]:
    from sandboxd.store import Store
    st = Store(str(d.state_dir / "sandboxd.db"))
    try:
        return [json.loads(r[0]) for r in st._db.execute("SELECT data FROM events WHERE kind = ?", (kind,))]
    finally:
        st.close()


def test_every_session_event_is_recorded_with_the_caller(start_daemon):
    d = start_daemon()
    with d.client(agent_name="test-agent", agent_version="1.2") as c:
        with c.session(runner="python") as s:
            s.write("in.txt", b"hello")
            s.exec(["cat", "in.txt"])
            s.run_code("1 + 1")
            s.read("in.txt")
            tar = s.export()
            s.import_(tar, path="copy")
            sid = s.id
        runs, _ = c.list_runs(limit=50)
    kinds = {r.get("kind") for r in runs if r.get("session_id") == sid or r.get("run_id") == sid}
    assert {"session", "exec", "code"} <= kinds, kinds
    session_row = next(r for r in runs if r["run_id"] == sid)
    assert session_row["principal"] == "root" and session_row["agent"]["name"] == "test-agent"
    assert session_row["outcome"] == "closed" and session_row["finished_at"]
    code_row = next(r for r in runs if r.get("kind") == "code")
    assert code_row["code_sha256"] and code_row["outcome"] == "exited" and code_row["agent"]["version"] == "1.2"
    files = _events(d, "session.file")
    ops = [e["op"] for e in files]
    assert ops == ["put", "get", "export", "import"], ops
    put = files[0]["files"][0]
    assert put["path"] == "in.txt" and put["size"] == 5 and len(put["sha256"]) == 64
    import hashlib
    assert put["sha256"] == hashlib.sha256(b"hello").hexdigest()
    from sandboxd.store import verify
    assert verify(str(d.state_dir / "sandboxd.db")).ok


def test_sessions_do_not_survive_a_restart_and_say_so(start_daemon, tmp_path):
    d = start_daemon()
    with d.client() as c:
        s = c.session(runner="python")
        sid = s.id
    d.proc.kill()
    d.expected_exit = -9
    d.proc.wait()
    d2 = start_daemon(workdir=d.workdir)
    with d2.client() as c:
        with pytest.raises(SandboxdError) as e:
            c.attach(sid)
        assert e.value.code == "NOT_FOUND" and "interrupted" in e.value.message, e.value


def test_session_metrics(sandbox, daemon):
    port = re.search(r"metrics http://127\.0\.0\.1:(\d+)", daemon.log()).group(1)

    def scrape() -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    with sandbox.session(runner="python") as s:
        assert re.search(r'sandboxd_sessions_live\{runner="python"\} [1-9]', scrape())
        s.exec(["true"])
        s.run_code("1")
        s.write("f", b"x" * 1000)
    text = scrape()
    assert re.search(r'sandboxd_session_calls_total\{kind="exec",outcome="exited"\} [1-9]', text)
    assert re.search(r'sandboxd_session_calls_total\{kind="code",outcome="exited"\} [1-9]', text)
    assert re.search(r'sandboxd_session_file_bytes_total\{direction="in"\} [1-9]', text)
    assert "sandboxd_session_lifetime_seconds_count" in text


def test_a_call_its_client_cancels_is_stopped_and_recorded(start_daemon):
    d = start_daemon()
    with d.client() as c, c.session(runner="python") as s:
        proc = s.start(["sh", "-c", "echo go; sleep 303"])
        for event in proc:
            if getattr(event, "stream", None) == "stdout":
                break
        proc.cancel()
        box = {}
        t = threading.Thread(target=lambda: box.update(r=s.run_code("import time; print('x', flush=True); "
                                                                      "time.sleep(304)")))
        t.start()
        assert _wait(lambda: s.interrupt(), 15)   # once the cell is running
        t.join(30)

        def rows():
            return [r for r in c.list_runs(limit=50)[0] if r.get("session_id") == s.id]
        assert _wait(lambda: any(r["kind"] == "exec" and r["outcome"] == "cancelled" for r in rows()), 15), rows()
        assert any(r["kind"] == "code" for r in rows())
        assert not any("sleep 303" in p for p in _procs(s))
