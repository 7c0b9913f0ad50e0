"""Operating a real daemon: signals (SIGTERM drain, kill -9 and restart, a dead launcher, SIGHUP reload),
cancellation, admission, health and reflection, and logs. No mocks: every test starts or uses a real sandboxd,
looks at the kernel (processes, cgroups, mounts) and at the run store afterwards, and joins every thread it
starts. Fairness across principals is covered at the unit level (tests/unit/test_admission.py), not here.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import threading
import time
import urllib.request

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from sandboxd import store as store_mod
from sandboxd.client import Output, Result, SandboxdError, Started

from conftest import find_cgroup_dirs, procs_with_uids

LONG = "import sys, time\nsys.stdout.write('go\\n')\ntime.sleep(60)\n"   # one write: one chunk


# -- helpers -------------------------------------------------------------------------------------------------
class Stream:
    """One Execute call consumed on its own thread (with its own channel), recording what arrived and when."""

    def __init__(self, d, code: str, runner: str = "python", **kw):
        self.d, self.code, self.runner, self.kw = d, code, runner, kw
        self.events: list = []
        self.error: SandboxdError | None = None
        self.run_id: str | None = None
        self.started = threading.Event()    # the daemon accepted the request (Started arrived)
        self.printed = threading.Event()    # the script wrote something: it is running
        self.done = threading.Event()
        self.done_at: float | None = None
        self.thread = threading.Thread(target=self._consume, daemon=True)
        self.thread.start()

    def _consume(self) -> None:
        try:
            with self.d.client() as c:
                for ev in c.execute(self.code, self.runner, **self.kw):
                    self.events.append(ev)
                    if isinstance(ev, Started):
                        self.run_id = ev.run_id
                        self.started.set()
                    elif isinstance(ev, Output):
                        self.printed.set()
        except SandboxdError as e:
            self.error = e
        except Exception as e:  # noqa: BLE001 - surfaced by the test, never swallowed
            self.error = SandboxdError("CLIENT", repr(e))
        finally:
            self.done_at = time.monotonic()
            self.done.set()

    @property
    def result(self) -> Result | None:
        return next((e for e in self.events if isinstance(e, Result)), None)

    @property
    def stdout(self) -> bytes:
        return b"".join(e.data for e in self.events if isinstance(e, Output) and e.stream == "stdout")

    def join(self, timeout: float = 30.0) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the Execute call of {self.code!r} did not end"


@contextlib.contextmanager
def streams():
    """Collects Streams and joins them whatever the test does (each ends once its daemon is gone)."""
    started: list[Stream] = []
    try:
        yield started
    finally:
        for s in started:
            s.thread.join(60)


def wait_for(predicate, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def db_path(d) -> str:
    return str(d.state_dir / "sandboxd.db")


def get_run(d, run_id: str) -> dict | None:
    s = store_mod.Store(db_path(d))
    try:
        return s.get_run(run_id)
    finally:
        s.close()


def wait_record(d, run_id: str, timeout: float = 10.0) -> dict:
    """The run's record once it is finished (the finisher may still be writing when the client gives up)."""
    rec = wait_for(lambda: (r := get_run(d, run_id)) and r.get("outcome") and r, timeout)
    assert rec, f"run {run_id} has no finished record"
    return rec


def events(d, kind: str | None = None, run_id: str | None = None) -> list[dict]:
    db = sqlite3.connect(f"file:{db_path(d)}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT seq, ts, kind, run_id, data FROM events ORDER BY seq").fetchall()
    finally:
        db.close()
    return [{"seq": r[0], "ts": r[1], "kind": r[2], "run_id": r[3], "data": json.loads(r[4])} for r in rows
            if (kind is None or r[2] == kind) and (run_id is None or r[3] == run_id)]


def launcher_of(d) -> psutil.Process:
    kids = [p for p in psutil.Process(d.proc.pid).children() if "sandboxd.sandbox.forkserver" in p.cmdline()]
    assert len(kids) == 1, f"expected one launcher child of the daemon, found {kids}"
    return kids[0]


def run_processes(d) -> list[psutil.Process]:
    return procs_with_uids(d.uid_start, d.uid_start + d.uid_count)


def mounts_under(path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.strip() for line in f if str(path) in line]


def nothing_left(d) -> list[str]:
    """Every trace of a stopped daemon's runs: processes, cgroups (parent included), mounts."""
    cgroups = []
    for top in find_cgroup_dirs(d.parent_name):
        cgroups += [top] + [os.path.join(top, n) for n in os.listdir(top) if n.startswith("run-")]
    return [f"pid {p.pid}" for p in run_processes(d)] + cgroups + mounts_under(d.runtime_dir)


