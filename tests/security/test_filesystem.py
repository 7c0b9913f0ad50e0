"""THREATS.md, Filesystem: the image and the root are read-only, mounts cannot be changed, the host's binaries
cannot be rewritten through /proc, nothing leaks in through descriptors or the working directory, and /proc,
/sys and /dev expose nothing writable of the host.

Already covered in tests/integration/test_isolation.py (not repeated): open(..., 'a') of a few paths,
the mount flags table, the list of character devices, /proc masking by read.
"""
from __future__ import annotations

import json
import os
import pathlib

import pytest

from conftest import attack, host_python_binaries, probe, run_uids, sha256_file


def one(sandbox, expr: str, **limits):
    return probe(sandbox, f"out['r'] = {expr}", **limits)["r"]


# Each of these reaches mnt_want_write() before any permission check, so only the read-only mounts (the root
# tmpfs remounted ro, the ro binds of the image, the ro /dev tmpfs) give EROFS. Remove them and the answer
# becomes EACCES (the uid owns none of these directories) or success: every case then fails.
READ_ONLY_WRITES = [
    ("create-in-root", "err(os.open, '/newfile', os.O_CREAT | os.O_WRONLY, 0o644)"),
    ("create-in-etc", "err(os.open, '/etc/ld.so.preload', os.O_CREAT | os.O_WRONLY, 0o644)"),
    ("create-in-usr-bin", "err(os.open, '/usr/bin/evil', os.O_CREAT | os.O_WRONLY, 0o755)"),
    ("create-in-dev", "err(os.open, '/dev/evil', os.O_CREAT | os.O_WRONLY, 0o644)"),
    ("mkdir-root", "err(os.mkdir, '/x')"),
    ("mkdir-usr", "err(os.mkdir, '/usr/x')"),
    ("mkdir-etc", "err(os.mkdir, '/etc/x')"),
    ("unlink-etc-passwd", "err(os.unlink, '/etc/passwd')"),
    ("unlink-interpreter", "err(os.unlink, '/usr/bin/python3.11')"),
    ("unlink-bin-symlink", "err(os.unlink, '/bin')"),
    ("rmdir-usr", "err(os.rmdir, '/usr')"),
    ("rename-etc-hosts", "err(os.rename, '/etc/hosts', '/etc/hosts.old')"),
    ("rename-over-interpreter", "err(os.rename, '/usr/bin/python3', '/usr/bin/python3.11')"),
    ("symlink-in-usr-bin", "err(os.symlink, '/tmp/evil', '/usr/bin/python3.99')"),
    ("hardlink-interpreter", "err(os.link, '/usr/bin/python3.11', '/usr/bin/py')"),
    ("truncate-with-o_trunc", "err(os.open, '/usr/bin/python3.11', os.O_WRONLY | os.O_TRUNC)"),
    ("chmod-interpreter", "err(os.chmod, '/usr/bin/python3.11', 0o777)"),
    ("utime-interpreter", "err(os.utime, '/usr/bin/python3.11', (0, 0))"),
    ("setxattr-etc-passwd", "err(os.setxattr, '/etc/passwd', 'user.x', b'1')"),
    ("fifo-in-usr", "err(os.mkfifo, '/usr/fifo')"),
]


@pytest.mark.parametrize("expr", [c[1] for c in READ_ONLY_WRITES], ids=[c[0] for c in READ_ONLY_WRITES])
def test_image_and_root_are_read_only(sandbox, expr):
    assert one(sandbox, expr) == "EROFS"


def test_rename_over_the_interpreter_from_tmp_crosses_a_mount(sandbox):
    # The writable tmpfs and the image are different mounts: rename cannot replace a file of the image.
    assert one(sandbox, "(open('/tmp/x', 'w').close(), err(os.rename, '/tmp/x', '/usr/bin/python3.11'))[1]") \
        == "EXDEV"


def test_read_only_mounts_behind_the_permission_checks(sandbox):
    """Writes to root-owned existing files of the image answer EACCES (permissions are checked first), so the
    read-only layer behind them is checked directly: statvfs reports ST_RDONLY."""
    s = probe(sandbox, """
        for p in ('/', '/usr', '/etc', '/etc/ld.so.cache', '/dev', '/proc/sys', '/tmp', '/work', '/dev/shm'):
            out[p] = bool(os.statvfs(p).f_flag & os.ST_RDONLY)
        out['write-etc-passwd'] = err(os.open, '/etc/passwd', os.O_WRONLY)
        out['write-interpreter'] = err(os.open, '/usr/bin/python3.11', os.O_WRONLY)
    """)
    # The root tmpfs is read-only as a superblock, so even the permission check answers EROFS there; the image
    # binds are read-only mounts of a writable filesystem, where DAC answers first.
    assert (s.pop("write-etc-passwd"), s.pop("write-interpreter")) == ("EROFS", "EACCES")
    assert s == {"/": True, "/usr": True, "/etc": True, "/etc/ld.so.cache": True, "/dev": True, "/proc/sys": True,
                 "/tmp": False, "/work": False, "/dev/shm": False}


