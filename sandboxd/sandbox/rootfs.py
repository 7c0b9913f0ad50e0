"""The run's filesystem: a read-only root assembled from an image, writable tmpfs only where the run works.

Runs in the run's init (pid 1 of the new pid namespace, so the fresh /proc shows the run's processes), inside
its private mount namespace; nothing here is visible to the host. The layout:

    /            tmpfs, remounted read-only once assembled
    /usr /lib..  read-only binds of the image's top-level entries (symlinks copied as symlinks)
    /etc         generated passwd, group, hosts, hostname, nsswitch.conf + read-only binds of a few image files
    /dev         tmpfs with only null zero full random urandom (binds of the host's nodes), shm, fd links
    /proc        fresh procfs of the run's pid namespace, sensitive entries masked or read-only
    /tmp /work   tmpfs limited in bytes and inodes, owned by the run's uid
    /sys         absent

Every mount is nosuid and nodev, except the five device binds, which must allow their device (they are the
only device nodes the run can reach). Inputs are written into /work here, before the payload exists, so no
path the payload could have planted is ever followed. The old root is detached after pivot_root.
"""
from __future__ import annotations

import os
import stat

from . import _libc
from ._libc import MNT_DETACH, MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_PRIVATE, MS_RDONLY, MS_REC, MS_REMOUNT
from .spec import RunSpec

DEVICES = ("null", "zero", "full", "random", "urandom")
# Masked like Docker and runc: kernel memory, keys, timers and scheduler internals tell a run about the host.
PROC_MASK_FILES = ("kcore", "keys", "key-users", "timer_list", "timer_stats", "sched_debug", "latency_stats",
                   "kallsyms", "kmsg", "kpagecount", "kpageflags", "kpagecgroup", "config.gz", "sysrq-trigger",
                   "vmallocinfo", "slabinfo", "pagetypeinfo", "buddyinfo", "zoneinfo", "iomem", "ioports")
# /proc/sys too: kernel tunables tell a run about the host (and are the classic write target); masked with an
# empty read-only tmpfs rather than only made read-only. Runtimes fall back when a tunable cannot be read.
PROC_MASK_DIRS = ("acpi", "asound", "scsi", "firmware", "bus", "fs", "irq", "sys")
PROC_READONLY = ()
RO = MS_RDONLY | MS_NOSUID | MS_NODEV


def _bind_ro(source: str, target: str, extra: int = MS_NODEV) -> None:
    _libc.mount(source, target, None, MS_BIND)
    # A bind mount ignores flags on creation; they only take effect on a remount.
    _libc.mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | extra)


def _write(path: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data) if len(data) < (1 << 20) else _write_all(fd, data)
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _tmpfs(target: str, size: int, inodes: int, mode: int, uid: int = 0, gid: int = 0, flags: int = 0) -> None:
    _libc.mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV | flags,
                f"size={size},nr_inodes={inodes},mode={mode:o},uid={uid},gid={gid}")


def _image(spec: RunSpec, root: str) -> None:
    src = spec.image.source
    for name in spec.image.entries:
        path = os.path.join(src, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(path), os.path.join(root, name))
        elif stat.S_ISDIR(st.st_mode):
            os.mkdir(os.path.join(root, name), 0o755)
            _bind_ro(path, os.path.join(root, name))


def _etc(spec: RunSpec, root: str) -> None:
    etc = os.path.join(root, "etc")
    os.mkdir(etc, 0o755)
    u, g = spec.uid, spec.gid
    generated = {
        "passwd": f"root:x:0:0:root:/root:/usr/sbin/nologin\n{spec.user}:x:{u}:{g}:sandbox:{spec.workdir}:/bin/sh\n"
                  f"nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
        "group": f"root:x:0:\n{spec.user}:x:{g}:\nnogroup:x:65534:\n",
        "hosts": f"127.0.0.1\tlocalhost {spec.hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        "hostname": f"{spec.hostname}\n",
        "nsswitch.conf": "passwd: files\ngroup: files\nshadow: files\nhosts: files\nnetworks: files\n"
                         "protocols: files\nservices: files\n",
        "resolv.conf": "",  # no network: no resolver to point at
    }
    for name, text in generated.items():
        _write(os.path.join(etc, name), text.encode())
    src_etc = os.path.join(spec.image.source, "etc")
    for name in spec.image.etc:
        path = os.path.join(src_etc, name)
        target = os.path.join(etc, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(path), target)
        elif stat.S_ISDIR(st.st_mode):
            os.mkdir(target, 0o755)
            _bind_ro(path, target)
        elif stat.S_ISREG(st.st_mode):
            _write(target, b"")
            _bind_ro(path, target)


