"""THREATS.md, Information: a run sees its own processes, a masked /proc, an environment built from scratch, its
own hostname and generated /etc, nothing of other runs (concurrent or earlier), and no kernel log.

Already covered in tests/integration/test_isolation.py (not repeated): /proc pids of a lone payload, hostname via
uname, /etc/passwd users vs the host's, shadow/sudoers absent, reading kcore/keys/timer_list/sched_debug/
kallsyms/sysrq-trigger, private ipc/uts/net/mnt/pid/cgroup namespaces.
"""
from __future__ import annotations

import json
import os
import threading
import uuid

from conftest import attack, probe, record, script, sleepers, still_serves


def test_proc_lists_only_the_runs_processes(sandbox, daemon):
    with sleepers([None]) as (host,):
        s = probe(sandbox, f"""
            kids = []
            for _ in range(3):
                pid = os.fork()
                if pid == 0:
                    time.sleep(30); os._exit(0)
                kids.append(pid)
            out['visible'] = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())
            out['mine'] = sorted(kids + [os.getpid()])
            out['host'] = [os.path.exists(f'/proc/{{p}}') for p in ({daemon.proc.pid}, {host.pid}, 1)]
            out['sysvipc'] = [open(f'/proc/sysvipc/{{k}}').read().count('\\n') for k in ('shm', 'msg', 'sem')]
            for k in kids:
                os.kill(k, 9); os.waitpid(k, 0)
        """)
    assert s["visible"] == s["mine"]
    assert s["host"] == [False, False, False]       # init (pid 1) is root-owned: hidepid=invisible hides it too
    assert s["sysvipc"] == [1, 1, 1]                  # headers only: the run's own, empty IPC namespace


# Masked: bound to /dev/null on a nodev mount (cannot be opened: EACCES) or an empty read-only tmpfs, or absent from this kernel.
MASKED = ["kcore", "keys", "key-users", "timer_list", "timer_stats", "sched_debug", "latency_stats", "kallsyms",
          "kmsg", "kpagecount", "kpageflags", "kpagecgroup", "config.gz", "vmallocinfo", "slabinfo", "pagetypeinfo",
          "buddyinfo", "zoneinfo", "iomem", "ioports", "sys/kernel/random/boot_id"]


def test_sensitive_proc_files_are_masked_or_absent(sandbox):
    s = probe(sandbox, f"""
        for name in {MASKED!r}:
            p = '/proc/' + name
            try:
                out[name] = len(open(p, 'rb').read(4096))
            except OSError as e:
                out[name] = errno.errorcode[e.errno]
        for name in ('acpi', 'scsi', 'firmware', 'bus', 'fs', 'irq', 'asound'):
            p = '/proc/' + name
            out[name] = os.listdir(p) if os.path.isdir(p) else 'absent'
    """)
    for name in MASKED:
        assert s[name] in ("EACCES", "ENOENT"), (name, s[name])
    for name in ("acpi", "scsi", "firmware", "bus", "fs", "irq", "asound"):
        assert s[name] in ([], "absent"), (name, s[name])


def test_kernel_log_is_denied(sandbox):
    s = probe(sandbox, """
        import subprocess
        out['dev_kmsg'] = err(os.open, '/dev/kmsg', os.O_RDONLY)
        out['proc_kmsg'] = err(os.open, '/proc/kmsg', os.O_RDONLY)
        out['syslog'] = sc('syslog', 3, ctypes.create_string_buffer(4096), 4096)
        dmesg = next((p for p in ('/usr/bin/dmesg', '/bin/dmesg') if os.path.exists(p)), None)
        out['dmesg'] = subprocess.run([dmesg], capture_output=True).returncode if dmesg else 'absent'
    """)
    assert (s["dev_kmsg"], s["proc_kmsg"], s["syslog"]) == ("ENOENT", "EACCES", "EPERM")
    assert s["dmesg"] != 0


def test_the_environment_holds_no_daemon_variables(own_daemon):
    """The daemon runs with a secret in its environment; the run (and what it spawns) sees only the runner's
    env and the allowlisted request variables."""
    secret = f"sbx_{uuid.uuid4().hex}"
    d = own_daemon(env={"SANDBOXD_CANARY_TOKEN": secret, "AWS_SECRET_ACCESS_KEY": secret,
                        "LD_PRELOAD": "", "PYTHONPATH": "/nonexistent"})
    with d.client() as c:
        r = attack(c, """
            import subprocess
            out = {'env': dict(os.environ),
                   'proc': open('/proc/self/environ', 'rb').read().decode(errors='replace'),
                   'shell': subprocess.run(['/bin/sh', '-c', 'env'], capture_output=True, text=True).stdout}
            print(json.dumps(out))
        """, env={"APP_OK": "1", "LD_PRELOAD": "/tmp/evil.so", "PYTHONPATH": "/tmp", "SANDBOXD_X": "1",
                  "BASH_ENV": "/tmp/x"})
        assert (r.outcome, r.exit_code) == ("exited", 0), r
        s = json.loads(r.stdout)
        rec = record(c, r.run_id)
    assert secret not in r.stdout.decode()
    assert set(s["env"]) == {"PATH", "HOME", "LANG", "TMPDIR", "PYTHONDONTWRITEBYTECODE", "APP_OK"}, s["env"]
    assert "LD_PRELOAD" not in s["shell"] and "SANDBOXD" not in s["shell"]
    assert sorted(rec["dropped_env"]) == ["BASH_ENV", "LD_PRELOAD", "PYTHONPATH", "SANDBOXD_X"]


