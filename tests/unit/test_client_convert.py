"""The clients' pure parts: wire conversion shared by sandboxd.client and sandboxd.aio, and sandboxctl's
argument handling for sessions. No daemon: the behaviour against a real one is tests/integration/."""
from __future__ import annotations

import hashlib
import io

import pytest

from sandboxd import _convert as c
from sandboxd.cli import ctl, sessions
from sandboxd.client import CodeRun, ExecResult, FileError, SandboxdError
from sandboxd.v1 import sandbox_pb2 as pb


@pytest.mark.parametrize("arg,expected", [
    ("s-1a2b:data.csv", ("s-1a2b", "data.csv")),
    ("abc:out/report.txt", ("abc", "out/report.txt")),
    ("abc:", ("abc", "")),
    ("abc:/work/x", ("abc", "/work/x")),
    ("data.csv", (None, "data.csv")),
    ("./a:b", (None, "./a:b")),           # a local name with a colon
    ("/tmp/a:b", (None, "/tmp/a:b")),
    ("dir/a:b", (None, "dir/a:b")),
    (":x", (None, ":x")),
    ("-", (None, "-")),
])
def test_parse_location(arg, expected):
    assert sessions.parse_location(arg) == expected


def test_local_target_puts_a_file_into_a_directory(tmp_path):
    assert sessions.local_target(str(tmp_path), "r.txt") == str(tmp_path / "r.txt")
    assert sessions.local_target(str(tmp_path / "new.txt"), "r.txt") == str(tmp_path / "new.txt")
    assert sessions.local_target("somewhere/", "r.txt") == "somewhere/r.txt"
    with pytest.raises(sessions.Refused):
        sessions._basename("out/..")


