"""Configuration files as an operator meets them: `sandboxd check-config FILE` prints the effective
configuration of a good file and names the file and the key of a bad one in one line; `sandboxd serve` refuses
a bad file with status 2 before anything exists (no socket, no launcher, no cgroup)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, find_cgroup_dirs, procs_with_uids

ETC = ROOT / "etc" / "sandboxd.toml"


def sandboxd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sandboxd.cli.daemon", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def write(tmp_path, text: str, name: str = "sandboxd.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def assert_one_line_error(p: subprocess.CompletedProcess, code: int, path, key: str) -> str:
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    assert p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert str(path) in lines[0] and key in lines[0], lines[0]
    assert "Traceback" not in p.stderr
    return lines[0]


# -- check-config ----------------------------------------------------------------------------------------------
def test_check_config_prints_the_effective_configuration(tmp_path):
    path = write(tmp_path, '[server]\nlisten = ["unix:///run/sandboxd-test/x.sock"]\nshutdown_grace = "3s"\n'
                           '[admission]\nmax_queue = 7\n[limits.default]\nmemory = "128MiB"\nwall_time = "20s"\n')
    p = sandboxd("check-config", str(path))
    assert p.returncode == 0, p.stderr
    cfg = json.loads(p.stdout)
    assert cfg["source"] == str(path)
    assert cfg["server"]["listen"] == ["unix:///run/sandboxd-test/x.sock"] and cfg["server"]["shutdown_grace"] == 3
    assert cfg["admission"]["max_queue"] == 7 and cfg["admission"]["max_queue_wait"] == 30
    assert cfg["default_limits"]["memory"] == 128 << 20 and cfg["default_limits"]["wall_time"] == 20
    # Runners resolve against the file's defaults: sh sets no limits of its own, python sets 10s and 256MiB.
    assert cfg["runners"]["sh"]["limits"]["wall_time"] == 20 and cfg["runners"]["sh"]["limits"]["memory"] == 128 << 20
    assert cfg["runners"]["python"]["limits"]["wall_time"] == 10
    assert cfg["seccomp_profiles"]["default"] and len(cfg["config_sha256"]) == 64
    # Checking has no side effects: nothing was created where the file points.
    assert not os.path.exists("/run/sandboxd-test")


def test_check_config_of_the_shipped_example():
    if not ETC.exists():
        pytest.skip("etc/sandboxd.toml is not in the repository")
    p = sandboxd("check-config", str(ETC))
    assert p.returncode == 0, p.stderr
    cfg = json.loads(p.stdout)
    assert cfg["source"] == str(ETC) and cfg["runners"]


BAD = {
    "unknown key": ('[server]\nlisten_on = ["unix:///run/x.sock"]\n', "server.listen_on"),
    "unknown table": ("[sandbox]\nuid_start = 300000\n[limit.default]\nmemory = \"1MiB\"\n", "limit: unknown key"),
    "wrong type": ('[admission]\nmax_queue = "many"\n', "admission.max_queue"),
    "wrong type bool": ('[sandbox]\nstop_on_output_limit = "yes"\n', "sandbox.stop_on_output_limit"),
    "bad size": ('[limits.default]\nmemory = "lots"\n', "limits.default.memory"),
    "bad duration": ('[server]\nshutdown_grace = "soon"\n', "server.shutdown_grace"),
    "limit above max": ('[limits.max]\nmemory = "64MiB"\n[limits.default]\nmemory = "128MiB"\n',
                        "limits.default.memory"),
    "bad listen address": ('[server]\nlisten = ["unix://relative.sock"]\n', "server.listen"),
    "bad listen port": ('[server]\nlisten = ["localhost:99999"]\n', "server.listen"),
    "missing runners dir": ('[sandbox]\nrunners_dir = "/nonexistent/sandboxd-runners"\n', "sandbox.runners_dir"),
    "invalid toml": ('[server\nlisten = 1\n', "invalid TOML"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_check_config_names_the_file_and_key_of_an_error(tmp_path, case):
    text, key = BAD[case]
    path = write(tmp_path, text)
    assert_one_line_error(sandboxd("check-config", str(path)), 1, path, key)


def test_check_config_names_the_runner_file_and_key(tmp_path):
    runners = tmp_path / "runners"
    runners.mkdir()
    bad = runners / "py.toml"
    bad.write_text('name = "py"\ncommand = ["/usr/bin/python3", "{script}"]\nscript = "main.py"\n'
                   '[limits]\nwall_time = "1h"\n')
    path = write(tmp_path, f'[sandbox]\nrunners_dir = "{runners}"\n')
    assert_one_line_error(sandboxd("check-config", str(path)), 1, bad, "limits.wall_time")


def test_check_config_of_a_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    assert_one_line_error(sandboxd("check-config", str(path)), 1, path, "cannot read")


def test_check_config_refuses_a_tcp_listener_without_tls(tmp_path):
    # `serve` refuses it, so check-config must too: a file that checks clean must start.
    path = write(tmp_path, '[server]\nlisten = ["127.0.0.1:50051"]\n')
    assert_one_line_error(sandboxd("check-config", str(path)), 1, path, "server.listen")


# -- serve -------------------------------------------------------------------------------------------------------
def serve_config(tmp_path, extra: str = "", server_extra: str = "") -> tuple:
    """A config whose socket, state, runtime dir, cgroup parent and uids are this test's own."""
    name = f"sandboxd-cfgtest-{os.getpid()}"
    uid_start = 300000 + (os.getpid() % 500) * 64
    sock = tmp_path / "s.sock"
    path = write(tmp_path, f'[server]\nlisten = ["unix://{sock}"]\nstate_dir = "{tmp_path}/state"\n'
                           f'runtime_dir = "{tmp_path}/run"\nmetrics_listen = "off"\n{server_extra}'
                           f'[sandbox]\ncgroup_parent_name = "{name}"\nuid_start = {uid_start}\nuid_count = 16\n'
                           f'{extra}')
    return path, sock, name, uid_start