# mount(2) and the new mount API. Two layers answer EPERM: the seccomp profile (all of these are in `denied`)
# and the missing CAP_SYS_ADMIN. Cases marked (seccomp) would succeed or answer differently without the profile,
# so they fail if the profile loses the rule; the others hold as long as either layer holds.
MOUNT_CALLS = [
    ("mount-tmpfs", "sc('mount', b'none', b'/tmp', b'tmpfs', 0, 0)"),
    ("mount-fresh-proc", "sc('mount', b'proc', b'/tmp', b'proc', 0, 0)"),
    ("remount-root-rw", "sc('mount', 0, b'/', 0, 0x20, 0)"),                           # MS_REMOUNT
    ("remount-bind-usr-rw", "sc('mount', 0, b'/usr', 0, 0x20 | 0x1000, 0)"),          # MS_REMOUNT | MS_BIND
    ("bind-tmp-over-usr", "sc('mount', b'/tmp', b'/usr', 0, 0x1000, 0)"),              # MS_BIND
    ("move-work", "sc('mount', b'/work', b'/tmp', 0, 0x2000, 0)"),                      # MS_MOVE
    ("mount-cgroup2", "sc('mount', b'cgroup2', b'/tmp', b'cgroup2', 0, 0)"),
    ("mount-cgroup-v1-memory", "sc('mount', b'cgroup', b'/tmp', b'cgroup', 0, b'memory')"),
    ("umount-proc-keys-mask", "sc('umount2', b'/proc/keys', 2)"),                       # MNT_DETACH: unmask
    ("umount-proc-sys-ro", "sc('umount2', b'/proc/sys', 2)"),
    ("umount-root", "sc('umount2', b'/', 2)"),
    ("fsopen-tmpfs", "sc('fsopen', b'tmpfs', 0)"),
    ("fspick-root", "sc('fspick', AT_FDCWD, b'/', 0)"),
    ("fsconfig (seccomp)", "sc('fsconfig', -1, 0, 0, 0, 0)"),                           # else EBADF
    ("fsmount (seccomp)", "sc('fsmount', -1, 0, 0)"),                                   # else EBADF
    ("open_tree-plain (seccomp)", "sc('open_tree', AT_FDCWD, b'/tmp', 0)"),             # else an O_PATH fd
    ("open_tree-clone", "sc('open_tree', AT_FDCWD, b'/usr', 1)"),                       # OPEN_TREE_CLONE
    ("move_mount", "sc('move_mount', AT_FDCWD, b'/work', AT_FDCWD, b'/tmp', 0)"),
    # struct mount_attr {attr_set, attr_clr, propagation, userns_fd}: clear MOUNT_ATTR_RDONLY on /.
    ("mount_setattr-clear-rdonly",
     "sc('mount_setattr', AT_FDCWD, b'/', 0, ctypes.create_string_buffer(struct.pack('QQQQ', 0, 1, 0, 0)), 32)"),
]


@pytest.mark.parametrize("expr", [c[1] for c in MOUNT_CALLS], ids=[c[0] for c in MOUNT_CALLS])
def test_mounts_cannot_change(sandbox, expr):
    s = probe(sandbox, f"out['r'] = {expr}\nout['root_ro'] = bool(os.statvfs('/').f_flag & os.ST_RDONLY)")
    assert s == {"r": "EPERM", "root_ro": True}