def test_hostname_and_etc_are_the_sandboxes(sandbox):
    host_etc = set(os.listdir("/etc"))
    s = probe(sandbox, """
        out['uname'] = os.uname().nodename
        out['proc_sys'] = os.listdir('/proc/sys')     # masked: no host tunables to read
        out['etc_hostname'] = open('/etc/hostname').read().strip()
        out['hosts'] = open('/etc/hosts').read()
        out['etc'] = sorted(os.listdir('/etc'))
        out['absent'] = {p: os.path.exists(p) for p in ('/etc/shadow', '/etc/machine-id', '/etc/ssh', '/root',
                                                         '/home', '/etc/sandboxd', '/var', '/boot', '/srv')}
    """)
    assert (s["uname"], s["etc_hostname"]) == ("sandbox",) * 2
    assert s["proc_sys"] == []
    assert s["hosts"].split() == ["127.0.0.1", "localhost", "sandbox", "::1", "localhost", "ip6-localhost",
                                  "ip6-loopback"]
    assert not any(s["absent"].values()), s["absent"]
    generated = {"passwd", "group", "hosts", "hostname", "nsswitch.conf", "resolv.conf"}
    assert set(s["etc"]) - generated <= host_etc and len(s["etc"]) < 20, s["etc"]


def test_concurrent_runs_cannot_see_each_other(sandbox):
    """Run A leaves files in /tmp, /work and /dev/shm, a SysV segment and message queue with known keys, an
    abstract socket and a process, then waits; run B, at the same time, looks for each of them."""
    token = uuid.uuid4().hex[:8]
    key = int(token, 16) & 0x7fffffff
    a_code = script(f"""
        for p in ('/tmp/a-{token}', '/work/a-{token}', '/dev/shm/a-{token}'):
            open(p, 'w').write('secret')
        libc.shmget.restype = libc.msgget.restype = ctypes.c_int
        assert libc.shmget({key}, 4096, 0o1000 | 0o666) >= 0 and libc.msgget({key}, 0o1000 | 0o666) >= 0
        srv = socket.socket(socket.AF_UNIX); srv.bind('\\0a-{token}'); srv.listen()
        if os.fork() == 0:
            os.execv('/bin/sleep', ['sleep-{token}', '30'])
        print(json.dumps({{'uid': os.getuid(), 'pid': os.getpid()}}), flush=True)
        time.sleep(2.5)                             # long enough for run B; then A ends by itself
    """)
    b_code = f"""
        libc.shmget.restype = libc.msgget.restype = ctypes.c_int
        out['files'] = [os.path.exists(p) for p in ('/tmp/a-{token}', '/work/a-{token}', '/dev/shm/a-{token}')]
        out['shm'] = (libc.shmget({key}, 0, 0), errno.errorcode.get(ctypes.get_errno()))
        out['msg'] = (libc.msgget({key}, 0), errno.errorcode.get(ctypes.get_errno()))
        out['abstract'] = err(socket.socket(socket.AF_UNIX).connect, '\\0a-{token}')
        out['procs'] = [open(f'/proc/{{p}}/cmdline').read() for p in os.listdir('/proc') if p.isdigit()]
        out['uid'] = os.getuid()
    """
    a_info, a_result = {}, {}
    ready = threading.Event()

    def run_a():
        with sandbox.__class__(sandbox.target) as c:
            for event in c.execute(a_code, wall_time=20):
                if getattr(event, "stream", None) == "stdout" and not ready.is_set():
                    a_info.update(json.loads(event.data))
                    ready.set()
                elif hasattr(event, "outcome"):
                    a_result["r"] = event
                    break
            ready.set()

    t = threading.Thread(target=run_a)
    t.start()
    try:
        assert ready.wait(15) and a_info, a_result
        s = probe(sandbox, b_code)
    finally:
        t.join(30)
    assert a_result["r"].outcome == "exited", a_result
    assert record(sandbox, a_result["r"].run_id)["outcome"] == "exited"
    assert s["files"] == [False, False, False]
    assert s["shm"] == s["msg"] == [-1, "ENOENT"]
    assert s["abstract"] == "ECONNREFUSED"
    assert not any(f"sleep-{token}" in c for c in s["procs"]), s["procs"]
    assert s["uid"] != a_info["uid"]


def test_nothing_persists_from_one_run_to_the_next(sandbox):
    token = uuid.uuid4().hex[:8]
    key = int(token, 16) & 0x7fffffff
    first = probe(sandbox, f"""
        for p in ('/tmp/p-{token}', '/work/p-{token}', '/dev/shm/p-{token}'):
            open(p, 'w').write('left behind')
        libc.shmget.restype = ctypes.c_int
        out['shm'] = libc.shmget({key}, 4096, 0o1000 | 0o666) >= 0
        out['uid'] = os.getuid()
    """)
    second = probe(sandbox, f"""
        libc.shmget.restype = ctypes.c_int
        out['files'] = [os.path.exists(p) for p in ('/tmp/p-{token}', '/work/p-{token}', '/dev/shm/p-{token}')]
        out['shm'] = libc.shmget({key}, 0, 0)
        out['tmp'] = sorted(os.listdir('/tmp')) + sorted(os.listdir('/dev/shm'))
        out['work'] = sorted(os.listdir('/work'))
    """)
    assert first["shm"] is True
    assert second == {"files": [False, False, False], "shm": -1, "tmp": [], "work": ["main.py"]}
    still_serves(sandbox)
