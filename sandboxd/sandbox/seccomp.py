"""Seccomp: profiles as data, compiled once in the daemon, loaded in the child as the last step before execve.

Daemon side (at start-up, once per profile):
    load_profile(path)     TOML -> frozen Profile, validated; errors name the file, the key and what was expected.
    compile_profile(path)  Profile -> SeccompProgram (classic BPF bytes), built with libseccomp through pyseccomp.

Child side (after credentials are dropped, right before execve):
    apply(bpf)             no_new_privs, then seccomp(2) with the ready-made program. Plain ctypes calls resolved at
                           import time: no libseccomp, nothing to compile or allocate in the child.

The profile format and the reasons behind the default profile are in docs/seccomp.md. Two libseccomp limits shape
the compiler. It refuses a rule whose action equals the default action, and it silently drops conditional rules on
a syscall that also has an unconditional one. So "allow ioctl, except TIOCSTI" cannot be one libseccomp filter:
a rule's `unless` comparisons go into a small guard filter (default allow) that runs first, and each of its allow
returns becomes a jump to the main filter. The result is one program with the meaning of two stacked filters.

pyseccomp (and so libseccomp) is imported lazily: the launcher and the child import this module for apply() only.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import itertools
import logging
import os
import re
import struct
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sandboxd.sandbox.spec import SeccompProgram

__all__ = [
    "PROFILE_DIR", "ProfileError", "Action", "ArgCmp", "Rule", "Profile",
    "profile_path", "load_profile", "compile_bpf", "compile_profile", "apply",
]

log = logging.getLogger(__name__)

PROFILE_DIR = Path(__file__).resolve().parent.parent / "seccomp"


class ProfileError(ValueError):
    """Raised when a seccomp profile cannot be read, parsed, validated or compiled.

    The message names the file, the key (e.g. ``rule[3].args[0].op``) and what was expected.
    """


# ---------------------------------------------------------------------------------------------------------------------
# Vocabulary

# seccomp return values (linux/seccomp.h); libseccomp uses the same numbers.
_RET_KILL_PROCESS = 0x80000000
_RET_KILL_THREAD = 0x00000000
_RET_TRAP = 0x00030000
_RET_ERRNO = 0x00050000
_RET_LOG = 0x7FFC0000
_RET_ALLOW = 0x7FFF0000
_MAX_ERRNO = 4094                       # libseccomp refuses 4095 and up

_SIMPLE_ACTIONS = {
    "allow": _RET_ALLOW,
    "log": _RET_LOG,
    "trap": _RET_TRAP,
    "kill_process": _RET_KILL_PROCESS,
    "kill_thread": _RET_KILL_THREAD,
}
_OPS = ("eq", "ne", "lt", "le", "gt", "ge", "masked_eq")
_MAX_ARGS = 6
_MAX_EXPANSION = 64                     # libseccomp rules one profile rule may expand to (per syscall)
_BPF_MAXINSNS = 4096

# Names usable in argument values and masks, joined with "|". Kept to what profiles need; the numbers are the
# same on every Linux architecture sandboxd runs on.
CONSTANTS: dict[str, int] = {
    # socket(2) families
    "AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10, "AF_NETLINK": 16, "AF_PACKET": 17, "AF_ALG": 38, "AF_VSOCK": 40,
    # namespace flags of clone(2) and unshare(2)
    "CLONE_NEWTIME": 0x00000080, "CLONE_NEWNS": 0x00020000, "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000, "CLONE_NEWIPC": 0x08000000, "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000, "CLONE_NEWNET": 0x40000000,
    # terminal ioctls
    "TIOCSTI": 0x5412, "TIOCLINUX": 0x541C,
    # file types in a mode (mknod)
    "S_IFMT": 0o170000, "S_IFSOCK": 0o140000, "S_IFLNK": 0o120000, "S_IFREG": 0o100000, "S_IFBLK": 0o060000,
    "S_IFDIR": 0o040000, "S_IFCHR": 0o020000, "S_IFIFO": 0o010000,
    # personality(2)
    "PER_LINUX": 0x0000, "PER_LINUX32": 0x0008, "UNAME26": 0x0020000,
}

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*\Z")
_SYSCALL = re.compile(r"[a-z_][a-z0-9_]*\Z")


@dataclass(frozen=True)
class Action:
    """What the kernel does with a matching syscall: allow, log, trap, kill_process, kill_thread or errno."""

    kind: str
    errno: int = 0

    def __str__(self) -> str:
        if self.kind == "errno":
            return f"errno:{errno.errorcode.get(self.errno, self.errno)}"
        return self.kind

    @property
    def value(self) -> int:
        """The seccomp return value (SECCOMP_RET_*)."""
        if self.kind == "errno":
            return _RET_ERRNO | self.errno
        return _SIMPLE_ACTIONS[self.kind]


@dataclass(frozen=True)
class ArgCmp:
    """One comparison of a syscall argument; several `values` mean "any of them"."""

    index: int
    op: str
    values: tuple[int, ...]
    mask: int | None = None             # masked_eq only: (arg & mask) == value


@dataclass(frozen=True)
class Rule:
    """`action` for `syscalls` when every `args` comparison holds; the default action when any `unless` one does."""

    action: Action
    syscalls: tuple[str, ...]
    args: tuple[ArgCmp, ...] = ()
    unless: tuple[ArgCmp, ...] = ()


@dataclass(frozen=True)
class Profile:
    name: str
    path: str
    sha256: str                         # of the file bytes; SeccompProgram and the run record carry it
    description: str
    default_action: Action
    bad_arch_action: Action
    rules: tuple[Rule, ...]
    denied: tuple[str, ...]
    unknown_syscalls: tuple[str, ...]   # in rules but unknown to the installed libseccomp: skipped, so denied
    warnings: tuple[str, ...]


# ---------------------------------------------------------------------------------------------------------------------
# Loading and validation (daemon side)

def profile_path(name: str, directory: str | os.PathLike | None = None) -> Path:
    """The file of the profile a runner names (`seccomp = "default"` -> <directory>/default.toml)."""
    directory = Path(directory) if directory is not None else PROFILE_DIR
    if not isinstance(name, str) or not _NAME.match(name):
        raise ProfileError(f"seccomp profile name {name!r}: expected lowercase letters, digits, '-' or '_'")
    path = directory / f"{name}.toml"
    if not path.is_file():
        raise ProfileError(f"seccomp profile {name!r}: no file {path}")
    return path


def load_profile(path: str | os.PathLike) -> Profile:
    """Read, parse and validate one profile. Raises ProfileError."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ProfileError(f"{path}: cannot read: {e.strerror}") from e
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ProfileError(f"{path}: not valid TOML: {e}") from e
    return _Parser(path, raw).profile(doc)


