"""sandboxd as a wheel: built with pip, installed into a fresh venv, serving a run from there.

An editable install reads runners/ and images/ from the source tree, so every other test would pass even if the
wheel lacked them. This one builds the wheel from a copy of the tree (with a stand-in for a built rootfs, which
must stay out of the wheel), installs it with its declared dependencies only, and runs a script through
`sandboxd serve` started from the venv's own entry point, on the private socket, state, runtime dir, cgroup
parent and uid range of conftest's Daemon.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT, Daemon, _check_stopped

# The source tree minus what a clone does not have (or must not ship): venvs, build outputs, generated stubs.
IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                "*_pb2*.py*", "rootfs", ".state", ".cache", "tests", "bench")


def _run(*argv, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=600, **kw)
    assert p.returncode == 0, f"{argv}: exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> pathlib.Path:
    if os.geteuid() != 0:
        pytest.skip("sandboxd tests need root")
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=IGNORE)
    fake_rootfs = src / "images" / "debian" / "rootfs" / "usr" / "bin"
    fake_rootfs.mkdir(parents=True)
    (fake_rootfs / "python3").write_text("not part of the package\n")
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp / "wheels", src)
    wheel = next((tmp / "wheels").glob("sandboxd-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    assert {"sandboxd/data/runners/python.toml", "sandboxd/data/images/debian/image.toml",
            "sandboxd/data/images/host/image.toml", "sandboxd/seccomp/default.toml",
            "sandboxd/v1/sandbox_pb2.py"} <= names, sorted(names)
    assert not [n for n in names if "/rootfs/" in n], "a built image's rootfs went into the wheel"
    _run(sys.executable, "-m", "venv", tmp / "venv")
    _run(tmp / "venv" / "bin" / "pip", "install", "-q", wheel)
    return tmp / "venv"


def test_declared_dependencies_are_the_runtime_ones(venv):
    """The venv holds the wheel and what it declares: no test-only or unused packages."""
    py = venv / "bin" / "python"
    where = _run(py, "-c", "import sandboxd; print(sandboxd.__file__)", cwd="/").stdout
    assert where.startswith(str(venv)), where
    for unused in ("psutil",):   # the tests' leftover checks only
        p = subprocess.run([py, "-c", f"import {unused}"], capture_output=True, cwd="/")
        assert p.returncode != 0, f"{unused} is installed as a dependency of sandboxd"
    # pyroute2 is a runtime dependency now: the launcher uses it for transparent egress (sandbox/egress.py).
    _run(py, "-c", "import sandboxd.sandbox.egress", cwd="/")


def test_serve_from_the_wheel_runs_a_script(venv, tmp_path):
    site = _run(venv / "bin" / "python", "-c", "import sandboxd, os; print(os.path.dirname(sandboxd.__file__))",
                cwd="/").stdout.strip()

    class WheelDaemon(Daemon):
        command = (str(venv / "bin" / "sandboxd"),)
        cwd = str(tmp_path)

    d = WheelDaemon(tmp_path)
    try:
        with d.client() as c:
            r = c.run("print(6 * 7)", runner="python", wall_time=10)
            assert (r.outcome, r.exit_code, r.stdout) == ("exited", 0, b"42\n"), r
            runners = {x.name: x for x in c.runners()}
        # The image definition came along, its rootfs did not: the runner is listed as unavailable.
        assert not runners["python-debian"].available
        assert f"{site}/data/images/debian/rootfs" in runners["python-debian"].unavailable_reason
        effective = json.loads(_run(venv / "bin" / "sandboxd", "check-config", d.config_path, cwd=tmp_path).stdout)
        assert effective["sandbox"]["runners_dir"] == f"{site}/data/runners"
        assert effective["sandbox"]["images_dir"] == f"{site}/data/images"
        assert effective["sandbox"]["seccomp_dir"] == f"{site}/seccomp"
    finally:
        _check_stopped(d)
