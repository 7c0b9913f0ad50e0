"""THREATS.md, Disk: every writable place is a size- and inode-limited tmpfs of the run (never the host's disk),
single files stop at RLIMIT_FSIZE, and what the daemon collects from a run (its output) is capped whatever the
run's files look like.

Already covered in tests/integration/test_limits.py (not repeated): /tmp filled with 8MiB files, /work filled
with empty files, one write at offset 1<<40.
"""
from __future__ import annotations

import os

import pytest

from conftest import MiB, attack, probe


SIZE = 64 * MiB           # tmp_size and work_size of the default limits
INODES = 4096             # tmp_inodes and work_inodes

# Files under RLIMIT_FSIZE (8MiB each), so only the tmpfs size can stop them; memory well above the tmpfs size,
# so the cgroup does not stop them first. /dev/shm shares /tmp's limits.
FILLS = [
    ("work-8MiB-files", "/work", "write"),
    ("dev-shm-8MiB-files", "/dev/shm", "write"),
    ("tmp-fallocate", "/tmp", "fallocate"),
    ("work-fallocate", "/work", "fallocate"),
]


@pytest.mark.parametrize("where,how", [f[1:] for f in FILLS], ids=[f[0] for f in FILLS])
def test_filling_a_writable_place_is_enospc_at_its_size(sandbox, where, how):
    s = probe(sandbox, f"""
        total, out['err'] = 0, None
        try:
            for i in range(1000):
                fd = os.open(f'{where}/f{{i}}', os.O_CREAT | os.O_WRONLY, 0o600)
                if {how!r} == 'fallocate':
                    os.posix_fallocate(fd, 0, 8 << 20); total += 8 << 20
                else:
                    for _ in range(8):
                        total += os.write(fd, b'x' * (1 << 20))
                os.close(fd)
        except OSError as e:
            out['err'] = errno.errorcode[e.errno]
        out['total'] = total
        st = os.statvfs({where!r})
        out['size'] = st.f_blocks * st.f_frsize
    """, memory=256 * MiB)
    assert s["err"] == "ENOSPC", s
    assert s["size"] == SIZE and SIZE - 8 * MiB <= s["total"] <= SIZE, s


# One file past RLIMIT_FSIZE (64MiB): EFBIG however the size is asked for (Python ignores SIGXFSZ; the shell case
# below does not).
HUGE = [
    ("ftruncate", "os.ftruncate(fd, 1 << 40)"),
    ("truncate-path", "os.truncate('/work/big', 1 << 40)"),
    ("pwrite-far", "os.pwrite(fd, b'x', 1 << 40)"),
    ("fallocate-huge", "os.posix_fallocate(fd, 0, 1 << 40)"),
    ("fallocate-keep-size", "libc.fallocate(fd, 1, ctypes.c_long(1 << 36), ctypes.c_long(4096)) == 0 or"
                            " (_ for _ in ()).throw(OSError(ctypes.get_errno(), 'fallocate'))"),
    # a sparse start, so the tmpfs (as large as the limit) does not fill first
    ("write-across-the-limit", "(os.lseek(fd, 63 << 20, 0), [os.write(fd, b'x' * (1 << 20)) for _ in range(3)])"),
    ("tmp-ftruncate", "os.ftruncate(os.open('/tmp/big', os.O_CREAT | os.O_WRONLY), 1 << 40)"),
    ("dev-shm-ftruncate", "os.ftruncate(os.open('/dev/shm/big', os.O_CREAT | os.O_WRONLY), 1 << 40)"),
]


@pytest.mark.parametrize("expr", [h[1] for h in HUGE], ids=[h[0] for h in HUGE])
def test_one_huge_file_is_efbig(sandbox, expr):
    s = probe(sandbox, f"""
        fd = os.open('/work/big', os.O_CREAT | os.O_WRONLY, 0o600)
        out['r'] = err(lambda: {expr})
        out['size'] = os.fstat(fd).st_size
    """, memory=256 * MiB)
    assert s["r"] == "EFBIG" and s["size"] <= SIZE, s