# Escape primitives. open_by_handle_at ignores the mount namespace ("shocker"); chroot and pivot_root are the
# classic ways out of a root; device nodes give raw access to disks and memory.
ESCAPES = [
    # seccomp + CAP_DAC_READ_SEARCH
    ("open_by_handle_at", "sc('open_by_handle_at', AT_FDCWD, ctypes.create_string_buffer(64), 0)", "EPERM"),
    # seccomp only: unprivileged processes may call it; it is the half that finds the handles
    ("name_to_handle_at (seccomp)",
     "sc('name_to_handle_at', AT_FDCWD, b'/tmp', ctypes.create_string_buffer(struct.pack('Ii', 128, 0) + bytes(128)),"
     " ctypes.byref(ctypes.c_int()), 0)", "EPERM"),
    ("chroot", "sc('chroot', b'/tmp')", "EPERM"),                                        # seccomp + CAP_SYS_CHROOT
    ("pivot_root", "sc('pivot_root', b'/tmp', b'/tmp')", "EPERM"),                      # seccomp + CAP_SYS_ADMIN
    # mknod of devices: the seccomp rule on the mode, CAP_MKNOD, and nodev on /tmp
    ("mknod-char-mem", "sc('mknod', b'/tmp/mem', 0o020600, os.makedev(1, 1))", "EPERM"),
    ("mknod-block-vda", "sc('mknod', b'/tmp/vda', 0o060600, os.makedev(254, 0))", "EPERM"),
    ("mknodat-char-kmsg", "sc('mknodat', AT_FDCWD, b'/work/kmsg', 0o020600, os.makedev(1, 11))", "EPERM"),
    ("mknod-char-high-bits", "sc('mknod', b'/tmp/m2', (1 << 32) | 0o020600, os.makedev(1, 1))", "EPERM"),
    # ... while FIFOs, sockets and regular files stay allowed: the rule is about devices, not mknod itself
    ("mknod-fifo-allowed", "sc('mknod', b'/tmp/fifo', 0o010600, 0)", 0),
    ("mknodat-socket-allowed", "sc('mknodat', AT_FDCWD, b'/tmp/sock', 0o140600, 0)", 0),
    ("mknod-regular-allowed", "sc('mknod', b'/work/file', 0o100600, 0)", 0),
]


@pytest.mark.parametrize("expr,expected", [c[1:] for c in ESCAPES], ids=[c[0] for c in ESCAPES])
def test_escape_primitives(sandbox, expr, expected):
    assert one(sandbox, expr) == expected


# runc CVE-2019-5736: a process of the container opens the runtime's binary through /proc/self/exe (or a
# sibling's /proc/<pid>/exe) and overwrites it. Here the interpreter belongs to root (DAC: EACCES) on a
# read-only bind (EROFS) and is being executed (ETXTBSY); the launcher's binary is not in the run's root at all.
EXE_WRITES = [
    ("self-exe-wronly", "err(os.open, '/proc/self/exe', os.O_WRONLY)"),
    ("self-exe-rdwr", "err(os.open, '/proc/self/exe', os.O_RDWR)"),
    ("self-exe-trunc", "err(os.open, '/proc/self/exe', os.O_WRONLY | os.O_TRUNC)"),
    ("self-exe-truncate", "err(os.truncate, '/proc/self/exe', 0)"),
    ("self-exe-o_path-reopen", "err(os.open, '/proc/self/fd/%d' % os.open('/proc/self/exe', os.O_PATH), os.O_WRONLY)"),
    ("self-exe-rdonly-reopen", "err(os.open, '/proc/self/fd/%d' % os.open('/proc/self/exe', os.O_RDONLY), os.O_RDWR)"),
    ("self-exe-chmod", "err(os.chmod, '/proc/self/exe', 0o6777)"),
    ("map_files-reopen",
     "err(os.open, '/proc/self/map_files/' + next(l.split()[0] for l in open('/proc/self/maps')"
     " if l.rstrip().endswith('python3.11')), os.O_RDWR)"),
    ("child-exe",
     "(lambda p: (time.sleep(0.2), err(os.open, f'/proc/{p.pid}/exe', os.O_WRONLY), p.kill(), p.wait())[1])"
     "(__import__('subprocess').Popen(['/usr/bin/python3', '-c', 'import time; time.sleep(5)']))"),
    ("init-exe", "err(os.open, '/proc/1/exe', os.O_WRONLY)"),
]


@pytest.mark.parametrize("expr", [c[1] for c in EXE_WRITES], ids=[c[0] for c in EXE_WRITES])
def test_proc_self_exe_cannot_be_overwritten(sandbox, expr):
    before = {p: (sha256_file(p), os.stat(p).st_mtime_ns, os.stat(p).st_mode) for p in host_python_binaries()}
    assert one(sandbox, expr) in ("EACCES", "EROFS", "ETXTBSY", "EPERM", "ENOENT")
    after = {p: (sha256_file(p), os.stat(p).st_mtime_ns, os.stat(p).st_mode) for p in host_python_binaries()}
    assert after == before


def test_the_launchers_binary_and_sources_are_not_in_the_root(sandbox):
    own = [p for p in host_python_binaries() if not p.startswith("/usr/")]  # the daemon's interpreter, if apart
    paths = own + [os.path.dirname(p) for p in own] + [str(pathlib.Path(__file__).resolve().parents[2] / "sandboxd")]
    s = probe(sandbox, f"out = {{p: os.path.exists(p) for p in {paths!r}}}")
    assert not any(s.values()), s