def pooled_cgroups(d) -> list[str]:
    return [os.path.join(top, n) for top in find_cgroup_dirs(d.parent_name) for n in os.listdir(top)
            if n.startswith("run-pool-")]


def remove_cgroups(d) -> None:
    """Last-resort cleanup after a failed check, so one bug does not turn into errors everywhere else: kill what
    is left in this daemon's own cgroups and remove them, deepest first. Touches nothing else."""
    for top in find_cgroup_dirs(d.parent_name):
        for dirpath, _, _ in sorted(os.walk(top), key=lambda e: -e[0].count("/")):
            with contextlib.suppress(OSError):
                with open(os.path.join(dirpath, "cgroup.procs")) as f:
                    for pid in f.read().split():
                        with contextlib.suppress(OSError):
                            os.kill(int(pid), signal.SIGKILL)
            wait_for(lambda p=dirpath: not _procs(p), 5)
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)


def _procs(path: str) -> str:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return f.read().strip()
    except OSError:
        return ""


def log_count(d, text: str) -> int:
    return d.log().count(text)


# -- signals -------------------------------------------------------------------------------------------------
GRACE = 5  # conftest's daemon config sets [server] shutdown_grace = "5s"; a test cannot set the key again


def sigterm_during_two_runs(start_daemon):
    """SIGTERM while a 1 s run and a 60 s run are running; returns once the daemon has exited."""
    d = start_daemon()
    assert f'shutdown_grace = "{GRACE}s"' in d.config_path.read_text()
    with streams() as ss:
        short = Stream(d, "import time\nprint('go', flush=True)\ntime.sleep(1)\nprint('done')\n")
        long = Stream(d, LONG, wall_time=60)
        ss += [short, long]
        assert short.printed.wait(20) and long.printed.wait(20), (short.error, long.error)
        sent = time.monotonic()
        os.kill(d.proc.pid, signal.SIGTERM)
        short.join(GRACE + 15)
        long.join(GRACE + 15)
        assert d.proc.wait(20) == 0, d.log()[-3000:]
    return d, short, long, sent


def test_sigterm_lets_short_runs_finish_and_stops_the_rest_after_the_grace(start_daemon):
    d, short, long, sent = sigterm_during_two_runs(start_daemon)
    # The short run finished normally, inside the grace period.
    assert short.error is None, short.error
    assert short.result.outcome == "exited" and short.result.exit_code == 0
    assert short.stdout == b"go\ndone\n"
    # The long one was stopped once the grace ran out, not before, and not much later.
    assert GRACE - 0.5 < long.done_at - sent < GRACE + 4, f"ended {long.done_at - sent:.1f}s after SIGTERM"
    # Nothing of the daemon remains: processes, cgroups, mounts, socket.
    assert not nothing_left(d), nothing_left(d)
    assert not os.path.exists(d.socket)
    assert "sandboxd stopped" in d.log()
    # Both runs are recorded with their outcomes; the stopped one with its request and its end.
    assert get_run(d, short.run_id)["outcome"] == "exited"
    rec = get_run(d, long.run_id)
    # "shutdown" when cancel_all() stops it first, "cancelled" when gRPC cancels its call first (see below).
    assert rec["outcome"] == "cancelled" and rec["message"].startswith("run stopped: "), rec
    kinds = [e["kind"] for e in events(d, run_id=long.run_id)]
    assert kinds[0] == "run.requested" and kinds[-1] == "run.finished", kinds
    assert store_mod.verify(db_path(d)).ok


def test_sigterm_tells_the_caller_of_a_stopped_run_its_outcome(start_daemon):
    d, short, long, sent = sigterm_during_two_runs(start_daemon)
    assert long.error is None, f"the caller of the stopped run got {long.error} instead of a result"
    assert long.result.outcome == "cancelled" and "shutdown" in long.result.message, long.result


