"""Seccomp profiles: parsing and validation errors, the compiler's output, and what that output decides.

The compiled program is run here through a small classic-BPF interpreter over made-up seccomp_data, so the
decisions (including the guard that runs before the main filter) are checked without loading anything into the
kernel. tests/integration/test_seccomp.py checks the same program on the real kernel.
"""
from __future__ import annotations

import errno
import hashlib
import struct
import textwrap
from pathlib import Path

import pytest

from sandboxd.sandbox import seccomp
from sandboxd.sandbox.seccomp import Action, ProfileError
from sandboxd.sandbox.spec import SeccompProgram

DEFAULT = Path(seccomp.__file__).resolve().parent.parent / "seccomp" / "default.toml"

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
ALLOW = 0x7FFF0000
KILL_PROCESS = 0x80000000
EPERM = 0x00050000 | errno.EPERM
ENOSYS = 0x00050000 | errno.ENOSYS

# Syscalls newer than some libseccomp releases: the only names the default profile may leave unresolved.
NEWER_THAN_LIBSECCOMP = {"mseal", "uretprobe", "getxattrat", "setxattrat", "listxattrat", "removexattrat",
                         "statmount", "listmount", "cachestat", "fchmodat2", "map_shadow_stack", "futex_wake",
                         "futex_wait", "futex_requeue", "futex_waitv", "memfd_secret", "process_mrelease",
                         "epoll_pwait2", "landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self"}


def run_bpf(bpf: bytes, nr: int, args=(0, 0, 0, 0, 0, 0), arch: int = AUDIT_ARCH_X86_64) -> int:
    """Evaluate a seccomp program on struct seccomp_data { int nr; u32 arch; u64 ip; u64 args[6]; }."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, *(a & (1 << 64) - 1 for a in args))
    insns = list(struct.iter_unpack("=HBBI", bpf))
    pc = acc = 0
    for _ in range(len(insns) + 1):             # classic BPF only jumps forward
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == 0x20:                        # ld [k]
            acc = struct.unpack_from("<I", data, k)[0]
        elif code == 0x54:                      # and #k
            acc &= k
        elif code == 0x06:                      # ret #k
            return k
        elif code == 0x05:                      # ja +k
            pc += k
        elif code in (0x15, 0x25, 0x35, 0x45):  # jeq, jgt, jge, jset #k
            taken = {0x15: acc == k, 0x25: acc > k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]
            pc += jt if taken else jf
        else:
            raise AssertionError(f"instruction {code:#x} not understood by the test interpreter")
    raise AssertionError("program did not return")


@pytest.fixture(scope="module")
def default_bpf() -> bytes:
    return seccomp.compile_profile(DEFAULT).bpf


def write(tmp_path: Path, body: str, name: str = "p") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(textwrap.dedent(body))
    return path


MINIMAL = """
    name = "p"
    default_action = "errno:EPERM"
    [[rule]]
    action = "allow"
    syscalls = ["read", "write"]