def test_planted_links_and_fifos_are_never_followed(sandbox, daemon, tmp_path):
    """The run plants symlinks, hardlinks and FIFOs wherever it can write, pointing at a host file (directly and
    through /proc/1/root), and replaces its own script with a link. Inputs were written before the payload
    existed and the daemon collects nothing from the run's filesystem; cleanup is an unmount in a namespace the
    host never enters. The host file and the daemon's directories must come out untouched."""
    canary = tmp_path / "canary"
    canary.write_text("host canary\n")
    os.chmod(canary, 0o600)
    before = (canary.read_bytes(), os.stat(canary))
    runtime_before = sorted(os.listdir(daemon.runtime_dir))
    r = attack(sandbox, f"""
        host = {str(canary)!r}
        for d in ('/work', '/tmp', '/dev/shm'):
            for name, target in (('link', host), ('proc1', '/proc/1/root' + host), ('etc', '/etc/passwd')):
                os.symlink(target, f'{{d}}/{{name}}')
            os.mkfifo(f'{{d}}/fifo')
            out[d + ':hardlink'] = err(os.link, host, f'{{d}}/hard')
        os.unlink('/work/main.py'); os.symlink(host, '/work/main.py')
        os.mkfifo('/work/stdout'); os.symlink(host, '/work/output')
        out['host-visible'] = os.path.exists(host)
        print(json.dumps(out))
    """)
    assert r.outcome == "exited" and r.exit_code == 0, r
    s = json.loads(r.stdout)
    assert s == {"/work:hardlink": "ENOENT", "/tmp:hardlink": "ENOENT", "/dev/shm:hardlink": "ENOENT",
                 "host-visible": False}
    st = os.stat(canary)
    assert (canary.read_bytes(), st.st_mode, st.st_uid, st.st_gid, st.st_nlink) == \
        (before[0], before[1].st_mode, before[1].st_uid, before[1].st_gid, 1)
    assert sorted(os.listdir(daemon.runtime_dir)) == runtime_before
    # Nothing of the daemon's own directories belongs to a run's uid.
    uids = run_uids(daemon)
    for top in (daemon.state_dir, daemon.runtime_dir):
        for dirpath, dirnames, filenames in os.walk(top):
            for name in dirnames + filenames:
                assert os.lstat(os.path.join(dirpath, name)).st_uid not in uids, os.path.join(dirpath, name)


def test_no_leaked_descriptors_or_host_working_directory(sandbox):
    """runc CVE-2024-21626 leaked a host directory fd, reachable as /proc/self/fd/N and as cwd. Probe every fd
    number up to the limit with fcntl (not only what /proc lists) and try to climb out of the working
    directory."""
    s = probe(sandbox, """
        import fcntl, resource
        def open_fds():
            fds = []
            for fd in range(resource.getrlimit(resource.RLIMIT_NOFILE)[0]):
                try:
                    fcntl.fcntl(fd, fcntl.F_GETFD); fds.append(fd)
                except OSError:
                    pass
            return fds
        out['payload'] = open_fds()
        out['targets'] = [os.readlink(f'/proc/self/fd/{fd}') for fd in (0, 1, 2)]
        out['cwd'] = os.getcwd()
        out['cwd_link'] = os.readlink('/proc/self/cwd')
        out['root_link'] = os.readlink('/proc/self/root')
        os.chdir('/proc/self/cwd/../../../../..')
        out['climbed'] = os.getcwd()
        out['climbed_is_root'] = os.stat('.') == os.stat('/')
    """)
    assert s["payload"] == [0, 1, 2]
    assert s["targets"][0].startswith(("/memfd:", "pipe:", "/dev/null")), s["targets"]
    assert all(t.startswith("pipe:") for t in s["targets"][1:]), s["targets"]
    assert (s["cwd"], s["cwd_link"], s["root_link"]) == ("/work", "/work", "/")
    assert s["climbed"] == "/" and s["climbed_is_root"]


DEV_ABSENT = ["mem", "kmem", "port", "kmsg", "console", "tty", "tty0", "ptmx", "pts", "vda", "sda", "nvme0n1",
              "loop0", "loop-control", "mapper", "net", "fuse", "kvm", "vsock", "vhost-net", "watchdog", "hpet",
              "rtc0", "cpu", "dri", "mqueue", "hugepages", "snd", "input", "uinput", "userfaultfd", "autofs"]