class _Parser:
    def __init__(self, path: Path, raw: bytes):
        self.path = path
        self.raw = raw

    def error(self, key: str, message: str) -> ProfileError:
        return ProfileError(f"{self.path}: {key}: {message}" if key else f"{self.path}: {message}")

    def keys(self, table: dict, key: str, required: set[str], optional: set[str]) -> None:
        for k in table:
            if k not in required and k not in optional:
                known = ", ".join(sorted(required | optional))
                raise self.error(f"{key}.{k}" if key else k, f"unknown key (expected one of: {known})")
        for k in sorted(required):
            if k not in table:
                raise self.error(f"{key}.{k}" if key else k, "missing")

    def string(self, value: object, key: str) -> str:
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {_type(value)}")
        return value

    def profile(self, doc: dict) -> Profile:
        self.keys(doc, "", {"name", "default_action", "rule"}, {"description", "bad_arch_action", "denied"})
        name = self.string(doc["name"], "name")
        if not _NAME.match(name):
            raise self.error("name", f"expected lowercase letters, digits, '-' or '_', got {name!r}")
        if name != self.path.stem:
            raise self.error("name", f"expected {self.path.stem!r} (the file name without .toml), got {name!r}")
        description = self.string(doc.get("description", ""), "description")
        default = self.action(doc["default_action"], "default_action")
        bad_arch = self.action(doc.get("bad_arch_action", "kill_process"), "bad_arch_action")
        if bad_arch.kind in ("allow", "log"):
            raise self.error("bad_arch_action", f"expected a denying action, got {str(bad_arch)!r}")
        if default.kind == "allow":
            # An allow-by-default profile is a denylist; sandboxd has no use for one and `unless` assumes denial.
            raise self.error("default_action", "expected a denying action (profiles are allowlists), got 'allow'")
        rules_raw = doc["rule"]
        if not isinstance(rules_raw, list) or not rules_raw or not all(isinstance(r, dict) for r in rules_raw):
            raise self.error("rule", "expected one or more [[rule]] tables")
        rules = tuple(self.rule(r, f"rule[{i}]", default) for i, r in enumerate(rules_raw))
        denied = self.syscall_list(doc.get("denied", []), "denied", allow_empty=True)
        self.cross_check(rules, denied)
        unknown, warnings = self.resolve(rules)
        return Profile(
            name=name, path=str(self.path), sha256=hashlib.sha256(self.raw).hexdigest(), description=description,
            default_action=default, bad_arch_action=bad_arch, rules=rules, denied=denied,
            unknown_syscalls=unknown, warnings=warnings,
        )

    def action(self, value: object, key: str) -> Action:
        text = self.string(value, key)
        expected = "expected allow, log, trap, kill_process, kill_thread or errno:<NAME|number>"
        if text in _SIMPLE_ACTIONS:
            return Action(text)
        kind, sep, code = text.partition(":")
        if kind != "errno" or not sep:
            raise self.error(key, f"{expected}, got {text!r}")
        if code.isdigit():
            number = int(code)
        elif code in errno.errorcode.values():
            number = getattr(errno, code)
        else:
            raise self.error(key, f"expected an errno name such as EPERM or a number, got {code!r}")
        if not 1 <= number <= _MAX_ERRNO:
            raise self.error(key, f"expected an errno between 1 and {_MAX_ERRNO}, got {number}")
        return Action("errno", number)

    def rule(self, table: dict, key: str, default: Action) -> Rule:
        self.keys(table, key, {"action", "syscalls"}, {"args", "unless"})
        action = self.action(table["action"], f"{key}.action")
        if action == default:
            raise self.error(f"{key}.action", f"{str(action)!r} is the default action already; name these "
                             "syscalls under `denied` instead (libseccomp refuses such rules)")
        syscalls = self.syscall_list(table["syscalls"], f"{key}.syscalls")
        args = self.comparisons(table.get("args", []), f"{key}.args")
        indexes = [a.index for a in args]
        for i, index in enumerate(indexes):
            if index in indexes[:i]:
                raise self.error(f"{key}.args[{i}].index", f"argument {index} is compared twice; libseccomp "
                                 "takes one comparison per argument in a rule (use a list of values, or two rules)")
        expansion = 1
        for a in args:
            expansion *= len(a.values)
        if expansion > _MAX_EXPANSION:
            raise self.error(f"{key}.args", f"expands to {expansion} libseccomp rules, expected at most "
                             f"{_MAX_EXPANSION}")
        unless = self.comparisons(table.get("unless", []), f"{key}.unless")
        return Rule(action, syscalls, args, unless)

    def syscall_list(self, value: object, key: str, allow_empty: bool = False) -> tuple[str, ...]:
        if not isinstance(value, list) or (not value and not allow_empty):
            raise self.error(key, f"expected a {'' if allow_empty else 'non-empty '}list of syscall names, "
                             f"got {_type(value)}")
        seen: set[str] = set()
        for i, name in enumerate(value):
            if not isinstance(name, str) or not _SYSCALL.match(name):
                raise self.error(f"{key}[{i}]", f"expected a syscall name, got {name!r}")
            if name in seen:
                raise self.error(f"{key}[{i}]", f"{name!r} is listed twice")
            seen.add(name)
        return tuple(value)

    def comparisons(self, value: object, key: str) -> tuple[ArgCmp, ...]:
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.error(key, f"expected a list of {{ index, op, value }} tables, got {_type(value)}")
        return tuple(self.comparison(v, f"{key}[{i}]") for i, v in enumerate(value))

    def comparison(self, table: dict, key: str) -> ArgCmp:
        self.keys(table, key, {"index", "op", "value"}, {"mask"})
        index = table["index"]
        if type(index) is not int or not 0 <= index < _MAX_ARGS:
            raise self.error(f"{key}.index", f"expected an argument index 0 to {_MAX_ARGS - 1}, got {index!r}")
        op = table["op"]
        if op not in _OPS:
            raise self.error(f"{key}.op", f"expected one of {', '.join(_OPS)}, got {op!r}")
        raw_values = table["value"]
        if isinstance(raw_values, list):
            if not raw_values:
                raise self.error(f"{key}.value", "expected a value or a non-empty list of values, got []")
            values = tuple(self.number(v, f"{key}.value[{i}]") for i, v in enumerate(raw_values))
        else:
            values = (self.number(raw_values, f"{key}.value"),)
        if len(set(values)) != len(values):
            raise self.error(f"{key}.value", "a value is listed twice")
        mask = None
        if op == "masked_eq":
            if "mask" not in table:
                raise self.error(f"{key}.mask", "missing (masked_eq compares arg & mask with value)")
            mask = self.number(table["mask"], f"{key}.mask")
            for v in values:
                if v & ~mask:
                    raise self.error(f"{key}.value", f"{v:#x} has bits outside mask {mask:#x}; it can never match")
        elif "mask" in table:
            raise self.error(f"{key}.mask", f"only masked_eq takes a mask, not {op}")
        return ArgCmp(index, op, values, mask)

    def number(self, value: object, key: str) -> int:
        """An unsigned 64-bit value: an integer, a constant name, or names and integers joined by '|'."""
        if type(value) is int:
            result = value
        elif isinstance(value, str) and value.strip():
            result = 0
            for part in (p.strip() for p in value.split("|")):
                if part in CONSTANTS:
                    result |= CONSTANTS[part]
                else:
                    try:
                        result |= int(part, 0)
                    except ValueError:
                        raise self.error(key, f"expected an integer or a known constant, got {part!r} (known: "
                                         f"{', '.join(sorted(CONSTANTS))})") from None
        else:
            raise self.error(key, f"expected an integer or a constant name, got {_type(value)}")
        if not 0 <= result < 1 << 64:
            raise self.error(key, f"expected an unsigned 64-bit value, got {result}")
        return result

    def cross_check(self, rules: tuple[Rule, ...], denied: tuple[str, ...]) -> None:
        # libseccomp keeps only the unconditional rule when a syscall has both kinds, so refuse the mix.
        unconditional: dict[str, int] = {}
        conditional: dict[str, int] = {}
        for i, rule in enumerate(rules):
            for name in rule.syscalls:
                mine, other = (conditional, unconditional) if rule.args else (unconditional, conditional)
                if name in other or (not rule.args and name in mine):
                    first = other.get(name, mine.get(name))
                    raise self.error(f"rule[{i}].syscalls", f"{name!r} already has a rule (rule[{first}]); "
                                     "an unconditional rule cannot share a syscall with another rule")
                mine.setdefault(name, i)
        # A rule's `unless` exceptions guard the syscall as a whole, so such a syscall has that one rule only.
        for i, rule in enumerate(rules):
            if not rule.unless:
                continue
            for name in rule.syscalls:
                other = next((j for j, r in enumerate(rules) if j != i and name in r.syscalls), None)
                if other is not None:
                    raise self.error(f"rule[{i}].unless", f"{name!r} also has rule[{other}]; a syscall with "
                                     "`unless` exceptions must have a single rule")
        for i, name in enumerate(denied):
            where = unconditional.get(name, conditional.get(name))
            if where is not None:
                raise self.error(f"denied[{i}]", f"{name!r} is denied, so no rule may name it, but rule[{where}] "
                                 f"gives it {str(rules[where].action)!r}")

    def resolve(self, rules: tuple[Rule, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        seccomp = _pyseccomp()
        unknown: list[str] = []
        warnings: list[str] = []
        for i, rule in enumerate(rules):
            for name in rule.syscalls:
                if seccomp.resolve_syscall(seccomp.Arch.NATIVE, name) < 0 and name not in unknown:
                    unknown.append(name)
                    warnings.append(f"{self.path}: rule[{i}].syscalls: {name!r} is not a syscall of this "
                                    f"architecture known to libseccomp {_libseccomp_version()}; skipped, so it "
                                    "gets the default action")
        return tuple(unknown), tuple(warnings)


def _type(value: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "a list",
            dict: "a table"}.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------------------------------------------------
# Compiling (daemon side)

def compile_profile(path: str | os.PathLike) -> SeccompProgram:
    """Load and compile one profile into the program the child loads. Raises ProfileError."""
    profile = load_profile(path)
    for warning in profile.warnings:
        log.debug("%s", warning)
    if profile.unknown_syscalls:  # expected with an older libseccomp: one line, not one per syscall
        log.info("seccomp profile %s: %d syscalls unknown to libseccomp %s get the default action: %s",
                 profile.name, len(profile.unknown_syscalls), _libseccomp_version(),
                 ", ".join(profile.unknown_syscalls))
    return SeccompProgram(name=profile.name, sha256=profile.sha256, bpf=compile_bpf(profile))


def compile_bpf(profile: Profile) -> bytes:
    """The profile as classic BPF (struct sock_filter[]), for the native architecture only."""
    seccomp = _pyseccomp()
    unknown = set(profile.unknown_syscalls)
    main = _new_filter(seccomp, profile.default_action.value, profile.bad_arch_action.value)
    guard = None
    for i, rule in enumerate(profile.rules):
        for name in rule.syscalls:
            if name in unknown:
                continue
            for combo in itertools.product(*(_seccomp_args(seccomp, cmp) for cmp in rule.args)):
                _add(profile, main, rule.action.value, name, combo, f"rule[{i}]")
            if rule.unless:
                if guard is None:
                    guard = _new_filter(seccomp, _RET_ALLOW, profile.bad_arch_action.value)
                for cmp in rule.unless:
                    for arg in _seccomp_args(seccomp, cmp):
                        _add(profile, guard, profile.default_action.value, name, (arg,), f"rule[{i}].unless")
    bpf = _export(main)
    if guard is not None:
        bpf = _chain(_export(guard), bpf)
    if len(bpf) // 8 > _BPF_MAXINSNS:
        raise ProfileError(f"{profile.path}: compiles to {len(bpf) // 8} BPF instructions, the kernel takes at "
                           f"most {_BPF_MAXINSNS}")
    return bpf


def _pyseccomp():
    try:
        import pyseccomp
    except (ImportError, RuntimeError) as e:       # RuntimeError: libseccomp.so not found
        raise ProfileError(f"cannot compile seccomp profiles: {e}") from e
    return pyseccomp


def _libseccomp_version() -> str:
    class _Version(ctypes.Structure):
        _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]
    try:
        fn = _pyseccomp()._libseccomp.seccomp_version
        fn.restype = ctypes.POINTER(_Version)
        v = fn().contents
        return f"{v.major}.{v.minor}.{v.micro}"
    except (AttributeError, ValueError):
        return "(unknown version)"


def _new_filter(seccomp, default: int, bad_arch: int):
    flt = seccomp.SyscallFilter(default)
    flt.set_attr(seccomp.Attr.ACT_BADARCH, bad_arch)
    try:
        # Binary tree over syscall numbers: a few comparisons per syscall instead of a walk down ~300 rules.
        flt.set_attr(seccomp.Attr.CTL_OPTIMIZE, 2)
    except OSError:
        pass                                        # libseccomp < 2.5: the linear layout is still correct
    return flt


def _seccomp_args(seccomp, cmp: ArgCmp) -> list:
    op = {"eq": seccomp.EQ, "ne": seccomp.NE, "lt": seccomp.LT, "le": seccomp.LE, "gt": seccomp.GT,
          "ge": seccomp.GE, "masked_eq": seccomp.MASKED_EQ}[cmp.op]
    if cmp.op == "masked_eq":
        return [seccomp.Arg(cmp.index, op, cmp.mask, v) for v in cmp.values]
    return [seccomp.Arg(cmp.index, op, v) for v in cmp.values]


def _add(profile: Profile, flt, action: int, name: str, args: Iterable, key: str) -> None:
    try:
        flt.add_rule(action, name, *args)
    except OSError as e:
        raise ProfileError(f"{profile.path}: {key}: libseccomp refused the rule for {name!r}: "
                           f"{e.strerror or e}") from e


def _export(flt) -> bytes:
    fd = os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC)
    with open(fd, "w+b", buffering=0) as f:
        flt.export_bpf(f)
        f.seek(0)
        return f.read()