@pytest.mark.parametrize("pool", [False, True], ids=["cold", "pooled"])
def test_kill_9_daemon_then_the_launcher_cleans_up_and_a_restart_marks_runs_interrupted(start_daemon, pool):
    # pooled: the default pool is on, so the runs claimed pooled sandboxes and more wait built: none may remain.
    d = start_daemon(pool=pool)
    if pool:
        assert wait_for(lambda: len(pooled_cgroups(d)) >= 2, 20), d.log()[-3000:]
    launcher = launcher_of(d)
    try:
        with streams() as ss:
            ss += [Stream(d, LONG, wall_time=60) for _ in range(3)]
            for s in ss:
                assert s.printed.wait(20), s.error
            assert len(run_processes(d)) >= 3
            d.proc.kill()
            d.expected_exit = -9
            d.proc.wait(10)
            # The launcher sees its control socket close: it ends every run, removes the cgroups and exits.
            launcher.wait(10)
            for s in ss:
                s.join(20)
                assert s.error is not None and s.error.code == "UNAVAILABLE", s.error
        left = wait_for(lambda: not nothing_left(d), 10) or nothing_left(d)
        assert left is True, f"left behind after kill -9: {left}\n{d.log()[-3000:]}"
    finally:
        if launcher.is_running():
            launcher.kill()
        remove_cgroups(d)
    # A new daemon on the same state: it serves, and the three runs are interrupted, not lost.
    d2 = start_daemon(workdir=d.workdir)
    with d2.client() as c:
        assert c.run("print(1)").ok
    for s in ss:
        rec = get_run(d2, s.run_id)
        assert rec["outcome"] == "interrupted", rec
    assert len(events(d2, "run.interrupted")) == 3
    port = re.search(r"metrics http://127\.0\.0\.1:(\d+)", d2.log()).group(1)
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'sandboxd_runs_total{outcome="interrupted",runner="python"} 3.0' in metrics, metrics
    assert store_mod.verify(db_path(d2)).ok


def test_kill_9_of_the_launcher_interrupts_the_run_and_a_new_launcher_takes_over(start_daemon):
    """The in-flight run (its code had started) ends as interrupted, not setup_failed, with an explanation (given to the caller and recorded); the daemon starts a new
    launcher, which removes the dead one's cgroups, and keeps serving."""
    d = start_daemon()
    launcher = launcher_of(d)
    with streams() as ss:
        s = Stream(d, LONG, wall_time=60)
        ss.append(s)
        assert s.printed.wait(20), s.error
        launcher.kill()
        launcher.wait(10)
        s.join(20)
    assert s.error is None and s.result is not None, f"the caller got {s.error} instead of a result"
    assert s.result.outcome == "interrupted" and "launcher" in s.result.message, s.result
    assert wait_for(lambda: "starting a new one" in d.log(), 10), d.log()[-3000:]
    with d.client() as c:
        assert wait_for(lambda: c.run("print(1)").ok, 20)
    rec = get_run(d, s.run_id)
    assert rec["outcome"] == "interrupted" and rec["message"] == s.result.message
    # The dead launcher's run: no process (PR_SET_PDEATHSIG) and no cgroup (the new launcher's recover()).
    assert wait_for(lambda: not d.leftovers(), 10), d.leftovers()
    assert launcher_of(d).pid != launcher.pid
    assert store_mod.verify(db_path(d)).ok


def test_reloaded_shutdown_grace_is_applied_or_refused(start_daemon):
    d = start_daemon()
    d.config_path.write_text(d.config_path.read_text().replace(f'shutdown_grace = "{GRACE}s"',
                                                               'shutdown_grace = "1s"'))
    os.kill(d.proc.pid, signal.SIGHUP)
    assert wait_for(lambda: log_count(d, "configuration reloaded") == 1, 10), d.log()[-2000:]
    assert d.stop() == 0
    log = d.log()
    assert "grace 1s" in log or "shutdown_grace" in log.split("configuration reloaded")[0], log[-2000:]


# -- cancellation ----------------------------------------------------------------------------------------------
def test_client_deadline_cancels_the_run(daemon, sandbox):
    seen = []
    t0 = time.monotonic()
    with pytest.raises(SandboxdError) as err:
        for ev in sandbox.execute(LONG, wall_time=60, timeout=1.0):
            seen.append(ev)
    assert err.value.code == "DEADLINE_EXCEEDED"
    assert time.monotonic() - t0 < 5
    assert isinstance(seen[0], Started)
    rec = wait_record(daemon, seen[0].run_id)
    assert rec["outcome"] == "cancelled", rec
    assert not daemon.wait_no_leftovers()


def test_closing_the_stream_early_cancels_the_run(daemon, sandbox):
    it = sandbox.execute(LONG, wall_time=60)
    started = next(it)
    assert isinstance(started, Started)
    out = next(it)
    assert isinstance(out, Output) and out.data == b"go\n"
    it.close()
    rec = wait_record(daemon, started.run_id)
    assert rec["outcome"] == "cancelled", rec
    assert not daemon.wait_no_leftovers()


