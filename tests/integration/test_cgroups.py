"""The cgroup drivers against the real kernel: every driver this host can run (hybrid and v1 here, v2 in the
pure-v2 VM of `make test-cgroup2`). Real child processes join the run cgroups the way the sandbox child does,
then hit the limits. Every test's processes and cgroups are cleaned up by the Lab, pass or fail.
"""
import errno
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from sandboxd.sandbox.cgroups import CgroupError, CgroupLimits

try:
    from . import cgroup_helpers as h
except ImportError:             # tests/integration is not a package
    import cgroup_helpers as h

KINDS = h.host_kinds()
pytestmark = pytest.mark.skipif(not KINDS, reason="needs root and a usable cgroup hierarchy")
MiB = 1 << 20


@pytest.fixture(scope="module", autouse=True)
def nothing_left_behind():
    yield
    assert h.leftovers() == []


@pytest.fixture(params=KINDS or ["none"])
def lab(request):
    lab = h.Lab(request.param)
    try:
        yield lab
    finally:
        lab.close()


@pytest.mark.cgroup2
def test_limits_are_written(lab):
    run = lab.run(memory=64 * MiB, pids=17, cpus=0.25)
    mem, pids, cpu = (h.cgroup_dir(run, c) for c in ("memory", "pids", "cpu"))
    if lab.kind == "v2":
        assert h.read(mem, "memory.max") == str(64 * MiB)
        assert h.read(mem, "memory.swap.max") == "0"
        assert h.read(cpu, "cpu.max") == "25000 100000"
    else:
        # v1 keeps TCP buffers in a separate counter: the run's one budget is split so both together are 64MiB.
        tcp = int(h.read(mem, "memory.kmem.tcp.limit_in_bytes")) if os.path.exists(
            os.path.join(mem, "memory.kmem.tcp.limit_in_bytes")) else 0
        assert tcp == (8 * MiB if tcp else 0)
        assert int(h.read(mem, "memory.limit_in_bytes")) + tcp == 64 * MiB
        assert h.read(mem, "memory.memsw.limit_in_bytes") == h.read(mem, "memory.limit_in_bytes")
        assert h.read(mem, "memory.oom_control").startswith("oom_kill_disable 0")
        assert (h.read(cpu, "cpu.cfs_quota_us"), h.read(cpu, "cpu.cfs_period_us")) == ("25000", "100000")
    assert h.read(pids, "pids.max") == "17"
    paths = run.join_paths()
    assert all(os.path.exists(p) and f"/{h.PREFIX}-{lab.kind}/run-t1/" in p for p in paths)
    kill_domain = {"v2": "/", "hybrid": "/unified/", "v1": "/freezer/"}[lab.kind]
    assert kill_domain in paths[0]


@pytest.mark.cgroup2
def test_usage_counts_cpu_and_memory(lab):
    run = lab.run()
    child = lab.child(run, """
        import time
        data = bytes([1]) * (32 << 20)
        end = time.process_time() + 0.1
        while time.process_time() < end:
            pass
        print("done", flush=True)
        time.sleep(60)
    """)
    assert child.line() == "done"
    usage = run.usage()
    assert usage.cpu_ns >= 50_000_000
    assert 32 * MiB <= usage.peak_memory < 256 * MiB
    assert usage.oom_kills == 0
    assert run.cpu_ns() >= usage.cpu_ns


@pytest.mark.cgroup2
def test_oom_kill_is_counted_and_kills_with_sigkill(lab):
    run = lab.run(memory=48 * MiB)
    child = lab.child(run, """
        chunks = []
        while True:
            chunks.append(bytes([1]) * (1 << 20))   # touched, so really charged
    """)
    assert child.proc.wait(timeout=h.LINE_TIMEOUT) == -signal.SIGKILL
    usage = run.usage()
    assert usage.oom_kills >= 1
    assert 16 * MiB < usage.peak_memory <= 49 * MiB


@pytest.mark.cgroup2
def test_fork_fails_past_pids_max(lab):
    run = lab.run(pids=6)
    child = lab.child(run, """
        import time
        forked = 0
        while True:
            try:
                pid = os.fork()
            except OSError as e:
                print(forked, e.errno, flush=True)
                break
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            forked += 1
        time.sleep(60)
    """)
    forked, error = map(int, child.line().split())
    assert (forked, error) == (5, errno.EAGAIN)        # the child itself is the sixth task


@pytest.mark.cgroup2
def test_cpu_bandwidth_throttles(lab):
    run = lab.run(cpus=0.1)
    child = lab.child(run, """
        import time
        start = time.monotonic()
        while time.monotonic() - start < 0.5:
            pass
        print("done", flush=True)
        time.sleep(60)
    """)
    assert child.line() == "done"
    used = run.cpu_ns()
    # Unthrottled, 0.5 s of spinning costs ~500 ms of CPU; at 0.1 CPU ~50-60 ms. Far from both bounds.
    assert 5_000_000 < used < 250_000_000
    throttled = dict(line.split() for line in h.read(h.cgroup_dir(run, "cpu"), "cpu.stat").splitlines())
    assert int(throttled["nr_throttled"]) > 0


