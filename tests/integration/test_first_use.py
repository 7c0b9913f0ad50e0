"""What a new user meets first: the CLIs in a pipeline, their tables and messages, the start-up log, the
effective configuration, and what a stopped daemon leaves in its runtime directory."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from sandboxd.cli.ctl import exit_status
from sandboxd.client import Result


def _cli(module: str, *args: str, env: dict | None = None, stdout=subprocess.PIPE, stdin: str = ""):
    return subprocess.run([sys.executable, "-m", module, *args], input=stdin, stdout=stdout,
                          stderr=subprocess.PIPE, text=True, timeout=60, cwd=ROOT, env={**os.environ, **(env or {})})


def ctl(daemon, *args: str, **kw):
    return _cli("sandboxd.cli.ctl", *args, env={"SANDBOXD_TARGET": daemon.target}, **kw)


def into_closed_pipe(module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command whose stdout is a pipe nobody reads any more, as in `... | head` after head exited."""
    r, w = os.pipe()
    os.close(r)
    try:
        return _cli(module, *args, env=env, stdout=w)
    finally:
        os.close(w)


def _runs_exist(daemon) -> None:
    with daemon.client() as c:
        for _ in range(2):
            assert c.run("print(1)").outcome == "exited"


def test_runs_list_into_a_closed_pipe_exits_quietly(daemon):
    _runs_exist(daemon)
    p = into_closed_pipe("sandboxd.cli.ctl", "runs", "list", env={"SANDBOXD_TARGET": daemon.target})
    assert (p.returncode, p.stderr) == (141, "")


def test_audit_export_into_a_closed_pipe_exits_quietly(daemon):
    _runs_exist(daemon)
    p = into_closed_pipe("sandboxd.cli.daemon", "audit", "export", "--state-dir", str(daemon.state_dir))
    assert p.returncode == 141 and "Traceback" not in p.stderr, p.stderr


def test_runs_list_columns_fit_their_longest_value(daemon):
    agent = "an-agent-with-a-rather-long-name"
    # A long runner name that is refused still gets a record (and a row in the list).
    assert ctl(daemon, "--agent-name", agent, "run", "--runner", "no-such-runner-long-name", "-",
               stdin="print(1)").returncode == 125
    assert ctl(daemon, "--agent-name", agent, "run", "-", stdin="print(1)").returncode == 0
    p = ctl(daemon, "runs", "list", "--agent", agent)
    assert p.returncode == 0, p.stderr
    header, *rows = p.stdout.splitlines()
    starts = [m.start() for m in re.finditer(r"\S+(?: \S+)*", header)]
    assert len(starts) == 6 and len(rows) == 2, p.stdout
    for row in rows:
        fields = [(m.start(), m.group()) for m in re.finditer(r"\S+", row)]
        assert [s for s, _ in fields] == starts, p.stdout  # every value starts under its own heading
        assert fields[3][1] == agent and fields[4][1] in ("python", "no-such-runner-long-name")


@pytest.mark.parametrize("outcome,signal,status", [
    ("memory_limit", 9, 137), ("memory_limit", 0, 137),     # killed by the OOM killer, or exited on MemoryError
    ("output_limit", 0, 153), ("output_limit", 9, 153),
    ("signaled", 11, 139), ("timeout", 9, 124), ("exited", 3, 3),
])
def test_each_limit_has_one_exit_status(outcome, signal, status):
    result = Result(run_id="r", outcome=outcome, exit_code=3 if outcome == "exited" else 0, signal=signal,
                    message="", wall_time=0, cpu_time=0, peak_memory=0, stdout_bytes=0, stderr_bytes=0,
                    stdout_truncated=False, stderr_truncated=False)
    assert exit_status(result) == status


def test_output_limit_exits_153_and_help_says_so(daemon):
    p = ctl(daemon, "run", "-", stdin="import sys\nsys.stdout.write('x' * (3 << 20))\n")
    assert p.returncode == 153 and "output_limit" in p.stderr, (p.returncode, p.stderr)
    help_text = " ".join(_cli("sandboxd.cli.ctl", "--help").stdout.split())
    assert "137 memory_limit" in help_text and "153 output_limit" in help_text


def test_run_without_a_file_names_only_what_is_missing():
    p = _cli("sandboxd.cli.ctl", "run")
    assert p.returncode == 2
    assert p.stderr.strip().endswith("the following arguments are required: FILE|-"), p.stderr


def test_runs_show_text_is_one_spelling_without_repeats(daemon):
    with daemon.client(agent_name="shower") as c:
        run_id = c.run("print(1)").run_id
    p = ctl(daemon, "runs", "show", run_id)
    assert p.returncode == 0, p.stderr
    view = dict(line.split(None, 1) if " " in line.strip() else (line.strip(), "")
                for line in p.stdout.splitlines())
    assert view["agent.name"] == "shower" and view["peer.uid"] == "0"
    assert "agent_name" not in view and "agent_version" not in view and "agent" not in view
    assert view["outcome"] == "exited" and view["stdout_truncated"] == "false"
    python_spellings = [k for k, v in view.items() if re.search(r"\bNone\b|\bTrue\b|\bFalse\b|'", v)]
    assert not python_spellings, p.stdout


def test_check_config_prints_modes_in_octal(tmp_path):
    path = tmp_path / "sandboxd.toml"
    path.write_text('[server]\nsocket_mode = "0640"\n')
    p = _cli("sandboxd.cli.daemon", "check-config", str(path))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["server"]["socket_mode"] == "0640"


def test_start_up_logs_one_line_about_syscalls_libseccomp_does_not_know(daemon):
    lines = [line for line in daemon.log().splitlines() if "libseccomp" in line]
    assert len(lines) <= 1, lines


def test_a_stopped_daemon_leaves_no_runtime_directories(start_daemon):
    d = start_daemon()
    with d.client() as c:
        assert c.run("print(1)").outcome == "exited"
    assert {"private", "root"} <= set(os.listdir(d.runtime_dir))
    assert d.stop() == 0
    assert not {"private", "root"} & set(os.listdir(d.runtime_dir)), os.listdir(d.runtime_dir)