# -- admission -----------------------------------------------------------------------------------------------
def test_admission_queue_full_and_queue_wait(start_daemon):
    d = start_daemon('[admission]\nmax_concurrent = 1\nmax_queue = 2\nmax_queue_per_principal = 2\nmax_queue_wait = "2s"')
    with streams() as ss:
        running = Stream(d, "import time\nprint('go', flush=True)\ntime.sleep(4)\n")
        ss.append(running)
        assert running.printed.wait(20), running.error
        queued = [Stream(d, "print('late')") for _ in range(2)]
        ss += queued
        for q in queued:
            assert q.started.wait(10)
        time.sleep(0.3)  # Started goes out just before the request joins the queue
        t0 = time.monotonic()
        with d.client() as c:
            with pytest.raises(SandboxdError) as full:
                c.run("print('no room')")
        assert time.monotonic() - t0 < 1.5, "a full queue must refuse at once"
        assert full.value.code == "RESOURCE_EXHAUSTED"
        assert "1 running and 2 queued" in full.value.message and "max_concurrent 1" in full.value.message \
            and "max_queue 2" in full.value.message, full.value.message
        assert full.value.retry_after and full.value.retry_after > 0
        # The queued two give up after max_queue_wait, while the running one still holds the only slot.
        for q in queued:
            q.join(10)
            assert q.error is not None and q.error.code == "RESOURCE_EXHAUSTED", (q.error, q.events)
            assert "within 2s" in q.error.message and q.error.retry_after
            assert 1.5 < q.done_at - t0 < 4.5
        running.join(20)
        assert running.result.outcome == "exited", running.result
    for q in queued:
        assert get_run(d, q.run_id)["outcome"] == "rejected"
    # And once the slot is free again, runs go through.
    with d.client() as c:
        assert c.run("print(1)").ok


def queued_behind_one_run(d, ss, **kw) -> tuple[Stream, Stream]:
    """A running LONG run holding the only slot (max_concurrent 1) and a second request waiting behind it."""
    running = Stream(d, LONG, wall_time=60)
    ss.append(running)
    assert running.printed.wait(20), running.error
    queued = Stream(d, "print('must never run')", **kw)
    ss.append(queued)
    assert queued.started.wait(20), queued.error
    wait_for(lambda: get_run(d, queued.run_id), 10)
    time.sleep(0.3)  # Started goes out just before the request joins the queue
    return running, queued


def test_a_request_whose_deadline_passes_in_the_queue_is_recorded_cancelled_at_once(start_daemon):
    d = start_daemon('[admission]\nmax_concurrent = 1')
    with streams() as ss:
        running, queued = queued_behind_one_run(d, ss, timeout=2.0)
        queued.join(30)
        assert queued.error is not None and queued.error.code == "DEADLINE_EXCEEDED", queued.error
        # Closed while the slot is still taken, not left open for a restart to call it interrupted.
        rec = wait_record(d, queued.run_id)
        assert not running.done.is_set()
        assert rec["outcome"] == "cancelled" and "waiting for a run slot" in rec["message"], rec
        with d.client() as c:
            c.stop_run(running.run_id)
        running.join(30)
    assert store_mod.verify(db_path(d)).ok


def test_sigterm_refuses_queued_requests_instead_of_starting_them(start_daemon):
    d = start_daemon('[admission]\nmax_concurrent = 1')
    with streams() as ss:
        running, queued = queued_behind_one_run(d, ss, wall_time=60)
        os.kill(d.proc.pid, signal.SIGTERM)
        queued.join(30)
        assert not running.done.is_set()  # refused during the grace period, not admitted after it
        assert queued.error is not None and queued.error.code == "UNAVAILABLE", (queued.error, queued.events)
        assert "shutting down" in queued.error.message and queued.stdout == b""
        running.join(GRACE + 20)
        assert d.proc.wait(20) == 0, d.log()[-3000:]
    rec = get_run(d, queued.run_id)
    assert rec["outcome"] == "rejected" and "shutting down" in rec["message"], rec
    assert get_run(d, running.run_id)["outcome"] == "cancelled"