@pytest.mark.cgroup2
def test_kill_ends_the_process_tree_including_a_double_forked_daemon(lab):
    run = lab.run()
    child = lab.child(run, """
        import time
        if os.fork() == 0:
            print(os.getpid(), flush=True)
            time.sleep(60)
            os._exit(0)
        if os.fork() == 0:          # a daemon: new session, parent gone, re-parented away from us
            os.setsid()
            if os.fork() == 0:
                print(os.getpid(), flush=True)
                time.sleep(60)
            os._exit(0)
        time.sleep(60)
    """)
    pids = [int(child.line()), int(child.line())]
    pidfds = [lab.track(pid) for pid in pids]
    with open(run.join_paths()[0]) as f:
        members = {int(p) for p in f.read().split()}
    assert set(pids) | {child.proc.pid} <= members
    run.kill()
    assert child.proc.wait(timeout=10) == -signal.SIGKILL
    assert h.wait_for(lambda: not any(h.alive(fd) for fd in pidfds))
    assert h.wait_for(run.empty)


@pytest.mark.cgroup2
def test_remove_leaves_nothing(lab):
    run = lab.run()
    child = lab.child(run)
    directories = [os.path.dirname(p) for p in run.join_paths()]
    run.remove()
    assert child.proc.wait(timeout=10) == -signal.SIGKILL
    assert not any(os.path.exists(d) for d in directories)
    assert run.empty()
    run.remove()        # idempotent: the Lab removes it again at the end


@pytest.mark.cgroup2
def test_recover_cleans_what_a_crashed_launcher_left(lab):
    # A launcher that creates a run, starts a process in it and dies without cleaning up.
    crashed = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import os, subprocess, sys
        from sandboxd.sandbox.cgroups import CgroupLimits, host_hierarchies, make_driver
        driver = make_driver("{lab.kind}", host_hierarchies(), parent_name="{h.PREFIX}-{lab.kind}")
        run = driver.create("crashed", CgroupLimits(memory=64 << 20, pids=8, cpus=1))
        script = "import sys, time\\nfor p in sys.argv[1:]: open(p, 'w').write('0')\\ntime.sleep(60)"
        child = subprocess.Popen([sys.executable, "-c", script, *run.join_paths()],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(child.pid, flush=True)
        while not open(run.join_paths()[0]).read().split():
            pass
        os._exit(0)
    """)], capture_output=True, text=True, timeout=60)
    assert crashed.returncode == 0, crashed.stderr
    orphan = lab.track(int(crashed.stdout))
    run_dirs = [os.path.join(p, "run-crashed") for p in h.parents(lab.driver)]
    assert all(os.path.isdir(d) for d in run_dirs) and h.alive(orphan)
    assert lab.driver.recover() == ["crashed"]
    assert h.wait_for(lambda: not h.alive(orphan))
    assert not any(os.path.exists(d) for d in run_dirs)
    assert lab.driver.recover() == []


@pytest.mark.cgroup2
def test_a_parent_in_use_by_a_live_launcher_is_refused(lab):
    lab.run()                                   # this process is now the live launcher of the parent
    second = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        from sandboxd.sandbox.cgroups import CgroupError, CgroupLimits, host_hierarchies, make_driver
        driver = make_driver("{lab.kind}", host_hierarchies(), parent_name="{h.PREFIX}-{lab.kind}")
        for attempt in (driver.recover, lambda: driver.create("t2", CgroupLimits(64 << 20, 8, 1))):
            try:
                attempt()
            except CgroupError as e:
                print(e)
    """)], capture_output=True, text=True, timeout=60)
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("in use by another live sandboxd launcher") == 2, second.stdout
    assert lab.driver.recover() == ["t1"]       # while its owner still can


@pytest.mark.cgroup2
def test_teardown_removes_runs_and_the_parent(lab):
    driver = lab.new_driver("-td")
    run = lab.run(driver=driver)
    child = lab.child(run)
    assert driver.usable()
    driver.teardown()
    assert child.proc.wait(timeout=10) == -signal.SIGKILL
    assert h.leftovers(f"{h.PREFIX}-{lab.kind}-td") == []
    assert not driver.usable()