def assert_started_nothing(sock, name, uid_start) -> None:
    assert not os.path.exists(sock), "a refused configuration must not leave a socket"
    assert not find_cgroup_dirs(name), "a refused configuration must not leave a cgroup"
    assert not procs_with_uids(uid_start, uid_start + 16)


@pytest.mark.skipif(os.geteuid() != 0, reason="sandboxd serve needs root")
@pytest.mark.parametrize("case", ["unknown key", "wrong type", "bad size", "limit above max", "bad listen address"])
def test_serve_refuses_a_bad_file_with_status_2_and_starts_nothing(tmp_path, case):
    text, key = BAD[case]
    # The broken key goes into the file the daemon would otherwise accept.
    section, _, rest = text.partition("\n")
    base, sock, name, uid_start = serve_config(tmp_path)
    good = base.read_text()
    if section == "[server]":
        bad = good.replace("[server]\n", f"[server]\n{rest}", 1)
        if "listen =" in rest:
            bad = bad.replace(f'listen = ["unix://{sock}"]\n', "", 1)
    else:
        bad = good + text
    base.write_text(bad)
    p = sandboxd("serve", "--config", str(base))
    assert_one_line_error(p, 2, base, key)
    assert_started_nothing(sock, name, uid_start)


@pytest.mark.skipif(os.geteuid() != 0, reason="sandboxd serve needs root")
def test_serve_refuses_a_missing_runners_dir_with_status_2(tmp_path):
    path, sock, name, uid_start = serve_config(tmp_path, 'runners_dir = "/nonexistent/sandboxd-runners"\n')
    p = sandboxd("serve", "--config", str(path))
    assert p.returncode == 2, p.stderr
    errors = [line for line in p.stderr.splitlines() if "ERROR" in line or line.startswith("sandboxd:")]
    assert len(errors) == 1 and str(path) in errors[0] and "sandbox.runners_dir" in errors[0], p.stderr
    assert "Traceback" not in p.stderr
    assert_started_nothing(sock, name, uid_start)