# struct sock_filter { __u16 code; __u8 jt; __u8 jf; __u32 k; }
_INSN = struct.Struct("=HBBI")
_BPF_RET_K = 0x06
_BPF_RET = 0x06                             # class bits of a return
_BPF_JA = 0x05


def _chain(guard: bytes, main: bytes) -> bytes:
    """Run `guard` first: its denials stand, each of its allows becomes a jump to the start of `main`."""
    n = len(guard) // _INSN.size
    out = []
    for i, (code, jt, jf, k) in enumerate(_INSN.iter_unpack(guard)):
        if code & 0x07 == _BPF_RET and code != _BPF_RET_K:
            raise ProfileError(f"unexpected BPF return {code:#x} in libseccomp output")   # libseccomp emits RET K
        if code == _BPF_RET_K and k == _RET_ALLOW:
            code, jt, jf, k = _BPF_JA, 0, 0, n - i - 1
        out.append(_INSN.pack(code, jt, jf, k))
    return b"".join(out) + main


# ---------------------------------------------------------------------------------------------------------------------
# Loading the program (child side). Everything is resolved here, at import, before the launcher forks.

_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_TSYNC = 1
_SYS_SECCOMP = {"x86_64": 317, "aarch64": 277}.get(os.uname().machine)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
_prctl.restype = ctypes.c_int
_syscall = _libc.syscall
_syscall.argtypes = (ctypes.c_long, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_void_p)
_syscall.restype = ctypes.c_long


