"""Landlock: a second, independent fence around the run's filesystem.

Why. The mount layout (rootfs.py) is the primary control: the root is read-only and only the run's tmpfs mounts
(/tmp, the workdir, /dev/shm) are writable. Landlock restates that policy in a different kernel subsystem, keyed on
inodes rather than mount flags. If a mount were ever left writable by mistake (a missed remount, an image bind
without MS_RDONLY, a new mount added without thought), Landlock still refuses writes outside the run's tmpfs; and
it also covers what mount flags cannot: writes to pseudo-filesystems such as /proc, ioctls on device nodes other
than the five the run is given, renames and links out of the writable trees, and (ABI v6) signals and abstract
unix sockets reaching outside the run's processes.

Where it runs. In the payload, after pivot_root and credentials (so the paths are the sandbox's: /tmp, /work,
/dev/shm, and no_new_privs is already set) and before seccomp, which is loaded last and allows the landlock_*
syscalls (they can only take rights away). The domain is inherited by every process the payload forks and kept
across execve.

The policy (`apply(writable)`):
    /                       execute, read files, read directories (everything the mounts let the run read)
    each path in writable   everything a directory tree can be given, except creating device nodes
    /dev/null zero full random urandom
                            write, and ioctl (programs ioctl what they open: isatty() on /dev/null must still
                            answer ENOTTY, not EACCES; the ioctls of these devices that change anything need
                            CAP_SYS_ADMIN, which the payload does not have)
    all else                denied with EACCES (EXDEV for a link or rename that would move a file to a place
                            with different rights)

ABI handling. The kernel reports its Landlock ABI version; the ruleset handles every right that version knows
(v1 base rights, v2 REFER, v3 TRUNCATE, v5 IOCTL_DEV; v4 TCP rights only when `deny_tcp`; v6 scopes), and the
struct size passed to the kernel matches the version (8 bytes up to v3, 16 for v4-5, 24 from v6). Rights a newer
kernel adds beyond those are not handled, so they stay allowed: the policy never fails on a newer kernel, and the
mounts remain the primary control. Without Landlock (ENOSYS: not built; EOPNOTSUPP: not enabled at boot),
`abi_version()` is 0. `apply(..., min_abi=N)` raises OSError when the kernel's ABI is below N (the run fails
closed: the daemon's default is N = 1, [sandbox] require_landlock); with min_abi=0 it does nothing and returns 0
on such a kernel, and the run's record says it applied ABI 0. Once Landlock is known to be supported, every
failure raises OSError: the run fails closed.

Child-side rules as in seccomp.py: the syscall entry points and struct types are resolved at import (in the
launcher, before it forks); apply() makes a handful of syscalls and small ctypes allocations, nothing more.
x86_64 syscall numbers.
"""
from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Sequence

__all__ = ["DEVICES", "abi_version", "probe", "apply", "handled_access_fs", "ruleset_attr_size"]

# <linux/landlock.h>
CREATE_RULESET_VERSION = 1 << 0
RULE_PATH_BENEATH = 1

ACCESS_FS_EXECUTE = 1 << 0
ACCESS_FS_WRITE_FILE = 1 << 1
ACCESS_FS_READ_FILE = 1 << 2
ACCESS_FS_READ_DIR = 1 << 3
ACCESS_FS_REMOVE_DIR = 1 << 4
ACCESS_FS_REMOVE_FILE = 1 << 5
ACCESS_FS_MAKE_CHAR = 1 << 6
ACCESS_FS_MAKE_DIR = 1 << 7
ACCESS_FS_MAKE_REG = 1 << 8
ACCESS_FS_MAKE_SOCK = 1 << 9
ACCESS_FS_MAKE_FIFO = 1 << 10
ACCESS_FS_MAKE_BLOCK = 1 << 11
ACCESS_FS_MAKE_SYM = 1 << 12
ACCESS_FS_REFER = 1 << 13           # ABI 2
ACCESS_FS_TRUNCATE = 1 << 14        # ABI 3
ACCESS_FS_IOCTL_DEV = 1 << 15       # ABI 5
ACCESS_NET_BIND_TCP = 1 << 0        # ABI 4
ACCESS_NET_CONNECT_TCP = 1 << 1     # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1               # ABI 6