def test_exec_argv_after_double_dash_keeps_its_options(monkeypatch):
    seen = []
    monkeypatch.setattr(sessions, "add_parsers", _recording(sessions.add_parsers, seen))
    for argv in (["exec", "S1", "--cwd", "sub", "--env", "A=1", "-i", "--", "wc", "-l", "--cwd", "data.csv"],
                 ["exec", "--cwd", "sub", "--env", "A=1", "-i", "S1", "--", "wc", "-l", "--cwd", "data.csv"]):
        assert ctl.main(argv) == 0
    assert len(seen) == 2
    for args in seen:
        assert (args.session, args.argv, args.cwd, args.env, args.interactive) == (
            "S1", ["wc", "-l", "--cwd", "data.csv"], "sub", ["A=1"], True)
    assert sessions._env(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    with pytest.raises(sessions.Refused):
        sessions._env(["novalue"])


def _recording(add_parsers, seen):
    """add_parsers with exec's command replaced by one that records its parsed arguments."""
    def add(sub):
        add_parsers(sub)
        sub.choices["exec"].set_defaults(fn=lambda args: seen.append(args) or 0)
    return add


def test_exec_start_argv_or_shell():
    argv = c.exec_start("s", ["wc", "-l", "f"], cwd="d", env={"A": "1"}, timeout=2, stdin=b"in", close_stdin=True)
    assert argv.WhichOneof("msg") == "start"
    assert (list(argv.start.argv), argv.start.shell, argv.start.stdin, argv.start.close_stdin) == (
        ["wc", "-l", "f"], "", b"in", True)
    shell = c.exec_start("s", "echo $HOME | wc -c", tty=True, rows=24, cols=80)
    assert (list(shell.start.argv), shell.start.shell) == ([], "echo $HOME | wc -c")
    assert (shell.start.window.rows, shell.start.window.cols) == (24, 80)
    for bad in ([], ""):
        with pytest.raises(ValueError):
            c.exec_start("s", bad)
    with pytest.raises(TypeError):
        c.exec_start("s", b"echo")


class _Reads(io.BytesIO):
    """A file object that counts the largest read asked of it."""
    largest = 0

    def read(self, n=-1):
        self.largest = max(self.largest, n)
        return super().read(n)


def test_put_requests_stream_each_file_in_chunks():
    big = bytes(range(256)) * (3 * c.CHUNK // 256 + 7)
    src = _Reads(big)
    msgs = list(c.put_requests("s1", {"a/big.bin": src, "t.txt": "héllo", "empty": b""}, mode=0o600))
    assert src.largest == c.CHUNK            # never read whole
    heads = [m for m in msgs if m.path]
    assert [(m.path, m.mode) for m in heads] == [("a/big.bin", 0o600), ("t.txt", 0o600), ("empty", 0o600)]
    assert msgs[0].session_id == "s1" and all(not m.session_id for m in msgs[1:])
    assert all(len(m.data) <= c.CHUNK for m in msgs)
    i = msgs.index(heads[1])
    assert b"".join(m.data for m in msgs[:i]) == big
    assert msgs[i].data == "héllo".encode()
    assert list(c.put_requests("s1", {})) == [pb.PutFilesRequest(session_id="s1")]


def test_import_requests_name_the_session_and_path_once():
    msgs = list(c.import_requests("s1", b"x" * (c.CHUNK + 1), "dst"))
    assert [(m.session_id, m.path, len(m.data)) for m in msgs] == [("s1", "dst", c.CHUNK), ("", "", 1)]


def _chunks(path, data, *, split=3, sha=None):
    yield pb.GetFilesChunk(path=path, size=len(data), mode=0o644)
    for i in range(0, len(data), split):
        yield pb.GetFilesChunk(data=data[i:i + split])
    yield pb.GetFilesChunk(eof=True, sha256=sha if sha is not None else hashlib.sha256(data).hexdigest())


def test_file_receiver_splits_files_and_checks_their_hash():
    sinks = {}
    r = c.FileReceiver(lambda p: sinks.setdefault(p, io.BytesIO()))
    stream = [*_chunks("a", b"hello world"), pb.GetFilesChunk(path="gone", error="not_found", message="no"),
              *_chunks("b", b"xyz", sha="0" * 64), pb.GetFilesChunk(path="one", data=b"1", eof=True)]
    done = [d for chunk in stream if (d := r.feed(chunk)) is not None]
    r.finish()
    assert [(p, e.error if e else None) for p, e in done] == [("a", None), ("gone", "not_found"), ("b", "other"),
                                                              ("one", None)]
    assert done[1][1].code == "NOT_FOUND" and done[2][1].code == "DATA_LOSS"
    assert sinks["a"].getvalue() == b"hello world" and sinks["one"].getvalue() == b"1"


def test_file_receiver_refuses_a_cut_stream():
    r = c.FileReceiver(lambda p: io.BytesIO())
    r.feed(pb.GetFilesChunk(path="a", data=b"part"))
    with pytest.raises(SandboxdError) as e:
        r.finish()
    assert e.value.code == "DATA_LOSS"


def test_file_receiver_error_part_way_reports_the_path():
    r = c.FileReceiver(lambda p: io.BytesIO())
    assert r.feed(pb.GetFilesChunk(path="grow", data=b"abc")) is None
    path, err = r.feed(pb.GetFilesChunk(error="too_large", message="grew past 64 MiB"))
    assert (path, err.error, err.code) == ("grow", "too_large", "OUT_OF_RANGE")


@pytest.mark.parametrize("code,message,error", [
    ("NOT_FOUND", "x: no such file", "not_found"),
    ("PERMISSION_DENIED", "x: denied", "permission_denied"),
    ("ALREADY_EXISTS", "x: exists", "already_exists"),
    ("INVALID_ARGUMENT", "path escapes", "invalid_path"),
    ("OUT_OF_RANGE", "past the limit", "too_large"),
    ("FAILED_PRECONDITION", "x: Is a directory", "is_directory"),
    ("FAILED_PRECONDITION", "x: not a directory", "not_a_directory"),
])
def test_single_path_statuses_become_file_errors(code, message, error):
    e = c.path_error(SandboxdError(code, message), "x")
    assert isinstance(e, FileError) and (e.path, e.error, e.code) == ("x", error, code)


@pytest.mark.parametrize("code,message,error", [
    ("NOT_FOUND", "not_found: x: no such file", "not_found"),
    ("RESOURCE_EXHAUSTED", "too_large: x: 70 MiB is past the 64 MiB transfer limit", "too_large"),
    ("FAILED_PRECONDITION", "is_directory: x: is a directory", "is_directory"),
])
def test_the_daemons_worded_file_statuses_name_their_error(code, message, error):
    e = c.path_error(SandboxdError(code, message), "x")
    assert isinstance(e, FileError) and (e.error, e.code) == (error, code) and e.detail == message.split(": ", 1)[1]


@pytest.mark.parametrize("code,message", [
    ("UNAVAILABLE", "m"), ("UNAUTHENTICATED", "m"), ("RESOURCE_EXHAUSTED", "overloaded"), ("INTERNAL", "m"),
    ("NOT_FOUND", "session 'abc' ended at 2026-11-30T08:32:29Z: closed"),   # the session, not the path
])
def test_other_statuses_stay_sandboxd_errors(code, message):
    e = c.path_error(SandboxdError(code, message), "x")
    assert type(e) is SandboxdError and e.code == code


def test_session_info_names_the_state():
    msg = pb.Session(session_id="s1", runner="python", principal="uid:0", state=pb.SESSION_STATE_BUSY,
                     limits=pb.Limits(memory_bytes=1 << 28), contexts=["default", "b"], idle_timeout_seconds=60)
    info = c.session_info(msg)
    assert (info.id, info.state, info.limits["memory"], info.contexts, info.idle_timeout) == (
        "s1", "busy", 1 << 28, ("default", "b"), 60)
    assert {f.name for f in pb.Session.DESCRIPTOR.fields} - {"session_id", "idle_timeout_seconds",
                                                             "max_lifetime_seconds"} <= set(info.__dataclass_fields__)
    assert sessions.session_view(info)["id"] == "s1"


def test_result_carries_collected_files():
    r = c.result(pb.Result(run_id="r", outcome=pb.OUTCOME_EXITED, files_truncated=True,
                           files=[pb.CollectedFile(path="out/a.txt", size=2, data=b"hi")]))
    assert (r.outcome, r.files, r.files_truncated) == ("exited", {"out/a.txt": b"hi"}, True)


def test_code_collector_builds_the_cell():
    col = c.CodeCollector()
    events = [pb.RunCodeEvent(started=pb.Started(run_id="k1")),
              pb.RunCodeEvent(stdout=pb.OutputChunk(data="é".encode()[:1])),
              pb.RunCodeEvent(stdout=pb.OutputChunk(data="é\n".encode()[1:])),
              pb.RunCodeEvent(result=pb.MimeBundle(data={"text/plain": "fig"}, kind="display_data")),
              pb.RunCodeEvent(result=pb.MimeBundle(data={"text/plain": "2", "text/html": "<b>2</b>"},
                                                   kind="execute_result")),
              pb.RunCodeEvent(done=pb.CodeResult(call_id="k1", outcome=pb.OUTCOME_EXITED, execution_count=3))]
    for e in events:
        col.add(c.code_event(e))
    run = col.code_run()
    assert (run.stdout, run.text, run.execution_count, run.ok) == ("é\n", "2", 3, True)
    assert run.results == [{"text/plain": "fig"}, {"text/plain": "2", "text/html": "<b>2</b>"}]
    err = c.code_event(pb.RunCodeEvent(error=pb.CodeError(name="ZeroDivisionError", value="division by zero",
                                                          traceback=["Traceback", "  line 1"])))
    col.add(err)
    assert col.code_run().error == err and not col.code_run().ok
    only_display = CodeRun("k", "exited", "", "", [{"text/plain": "x"}], None, 1, False, 0, "",
                           result_kinds=("display_data",))
    assert only_display.text == ""


def _exec(outcome, exit_code=0, signal=0):
    return ExecResult("c", outcome, exit_code, signal, b"", b"", 0, 0, 0, False, False, "")


@pytest.mark.parametrize("result,status", [
    (_exec("exited", 3), 3), (_exec("timeout"), 124), (_exec("signaled", signal=9), 137),
    (_exec("memory_limit", signal=9), 137), (_exec("setup_failed"), 125), (_exec("cancelled"), 125),
])
def test_exec_exit_status_follows_run(result, status):
    assert ctl.exit_status(result) == status


@pytest.mark.parametrize("outcome,error,status", [
    ("exited", False, 0), ("exited", True, 1), ("timeout", False, 124), ("memory_limit", True, 137),
    ("cancelled", False, 125), ("interrupted", False, 125),
])
def test_code_exit_status(outcome, error, status):
    done = c.CodeResult("k", outcome, 1, 0, "", False, 0, 0, False, False, error)
    assert sessions.code_exit_status(done) == status


def test_cp_needs_exactly_one_session_side(capsys):
    assert ctl.main(["--target", "unix:///nonexistent.sock", "cp", "a", "b"]) == 125
    assert ctl.main(["--target", "unix:///nonexistent.sock", "cp", "s1:a", "s2:b"]) == 125
    assert capsys.readouterr().err.count("exactly one of SRC and DST") == 2


def test_the_async_client_mirrors_every_public_call_of_the_sync_client():
    import inspect

    from sandboxd import aio, client

    def public(cls):
        return {n for n, _ in inspect.getmembers(cls, inspect.isfunction) if not n.startswith("_")}
    for sync, asynchronous in ((client.Client, aio.AsyncClient), (client.Session, aio.AsyncSession),
                               (client.Process, aio.AsyncProcess)):
        assert public(sync) <= public(asynchronous), (sync.__name__, public(sync) - public(asynchronous))
