"""sandboxctl as a user runs it: exit statuses, --json, stdin, runner by extension, runners listing."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def ctl(daemon, *args, stdin: str = "", env_target: bool = True):
    env = {**os.environ, "SANDBOXD_TARGET": daemon.target} if env_target else dict(os.environ)
    return subprocess.run([sys.executable, "-m", "sandboxd.cli.ctl", *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=60, cwd=ROOT)


def test_run_example_streams_and_exits_zero(daemon):
    p = ctl(daemon, "run", "examples/hello.py")
    assert p.returncode == 0, p.stderr
    assert "hello from sandbox" in p.stdout and p.stdout.rstrip().endswith("done")


def test_run_from_stdin(daemon):
    p = ctl(daemon, "run", "--runner", "python", "-", stdin="print(sum(range(10)))")
    assert (p.returncode, p.stdout) == (0, "45\n")


def test_target_flag(daemon):
    p = ctl(daemon, "--target", daemon.target, "run", "-", stdin="print('t')", env_target=False)
    assert (p.returncode, p.stdout) == (0, "t\n")


@pytest.mark.parametrize("code,status", [
    ("import sys; sys.exit(3)", 3),
    ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", 128 + 11),
    ("import time; time.sleep(10)", 124),
])
def test_exit_status(daemon, code, status):
    p = ctl(daemon, "run", "--timeout", "1", "-", stdin=code)
    assert p.returncode == status, (p.stdout, p.stderr)


def test_refused_run_is_125_with_one_line_reason(daemon):
    p = ctl(daemon, "run", "--runner", "nope", "-", stdin="x")
    assert p.returncode == 125
    assert len(p.stderr.strip().splitlines()) == 1 and "nope" in p.stderr


def test_memory_flag_and_memory_limit_outcome(daemon):
    p = ctl(daemon, "run", "--memory", "48MiB", "--json", "-", stdin="b = bytearray(200 << 20)")
    out = json.loads(p.stdout)
    assert out["outcome"] == "memory_limit" and p.returncode == 128 + 9


def test_json_output(daemon, tmp_path):
    script = tmp_path / "s.sh"
    script.write_text("echo out; echo err >&2; exit 4\n")
    p = ctl(daemon, "run", "--json", str(script))  # .sh -> the sh runner
    out = json.loads(p.stdout)
    assert p.returncode == 4
    assert {"run_id", "outcome", "exit_code", "signal", "stdout", "stderr", "stdout_truncated", "stderr_truncated",
            "duration_ms", "cpu_ms", "peak_memory_bytes"} <= set(out)
    assert (out["outcome"], out["exit_code"], out["stdout"], out["stderr"]) == ("exited", 4, "out\n", "err\n")


def test_unreachable_daemon_is_125(tmp_path):
    p = subprocess.run([sys.executable, "-m", "sandboxd.cli.ctl", "--target", f"unix://{tmp_path}/none.sock", "run",
                        "-"], input="print(1)", capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 125 and "unavailable" in p.stderr


def test_runners_listing(daemon):
    p = ctl(daemon, "runners")
    assert p.returncode == 0
    assert "python" in p.stdout and "/usr/bin/python3" in p.stdout


def test_run_help_says_limits_may_be_raised_up_to_the_maximum():
    """The help must say what the planner does: --timeout and --memory may go above the runner's default."""
    out = subprocess.run([sys.executable, "-m", "sandboxd.cli.ctl", "run", "--help"], capture_output=True,
                         text=True, check=True).stdout
    flat = " ".join(out.split())
    assert "only lower" not in flat
    assert flat.count("may be raised up to the runner's and your policy's maximum") == 2
