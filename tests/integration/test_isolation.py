"""Each property of the sandbox, checked from inside a real run. Every test would fail if its layer were
missing (for instance, without the mount namespace the root would be writable; without the net namespace more
interfaces than lo would be listed)."""
from __future__ import annotations

import json
import os
import socket
import textwrap

import pytest

pytestmark = pytest.mark.cgroup2


def run_json(sandbox, code: str, **kw):
    r = sandbox.run("import json, os, sys\n" + textwrap.dedent(code), **kw)
    assert r.outcome == "exited" and r.exit_code == 0, (r, r.stderr.decode())
    return json.loads(r.stdout)


def test_credentials_and_capabilities(sandbox):
    s = run_json(sandbox, """
        st = dict(l.split(':\\t', 1) for l in open('/proc/self/status').read().splitlines() if ':\\t' in l)
        print(json.dumps({k: st[k].strip() for k in ('Uid', 'Gid', 'Groups', 'CapInh', 'CapPrm', 'CapEff',
                                                    'CapBnd', 'CapAmb', 'NoNewPrivs', 'Seccomp')}))
    """)
    uid = s["Uid"].split()
    assert len(set(uid)) == 1 and int(uid[0]) >= 1000
    assert len(set(s["Gid"].split())) == 1 and int(s["Gid"].split()[0]) >= 1000
    assert s["Groups"] == ""
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(s[cap], 16) == 0, cap
    assert (s["NoNewPrivs"], s["Seccomp"]) == ("1", "2")


def test_no_controlling_terminal_and_own_session(sandbox):
    s = run_json(sandbox, """
        try:
            os.open('/dev/tty', os.O_RDWR); tty = 'opened'
        except OSError as e:
            tty = e.errno
        print(json.dumps({'tty': tty, 'sid': os.getsid(0), 'pid': os.getpid()}))
    """)
    assert s["tty"] != "opened"
    assert s["sid"] == s["pid"]


def test_pid_namespace_shows_only_the_run(sandbox):
    s = run_json(sandbox, """
        pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())
        print(json.dumps({'me': os.getpid(), 'pids': pids, 'ppid': os.getppid()}))
    """)
    assert s["me"] == 2 and s["ppid"] == 1
    # hidepid=invisible also hides init (root-owned): the run sees itself and nothing of the host.
    assert 2 in s["pids"] and set(s["pids"]) <= {1, 2}


def test_only_fds_0_1_2_are_open(sandbox):
    s = run_json(sandbox, """
        fds = {}
        for fd in os.listdir('/proc/self/fd'):
            try:
                fds[fd] = os.readlink('/proc/self/fd/' + fd)
            except OSError:
                pass
        print(json.dumps({'fds': fds, 'cwd': os.getcwd()}))
    """)
    fds = {int(k): v for k, v in s["fds"].items()}
    extra = {fd: v for fd, v in fds.items() if fd > 2 and not v.startswith("/proc/")}  # the listdir's own fd
    assert not extra, extra
    assert s["cwd"] == "/work"


def test_hostname_and_generated_etc(sandbox):
    s = run_json(sandbox, """
        print(json.dumps({'host': os.uname().nodename, 'passwd': open('/etc/passwd').read(),
                          'hosts': open('/etc/hosts').read(), 'etc': sorted(os.listdir('/etc')),
                          'user': __import__('pwd').getpwuid(os.getuid()).pw_name}))
    """)
    assert s["host"] == "sandbox"
    assert s["user"] == "sandbox"
    host_users = {line.split(":")[0] for line in open("/etc/passwd")} - {"root", "nobody"}
    assert not host_users & {line.split(":")[0] for line in s["passwd"].splitlines()}
    assert "shadow" not in s["etc"] and "gshadow" not in s["etc"] and "sudoers" not in s["etc"]


