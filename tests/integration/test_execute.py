"""The Execute contract through a real daemon: event order, streaming, results, concurrency, ListRunners."""
from __future__ import annotations

import threading

import grpc
import pytest

from sandboxd.client import Output, Result, Started
from sandboxd.v1 import sandbox_pb2 as pb
from sandboxd.v1 import sandbox_pb2_grpc as pb_grpc

pytestmark = pytest.mark.cgroup2


def test_events_are_started_then_output_then_one_result(sandbox):
    events = list(sandbox.execute("import sys\nprint('out')\nprint('err', file=sys.stderr)\nsys.exit(7)"))
    assert isinstance(events[0], Started) and events[0].run_id
    assert isinstance(events[-1], Result)
    assert sum(isinstance(e, Result) for e in events) == 1
    out = b"".join(e.data for e in events if isinstance(e, Output) and e.stream == "stdout")
    err = b"".join(e.data for e in events if isinstance(e, Output) and e.stream == "stderr")
    assert (out, err) == (b"out\n", b"err\n")
    r = events[-1]
    assert (r.outcome, r.exit_code, r.signal) == ("exited", 7, 0)
    assert r.run_id == events[0].run_id
    assert r.stdout_bytes == 4 and r.stderr_bytes == 4
    assert r.cpu_time > 0 and r.wall_time > 0 and r.peak_memory > 1 << 20


def test_raw_grpc_oneof_is_named_event(daemon):
    with grpc.insecure_channel(daemon.target) as ch:
        events = list(pb_grpc.SandboxStub(ch).Execute(pb.ExecuteRequest(runner="sh", code="echo hi")))
    assert [e.WhichOneof("event") for e in events] == ["started", "stdout", "result"]
    assert events[-1].result.outcome == pb.OUTCOME_EXITED


def test_output_streams_while_the_script_runs(sandbox):
    """The first line arrives while the script is still blocked: the script waits forever after printing, so
    receiving the line at all proves it was streamed, and closing the stream cancels the run."""
    events = sandbox.execute("import time\nprint('first', flush=True)\ntime.sleep(60)", wall_time=60)
    assert isinstance(next(events), Started)
    got = b""
    while got != b"first\n":  # python -u writes "first" and "\n" separately: one or two chunks
        event = next(events)
        assert isinstance(event, Output) and event.stream == "stdout", event
        got += event.data
    events.close()  # cancels the RPC; the daemon must stop the run (checked by the sandbox fixture)


def test_stdin_args_env_and_files(sandbox):
    code = ("import sys, os\nprint(sys.stdin.read().upper())\nprint(sys.argv[1:])\n"
            "print(os.environ.get('APP_MODE'), os.environ.get('SECRET'))\nprint(open('data/in.txt').read())")
    r = sandbox.run(code, args=["a", "b c"], stdin=b"hello", env={"APP_MODE": "test", "SECRET": "x"},
                    files={"data/in.txt": b"file content"})
    assert r.outcome == "exited", r
    assert r.stdout.decode().splitlines() == ["HELLO", "['a', 'b c']", "test None", "file content"]


def test_environment_is_built_from_scratch(sandbox):
    r = sandbox.run("import os\nprint(sorted(os.environ))")
    names = eval(r.stdout)
    assert set(names) <= {"PATH", "HOME", "LANG", "TMPDIR", "PYTHONDONTWRITEBYTECODE", "LC_CTYPE"}
    assert "SANDBOXD_TARGET" not in names and "VIRTUAL_ENV" not in names


def test_runners_listed(sandbox):
    runners = {r.name: r for r in sandbox.runners()}
    assert {"python", "bash", "sh"} <= set(runners)
    assert runners["python"].available and "py" in runners["python"].extensions
    assert runners["python"].default_limits["memory"] <= runners["python"].max_limits["memory"]


@pytest.mark.parametrize("runner,code,expected", [
    ("bash", "echo $((6*7)) | tr 4 x; echo ${BASH_VERSINFO[0]} >/dev/null", b"x2\n"),
    ("sh", "printf '%s\\n' sh-ok", b"sh-ok\n"),
])
def test_shell_runners(sandbox, runner, code, expected):
    r = sandbox.run(code, runner)
    assert (r.outcome, r.stdout) == ("exited", expected), r


def test_node_runner_when_present(sandbox):
    node = {r.name: r for r in sandbox.runners()}.get("node")
    if node is None or not node.available:
        pytest.skip("no node in the host image")
    r = sandbox.run("console.log([1,2,3].map(x => x * 2).join(','))", "node")
    assert (r.outcome, r.stdout) == ("exited", b"2,4,6\n"), r


def test_concurrent_runs_get_distinct_uids(sandbox):
    results = []

    def one():
        results.append(sandbox.run("import os, time\ntime.sleep(0.5)\nprint(os.getuid())"))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    uids = [int(r.stdout) for r in results]
    assert all(r.outcome == "exited" for r in results)
    assert len(set(uids)) == 4 and min(uids) >= 1000


def test_nothing_persists_between_runs(sandbox):
    first = sandbox.run("open('/tmp/mark', 'w').write('x'); open('/work/mark', 'w').write('x'); print('ok')")
    assert first.stdout == b"ok\n"
    second = sandbox.run("import os\nprint(os.path.exists('/tmp/mark'), os.path.exists('/work/mark'))")
    assert second.stdout == b"False False\n"
