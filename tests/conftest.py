"""Shared fixtures: a real sandboxd on a private socket, state dir, runtime dir, cgroup parent and uid range.

Every daemon started here is stopped by pid (SIGTERM, then SIGKILL) and checked for leftovers: no run cgroup,
no process of its uid range. Tests never touch processes or cgroups they did not create.
"""
from __future__ import annotations

import itertools
import os
import re
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
_counter = itertools.count()


def find_cgroup_dirs(name: str, root: str = "/sys/fs/cgroup", depth: int = 6) -> list[str]:
    found = []
    base = root.rstrip("/").count("/")
    for dirpath, dirnames, _ in os.walk(root):
        if dirpath.count("/") - base >= depth:
            dirnames[:] = []
            continue
        for d in dirnames:
            if d == name:
                found.append(os.path.join(dirpath, d))
    return found


def procs_with_uids(lo: int, hi: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["uids"]):
        try:
            if p.info["uids"] and lo <= p.info["uids"].real < hi:
                out.append(p)
        except psutil.Error:
            pass
    return out


def _pool_cgroup(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            m = re.search(r"^0::(.*/run-pool-[^/\n]+)$", f.read(), re.M)
    except OSError:
        return None
    return m.group(1) if m else None


def waiting_in_pool(p: psutil.Process) -> bool:
    """A prestarted interpreter in a pooled sandbox (sandbox/child.py, _prestart), starting up or waiting for
    its script, not a run's leftover: a process of a run uid in a run-pool-* cgroup whose parent is that
    sandbox's live init (root, same cgroup; the init of a finished run is gone, and with it every process of its
    pid namespace), with the runner's own command line."""
    try:
        group = _pool_cgroup(p.pid)
        parent = p.parent()
        return (group is not None and parent is not None and parent.uids().real == 0
                and _pool_cgroup(parent.pid) == group and p.cmdline()[-1:] == ["/work/main.py"])
    except (psutil.Error, OSError):
        return False


def run_procs(lo: int, hi: int) -> list[psutil.Process]:
    """Processes of run uids in [lo, hi) that belong to runs (or their leftovers): not pooled interpreters."""
    return [p for p in procs_with_uids(lo, hi) if not waiting_in_pool(p)]


class Daemon:
    """A sandboxd process started by the tests."""

    pool = False        # subclasses that place and start a daemon themselves get no warm pool
    pool_cap = 8

    command = (sys.executable, "-m", "sandboxd.cli.daemon")  # another install's `sandboxd` may replace it
    cwd = str(ROOT)

    def __init__(self, workdir: pathlib.Path, config_extra: str = "", runners_dir: str | None = None,
                 env: dict | None = None, pool: bool | None = None):
        self._place(workdir)
        # The warm pool is explicit: off unless asked for (or configured by the test), so a daemon's cgroups
        # and uids are its runs' only. SANDBOXD_TEST_POOL=1 turns the built-in default (python: 2) on for every
        # daemon a test starts, to run a whole suite with the pool on.
        if pool is None:
            pool = os.environ.get("SANDBOXD_TEST_POOL") == "1"
        self.pool = pool or "[pool" in config_extra
        runners = f'runners_dir = "{runners_dir}"\n' if runners_dir else ""
        sections = {"server": "", "sandbox": "", "rest": ""}
        # Tests may extend [server] and [sandbox]; everything else they pass goes after.
        current = "rest"
        for line in config_extra.splitlines():
            if line.strip() in ("[server]", "[sandbox]"):
                current = line.strip()[1:-1]
                continue
            if line.strip().startswith("["):
                current = "rest"
            sections[current] += line + "\n"
        # Pool off as a top-level inline table, first: tests append to the file's last table.
        pool_off = "" if self.pool else "pool = { size = 0, runners = {}, sessions = {} }\n"
        self._start(
            f'{pool_off}[server]\nlisten = ["{self.target}"]\nstate_dir = "{self.state_dir}"\n'
            f'runtime_dir = "{self.runtime_dir}"\nmetrics_listen = "127.0.0.1:0"\nshutdown_grace = "5s"\n'
            f'{sections["server"]}'
            f'[sandbox]\ncgroup_parent_name = "{self.parent_name}"\nuid_start = {self.uid_start}\n'
            f'uid_count = {self.uid_count}\n{runners}{sections["sandbox"]}{sections["rest"]}', env)

    def _place(self, workdir: pathlib.Path) -> None:
        """Paths, cgroup parent and uid range of this daemon, unique within the test process."""
        self.n = n = next(_counter)
        self.workdir = workdir
        self.socket = str(workdir / "sandboxd.sock")
        self.target = f"unix://{self.socket}"
        self.state_dir = workdir / "state"
        self.runtime_dir = workdir / "run"
        self.parent_name = f"sandboxd-test-{os.getpid()}-{n}"
        self.uid_start = 400000 + (os.getpid() % 500) * 2000 + n * 64
        self.uid_count = 64
        self.config_path = workdir / "sandboxd.toml"
        self.pool_cap = 8   # [pool] max_total's default

    def _start(self, config_text: str, env: dict | None = None) -> None:
        """Write the configuration, start `sandboxd serve` on it and wait until it answers."""
        self.config_path.write_text(config_text)
        self.log_path = self.workdir / f"sandboxd-{self.n}.log"
        self._log = open(self.log_path, "wb")
        self.expected_exit = 0
        self.proc = subprocess.Popen([*self.command, "serve", "--config", str(self.config_path)],
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, cwd=self.cwd)
        self.wait_ready()

    def wait_ready(self, timeout: float = 60.0) -> None:
        from sandboxd.client import Client, SandboxdError
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sandboxd exited with {self.proc.returncode}:\n{self.log()}")
            if os.path.exists(self.socket):
                try:
                    with Client(self.target) as c:
                        c.runners(timeout=2)
                    return
                except SandboxdError:
                    pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"sandboxd did not become ready:\n{self.log()}")

    def client(self, **kw):
        from sandboxd.client import Client
        return Client(self.target, **kw)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def leftovers(self) -> list[str]:
        """Run cgroups and processes of this daemon's runs that still exist."""
        found = []
        for d in find_cgroup_dirs(self.parent_name):
            found += [os.path.join(d, c) for c in os.listdir(d) if c.startswith("run-")]
        if self.pool:
            # Sandboxes waiting in the pool are not leftovers: at most the pool's cap of them, none holding a
            # process of a run uid but its prestarted interpreter (init waits as root; checked below).
            pooled = [f for f in found if os.path.basename(f).startswith("run-pool-")]
            found = [f for f in found if f not in pooled]
            if len({os.path.basename(f) for f in pooled}) > self.pool_cap:
                found += pooled
        found += [f"pid {p.pid} uid {p.uids().real}" for p in run_procs(self.uid_start,
                                                                        self.uid_start + self.uid_count)]
        return found

    def wait_no_leftovers(self, timeout: float = 10.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while (left := self.leftovers()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return left


def _check_stopped(d: Daemon) -> None:
    code = d.stop()
    assert code == d.expected_exit, f"sandboxd exited with {code}:\n{d.log()[-4000:]}"
    # After a kill -9 the launcher notices the closed socket and cleans up on its own: give it a moment.
    deadline = time.monotonic() + 10
    while find_cgroup_dirs(d.parent_name) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not find_cgroup_dirs(d.parent_name), "the daemon left its cgroup parent behind"
    assert not d.wait_no_leftovers()


@pytest.fixture(scope="session")
def daemon():
    """One daemon for the tests that need no special configuration."""
    if os.geteuid() != 0:
        pytest.skip("sandboxd tests need root")
    with tempfile.TemporaryDirectory(prefix="sandboxd-test-") as tmp:
        d = Daemon(pathlib.Path(tmp))
        try:
            yield d
        finally:
            _check_stopped(d)


@pytest.fixture(scope="session")
def pooled_daemon():
    """A daemon whose warm pool is on for the python runner, sized for the security battery's default limits:
    its runs claim sandboxes built ahead of time (tests/integration/test_pool.py, the battery's "pooled" mode)."""
    if os.geteuid() != 0:
        pytest.skip("sandboxd tests need root")
    with tempfile.TemporaryDirectory(prefix="sandboxd-test-") as tmp:
        d = Daemon(pathlib.Path(tmp), "[pool]\nmax_total = 4\nrunners = { python = 2 }\nsessions = { python = 1 }\n")
        d.pool_cap = 4
        try:
            yield d
        finally:
            _check_stopped(d)


@pytest.fixture
def start_daemon(tmp_path_factory):
    """Start a daemon with extra configuration: start_daemon('[limits.max]\\nmemory = "64MiB"')."""
    started = []

    def start(config_extra: str = "", workdir: pathlib.Path | None = None, **kw) -> Daemon:
        d = Daemon(workdir or tmp_path_factory.mktemp("sandboxd"), config_extra, **kw)
        started.append(d)
        return d

    yield start
    errors = []
    for d in started:  # stop every daemon, even when an earlier one fails its checks
        try:
            _check_stopped(d)
        except AssertionError as e:
            errors.append(str(e))
    assert not errors, "\n".join(errors)


@pytest.fixture
def sandbox(daemon):
    """A client of the shared daemon; after the test, nothing of its runs may remain."""
    with daemon.client() as c:
        yield c
    left = daemon.wait_no_leftovers()
    assert not left, f"runs left processes or cgroups behind: {left}"