def test_root_is_read_only_and_tmpfs_is_writable(sandbox):
    s = run_json(sandbox, """
        import errno
        res = {}
        for path in ('/newfile', '/usr/evil', '/etc/passwd', '/usr/bin/python3', '/bin/sh', '/dev/evil'):
            try:
                open(path, 'a').close(); res[path] = 'written'
            except OSError as e:
                res[path] = errno.errorcode[e.errno]
        for path in ('/tmp/ok', '/work/ok', '/dev/shm/ok'):
            open(path, 'w').write('x'); res[path] = 'written'
        try:
            os.rename('/usr/bin/python3', '/usr/bin/p')
        except OSError as e:
            res['rename'] = errno.errorcode[e.errno]
        print(json.dumps(res))
    """)
    for path in ("/newfile", "/usr/evil", "/etc/passwd", "/usr/bin/python3", "/bin/sh", "/dev/evil"):
        assert s[path] in ("EROFS", "EACCES"), (path, s[path])
    assert s["/usr/evil"] == "EROFS" and s["/newfile"] == "EROFS"
    assert s["rename"] in ("EROFS", "EACCES")
    assert s["/tmp/ok"] == s["/work/ok"] == s["/dev/shm/ok"] == "written"


def test_mount_flags(sandbox):
    s = run_json(sandbox, """
        mounts = []
        for line in open('/proc/self/mountinfo'):
            f = line.split()
            mounts.append({'target': f[4], 'opts': f[5].split(',')})
        print(json.dumps(mounts))
    """)
    by_target = {m["target"]: m["opts"] for m in s}
    assert "ro" in by_target["/"] and "ro" in by_target["/usr"]
    assert "/sys" not in by_target
    devices = {f"/dev/{d}" for d in ("null", "zero", "full", "random", "urandom")}
    for m in s:
        assert "nosuid" in m["opts"] or m["target"].startswith("/proc/"), m
        if m["target"] not in devices and not m["target"].startswith("/proc/"):
            assert "nodev" in m["opts"], m


def test_dev_holds_only_the_safe_devices_and_no_sys(sandbox):
    s = run_json(sandbox, """
        import stat
        devs = sorted(n for n in os.listdir('/dev') if stat.S_ISCHR(os.stat('/dev/' + n).st_mode))
        print(json.dumps({'devs': devs, 'sys': os.path.exists('/sys'), 'null': open('/dev/null', 'w').write('x'),
                          'urandom': len(open('/dev/urandom', 'rb').read(8))}))
    """)
    assert s["devs"] == ["full", "null", "random", "urandom", "zero"]
    assert s["sys"] is False and s["urandom"] == 8


def test_proc_sensitive_files_masked(sandbox):
    s = run_json(sandbox, """
        res = {}
        for name in ('kcore', 'keys', 'timer_list', 'sched_debug', 'kallsyms', 'sysrq-trigger'):
            try:
                res[name] = len(open('/proc/' + name, 'rb').read(4096))
            except OSError as e:
                res[name] = 'err'
        try:
            open('/proc/sys/kernel/hostname', 'w').write('x'); res['sys_write'] = 'written'
        except OSError as e:
            res['sys_write'] = e.errno
        print(json.dumps(res))
    """)
    for name in ("kcore", "keys", "timer_list", "sched_debug", "kallsyms", "sysrq-trigger"):
        assert s[name] in (0, "err"), (name, s[name])
    assert s["sys_write"] != "written"


def test_network_namespace_has_only_loopback_up(sandbox):
    # A listener on the host's loopback: the sandbox has its own lo, so it must not reach it.
    host = socket.socket()
    host.bind(("127.0.0.1", 0))
    host.listen(1)
    port = host.getsockname()[1]
    try:
        s = run_json(sandbox, f"""
            import socket, errno
            names = [l.split(':')[0].strip() for l in open('/proc/net/dev').read().splitlines()[2:]]
            srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen(1)
            c = socket.create_connection(srv.getsockname(), timeout=2); c.close()  # lo is up
            res = {{'ifaces': names, 'lo_ok': True}}
            for target in (('127.0.0.1', {port}), ('1.1.1.1', 53), ('10.0.0.1', 80)):
                try:
                    socket.create_connection(target, timeout=2); res[str(target)] = 'connected'
                except OSError as e:
                    res[str(target)] = errno.errorcode.get(e.errno, str(e))
            print(json.dumps(res))
        """)
    finally:
        host.close()
    assert s["ifaces"] == ["lo"] and s["lo_ok"]
    assert s[str(("127.0.0.1", port))] == "ECONNREFUSED"
    assert s[str(("1.1.1.1", 53))] == "ENETUNREACH"