def test_a_shell_writing_past_the_file_size_limit_is_stopped(sandbox):
    # Programs that keep SIGXFSZ's default action die of it: the file still stops at the limit.
    s = probe(sandbox, """
        import subprocess
        p = subprocess.run(['/bin/sh', '-c', 'head -c 100000000 /dev/zero > /work/big'], capture_output=True)
        out['code'] = p.returncode
        out['size'] = os.stat('/work/big').st_size
    """, memory=256 * MiB)
    assert s["code"] != 0 and s["size"] <= SIZE, s


INODE_EATERS = [
    ("tmp-mkdir", "os.mkdir(f'/tmp/d{i}')"),
    ("tmp-empty-files", "os.close(os.open(f'/tmp/f{i}', os.O_CREAT | os.O_WRONLY))"),
    ("dev-shm-symlinks", "os.symlink('x', f'/dev/shm/l{i}')"),
    ("work-fifos", "os.mkfifo(f'/work/p{i}')"),
    ("work-hardlinks", "os.link('/work/main.py', f'/work/h{i}')"),
]


@pytest.mark.parametrize("expr", [e[1] for e in INODE_EATERS], ids=[e[0] for e in INODE_EATERS])
def test_millions_of_entries_are_enospc_at_the_inode_limit(sandbox, expr):
    s = probe(sandbox, f"""
        out['err'] = None
        try:
            for i in range(1_000_000):
                {expr}
        except OSError as e:
            out['err'] = errno.errorcode[e.errno]
        out['made'] = i
    """, memory=256 * MiB)
    assert s["err"] == "ENOSPC" and INODES - 16 <= s["made"] < INODES, s


def test_every_writable_mount_is_a_tmpfs_of_the_run(sandbox, daemon):
    """The host disk is never written: every mount the run can write is a tmpfs (or one of the five device binds,
    or its own /proc), and after a fill the host's runtime directory is as it was."""
    runtime_before = sorted(os.listdir(daemon.runtime_dir))
    s = probe(sandbox, """
        rw = []
        for line in open('/proc/self/mountinfo'):
            pre, post = line.split(' - ')
            if 'rw' in pre.split()[5].split(','):
                rw.append((pre.split()[4], post.split()[0]))
        out['rw'] = rw
        fd = os.open('/work/fill', os.O_CREAT | os.O_WRONLY, 0o600)
        out['fill'] = err(lambda: [os.write(fd, b'x' * (1 << 20)) for _ in range(100)])
    """, memory=256 * MiB)
    assert s["fill"] == "ENOSPC"
    devices = {f"/dev/{d}" for d in ("null", "zero", "full", "random", "urandom")}
    for target, fstype in s["rw"]:
        # A session's own devpts instance (its terminals, at most 64, allocated by init only) is the one other.
        assert fstype == "tmpfs" or (fstype == "proc" and target == "/proc") or \
            (fstype == "devpts" and target == "/.sandboxd/pts") or \
            (fstype == "devtmpfs" and (target in devices or target.startswith("/proc/"))), (target, fstype)
    assert {t for t, f in s["rw"] if f == "tmpfs"} == {"/tmp", "/work", "/dev/shm"}
    assert sorted(os.listdir(daemon.runtime_dir)) == runtime_before


@pytest.mark.parametrize("how", ["sendfile", "splice", "read-write"])
def test_a_sparse_file_sent_to_the_output_is_cut_at_the_cap(sandbox, how):
    """The daemon collects only the output streams: a sparse file of (apparently) 60MiB sent to stdout by the
    kernel's zero-copy paths is cut at the cap like any other output."""
    cap = 100_000
    r = attack(sandbox, f"""
        fd = os.open('/work/sparse', os.O_CREAT | os.O_RDWR, 0o600)
        os.ftruncate(fd, 60 << 20)
        if {how!r} == 'sendfile':
            while os.sendfile(1, fd, None, 1 << 20): pass
        elif {how!r} == 'splice':
            while os.splice(fd, 1, 1 << 20): pass
        else:
            while chunk := os.read(fd, 1 << 20): os.write(1, chunk)
    """, output=cap, memory=256 * MiB)
    assert (r.outcome, r.stdout_truncated, len(r.stdout)) == ("output_limit", True, cap), r
    assert r.stdout == bytes(cap)
