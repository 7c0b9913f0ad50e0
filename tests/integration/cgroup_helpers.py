"""Helpers for the real-kernel cgroup tests: a Lab that owns a driver, its runs and every process a test
starts, and cleans all of it up even when the test fails. Child processes are `python -c` scripts that first
write "0" into each of the run's join paths, exactly as the sandbox child does.

Parents are named sandboxd-test-<pytest pid>-<kind>, never the daemon's "sandboxd": a test's recover() must
not touch the runs of a daemon (or of another test session) on the same host.
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time

from sandboxd.sandbox.cgroups import CgroupError, CgroupLimits, RunCgroup, detect, host_hierarchies, make_driver

PREFIX = f"sandboxd-cgtest-{os.getpid()}"  # distinct from the daemon fixtures' parents (conftest)
LINE_TIMEOUT = 30.0         # generous: the pure-v2 VM emulates its CPU
JOIN = """\
import os, sys
for path in sys.argv[1:]:
    with open(path, "w") as f:
        f.write("0")
print("joined", flush=True)
"""


def host_kinds() -> list[str]:
    """The drivers this host can run: its own kind, plus v1 on a hybrid host (the freezer is there too)."""
    if os.geteuid() != 0:
        return []
    try:
        kind = detect().name
    except (CgroupError, OSError):
        return []
    return ["hybrid", "v1"] if kind == "hybrid" else [kind]


def cgroup_dir(run: RunCgroup, controller: str) -> str:
    """The run's directory holding `controller`'s files (v2: the only one)."""
    return run.path if hasattr(run, "path") else run.dirs[controller]


def parents(driver) -> list[str]:
    """The driver's parent directories (v2: one; v1 and hybrid: one per hierarchy)."""
    return [driver.parent] if hasattr(driver, "parent") else list(dict.fromkeys(driver.parents.values()))


def read(directory: str, name: str) -> str:
    with open(os.path.join(directory, name)) as f:
        return f.read().strip()


def alive(pidfd: int) -> bool:
    """A pidfd polls readable once its process has exited, whoever reaps it."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return not poller.poll(0)


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class Child:
    """A python child that joined a run cgroup; line() reads what it prints, with a timeout."""

    def __init__(self, run: RunCgroup, body: str):
        self.proc = subprocess.Popen([sys.executable, "-c", JOIN + textwrap.dedent(body), *run.join_paths()],
                                     stdout=subprocess.PIPE)
        self._buffer = b""
        joined = self.line()
        assert joined == "joined", joined

    def line(self, timeout: float = LINE_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise AssertionError(f"child {self.proc.pid} printed no line within {timeout}s")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise AssertionError(f"child {self.proc.pid} ended (status {self.proc.wait()}) before a line")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()


class Lab:
    """Everything one test creates, for clean-up in reverse: processes by pid, runs, drivers."""

    def __init__(self, kind: str):
        self.kind = kind
        self.drivers = []
        self.runs: list[RunCgroup] = []
        self.children: list[Child] = []
        self.pidfds: list[int] = []
        self.driver = self.new_driver()

    def new_driver(self, suffix: str = "", setup: bool = True, **kwargs):
        driver = make_driver(self.kind, host_hierarchies(), parent_name=f"{PREFIX}-{self.kind}{suffix}", **kwargs)
        self.drivers.append(driver)
        if setup:
            driver.setup()
        return driver

    def run(self, run_id: str = "t1", memory: int = 256 << 20, pids: int = 64, cpus: float = 1.0,
            driver=None) -> RunCgroup:
        run = (driver or self.driver).create(run_id, CgroupLimits(memory=memory, pids=pids, cpus=cpus))
        self.runs.append(run)
        return run

    def child(self, run: RunCgroup, body: str = "import time; time.sleep(60)") -> Child:
        child = Child(run, body)
        self.children.append(child)
        return child

    def track(self, pid: int) -> int:
        """A pidfd for a grandchild, opened while it surely runs: clean-up can then never hit a reused pid."""
        pidfd = os.pidfd_open(pid)
        self.pidfds.append(pidfd)
        return pidfd

    def close(self) -> None:
        errors = []
        for run in reversed(self.runs):
            try:
                run.remove()
            except CgroupError as e:
                errors.append(e)
        for child in self.children:
            child.stop()
        for pidfd in self.pidfds:
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.close(pidfd)
        for driver in reversed(self.drivers):
            try:
                driver.teardown()
            except CgroupError as e:
                errors.append(e)
        if errors:
            raise errors[0]


def leftovers(prefix: str = PREFIX) -> list[str]:
    """Directories named after this test session anywhere under /sys/fs/cgroup."""
    found = []
    for root, dirs, _ in os.walk("/sys/fs/cgroup"):
        found += [os.path.join(root, d) for d in dirs if d.startswith(prefix)]
    return found