def test_ipc_and_uts_namespaces_are_private(sandbox):
    s = run_json(sandbox, """
        print(json.dumps({ns: os.readlink('/proc/self/ns/' + ns) for ns in
                          ('ipc', 'uts', 'net', 'mnt', 'pid', 'cgroup')}))
    """)
    for ns, link in s.items():
        assert link != os.readlink(f"/proc/self/ns/{ns}"), ns


def test_cgroup_namespace_hides_the_host_hierarchy(sandbox):
    s = run_json(sandbox, "print(json.dumps(open('/proc/self/cgroup').read().splitlines()))")
    for line in s:
        assert line.split(":", 2)[2] == "/", s


def test_rlimits(sandbox):
    s = run_json(sandbox, """
        import resource as r
        print(json.dumps({n: r.getrlimit(getattr(r, n)) for n in
                          ('RLIMIT_CORE', 'RLIMIT_FSIZE', 'RLIMIT_NOFILE', 'RLIMIT_STACK', 'RLIMIT_CPU')}))
        try:
            r.setrlimit(r.RLIMIT_NOFILE, (1 << 20, 1 << 20))
        except (ValueError, OSError):
            pass
        else:
            sys.exit(99)
    """)
    assert s["RLIMIT_CORE"] == [0, 0]
    assert s["RLIMIT_FSIZE"][1] > 0 and s["RLIMIT_NOFILE"][1] <= 4096 and s["RLIMIT_CPU"][1] > 0


def test_setuid_binaries_grant_nothing(sandbox):
    """A setuid-root binary of the image still runs with the run's uid: /usr is nosuid and no_new_privs is
    set. `su` exists setuid on Debian; its euid is read from /proc while it waits for a password."""
    r = sandbox.run(textwrap.dedent("""
        import os, subprocess, time, json
        path = next((p for p in ('/usr/bin/su', '/bin/su') if os.path.exists(p)), None)
        if path is None or not os.stat(path).st_mode & 0o4000:
            print(json.dumps({'skip': True})); raise SystemExit
        r, w = os.pipe()
        p = subprocess.Popen([path, 'root', '-c', 'true'], stdin=r, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        try:
            uids = open(f'/proc/{p.pid}/status').read().split('Uid:')[1].split()[:4]
        except (OSError, IndexError):
            uids = None
        p.kill(); p.wait()
        print(json.dumps({'uids': uids, 'me': os.getuid()}))
    """))
    s = json.loads(r.stdout)
    if s.get("skip"):
        pytest.skip("no setuid su in the image")
    if s["uids"] is not None:  # su may also exit at once; if it was still running, it must not be root
        assert all(int(u) == s["me"] for u in s["uids"]), s


def test_seccomp_kill_is_visible_and_names_the_syscall(sandbox):
    """A syscall of a foreign ABI kills the process (SIGSYS); the result says so and, when the kernel logs
    the kill (audit type 1326 in /dev/kmsg), names the syscall."""
    r = sandbox.run("import ctypes\nctypes.CDLL(None).syscall(0x40000000 | 39)")  # x32 getpid
    assert (r.outcome, r.signal) == ("signaled", 31), r
    assert "seccomp" in r.message
    try:
        os.close(os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK))
    except OSError:
        pytest.skip("no readable /dev/kmsg here: the syscall cannot be named")
    assert "x32 getpid (39)" in r.message, r.message


def test_landlock_confines_writes_to_the_run_tmpfs(sandbox):
    """/proc/self/comm is writable by its owner and not under a read-only mount: only Landlock refuses it."""
    from sandboxd.sandbox import landlock
    if not landlock.abi_version():
        pytest.skip("the kernel has no Landlock")
    s = run_json(sandbox, """
        import errno
        res = {}
        for path in ('/proc/self/comm', '/work/ok', '/tmp/ok', '/dev/shm/ok', '/dev/null'):
            try:
                with open(path, 'w') as f:
                    f.write('x')
                res[path] = 'written'
            except OSError as e:
                res[path] = errno.errorcode[e.errno]
        print(json.dumps(res))
    """)
    assert s["/proc/self/comm"] == "EACCES"
    assert s["/work/ok"] == s["/tmp/ok"] == s["/dev/shm/ok"] == s["/dev/null"] == "written"