"""


# ---------------------------------------------------------------------------------------------------------------------
# The default profile

def test_default_profile_loads_and_names_its_skips():
    profile = seccomp.load_profile(DEFAULT)
    assert profile.name == "default"
    assert profile.default_action == Action("errno", errno.EPERM)
    assert profile.bad_arch_action == Action("kill_process")
    assert profile.sha256 == hashlib.sha256(DEFAULT.read_bytes()).hexdigest()
    # Anything else unresolved is a typo, and a typo in an allowlist silently denies.
    assert set(profile.unknown_syscalls) <= NEWER_THAN_LIBSECCOMP
    assert len(profile.warnings) == len(profile.unknown_syscalls)
    assert all(str(DEFAULT) in w and "skipped" in w for w in profile.warnings)


def test_default_profile_denies_what_it_must():
    profile = seccomp.load_profile(DEFAULT)
    allowed = {name for rule in profile.rules if rule.action.kind == "allow" for name in rule.syscalls}
    for name in ("mount", "umount2", "pivot_root", "chroot", "fsopen", "fsconfig", "fsmount", "fspick",
                 "move_mount", "open_tree", "mount_setattr", "unshare", "setns", "ptrace", "process_vm_readv",
                 "process_vm_writev", "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
                 "io_uring_setup", "io_uring_enter", "io_uring_register", "kexec_load", "kexec_file_load",
                 "init_module", "finit_module", "delete_module", "reboot", "swapon", "swapoff", "acct", "syslog",
                 "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "open_by_handle_at",
                 "name_to_handle_at", "lookup_dcookie", "quotactl", "nfsservctl", "vm86", "iopl", "ioperm",
                 "setdomainname", "sethostname", "fanotify_init"):
        assert name in profile.denied, name
        assert name not in allowed, name


def test_compile_is_deterministic_and_carries_the_file_hash(default_bpf):
    program = seccomp.compile_profile(DEFAULT)
    assert isinstance(program, SeccompProgram)
    assert program.name == "default"
    assert program.sha256 == hashlib.sha256(DEFAULT.read_bytes()).hexdigest()
    assert program.bpf == default_bpf == seccomp.compile_profile(DEFAULT).bpf
    assert len(program.bpf) % 8 == 0 and 0 < len(program.bpf) // 8 <= 4096


def test_hash_follows_the_bytes_not_the_rules(tmp_path):
    a = write(tmp_path, MINIMAL)
    first = seccomp.compile_profile(a)
    a.write_text(textwrap.dedent(MINIMAL) + "# a comment\n")
    second = seccomp.compile_profile(a)
    assert first.bpf == second.bpf
    assert first.sha256 != second.sha256 == hashlib.sha256(a.read_bytes()).hexdigest()


@pytest.mark.parametrize("nr, args, arch, expected", [
    (0, (), AUDIT_ARCH_X86_64, ALLOW),                                     # read
    (59, (), AUDIT_ARCH_X86_64, ALLOW),                                    # execve
    (165, (), AUDIT_ARCH_X86_64, EPERM),                                   # mount
    (101, (), AUDIT_ARCH_X86_64, EPERM),                                   # ptrace
    (425, (), AUDIT_ARCH_X86_64, EPERM),                                   # io_uring_setup
    (435, (), AUDIT_ARCH_X86_64, ENOSYS),                                  # clone3
    (56, (17,), AUDIT_ARCH_X86_64, ALLOW),                                 # clone(SIGCHLD)
    (56, (0x3D0F00,), AUDIT_ARCH_X86_64, ALLOW),                           # clone as pthread_create does
    (56, (0x10000000 | 17,), AUDIT_ARCH_X86_64, EPERM),                    # clone(CLONE_NEWUSER)
    (56, (0x20000 | 17,), AUDIT_ARCH_X86_64, EPERM),                       # clone(CLONE_NEWNS)
    (56, (0x80,), AUDIT_ARCH_X86_64, EPERM),                               # clone(CLONE_NEWTIME)
    (41, (2,), AUDIT_ARCH_X86_64, ALLOW),                                  # socket(AF_INET)
    (41, (10,), AUDIT_ARCH_X86_64, ALLOW),                                 # socket(AF_INET6)
    (41, (1,), AUDIT_ARCH_X86_64, ALLOW),                                  # socket(AF_UNIX)
    (41, (16,), AUDIT_ARCH_X86_64, EPERM),                                 # socket(AF_NETLINK)
    (41, (17,), AUDIT_ARCH_X86_64, EPERM),                                 # socket(AF_PACKET)
    (41, ((1 << 32) | 1,), AUDIT_ARCH_X86_64, EPERM),                      # AF_UNIX with high bits
    (53, (1,), AUDIT_ARCH_X86_64, ALLOW),                                  # socketpair(AF_UNIX)
    (53, (2,), AUDIT_ARCH_X86_64, EPERM),                                  # socketpair(AF_INET)
    (16, (0, 0x541B), AUDIT_ARCH_X86_64, ALLOW),                           # ioctl(FIONREAD)
    (16, (0, 0xFFFFFFFF0000541B), AUDIT_ARCH_X86_64, ALLOW),               # ... sign-extended by musl
    (16, (0, 0x5412), AUDIT_ARCH_X86_64, EPERM),                           # ioctl(TIOCSTI)
    (16, (0, (1 << 32) | 0x5412), AUDIT_ARCH_X86_64, EPERM),               # ... with high bits
    (16, (0, 0x541C), AUDIT_ARCH_X86_64, EPERM),                           # ioctl(TIOCLINUX)
    (133, (0, 0o010644), AUDIT_ARCH_X86_64, ALLOW),                        # mknod(S_IFIFO)
    (133, (0, 0o020644), AUDIT_ARCH_X86_64, EPERM),                        # mknod(S_IFCHR)
    (259, (0, 0, 0o060644), AUDIT_ARCH_X86_64, EPERM),                     # mknodat(S_IFBLK)
    (259, (0, 0, 0o140644), AUDIT_ARCH_X86_64, ALLOW),                     # mknodat(S_IFSOCK)
    (135, (0xFFFFFFFF,), AUDIT_ARCH_X86_64, ALLOW),                        # personality(query)
    (135, (0x0040000,), AUDIT_ARCH_X86_64, EPERM),                         # personality(ADDR_NO_RANDOMIZE)
    (4000, (), AUDIT_ARCH_X86_64, EPERM),                                  # past the table
    (-1, (), AUDIT_ARCH_X86_64, EPERM),
    (39 | 0x40000000, (), AUDIT_ARCH_X86_64, KILL_PROCESS),                # x32 getpid
    (0x7FFFFFFF, (), AUDIT_ARCH_X86_64, KILL_PROCESS),                     # x32 range, any number
    (20, (), AUDIT_ARCH_I386, KILL_PROCESS),                               # int 0x80 getpid
    (16, (0, 0x5412), AUDIT_ARCH_I386, KILL_PROCESS),                      # the guard checks the arch too
    (0, (), 0xC00000B7, KILL_PROCESS),                                     # aarch64
])
def test_default_program_decides(default_bpf, nr, args, arch, expected):
    args = tuple(args) + (0,) * (6 - len(args))
    assert run_bpf(default_bpf, nr, args, arch) == expected


def test_unless_becomes_a_guard_in_front(tmp_path):
    path = write(tmp_path, """
        name = "p"
        default_action = "errno:EACCES"
        [[rule]]
        action = "allow"
        syscalls = ["ioctl", "read"]
        unless = [{ index = 1, op = "masked_eq", mask = 0xffffffff, value = [1, 2] }]
    """)
    bpf = seccomp.compile_bpf(seccomp.load_profile(path))
    eacces = 0x00050000 | errno.EACCES
    assert run_bpf(bpf, 16, (0, 3, 0, 0, 0, 0)) == ALLOW
    assert run_bpf(bpf, 16, (0, (5 << 32) | 2, 0, 0, 0, 0)) == eacces
    assert run_bpf(bpf, 0, (0, 1, 0, 0, 0, 0)) == eacces
    # write is not listed: had the guard's own allow survived, it would answer ALLOW here
    assert run_bpf(bpf, 1, (0, 1, 0, 0, 0, 0)) == eacces
    assert run_bpf(bpf, 1, (0, 3, 0, 0, 0, 0)) == eacces


def test_unknown_syscall_is_skipped_with_a_warning(tmp_path):
    path = write(tmp_path, MINIMAL + '\n    [[rule]]\n    action = "allow"\n    syscalls = ["no_such_syscall_x"]\n')
    profile = seccomp.load_profile(path)
    assert profile.unknown_syscalls == ("no_such_syscall_x",)
    assert "rule[1].syscalls" in profile.warnings[0] and "no_such_syscall_x" in profile.warnings[0]
    bpf = seccomp.compile_bpf(profile)
    assert run_bpf(bpf, 0) == ALLOW


def test_other_architecture_names_are_skipped(tmp_path):
    path = write(tmp_path, MINIMAL + '\n    [[rule]]\n    action = "allow"\n    syscalls = ["socketcall"]\n')
    assert seccomp.load_profile(path).unknown_syscalls == ("socketcall",)


def test_constants_and_expressions(tmp_path):
    path = write(tmp_path, """
        name = "p"
        default_action = "errno:EPERM"
        [[rule]]
        action = "allow"
        syscalls = ["clone"]
        args = [{ index = 0, op = "masked_eq", mask = "CLONE_NEWNS | CLONE_NEWUSER | 0x1", value = 0 }]
    """)
    (rule,) = seccomp.load_profile(path).rules
    assert rule.args[0].mask == 0x20000 | 0x10000000 | 1


# ---------------------------------------------------------------------------------------------------------------------
# Errors name the file, the key and what was expected

@pytest.mark.parametrize("body, key, expected", [
    ('name = "p"\ndefault_action = "errno:EPERM"\ncolour = 1\n[[rule]]\naction = "allow"\nsyscalls = ["read"]',
     "colour", "unknown key"),
    ('name = "p"\n[[rule]]\naction = "allow"\nsyscalls = ["read"]', "default_action", "missing"),
    ('name = "q"\ndefault_action = "errno:EPERM"\n[[rule]]\naction = "allow"\nsyscalls = ["read"]',
     "name", "expected 'p'"),
    ('name = "p"\ndefault_action = "deny"\n[[rule]]\naction = "allow"\nsyscalls = ["read"]',
     "default_action", "expected allow, log, trap"),
    ('name = "p"\ndefault_action = "allow"\n[[rule]]\naction = "log"\nsyscalls = ["read"]',
     "default_action", "allowlists"),
    ('name = "p"\ndefault_action = "errno:EPERM"\nbad_arch_action = "allow"\n[[rule]]\naction = "allow"\n'
     'syscalls = ["read"]', "bad_arch_action", "denying action"),
    ('name = "p"\ndefault_action = "errno:ENOPE"\n[[rule]]\naction = "allow"\nsyscalls = ["read"]',
     "default_action", "errno name"),
    ('name = "p"\ndefault_action = "errno:5000"\n[[rule]]\naction = "allow"\nsyscalls = ["read"]',
     "default_action", "between 1 and 4094"),
    ('name = "p"\ndefault_action = "errno:EPERM"\nrule = 3', "rule", "[[rule]] tables"),
    ('name = "p"\ndefault_action = "errno:EPERM"\n[[rule]]\naction = "permit"\nsyscalls = ["read"]',
     "rule[0].action", "got 'permit'"),
    ('name = "p"\ndefault_action = "errno:EPERM"\n[[rule]]\naction = "allow"\nsyscalls = "read"',
     "rule[0].syscalls", "expected a non-empty list of syscall names, got a string"),
    ('name = "p"\ndefault_action = "errno:EPERM"\n[[rule]]\naction = "allow"\nsyscalls = []',
     "rule[0].syscalls", "non-empty list"),
    ('name = "p"\ndefault_action = "errno:EPERM"\n[[rule]]\naction = "allow"\nsyscalls = ["read", 3]',
     "rule[0].syscalls[1]", "expected a syscall name"),
    ('name = "p"\ndefault_action = "errno:EPERM"\n[[rule]]\naction = "allow"\nsyscalls = ["read", "read"]',
     "rule[0].syscalls[1]", "listed twice"),
    ('name = "p"\ndefault_action = "errno:EPERM"\n[[rule]]\naction = "allow"\nsyscalls = ["read"]\nwhy = "x"',
     "rule[0].why", "unknown key"),
    ('name = "p"\ndefault_action = "errno:EPERM"\n[[rule]]\naction = "errno:EPERM"\nsyscalls = ["read"]',
     "rule[0].action", "default action already"),
    ('name = "p"\ndefault_action = "errno:EPERM"\n[[rule]]\naction = "allow"\nsyscalls = ["socket"]\n'
     'args = [{ index = "0", op = "eq", value = 1 }]', "rule[0].args[0].index", "argument index 0 to 5"),
    ('name = "p"\ndefault_action = "errno:EPERM"\n[[rule]]\naction = "allow"\nsyscalls = ["socket"]\n'
     'args = [{ index = 6, op = "eq", value = 1 }]', "rule[0].args[0].index", "got 6"),
    ('name = "p"\ndefault_action = "errno:EPERM"\n[[rule]]\naction = "allow"\nsyscalls = ["socket"]\n'
     'args = [{ index = 0, op = "equals", value = 1 }]', "rule[0].args[0].op", "expected one of eq"),
    ('name = "p"\ndefault_action = "errno:EPERM"\n[[rule]]\naction = "allow"\nsyscalls = ["socket"]\n'
     'args = [{ index = 0, op = "eq", value = true }]', "rule[0].args[0].value", "got a boolean"),
    ('name = "p"\ndefault_action = "errno:EPERM"\n[[rule]]\naction = "allow"\nsyscalls = ["socket"]\n'
     'args = [{ index = 0, op = "eq", value = "AF_UNICORN" }]', "rule[0].args[0].value", "'AF_UNICORN'"),
    ('name = "p"\ndefault_action = "errno:EPERM"\n[[rule]]\naction = "allow"\nsyscalls = ["socket"]\n'
     'args = [{ index = 0, op = "eq", value = -1 }]', "rule[0].args[0].value", "unsigned 64-bit"),
    ('name = "p"\ndefault_action = "errno:EPERM"\n[[rule]]\naction = "allow"\nsyscalls = ["socket"]\n'
     'args = [{ index = 0, op = "eq", value = [] }]', "rule[0].args[0].value", "non-empty list"),
    ('name = "p"\ndefault_action = "errno:EPERM"\n[[rule]]\naction = "allow"\nsyscalls = ["socket"]\n'
     'args = [{ index = 0, op = "eq", value = 1, mask = 1 }]', "rule[0].args[0].mask", "only masked_eq"),
    ('name = "p"\ndefault_action = "errno:EPERM"\n[[rule]]\naction = "allow"\nsyscalls = ["clone"]\n'
     'args = [{ index = 0, op = "masked_eq", value = 0 }]', "rule[0].args[0].mask", "missing"),
    ('name = "p"\ndefault_action = "errno:EPERM"\n[[rule]]\naction = "allow"\nsyscalls = ["clone"]\n'
     'args = [{ index = 0, op = "masked_eq", mask = 0xf0, value = 1 }]', "rule[0].args[0].value", "never match"),
    ('name = "p"\ndefault_action = "errno:EPERM"\n[[rule]]\naction = "allow"\nsyscalls = ["socket"]\n'
     'args = [{ index = 0, op = "eq", value = 1 }, { index = 0, op = "ne", value = 2 }]',
     "rule[0].args[1].index", "compared twice"),
    ('name = "p"\ndefault_action = "errno:EPERM"\n[[rule]]\naction = "allow"\nsyscalls = ["socket"]\n'
     'args = [{ index = 0, op = "eq" }]', "rule[0].args[0].value", "missing"),
    ('name = "p"\ndefault_action = "errno:EPERM"\n[[rule]]\naction = "allow"\nsyscalls = ["socket"]\n'
     'args = { index = 0, op = "eq", value = 1 }', "rule[0].args", "got a table"),
    ('name = "p"\ndefault_action = "errno:EPERM"\n[[rule]]\naction = "allow"\nsyscalls = ["read"]\n'
     '[[rule]]\naction = "allow"\nsyscalls = ["read"]\nargs = [{ index = 0, op = "eq", value = 1 }]',
     "rule[1].syscalls", "already has a rule (rule[0])"),
    ('name = "p"\ndefault_action = "errno:EPERM"\n[[rule]]\naction = "allow"\nsyscalls = ["read"]\n'
     'args = [{ index = 0, op = "eq", value = 1 }]\n[[rule]]\naction = "log"\nsyscalls = ["read"]',
     "rule[1].syscalls", "already has a rule (rule[0])"),
    ('name = "p"\ndefault_action = "errno:EPERM"\n[[rule]]\naction = "allow"\nsyscalls = ["ioctl"]\n'
     'args = [{ index = 0, op = "eq", value = 1 }]\nunless = [{ index = 1, op = "eq", value = 1 }]\n'
     '[[rule]]\naction = "log"\nsyscalls = ["ioctl"]\nargs = [{ index = 0, op = "eq", value = 2 }]',
     "rule[0].unless", "single rule"),
    ('name = "p"\ndefault_action = "errno:EPERM"\ndenied = ["ptrace"]\n[[rule]]\naction = "allow"\n'
     'syscalls = ["read", "ptrace"]', "denied[0]", "'ptrace' is denied, so no rule may name it, but rule[0] gives it 'allow'"),
    ('name = "p"\ndefault_action = "errno:EPERM"\ndenied = "ptrace"\n[[rule]]\naction = "allow"\n'
     'syscalls = ["read"]', "denied", "got a string"),
    ('name = "p"\ndefault_action = "errno:EPERM"\n[[rule]]\naction = "allow"\nsyscalls = ["a"]\n'
     'args = [{ index = 0, op = "eq", value = [1,2,3,4,5,6,7,8,9] }, '
     '{ index = 1, op = "eq", value = [1,2,3,4,5,6,7,8] }]',
     "rule[0].args", "at most 64"),
])
def test_errors_name_the_file_and_key(tmp_path, body, key, expected):
    path = write(tmp_path, body)
    with pytest.raises(ProfileError) as info:
        seccomp.load_profile(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert expected in message, message


def test_profile_error_is_a_value_error():
    assert issubclass(ProfileError, ValueError)


def test_invalid_toml_and_missing_file(tmp_path):
    path = write(tmp_path, 'name = "p"\ndefault_action = \n')
    with pytest.raises(ProfileError, match=rf"^{path}: not valid TOML"):
        seccomp.load_profile(path)
    with pytest.raises(ProfileError, match="cannot read"):
        seccomp.load_profile(tmp_path / "absent.toml")
    with pytest.raises(ProfileError, match="cannot read"):
        seccomp.compile_profile(tmp_path / "absent.toml")


def test_profile_path(tmp_path):
    assert seccomp.profile_path("default") == DEFAULT
    write(tmp_path, MINIMAL)
    assert seccomp.profile_path("p", tmp_path) == tmp_path / "p.toml"
    for bad in ("../default", "Default", "", "a/b", "x.toml"):
        with pytest.raises(ProfileError, match="expected lowercase"):
            seccomp.profile_path(bad)
    with pytest.raises(ProfileError, match="no file"):
        seccomp.profile_path("absent", tmp_path)


def test_action_text_and_values():
    assert str(Action("errno", errno.EPERM)) == "errno:EPERM" and Action("errno", 1).value == 0x50001
    assert Action("kill_process").value == KILL_PROCESS and Action("allow").value == ALLOW


def test_apply_checks_the_program_before_touching_the_process():
    # Refused before prctl(): safe to call in the test process.
    for bad in (b"", b"1234567", b"\0" * 8 * 4097):
        with pytest.raises(OSError) as info:
            seccomp.apply(bad)
        assert info.value.errno == errno.EINVAL