@pytest.mark.cgroup2
def test_create_refuses_bad_input_and_leaves_nothing(lab):
    for run_id in ("", "../x", "a/b", ".hidden", "x" * 200):
        with pytest.raises(CgroupError, match="run id"):
            lab.driver.create(run_id, CgroupLimits(memory=64 * MiB, pids=8, cpus=1))
    for limits in (CgroupLimits(0, 8, 1), CgroupLimits(64 * MiB, 0, 1), CgroupLimits(64 * MiB, 8, 0)):
        with pytest.raises(CgroupError, match="positive"):
            lab.driver.create("t1", limits)
    lab.run()
    with pytest.raises(CgroupError, match="already exists"):
        lab.run()
    assert lab.driver.recover() == ["t1"]


# --- v2 only: where the driver puts the daemon and the parent -----------------------------------------------

def v2_only(lab):
    if lab.kind != "v2":
        pytest.skip("cgroup v2 delegation rules")


def own_cgroup(lab, name):
    """A fresh cgroup beside the test parent (controllers are enabled there), standing in for a daemon's own."""
    path = os.path.join(os.path.dirname(lab.driver.parent), f"{h.PREFIX}-{name}")
    os.mkdir(path)
    return path


def run_as_daemon(own: str, script: str) -> subprocess.CompletedProcess:
    """A python process that moves itself into `own`, then runs `script` there."""
    prelude = "import os, sys\nwith open(sys.argv[1] + '/cgroup.procs', 'w') as f:\n    f.write('0')\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(script), own],
                          capture_output=True, text=True, timeout=120)


def remove_tree(path):
    for root, _, _ in sorted(os.walk(path), key=lambda entry: -entry[0].count("/")):
        assert h.wait_for(lambda: not os.path.exists(root) or _rmdir(root)), root


def _rmdir(path):
    try:
        os.rmdir(path)
        return True
    except OSError:
        return False


@pytest.mark.cgroup2
def test_v2_daemon_alone_in_its_cgroup_moves_itself_into_a_leaf(lab):
    v2_only(lab)
    own = own_cgroup(lab, "own")
    try:
        # The daemon runs setup() before it starts the launcher; the launcher then does everything else.
        done = run_as_daemon(own, f"""
            from sandboxd.sandbox.cgroups import CgroupLimits, detect
            driver = detect(parent_name="{h.PREFIX}-inner")
            driver.setup()
            print(open("/proc/self/cgroup").read().strip())
            pid = os.fork()
            if pid == 0:                        # the launcher: same parent, nobody moved again
                launcher = detect(parent_name="{h.PREFIX}-inner")
                launcher.setup()
                launcher.recover()
                launcher.create("r1", CgroupLimits(memory=64 << 20, pids=8, cpus=1)).remove()
                same = launcher.parent == driver.parent
                launcher.teardown()
                os._exit(0 if same else 3)
            print("launcher", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
            print(driver.parent)
        """)
        assert done.returncode == 0, done.stderr
        cgroup, launcher, parent = done.stdout.splitlines()
        assert cgroup.endswith(f"/{h.PREFIX}-own/{h.PREFIX}-inner-daemon")
        assert launcher == "launcher 0"
        assert parent == os.path.join(own, f"{h.PREFIX}-inner")
        assert not os.path.exists(parent)
    finally:
        remove_tree(own)


@pytest.mark.cgroup2
def test_v2_daemon_sharing_its_cgroup_is_refused_and_moves_nobody(lab):
    v2_only(lab)
    own = own_cgroup(lab, "shared")
    try:
        done = run_as_daemon(own, f"""
            import subprocess
            from sandboxd.sandbox.cgroups import CgroupError, detect
            other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            try:
                detect(parent_name="{h.PREFIX}-inner").setup()
            except CgroupError as e:
                print(e)
            with open(sys.argv[1] + "/cgroup.procs") as f:
                print(sorted(map(int, f.read().split())) == sorted([os.getpid(), other.pid]))
            other.kill()
            other.wait()
        """)
        assert done.returncode == 0, done.stderr
        message, nobody_moved = done.stdout.splitlines()
        assert "Delegate=yes" in message and "parent_path" in message
        assert nobody_moved == "True"
        assert [d for d in os.listdir(own) if os.path.isdir(os.path.join(own, d))] == []
    finally:
        remove_tree(own)


@pytest.mark.cgroup2
def test_v2_parent_path_is_used_as_given(lab):
    v2_only(lab)
    hierarchy = lab.driver.hierarchy
    cgroup = os.path.join(os.path.dirname(lab.driver.parent), f"{h.PREFIX}-delegated")
    parent_path = "/" + os.path.relpath(cgroup, hierarchy.mountpoint)
    driver = lab.new_driver("-pp", parent_path=os.path.normpath(os.path.join(hierarchy.root, parent_path)))
    run = lab.run(driver=driver)
    assert run.join_paths() == [os.path.join(cgroup, "run-t1", "cgroup.procs")]
    driver.teardown()                   # created by setup(), so removed by teardown()
    assert not os.path.exists(cgroup)