_FS_V1 = (1 << 13) - 1              # EXECUTE .. MAKE_SYM
# Rights that may appear in a rule on a file (anything else on a non-directory is EINVAL).
_FS_FILE = ACCESS_FS_EXECUTE | ACCESS_FS_WRITE_FILE | ACCESS_FS_READ_FILE | ACCESS_FS_TRUNCATE | ACCESS_FS_IOCTL_DEV

READ_EXEC = ACCESS_FS_EXECUTE | ACCESS_FS_READ_FILE | ACCESS_FS_READ_DIR
# The writable trees get everything but device nodes: the mounts are nodev and the payload lacks CAP_MKNOD, so
# granting MAKE_CHAR/MAKE_BLOCK would give nothing but a path to get wrong.
WRITABLE_TREE = ((1 << 16) - 1) & ~(ACCESS_FS_MAKE_CHAR | ACCESS_FS_MAKE_BLOCK)
DEVICE_RIGHTS = ACCESS_FS_WRITE_FILE | ACCESS_FS_IOCTL_DEV
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")

_SYS_CREATE_RULESET = 444           # x86_64 (and every architecture using the generic table)
_SYS_ADD_RULE = 445
_SYS_RESTRICT_SELF = 446
_PR_SET_NO_NEW_PRIVS = 38


def handled_access_fs(abi: int) -> int:
    """The filesystem rights a ruleset handles under `abi` (0 for none)."""
    if abi < 1:
        return 0
    rights = _FS_V1
    if abi >= 2:
        rights |= ACCESS_FS_REFER
    if abi >= 3:
        rights |= ACCESS_FS_TRUNCATE
    if abi >= 5:
        rights |= ACCESS_FS_IOCTL_DEV
    return rights


def ruleset_attr_size(abi: int) -> int:
    """Bytes of struct landlock_ruleset_attr that `abi` knows: handled_access_fs, + handled_access_net (v4),
    + scoped (v6)."""
    return 8 if abi <= 3 else 16 if abi <= 5 else 24


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1                      # __attribute__((packed)): 12 bytes, no trailing padding
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


assert ctypes.sizeof(_RulesetAttr) == 24 and ctypes.sizeof(_PathBeneathAttr) == 12

# Our own CDLL handle and function objects (indexing makes a new one each time), so the argtypes set here cannot
# clash with those _libc.py and seccomp.py set on their own `syscall` and `prctl`.
_lib = ctypes.CDLL(None, use_errno=True)
_create_ruleset = _lib["syscall"]
_create_ruleset.argtypes = (ctypes.c_long, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint32)
_create_ruleset.restype = ctypes.c_long
_add_rule = _lib["syscall"]
_add_rule.argtypes = (ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32)
_add_rule.restype = ctypes.c_long
_restrict_self = _lib["syscall"]
_restrict_self.argtypes = (ctypes.c_long, ctypes.c_int, ctypes.c_uint32)
_restrict_self.restype = ctypes.c_long
_prctl = _lib["prctl"]
_prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
_prctl.restype = ctypes.c_int

_UNSUPPORTED = (errno.ENOSYS, errno.EOPNOTSUPP)


def _fail(what: str) -> OSError:
    e = ctypes.get_errno()
    return OSError(e, f"landlock: {what}: {os.strerror(e)}")


def probe() -> int:
    """Ask the kernel for its Landlock ABI version, now: 0 when Landlock is absent (ENOSYS) or disabled
    (EOPNOTSUPP). Any other error (a seccomp filter answering EPERM, say) raises OSError: neither "supported" nor
    "unsupported" would be true."""
    rc = _create_ruleset(_SYS_CREATE_RULESET, None, 0, CREATE_RULESET_VERSION)
    if rc >= 0:
        return int(rc)
    if ctypes.get_errno() in _UNSUPPORTED:
        return 0
    raise _fail("querying the ABI version")