@pytest.mark.skipif(os.geteuid() != 0, reason="sandboxd serve needs root")
def test_serve_refuses_a_tcp_listener_without_tls_with_status_2_and_leaves_nothing(tmp_path):
    path, sock, name, uid_start = serve_config(tmp_path)
    path.write_text(path.read_text().replace(f'listen = ["unix://{sock}"]', 'listen = ["127.0.0.1:0"]'))
    p = sandboxd("serve", "--config", str(path))
    assert p.returncode == 2, p.stderr
    assert "server.listen" in p.stderr and "127.0.0.1:0" in p.stderr and "Traceback" not in p.stderr
    assert_started_nothing(sock, name, uid_start)


# -- who owns what the daemon reads as root -------------------------------------------------------------------
def trusted_tree(tmp_path):
    """Copies of the shipped runners, images and seccomp profiles, owned by root with the usual modes."""
    import shutil
    for name in ("runners", "images"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("rootfs", ".cache", "*.lock"))
    shutil.copytree(ROOT / "sandboxd" / "seccomp", tmp_path / "seccomp")
    return (f'runners_dir = "{tmp_path}/runners"\nimages_dir = "{tmp_path}/images"\n'
            f'seccomp_dir = "{tmp_path}/seccomp"\n')


UNTRUSTED = {
    # what the test does to the copy -> the path the error must name
    "runners dir owned by nobody": (lambda t: os.chown(t / "runners", 65534, 65534), "runners"),
    "runner file world-writable": (lambda t: os.chmod(t / "runners" / "python.toml", 0o666), "runners/python.toml"),
    "runner file owned by nobody": (lambda t: os.chown(t / "runners" / "sh.toml", 65534, -1), "runners/sh.toml"),
    "images dir group-writable": (lambda t: os.chmod(t / "images", 0o775), "images"),
    "image dir owned by nobody": (lambda t: os.chown(t / "images" / "host", 65534, -1), "images/host"),
    "image definition world-writable": (lambda t: os.chmod(t / "images" / "host" / "image.toml", 0o646),
                                        "images/host/image.toml"),
    "seccomp dir world-writable": (lambda t: os.chmod(t / "seccomp", 0o757), "seccomp"),
    "seccomp profile owned by nobody": (lambda t: os.chown(t / "seccomp" / "default.toml", 65534, -1),
                                        "seccomp/default.toml"),
}


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_check_config_accepts_root_owned_copies(tmp_path):
    path = write(tmp_path, "[sandbox]\n" + trusted_tree(tmp_path))
    p = sandboxd("check-config", str(path))
    assert p.returncode == 0, p.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
@pytest.mark.parametrize("case", sorted(UNTRUSTED))
def test_check_config_refuses_what_a_non_root_user_can_change(tmp_path, case):
    sandbox = trusted_tree(tmp_path)
    change, named = UNTRUSTED[case]
    change(tmp_path)
    path = write(tmp_path, "[sandbox]\n" + sandbox)
    line = assert_one_line_error(sandboxd("check-config", str(path)), 1, tmp_path / named, "")
    assert f"{tmp_path / named}:" in line and ("not root" in line or "writable by its group or by others" in line)


@pytest.mark.skipif(os.geteuid() != 0, reason="sandboxd serve needs root")
def test_serve_refuses_a_runner_a_non_root_user_can_change_with_status_2(tmp_path):
    sandbox = trusted_tree(tmp_path)
    os.chmod(tmp_path / "runners" / "python.toml", 0o666)
    path, sock, name, uid_start = serve_config(tmp_path, sandbox)
    p = sandboxd("serve", "--config", str(path))
    assert p.returncode == 2, p.stderr
    assert f"{tmp_path}/runners/python.toml: runner definition is writable by its group or by others" in p.stderr
    assert "Traceback" not in p.stderr
    assert_started_nothing(sock, name, uid_start)
