"""The warm pool: a run served by a sandbox built ahead of time is indistinguishable from a cold one.

Each script of the compatibility battery runs on the shared daemon (pool off: cold) and on `pooled_daemon`
(pool on for python), and every byte of stdout and stderr, the outcome, exit code and signal must be the same;
the pooled run's record must say it was served by the pool, so the comparison is never cold against cold.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import signal
import time
import urllib.request

import pytest

from conftest import find_cgroup_dirs
from sandboxd import store as store_mod

_compat = importlib.util.spec_from_file_location(
    "_sandboxd_security_compat", pathlib.Path(__file__).resolve().parent.parent / "security" / "test_compat.py")
COMPAT = importlib.util.module_from_spec(_compat)
_compat.loader.exec_module(COMPAT)

MiB = 1 << 20
# name -> (script, keyword arguments of Client.run). Nothing printed may differ between two cold runs either
# (no pids of the host, no times, no uids: a run's uid is allocated per run).
CASES = {
    "argv_name_file": ("import sys\nprint(sys.argv, __name__, __file__, sys.orig_argv, sys.flags.isolated)",
                       {"args": ["a", "b c", "--x=1", ""]}),
    "traceback": ("def inner():\n    raise ValueError('boom')\n\ndef outer():\n    inner()\n\nouter()\n", {}),
    "syntax_error": ("print('never'\n", {}),
    "exit_code": ("import sys\nprint('before')\nsys.exit(7)", {}),
    "exit_message": ("import sys\nsys.exit('fatal: because')", {}),
    "uncaught_keyboardinterrupt": ("raise KeyboardInterrupt", {}),
    "signal_self": ("import os, signal\nprint('x', flush=True)\nos.kill(os.getpid(), signal.SIGTERM)", {}),
    "abort": ("import os\nos.abort()", {}),
    "atexit": ("import atexit\natexit.register(print, 'bye')\nprint('hi')", {}),
    "stdin": ("import sys\ndata = sys.stdin.buffer.read()\nprint(len(data), data[:20], data[-5:])",
              {"stdin": b"line one\n" + bytes(range(256)) * 300 + b"end\n"}),
    "no_stdin": ("import sys\nprint(repr(sys.stdin.read()))", {}),
    "cwd_env": ("import os\nprint(os.getcwd())\nprint(sorted(os.environ.items()))",
                {"env": {"APP_X": "1", "LANG": "C", "TZ": "UTC"}}),
    "files": ("import os, pwd, stat\nfor p in sorted(os.listdir('.')) + ['d/e/f.txt']:\n"
              "    st = os.lstat(p)\n"
              "    print(p, oct(st.st_mode), pwd.getpwuid(st.st_uid).pw_name, st.st_size, st.st_nlink)\n"
              "print(open('d/e/f.txt').read())",
              {"files": {"d/e/f.txt": b"nested", "data.bin": bytes(1000)}}),
    "identity": ("import os, pwd, grp, socket\nu = os.getuid()\n"
                 "print(u == os.geteuid() == os.getgid() == os.getegid(), u >= 1000, os.getgroups())\n"
                 "print(pwd.getpwuid(u).pw_name, pwd.getpwuid(u).pw_dir, grp.getgrgid(os.getgid()).gr_name)\n"
                 "print(socket.gethostname(), os.getpid(), os.getppid(), os.getpgrp() == os.getpid(), os.umask(0))",
                 {}),
    "process_state": ("import resource\n"
                      "print([(n, resource.getrlimit(getattr(resource, n))) for n in sorted(dir(resource)) "
                      "if n.startswith('RLIMIT_')])\n"
                      "keep = ('NoNewPrivs', 'Seccomp', 'Cap', 'Threads')\n"
                      "print([l for l in open('/proc/self/status') if l.startswith(keep)])\n"
                      "import os\nprint(sorted(os.listdir('/proc/self/fd')))",
                      {}),
    "mounts": ("import re\nfor line in open('/proc/self/mountinfo'):\n"
               "    f = line.split()\n    print(f[4], f[5], f[f.index('-') + 1], re.sub(r'size=\\d+k|[ug]id=\\d+', '', "
               "f[-1]))\nimport os\nprint(sorted(os.listdir('/')), sorted(os.listdir('/dev')))\n"
               "print(open('/etc/hosts').read(), open('/etc/hostname').read())",
               {}),
    "filesystem_walls": ("import errno, os\n"
                         "def e(f, *a):\n    try:\n        f(*a)\n        return 'ok'\n"
                         "    except OSError as x:\n        return errno.errorcode[x.errno]\n"
                         "print(e(open, '/etc/x', 'w'), e(open, '/usr/x', 'w'), e(os.mkdir, '/x'),"
                         " e(open, '/tmp/x', 'w'), e(open, '/work/x', 'w'), e(open, '/dev/shm/x', 'w'))\n"
                         "print(os.statvfs('/work').f_blocks * os.statvfs('/work').f_frsize, "
                         "os.statvfs('/tmp').f_files)",
                         {}),
    # The kill at the cap lands while the writer may still be in its one big write (a pipe_write that never has
    # to wait checks no signal), so what follows it waits a while: otherwise it is a race, cold or warm.
    "output_cap": ("import sys, time\nsys.stdout.write('x' * 3000000)\ntime.sleep(5)\nsys.stderr.write('y' * 10)",
                   {"output": 1000}),
    "timeout": ("import time\nprint('start', flush=True)\ntime.sleep(30)", {"wall_time": 1}),
    "memory_limit": ("x = bytearray(200 << 20)\nprint('unreachable')", {"memory": 64 * MiB}),
    "pids_limit": ("import os, time\nkids = 0\ntry:\n    for _ in range(64):\n"
                   "        if os.fork() == 0:\n            time.sleep(5)\n            os._exit(0)\n        kids += 1\n"
                   "except OSError as e:\n    print('stopped', e.strerror)\nprint(kids < 64)", {"pids": 8}),
    "seccomp_kill": ("import ctypes\nprint('x', flush=True)\nctypes.CDLL(None).syscall(169, 0, 0, 0, 0)", {}),
}


def metric(d, name: str) -> float:
    port = re.search(r"metrics http://127\.0\.0\.1:(\d+)", d.log()).group(1)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def pooled_of(d, run_id: str, key: str = "pooled") -> bool | None:
    s = store_mod.Store(str(d.state_dir / "sandboxd.db"))
    try:
        return s.get_run(run_id).get(key)
    finally:
        s.close()


def wait_ready(d, n: int = 1, timeout: float = 30.0) -> None:
    """Runs back to back can outpace the refill (one build at a time): wait for a ready sandbox first."""
    deadline = time.monotonic() + timeout
    while metric(d, 'sandboxd_pool_ready{runner="python"}') < n:
        assert time.monotonic() < deadline, d.log()[-3000:]
        time.sleep(0.02)


def both_ways(daemon, pooled_daemon, code: str, runner: str = "python", **kw):
    if daemon.pool:
        pytest.skip("SANDBOXD_TEST_POOL=1: the shared daemon is pooled too, there is no cold reference")
    with daemon.client() as c:
        cold = c.run(code, runner, **kw)
    wait_ready(pooled_daemon)
    with pooled_daemon.client() as c:
        warm = c.run(code, runner, **kw)
    assert pooled_of(pooled_daemon, warm.run_id) is True, "the pooled daemon ran it cold"
    assert pooled_of(daemon, cold.run_id) is False
    # The python runner's interpreter is prestarted; a run with args or env of its own gets a fresh one.
    prestarted = runner == "python" and not kw.get("args") and not kw.get("env")
    assert pooled_of(pooled_daemon, warm.run_id, "prestarted") is prestarted
    for field in ("outcome", "exit_code", "signal", "stdout", "stderr", "stdout_truncated", "stderr_truncated"):
        assert getattr(warm, field) == getattr(cold, field), (field, cold, warm)
    for stream in ("stdout", "stderr"):  # past a cap, what was written before the kill landed is a race, cold or not
        if not getattr(cold, f"{stream}_truncated"):
            assert getattr(warm, f"{stream}_bytes") == getattr(cold, f"{stream}_bytes"), (stream, cold, warm)
    assert re.sub(r"\d+ bytes", "", warm.message) == re.sub(r"\d+ bytes", "", cold.message)
    return cold


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_pooled_run_is_indistinguishable_from_a_cold_one(daemon, pooled_daemon, name):
    code, kw = CASES[name]
    cold = both_ways(daemon, pooled_daemon, code, **kw)
    assert cold.outcome != "setup_failed", cold


@pytest.mark.parametrize("name", sorted(COMPAT.PYTHON))
def test_compat_workloads_the_same_pooled_and_cold(daemon, pooled_daemon, name):
    # Guarded: spawned children import the script again, and how many do is a race, cold or not.
    code = COMPAT.textwrap.dedent(COMPAT.PYTHON[name]) + "\nif __name__ == '__main__':\n    print('ok')"
    cold = both_ways(daemon, pooled_daemon, code, wall_time=60)
    assert (cold.outcome, cold.exit_code, cold.stdout) == ("exited", 0, b"ok\n"), cold


def test_claims_are_counted_and_the_pool_refills(pooled_daemon):
    d = pooled_daemon
    wait_ready(d, 2)
    hits = metric(d, 'sandboxd_pool_claims_total{result="hit",runner="python"}')
    with d.client() as c:
        for _ in range(2):
            assert c.run("print(1)").stdout == b"1\n"
    assert metric(d, 'sandboxd_pool_claims_total{result="hit",runner="python"}') == hits + 2
    wait_ready(d, 2)
    assert metric(d, 'sandboxd_pool_refill_seconds_count{runner="python"}') >= 4
    # Only ready sandboxes remain: each a cgroup holding no process of a run uid, within the pool's cap.
    assert not d.wait_no_leftovers()


def test_a_run_the_pool_cannot_take_runs_cold(pooled_daemon):
    """Below the smallest memory a claim may set, and on a runner without a pool: the cold path, counted."""
    d = pooled_daemon
    misses = metric(d, 'sandboxd_pool_claims_total{result="miss",runner="python"}')
    wait_ready(d)
    with d.client() as c:
        r = c.run("print('small')", memory=16 * MiB)
        assert (r.outcome, r.stdout) == ("exited", b"small\n"), r
        assert pooled_of(d, r.run_id) is False
        s = c.run("echo sh", "sh")
        assert (s.outcome, s.stdout) == ("exited", b"sh\n") and pooled_of(d, s.run_id) is False
    assert metric(d, 'sandboxd_pool_claims_total{result="miss",runner="python"}') == misses + 1


def test_a_pooled_sandbox_serves_one_run_only(pooled_daemon):
    """What one run leaves in its sandbox (files, background processes) is gone for the next: every run gets a
    sandbox of its own, pooled or not."""
    d = pooled_daemon
    with d.client() as c:
        for _ in range(3):
            wait_ready(d)
            r = c.run("import os, subprocess\nprint(sorted(os.listdir('/work')), sorted(os.listdir('/tmp')))\n"
                      "open('/tmp/left', 'w').write('x'); open('/work/left', 'w').write('x')\n"
                      "subprocess.Popen(['sleep', '60'], start_new_session=True)")
            assert (r.outcome, r.stdout) == ("exited", b"['main.py'] []\n"), r
            assert pooled_of(d, r.run_id) is True
    assert not d.wait_no_leftovers()


def test_reload_drains_and_rebuilds_the_pool(start_daemon):
    d = start_daemon("[pool]\nrunners = { python = 2 }\nsessions = {}\n", pool=True)
    wait_ready(d, 2)

    def pooled() -> list[str]:
        return [n for top in find_cgroup_dirs(d.parent_name) for n in os.listdir(top) if n.startswith("run-pool-")]
    before = set(pooled())
    assert len(before) == 2
    # A changed template (the runner's default limits, here through [limits.default]): drained and built again.
    d.config_path.write_text(d.config_path.read_text().replace(
        "[pool]\n", '[limits.default]\ntmp_size = "32MiB"\n[pool]\n'))
    os.kill(d.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 20
    while not (len(now := set(pooled())) == 2 and not now & before):
        assert time.monotonic() < deadline, (before, now, d.log()[-3000:])
        time.sleep(0.05)
    wait_ready(d, 2)
    with d.client() as c:
        r = c.run("import os\nprint(os.statvfs('/tmp').f_blocks * os.statvfs('/tmp').f_frsize)")
        assert r.stdout == b"%d\n" % (32 * MiB) and pooled_of(d, r.run_id) is True, r
    # The pool switched off: drained, nothing left.
    d.config_path.write_text(d.config_path.read_text().replace("runners = { python = 2 }", "runners = {}"))
    os.kill(d.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 20
    while pooled():
        assert time.monotonic() < deadline, d.log()[-3000:]
        time.sleep(0.05)
    assert metric(d, 'sandboxd_pool_ready{runner="python"}') == 0


# -- sessions from the pool ------------------------------------------------------------------------------------
SESSION_PROBE = r"""
import json, os, resource, pwd, re
out = {
    "ids": [os.getuid(), os.getgid(), os.getgroups(), pwd.getpwuid(os.getuid()).pw_name],
    "cwd": os.getcwd(), "files": sorted(os.listdir(".")), "data": open("in/a.txt").read(),
    "rlimits": sorted((n, resource.getrlimit(getattr(resource, n))) for n in dir(resource) if n.startswith("RLIMIT_")),
    "status": [l for l in open("/proc/self/status") if l.startswith(("NoNewPrivs", "Seccomp", "Cap", "Threads"))],
    "fds": sorted(os.listdir("/proc/self/fd")),
    "mounts": [re.sub(r"size=\d+k|[ug]id=\d+", "", " ".join(l.split()[4:6] + l.split()[-3:]))
               for l in open("/proc/self/mountinfo")],
    "env": sorted(k for k in os.environ),
    "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
}
print(json.dumps(out, sort_keys=True))
"""


def session_probe(d, **kw) -> tuple[dict, str]:
    with d.client() as c, c.session("python", files={"in/a.txt": b"hello", "probe.py": SESSION_PROBE},
                                    **kw) as s:
        r = s.exec(["python3", "-I", "probe.py"])
        assert r.exit_code == 0, r
        assert s.run_code("6 * 7").results[0]["text/plain"] == "42"
        sid = s.id
    return json.loads(r.stdout), sid


def session_pooled(d, sid: str) -> bool | None:
    return pooled_of(d, sid)


def wait_session_ready(d, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while metric(d, 'sandboxd_pool_sessions_ready{runner="python"}') < 1:
        assert time.monotonic() < deadline, d.log()[-3000:]
        time.sleep(0.02)


def test_a_pooled_session_is_indistinguishable_from_a_cold_one(daemon, start_daemon):
    """The same probe in a cold session and in one that claimed a pooled sandbox: identity, working directory
    and files, rlimits (the session's own pids limit, not the template's), seccomp and capabilities, open fds,
    mounts, environment names and the processes it can see must all be the same."""
    if daemon.pool:
        pytest.skip("SANDBOXD_TEST_POOL=1: the shared daemon is pooled too, there is no cold reference")
    d = start_daemon("[pool]\nrunners = {}\nsessions = { python = 1 }\n", pool=True)
    wait_session_ready(d)
    cold, cold_id = session_probe(daemon, pids=24, memory=96 * MiB, env={"APP_X": "1"})
    warm, warm_id = session_probe(d, pids=24, memory=96 * MiB, env={"APP_X": "1"})
    assert session_pooled(daemon, cold_id) is False and session_pooled(d, warm_id) is True
    for probe in (cold, warm):
        probe["ids"] = probe["ids"][2:]          # uids differ per sandbox by design
    assert warm == cold
    assert ["RLIMIT_NPROC", [24, 24]] in warm["rlimits"]
    assert metric(d, 'sandboxd_pool_session_claims_total{result="hit",runner="python"}') == 1


def test_a_pooled_session_has_its_own_limits_and_the_pool_refills(start_daemon):
    d = start_daemon("[pool]\nrunners = {}\nsessions = { python = 1 }\n", pool=True)
    wait_session_ready(d)
    with d.client() as c, c.session("python", memory=48 * MiB, wall_time=5) as s:
        big = s.exec(["python3", "-c", "b = bytearray(96 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1"])
        assert big.outcome == "memory_limit", big
        assert s.exec("echo still here").stdout == b"still here\n"
        sid = s.id
    assert session_pooled(d, sid) is True
    wait_session_ready(d)
    # A session the template cannot serve (a smaller /tmp through its runner's limits is not requestable,
    # but a memory limit below what a claim can safely set is) is built cold.
    with d.client() as c, c.session("python", memory=16 * MiB) as s:
        assert s.exec("true").exit_code == 0
        sid = s.id
    assert session_pooled(d, sid) is False
    assert metric(d, 'sandboxd_pool_session_claims_total{result="miss",runner="python"}') == 1
    assert not d.wait_no_leftovers()


def test_a_claim_the_prestarted_interpreter_cannot_take_fails_closed(start_daemon):
    """The launcher and init check a claim again, whatever the daemon decided: a spec that asks for the
    prestarted interpreter with another command line is refused by the launcher, one with a higher rlimit than
    the interpreter has by init; each run ends setup_failed, its sandbox is destroyed with its interpreter, and
    the uid of a refused interpreter is reported not clean (its process may still be dying)."""
    import asyncio
    import dataclasses

    from conftest import procs_with_uids, run_procs
    from sandboxd import config as config_mod
    from sandboxd.policy import RunRequest, plan_pooled, plan_run
    from sandboxd.sandbox.launcher import Launcher, stdin_memfd
    from sandboxd.state import build_catalog

    d = start_daemon()
    cat = build_catalog(config_mod.load(str(d.config_path)))
    runner = cat.runners["python"]
    assert runner.prestart

    async def attempt(i: int, change) -> tuple:
        uid = d.uid_start + d.uid_count - 1 - i
        launcher = Launcher(str(d.workdir / f"staging-{i}"), cgroup_parent_name=f"{d.parent_name}-claims{i}")
        await launcher.start()
        fds = []
        try:
            tmpl = dataclasses.replace(plan_pooled(runner, cat.images, cat.seccomp, f"pool-{i}"), uid=uid, gid=uid)
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            fds += [out_r, err_r, stdin := stdin_memfd()]
            pooled = await launcher.prepare(tmpl, (stdin, out_w, err_w))
            os.close(out_w)
            os.close(err_w)
            assert await asyncio.wait_for(pooled.started, 30)
            # Its interpreter runs, as the sandbox's uid, and the tests' leftover check knows it for a waiting one.
            assert len(procs_with_uids(uid, uid + 1)) == 1 and not run_procs(uid, uid + 1)
            spec, _ = plan_run(RunRequest("python", b"print(1)\n"), cat.runners, cat.images, cat.seccomp,
                               f"claim-{i}", 1 << 24)
            spec = change(dataclasses.replace(spec, uid=uid, gid=uid, prestart=runner.script))
            handle = await launcher.claim(pooled, spec, b"", -1, -1)
            fin = await asyncio.wait_for(handle.finished, 30)
            return fin, uid
        finally:
            await launcher.stop()
            for fd in fds:
                os.close(fd)

    wrong_argv = lambda s: dataclasses.replace(s, argv=(*s.argv, "extra"))
    fin, uid = asyncio.run(attempt(0, wrong_argv))
    assert fin.setup_error and "prestarted interpreter" in fin.setup_error and fin.clean is False, fin
    higher = lambda s: dataclasses.replace(s, limits=dataclasses.replace(s.limits, cpu_time=s.limits.cpu_time * 100))
    fin, uid2 = asyncio.run(attempt(1, higher))
    assert fin.setup_error and "rlimits" in fin.setup_error and fin.exit_code is None, fin
    deadline = time.monotonic() + 10
    while procs_with_uids(uid2, uid + 1) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not procs_with_uids(uid2, uid + 1), "a refused claim left its interpreter running"


def test_idle_pooled_sandboxes_yield_to_a_session_the_budget_would_refuse(start_daemon):
    """The pool's reservations count against the sessions' memory budget, but idle ones give way: with two
    ready sandboxes of 256 MiB and a budget of 600 MiB, a session of 256 MiB drains one instead of being
    refused, and the pool does not refill past the budget while the session lives."""
    d = start_daemon('[pool]\nrunners = { python = 2 }\nsessions = {}\n[sessions]\nmemory_budget = "600MiB"\n',
                     pool=True)
    wait_ready(d, 2)
    with d.client() as c, c.session("python", memory=256 * MiB) as s:
        assert s.exec("true").exit_code == 0
        time.sleep(1.0)   # past the refill delays: the budget keeps the pool at one
        assert metric(d, 'sandboxd_pool_ready{runner="python"}') == 1
    wait_ready(d, 2)


def test_a_pooled_sandbox_is_ready_only_once_its_interpreter_holds_its_script(start_daemon):
    """A claim removes the FIFO from the script's path at once, so the sandbox may count as ready only once its
    interpreter has opened the FIFO: one still starting up would then find no script (exit 2, "can't open
    file", seen once in CI). Checked from the host the moment the daemon counts the sandbox ready, and by runs
    claiming at once."""
    from conftest import procs_with_uids, waiting_in_pool
    d = start_daemon("[pool]\nrunners = { python = 1 }\nsessions = {}\n", pool=True)
    port = re.search(r"metrics http://127\.0\.0\.1:(\d+)", d.log()).group(1)
    url = f"http://127.0.0.1:{port}/metrics"
    with d.client() as c:
        for _ in range(6):
            deadline = time.monotonic() + 30
            while 'sandboxd_pool_ready{runner="python"} 1.0' not in urllib.request.urlopen(url, timeout=10).read().decode():
                assert time.monotonic() < deadline, d.log()[-3000:]
            waiting = [p for p in procs_with_uids(d.uid_start, d.uid_start + d.uid_count) if waiting_in_pool(p)]
            assert len(waiting) == 1, waiting
            fds = [os.readlink(f"/proc/{waiting[0].pid}/fd/{n}") for n in os.listdir(f"/proc/{waiting[0].pid}/fd")]
            assert "/work/main.py" in fds, fds
            r = c.run("print(1)")
            assert (r.outcome, r.exit_code, r.stdout) == ("exited", 0, b"1\n"), (r, r.stderr)
            assert pooled_of(d, r.run_id, "prestarted") is True