# Probed once at import, in the launcher (one syscall, no fd); the payload inherits the answer through fork().
try:
    _ABI: int | None = probe()
    _PROBE_ERROR: OSError | None = None
except OSError as _e:
    _ABI, _PROBE_ERROR = None, _e


def abi_version() -> int:
    """The Landlock ABI version of the running kernel (probed at import), 0 when unsupported. Raises OSError if
    the probe failed in an unexpected way."""
    if _ABI is None:
        raise OSError(_PROBE_ERROR.errno, str(_PROBE_ERROR))
    return _ABI


def apply(writable: Sequence[str], deny_tcp: bool = False, min_abi: int = 0) -> int:
    """Restrict the calling process (and everything it later forks or executes) to the policy in the module
    docstring and return the ABI used; 0, doing nothing, when the kernel has no Landlock and `min_abi` is 0.
    A kernel ABI below `min_abi` raises OSError before anything is restricted.

    `writable`: absolute paths (sandbox paths, after pivot_root) given full write rights beneath them, e.g.
    ["/tmp", "/work", "/dev/shm"]; each must exist. `deny_tcp`: also deny every TCP bind and connect, loopback
    included (needs ABI 4; on an older kernel this raises rather than run without it).

    Child side: call after credentials (no_new_privs is set again here; it is idempotent and required) and before
    seccomp. Raises OSError on any failure once Landlock is known to be supported; the caller must fail the run.
    """
    abi = abi_version()
    if abi < min_abi:
        raise OSError(errno.EOPNOTSUPP, f"landlock: the run requires ABI {min_abi} or later, the kernel has "
                      + (f"ABI {abi}" if abi else "no Landlock (not built in, or not enabled at boot)"))
    if abi == 0:
        return 0
    if deny_tcp and abi < 4:
        raise OSError(errno.EOPNOTSUPP, f"landlock: deny_tcp needs ABI 4, the kernel has ABI {abi}")
    handled = handled_access_fs(abi)
    attr = _RulesetAttr(handled, ACCESS_NET_BIND_TCP | ACCESS_NET_CONNECT_TCP if deny_tcp else 0,
                        SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0)
    ruleset = _create_ruleset(_SYS_CREATE_RULESET, ctypes.addressof(attr), ruleset_attr_size(abi), 0)
    if ruleset < 0:
        raise _fail(f"landlock_create_ruleset(ABI {abi}, fs={handled:#x}, net={attr.handled_access_net:#x}, "
                    f"scoped={attr.scoped:#x})")
    try:
        rule = _PathBeneathAttr()
        _add_path(ruleset, rule, "/", READ_EXEC & handled, required=True)
        for path in writable:
            if not os.path.isabs(path):
                raise OSError(errno.EINVAL, f"landlock: writable path {path!r} is not absolute")
            _add_path(ruleset, rule, path, WRITABLE_TREE & handled, required=True)
        for path in DEVICES:
            _add_path(ruleset, rule, path, DEVICE_RIGHTS & handled, required=False)
        if _prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise _fail("PR_SET_NO_NEW_PRIVS")
        if _restrict_self(_SYS_RESTRICT_SELF, ruleset, 0) != 0:
            raise _fail("landlock_restrict_self")
    finally:
        os.close(ruleset)
    return abi


def _add_path(ruleset: int, rule: _PathBeneathAttr, path: str, rights: int, required: bool) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        if required:
            raise
        return                      # a device the root does not have: no rule, so no access to it
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            rights &= _FS_FILE      # directory-only rights on a file rule are EINVAL
        rule.allowed_access = rights
        rule.parent_fd = fd
        if _add_rule(_SYS_ADD_RULE, ruleset, RULE_PATH_BENEATH, ctypes.addressof(rule), 0) != 0:
            raise _fail(f"landlock_add_rule({path!r}, {rights:#x})")
    finally:
        os.close(fd)