def _dev(spec: RunSpec, root: str) -> None:
    dev = os.path.join(root, "dev")
    os.mkdir(dev, 0o755)
    _tmpfs(dev, 64 << 10, 64, 0o755, flags=MS_NOEXEC)
    for name in DEVICES:
        target = os.path.join(dev, name)
        _write(target, b"", 0o666)
        # nodev would make the node useless; nosuid and noexec still apply.
        _libc.mount(f"/dev/{name}", target, None, MS_BIND)
        _libc.mount(None, target, None, MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NOEXEC)
    for name, to in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                     ("stderr", "/proc/self/fd/2")):
        os.symlink(to, os.path.join(dev, name))
    # POSIX semaphores and shared memory (multiprocessing) live in /dev/shm; it shares /tmp's limits.
    shm = os.path.join(dev, "shm")
    os.mkdir(shm, 0o1777)
    _tmpfs(shm, spec.limits.tmp_size, spec.limits.tmp_inodes, 0o1777, flags=MS_NOEXEC)
    _libc.mount(None, dev, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                "size=65536,nr_inodes=64,mode=755")


def _proc(root: str) -> None:
    proc = os.path.join(root, "proc")
    os.mkdir(proc, 0o555)
    _libc.mount("proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=invisible")
    for name in PROC_READONLY:
        path = os.path.join(proc, name)
        if os.path.isdir(path):
            _bind_ro(path, path, MS_NODEV | MS_NOEXEC)
    for name in PROC_MASK_FILES:
        path = os.path.join(proc, name)
        if os.path.isfile(path):
            _mask_file(path)
    for name in PROC_MASK_DIRS:
        path = os.path.join(proc, name)
        if os.path.isdir(path):
            _libc.mount("tmpfs", path, "tmpfs", RO | MS_NOEXEC, "size=0,nr_inodes=1,mode=555")
        elif os.path.isfile(path):
            _mask_file(path)


def _mask_file(path: str) -> None:
    """Hide a /proc file behind /dev/null, remounted read-only, nosuid, nodev and noexec like every other mount:
    nodev makes the node unopenable (EACCES), so the mask neither reads the file nor writes anywhere."""
    _bind_ro("/dev/null", path, MS_NODEV | MS_NOEXEC)


def _support(spec: RunSpec, root: str) -> None:
    """sandboxd's own files for a session (the kernel script): root-owned, on the root that becomes read-only;
    and the session's terminals: a private devpts instance whose ptmx only init (root) can open
    (ptmxmode=000), so a call gets a terminal only when asked for one, and /dev stays as in a one-shot run."""
    if not spec.session:
        return
    base = os.path.join(root, ".sandboxd")
    os.mkdir(base, 0o755)
    pts = os.path.join(base, "pts")
    os.mkdir(pts, 0o755)
    _libc.mount("devpts", pts, "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=000,mode=0620,max=64")
    for f in spec.support_files:
        _write(os.path.join(base, os.path.basename(f.path)), f.data, 0o444)


def _workdir(spec: RunSpec, root: str) -> None:
    lim, u, g = spec.limits, spec.uid, spec.gid
    tmp = os.path.join(root, "tmp")
    os.mkdir(tmp, 0o1777)
    _tmpfs(tmp, lim.tmp_size, lim.tmp_inodes, 0o1777)
    work = os.path.join(root, spec.workdir.lstrip("/"))
    os.makedirs(work, 0o755)
    _tmpfs(work, lim.work_size, lim.work_inodes, 0o755, u, g)
    write_files(spec, work)


def write_files(spec: RunSpec, work: str) -> None:
    """The run's inputs, as root, owned by the run's uid. Also a pooled sandbox's init, once claimed: there too
    the tmpfs is brand new and no untrusted code has run yet, so nothing here can be a planted link (and
    O_NOFOLLOW | O_EXCL refuse one anyway)."""
    u, g = spec.uid, spec.gid
    for f in spec.files:
        parent = os.path.dirname(f.path)
        if parent:
            d = work
            for part in parent.split("/"):
                d = os.path.join(d, part)
                if not os.path.isdir(d):
                    os.mkdir(d, 0o755)
                    os.chown(d, u, g)
        _write(os.path.join(work, f.path), f.data, f.mode, u, g)


def apply(spec: RunSpec, staging: str) -> None:
    """Build the root at `staging` (an empty directory) and pivot into it. The caller is pid 1 of the run."""
    # Nothing mounted from here on may propagate back to the host, and no host mount event may reach us.
    _libc.mount(None, "/", None, MS_REC | MS_PRIVATE)
    _libc.mount("tmpfs", staging, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=512,mode=755")
    _image(spec, staging)
    _etc(spec, staging)
    _dev(spec, staging)
    _proc(staging)
    _support(spec, staging)
    _workdir(spec, staging)
    os.chdir(staging)
    # pivot_root(".", ".") stacks the old root under the new one; detaching it leaves no path to the host.
    _libc.pivot_root(".", ".")
    _libc.umount2(".", MNT_DETACH)
    os.chdir("/")
    _libc.mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=512,mode=755")
    os.chdir(spec.workdir)