def apply(program_bpf: bytes) -> None:
    """Install a compiled program on the calling process: the last step before execve.

    Sets no_new_privs first (idempotent; without it an unprivileged process cannot load a filter, and with it no
    exec can gain privileges). TSYNC puts every thread of the process under the filter, or fails. Raises OSError;
    the caller must then fail the run closed.
    """
    count, rest = divmod(len(program_bpf), _INSN.size)
    if rest or not 0 < count <= _BPF_MAXINSNS:
        raise OSError(errno.EINVAL, f"seccomp: {len(program_bpf)} bytes is not a BPF program of 1 to "
                                    f"{_BPF_MAXINSNS} instructions")
    if _prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"seccomp: PR_SET_NO_NEW_PRIVS: {os.strerror(e)}")
    buf = ctypes.create_string_buffer(bytes(program_bpf), len(program_bpf))
    prog = _SockFprog(count, ctypes.addressof(buf))
    rc = -1
    e = errno.ENOSYS
    if _SYS_SECCOMP is not None:
        rc = _syscall(_SYS_SECCOMP, _SECCOMP_SET_MODE_FILTER, _SECCOMP_FILTER_FLAG_TSYNC, ctypes.addressof(prog))
        e = ctypes.get_errno() if rc < 0 else 0
    if rc < 0 and e == errno.ENOSYS:
        # Kernels before 3.17: no seccomp(2), no TSYNC. The launcher's child is single-threaded anyway.
        rc = _prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(prog), 0, 0)
        e = ctypes.get_errno() if rc < 0 else 0
    if rc > 0:
        raise OSError(errno.EBUSY, f"seccomp: thread {rc} could not be synchronized to the filter")
    if rc < 0:
        raise OSError(e, f"seccomp: loading the filter: {os.strerror(e)}")