def test_dev_holds_no_host_device(sandbox):
    s = probe(sandbox, f"out = {{n: err(os.stat, '/dev/' + n) for n in {DEV_ABSENT!r}}}")
    assert s == {n: "ENOENT" for n in DEV_ABSENT}


# /proc/sys is masked with an empty read-only tmpfs (checked by statvfs above), so none of its files exist
# inside; sysrq-trigger is masked (or absent: this kernel may lack it); /sys is absent.
KERNEL_WRITES = [
    "/proc/sys/kernel/core_pattern", "/proc/sys/kernel/modprobe", "/proc/sys/kernel/hostname",
    "/proc/sys/kernel/randomize_va_space", "/proc/sys/vm/drop_caches", "/proc/sys/vm/overcommit_memory",
    "/proc/sys/net/ipv4/ip_forward", "/proc/sys/fs/file-max", "/proc/sys/kernel/sysrq",
    "/sys/kernel/uevent_helper", "/sys/fs/cgroup/cgroup.procs", "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    "/sys/fs/cgroup/pids.max", "/sys/power/state",
]


@pytest.mark.parametrize("path", KERNEL_WRITES)
def test_kernel_settings_are_not_writable(sandbox, path):
    # Absent inside: /sys is not mounted and /proc/sys is masked, whatever settings this kernel has.
    assert one(sandbox, f"err(os.open, {path!r}, os.O_WRONLY)") == "ENOENT"


def test_sysrq_trigger_is_masked_or_absent(sandbox):
    s = probe(sandbox, """
        p = '/proc/sysrq-trigger'
        out['exists'] = os.path.exists(p)
        out['is_null'] = out['exists'] and os.stat(p).st_rdev == os.stat('/dev/null').st_rdev
    """)
    assert not s["exists"] or s["is_null"], s


def test_no_sys_and_no_cgroup_filesystem(sandbox):
    """Escaping the cgroup or raising its limits needs a writable cgroupfs: none is mounted, none can be, and
    /proc/self/cgroup shows the run's cgroup as its root."""
    s = probe(sandbox, """
        out['sys'] = os.path.exists('/sys')
        out['fstypes'] = sorted({l.split(' - ')[1].split()[0] for l in open('/proc/self/mountinfo')})
        out['cgroup_paths'] = sorted({l.rstrip('\\n').split(':', 2)[2] for l in open('/proc/self/cgroup')})
    """)
    assert s["sys"] is False
    assert not {"cgroup", "cgroup2", "sysfs", "debugfs", "securityfs", "bpf", "tracefs"} & set(s["fstypes"])
    assert s["cgroup_paths"] == ["/"]


def test_writes_to_masked_proc_files_reach_nothing(sandbox):
    """Masks are binds of /dev/null on a nodev mount (files: the node cannot be opened at all) or empty read-only
    tmpfs (directories): reading shows nothing and writing reaches nothing."""
    s = probe(sandbox, """
        for p in ('/proc/timer_list', '/proc/keys', '/proc/kallsyms'):
            out[p] = (os.stat(p).st_rdev == os.stat('/dev/null').st_rdev, err(os.open, p, os.O_RDONLY),
                      err(os.open, p, os.O_WRONLY))
        for d in ('/proc/acpi', '/proc/fs', '/proc/irq', '/proc/bus'):
            if os.path.isdir(d):
                out[d] = (os.listdir(d), err(os.open, d + '/x', os.O_CREAT | os.O_WRONLY))
    """)
    for p in ("/proc/timer_list", "/proc/keys", "/proc/kallsyms"):
        assert s[p] == [True, "EACCES", "EACCES"], (p, s[p])
    for d in ("/proc/acpi", "/proc/fs", "/proc/irq", "/proc/bus"):
        if d in s:
            assert s[d] in ([[], "EROFS"], [[], "EACCES"]), (d, s[d])


def test_proc_masks_are_read_only_nosuid_nodev_noexec(sandbox):
    """Every mount over /proc (file masks and directory masks alike) carries ro, nosuid, nodev and noexec, as
    docs/security.md promises of every mount but the five device binds."""
    s = probe(sandbox, """
        for line in open('/proc/self/mountinfo'):
            f = line.split()
            if f[4].startswith('/proc/'):
                out[f[4]] = sorted(set(f[5].split(',')) & {'ro', 'nosuid', 'nodev', 'noexec'})
    """)
    assert {"/proc/keys", "/proc/kallsyms", "/proc/timer_list", "/proc/sys"} <= set(s), sorted(s)
    bad = {p: o for p, o in s.items() if o != ["nodev", "noexec", "nosuid", "ro"]}
    assert not bad, bad