# -- reload ----------------------------------------------------------------------------------------------------
def test_sighup_reload_applies_to_new_runs_and_a_bad_file_keeps_the_running_config(start_daemon):
    # The sh runner sets no limits of its own, so [limits.default] is what its runs get.
    d = start_daemon('[limits.default]\nwall_time = "20s"\nmemory = "128MiB"\n')
    good = d.config_path.read_text()
    with streams() as ss:
        old = Stream(d, "echo go; sleep 4; echo end", "sh")
        ss.append(old)
        assert old.printed.wait(20), old.error
        d.config_path.write_text(good.replace('wall_time = "20s"', 'wall_time = "2s"')
                                 .replace('memory = "128MiB"', 'memory = "64MiB"'))
        os.kill(d.proc.pid, signal.SIGHUP)
        assert wait_for(lambda: log_count(d, "configuration reloaded") == 1, 10), d.log()[-2000:]
        with d.client() as c:
            new = c.run("echo hi", "sh")
        assert new.ok and new.limits["wall_time"] == 2 and new.limits["memory"] == 64 << 20, new.limits
        # The run that started before the reload keeps its limits: not stopped at the new 2s wall clock.
        old.join(20)
        assert old.result.outcome == "exited" and old.stdout == b"go\nend\n", old.result
        assert old.result.limits["wall_time"] == 20 and old.result.limits["memory"] == 128 << 20
    # An invalid file, then an unknown key: refused, named in the log, the previous configuration stays.
    bad_files = [("not toml [", "invalid TOML"), (good + "bogus_key = 1\n", "limits.default.bogus_key")]
    for n, (text, named) in enumerate(bad_files, 1):
        d.config_path.write_text(text)
        os.kill(d.proc.pid, signal.SIGHUP)
        assert wait_for(lambda n=n: log_count(d, "configuration reload refused") == n, 10), d.log()[-2000:]
        refusal = [line for line in d.log().splitlines() if "configuration reload refused" in line][-1]
        assert str(d.config_path) in refusal and named in refusal, refusal
        with d.client() as c:
            r = c.run("echo still", "sh")
        assert r.ok and r.limits["wall_time"] == 2 and r.limits["memory"] == 64 << 20, r.limits
    loaded = events(d, "config.loaded")
    assert len(loaded) == 2 and loaded[1]["data"].get("reload") is True
    rejected = events(d, "config.rejected")
    assert len(rejected) == 2
    assert "invalid TOML" in rejected[0]["data"]["error"] and "bogus_key" in rejected[1]["data"]["error"]
    assert all(e["data"]["source"] == str(d.config_path) for e in rejected)


# -- health and reflection ------------------------------------------------------------------------------------
def test_health_serving_and_reflection_lists_the_service(daemon):
    with grpc.insecure_channel(daemon.target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)

        def status(service):
            try:
                return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            except grpc.RpcError:
                return None
        for service in ("", "sandboxd.v1.Sandbox"):
            assert wait_for(lambda s=service: status(s) == health_pb2.HealthCheckResponse.SERVING, 10), service
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        answers = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 timeout=5))
        names = {s.name for a in answers for s in a.list_services_response.service}
        assert {"sandboxd.v1.Sandbox", "grpc.health.v1.Health"} <= names, names


# -- logs ------------------------------------------------------------------------------------------------------
def test_json_logs_carry_run_ids_and_never_script_output(start_daemon):
    d = start_daemon('[logging]\nformat = "json"')
    code = ("import sys\nprint('\\x1b[31mRED\\x1b[0m \\x1b]0;title\\x07')\nprint('\\n2026-01-01 ERROR fake')\n"
            "sys.stderr.write('\\n2026-01-01 ERROR fake-err\\n')\n")
    with d.client() as c:
        r = c.run(code)
    assert r.ok and b"fake" in r.stdout and b"\x1b[31m" in r.stdout
    wait_for(lambda: r.run_id in d.log() and "finished" in d.log(), 5)
    lines = d.log().splitlines()
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON log line: {line!r}")
    about_run = [e for e in entries if r.run_id in e["msg"]]
    assert len(about_run) >= 2 and all(e.get("run_id") == r.run_id for e in about_run), about_run
    text = d.log()
    assert "fake" not in text and "\x1b" not in text and "RED" not in text


def test_json_logs_stay_json_when_the_launcher_logs(start_daemon):
    d = start_daemon('[logging]\nformat = "json"')
    launcher = launcher_of(d)
    with streams() as ss:
        s = Stream(d, LONG, wall_time=60)
        ss.append(s)
        assert s.printed.wait(20), s.error
        # kill -9: the launcher ends the run and logs that it cannot report the result to the daemon.
        d.proc.kill()
        d.expected_exit = -9
        d.proc.wait(10)
        launcher.wait(10)
        s.join(20)
    assert "sandboxd.launcher" in d.log()
    for line in d.log().splitlines():
        try:
            json.loads(line)
        except ValueError:
            pytest.fail(f"not a JSON log line: {line!r}")