def _instructions(bpf: bytes) -> Iterator[tuple[int, int, int, int]]:
    """(code, jt, jf, k) of each instruction; for tests and debugging."""
    return _INSN.iter_unpack(bpf)


AUDIT_ARCHES = {"c000003e": "x86_64", "40000003": "i386"}
X32_BIT = 0x40000000


def describe_kill(arch_hex: str, nr: int) -> str:
    """Name the syscall of a seccomp kill reported by the kernel ("x32 getpid (39)", "i386 mount (21)").
    Daemon side (uses libseccomp's tables)."""
    seccomp = _pyseccomp()
    arch = AUDIT_ARCHES.get(arch_hex, f"arch {arch_hex}")
    if arch == "x86_64" and nr & X32_BIT:
        arch, nr, table = "x32", nr & ~X32_BIT, seccomp.Arch.X86_64
    else:
        table = {"x86_64": seccomp.Arch.X86_64, "i386": seccomp.Arch.X86}.get(arch)
    name = None
    if table is not None:
        try:
            name = seccomp.resolve_syscall(table, nr)
            name = name.decode() if isinstance(name, bytes) else name
        except Exception:  # noqa: BLE001 - an unknown number is still worth reporting as a number
            name = None
    return f"{arch} {name or 'syscall'} ({nr})"
