"""THREATS.md, Seccomp bypass: other syscall tables kill the process, io_uring is denied, high bits and unknown
numbers do not slip through, and stacking filters or clearing no_new_privs loosens nothing.

These are answers of the profile alone (the kernel would run the i386/x32 call, create the io_uring, run the
unknown call as ENOSYS), so each case fails if the profile or its architecture check is removed.
Per-syscall denials against an unfiltered control are in tests/integration/test_seccomp.py; high bits on other
arguments are in test_privilege.py (ioctl, clone, unshare), test_network.py (socket, socketpair) and
test_filesystem.py (mknod).
"""
from __future__ import annotations

import pytest

from conftest import attack, probe


X32 = 0x40000000


def assert_killed_by_sigsys(r):
    assert (r.outcome, r.signal) == ("signaled", 31), (r, r.stderr[-1000:])
    assert "seccomp" in r.message, r.message
    assert r.stdout == b"before\n", r.stdout       # killed at the call: nothing after it ran


# x32: the same x86_64 entry with bit 30 set in the number; the kernel would run the x32 table.
X32_CALLS = [
    ("getpid", X32 | 39, ()),
    ("write-stdout", X32 | 1, (1, "b'x32 wrote this\\n'", 15)),
    ("mount", X32 | 165, ("b'none'", "b'/tmp'", "b'tmpfs'", 0, 0)),
    ("unshare-newuser", X32 | 272, (0x10000000,)),
    ("x32-only-ioctl-512-range", X32 | 514, (0, 0x5412, 0)),
    ("x32-rt_sigaction", X32 | 512, (10, 0, 0, 8)),
    ("x32-execve", X32 | 520, ("b'/bin/sh'", 0, 0)),
    ("all-low-bits", X32 | 0x3fffffff, ()),
]


@pytest.mark.parametrize("nr,args", [c[1:] for c in X32_CALLS], ids=[c[0] for c in X32_CALLS])
def test_x32_syscalls_kill_the_process(sandbox, nr, args):
    call = ", ".join(str(a) for a in (nr, *args))
    r = attack(sandbox, f"print('before', flush=True)\nsc({call})\nprint('after', flush=True)")
    assert_killed_by_sigsys(r)


INT80 = """
import mmap
page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
page.write({code})
print('before', flush=True)
ctypes.CFUNCTYPE(ctypes.c_int)(addr(page))()
print('after', flush=True)
"""
# i386 calls from this 64-bit process through `int 0x80`: audit arch I386, not X86_64.
I386_CALLS = [
    ("getpid", b"\xb8\x14\x00\x00\x00\xcd\x80\xc3"),                       # mov eax, 20; int 0x80; ret
    ("exit", b"\xb8\x01\x00\x00\x00\x31\xdb\xcd\x80\xc3"),                # mov eax, 1; xor ebx, ebx; int 0x80
    ("mount", b"\xb8\x15\x00\x00\x00\x31\xdb\x31\xc9\x31\xd2\xcd\x80\xc3"),  # mov eax, 21 (i386 mount)
    ("unshare", b"\xb8\x36\x01\x00\x00\xbb\x00\x00\x00\x10\xcd\x80\xc3"),    # eax 310, ebx CLONE_NEWUSER
    ("setuid32-0", b"\xb8\xd5\x00\x00\x00\x31\xdb\xcd\x80\xc3"),          # eax 213, ebx 0
]


@pytest.mark.parametrize("code", [c[1] for c in I386_CALLS], ids=[c[0] for c in I386_CALLS])
def test_int80_i386_syscalls_kill_the_process(sandbox, code):
    r = attack(sandbox, INT80.format(code=code))
    assert_killed_by_sigsys(r)


ELF32 = """
import struct
code = {code!r}
base = 0x08048000
size = 52 + 32 + len(code)
ehdr = b'\\x7fELF\\x01\\x01\\x01\\x00' + bytes(8) + struct.pack('<HHIIIIIHHHHHH', 2, 3, 1, base + 84, 52, 0, 0, 52, 32,
                                                                1, 0, 0, 0)
phdr = struct.pack('<IIIIIIII', 1, 0, base, base, size, size, 5, 0x1000)
with open('/tmp/elf32', 'wb') as f:
    f.write(ehdr + phdr + code)
os.chmod('/tmp/elf32', 0o755)
print('before', flush=True)
os.execv('/tmp/elf32', ['elf32'])
"""


def test_a_32_bit_program_is_killed_at_its_first_syscall(sandbox):
    """A whole i386 ELF written to /tmp and exec'd (the 64-bit execve is allowed; the kernel's IA32 emulation
    loads it): its first `int 0x80` (getpid, then exit with the pid) kills it."""
    code = b"\xb8\x14\x00\x00\x00\xcd\x80\x89\xc3\xb8\x01\x00\x00\x00\xcd\x80"
    r = attack(sandbox, ELF32.format(code=code))
    if b"Exec format error" in r.stderr:
        pytest.skip("this kernel has no IA32 emulation")
    assert_killed_by_sigsys(r)


IO_URING = [
    ("io_uring_setup", "sc('io_uring_setup', 8, ctypes.create_string_buffer(120))"),
    ("io_uring_setup-sqpoll", "sc('io_uring_setup', 8, ctypes.create_string_buffer(struct.pack('IIII', 0, 0, 2, 0)"
                              " + bytes(104)))"),                            # IORING_SETUP_SQPOLL
    ("io_uring_enter", "sc('io_uring_enter', 0, 1, 0, 0, 0, 0)"),
    ("io_uring_register", "sc('io_uring_register', 0, 0, 0, 0)"),
]


@pytest.mark.parametrize("expr", [c[1] for c in IO_URING], ids=[c[0] for c in IO_URING])
def test_io_uring_is_denied(sandbox, expr):
    # io_uring_disabled is 0 on this host: without the profile io_uring_setup would hand out a ring.
    assert probe(sandbox, f"out['r'] = {expr}")["r"] == "EPERM"


# Numbers past the table, in the gaps, and at the edges. They fall through to the default action (EPERM);
# without the profile the kernel answers ENOSYS.
UNKNOWN = [
    ("gap-350", 350), ("gap-400", 400), ("past-table-500", 500), ("1000", 1000), ("4000", 4000),
    ("0x3fffffff", 0x3fffffff), ("minus-1", -1),
]


@pytest.mark.parametrize("nr", [u[1] for u in UNKNOWN], ids=[u[0] for u in UNKNOWN])
def test_unknown_syscall_numbers_are_denied(sandbox, nr):
    assert probe(sandbox, f"out['r'] = sc({nr})")["r"] == "EPERM"


@pytest.mark.parametrize("nr", [0x7fffffff, -(1 << 31), -2, 0xfffffffe], ids=["0x7fffffff", "int-min", "minus-2",
                                                                             "0xfffffffe"])
def test_numbers_with_the_x32_bit_kill_even_when_negative(sandbox, nr):
    # As a 32-bit number these have bit 30 (or 31) set: the architecture check kills before any rule is read.
    assert_killed_by_sigsys(attack(sandbox, f"print('before', flush=True)\nsc({nr})\nprint('after')"))


def test_uretprobe_is_the_kernels_own_exception(sandbox):
    """Recent kernels run uretprobe (335) without consulting seccomp at all (it is only valid from the kernel's
    trampoline); called from anywhere else the kernel answers SIGILL. Pinned here so that a kernel which starts
    exposing anything through that exception is noticed: the outcome must stay a SIGILL of the caller (or the
    profile's EPERM on kernels without the exception)."""
    r = attack(sandbox, "print('before', flush=True)\nout['r'] = sc(335)\nprint(out['r'])")
    assert (r.outcome, r.signal) == ("signaled", 4) or r.stdout == b"before\nEPERM\n", r


# Arguments with high bits. The profile compares the full 64-bit register where the kernel reads only 32 bits.
HIGH_BITS = [
    ("personality-high-bits", "sc('personality', (1 << 32) | 0x0040000)"),      # ADDR_NO_RANDOMIZE
    ("personality-all-ones-low", "sc('personality', 0xffffffff00000000 | 0x0400000)"),
    ("clone-newns-bit-63", "sc('clone', (1 << 63) | 0x20000 | 17, 0, 0, 0, 0)"),
    ("unshare-bit-63", "sc('unshare', (1 << 63) | 0x10000000)"),
]


@pytest.mark.parametrize("expr", [h[1] for h in HIGH_BITS], ids=[h[0] for h in HIGH_BITS])
def test_high_bits_do_not_slip_through(sandbox, expr):
    s = probe(sandbox, f"r = {expr}\nif r == 0: os._exit(0)\nout['r'] = r")
    assert s["r"] == "EPERM"


# A classic BPF program: (code, jt, jf, k) per instruction.
ALLOW_ALL = "struct.pack('HBBI', 0x06, 0, 0, 0x7fff0000)"                 # ret ALLOW
NOTIFY_MOUNT = ("struct.pack('HBBI', 0x20, 0, 0, 0)"                      # ld [nr]
                " + struct.pack('HBBI', 0x15, 0, 1, 165)"                  # jeq mount
                " + struct.pack('HBBI', 0x06, 0, 0, 0x7fc00000)"           # ret USER_NOTIF
                " + struct.pack('HBBI', 0x06, 0, 0, 0x7fff0000)")          # ret ALLOW
LOOSEN = """
class Prog(ctypes.Structure):
    _fields_ = [('len', ctypes.c_ushort), ('filter', ctypes.c_void_p)]
def prog(code):
    buf = ctypes.create_string_buffer(code)
    p = Prog(len(code) // 8, ctypes.addressof(buf)); p._buf = buf
    return p
out['prctl-filter'] = sc('prctl', 22, 2, ctypes.byref(prog({allow})), 0, 0)        # PR_SET_SECCOMP, FILTER
out['seccomp-tsync'] = sc('seccomp', 1, 1, ctypes.byref(prog({allow})))             # SET_MODE_FILTER, TSYNC
out['seccomp-listener'] = sc('seccomp', 1, 8, ctypes.byref(prog({notify})))         # NEW_LISTENER
out['no_new_privs-0'] = sc('prctl', 38, 0, 0, 0, 0)
out['no_new_privs'] = sc('prctl', 39, 0, 0, 0, 0)
out['mode-strict'] = sc('prctl', 22, 1, 0, 0, 0)
out['seccomp-off'] = sc('prctl', 22, 0, 0, 0, 0)
# After all that, the original answers stand; a mount must not be handed to the listener (it would block).
out['mount'] = sc('mount', b'none', b'/tmp', b'tmpfs', 0, 0)
out['unshare'] = sc('unshare', 0x10000000)
out['io_uring'] = sc('io_uring_setup', 8, ctypes.create_string_buffer(120))
out['filters'] = int([l for l in open('/proc/self/status') if l.startswith('Seccomp_filters')][0].split()[1])
"""


def test_stacked_filters_and_no_new_privs_cannot_loosen_anything(sandbox):
    """The kernel runs every stacked filter and keeps the strictest answer (KILL > ERRNO > USER_NOTIF > ALLOW);
    no_new_privs cannot be cleared; a filter cannot be removed or switched to another mode."""
    s = probe(sandbox, LOOSEN.format(allow=ALLOW_ALL, notify=NOTIFY_MOUNT), wall_time=5)
    listener = s.pop("seccomp-listener")
    assert isinstance(listener, int) and listener >= 0, listener          # a listener fd: allowed, and useless
    assert s == {"prctl-filter": 0, "seccomp-tsync": 0, "no_new_privs-0": "EINVAL", "no_new_privs": 1,
                 "mode-strict": "EINVAL", "seccomp-off": "EINVAL", "mount": "EPERM", "unshare": "EPERM",
                 "io_uring": "EPERM", "filters": 4}


def test_stacked_filters_do_not_survive_as_a_way_out_after_exec(sandbox):
    # A child that installs an allow-all filter and execs a shell: the shell is still bound by the profile.
    r = attack(sandbox, LOOSEN.split("out['prctl-filter']")[0] + f"""
sc('prctl', 22, 2, ctypes.byref(prog({ALLOW_ALL})), 0, 0)
os.execv('/bin/sh', ['sh', '-c', 'grep -E "^(NoNewPrivs|Seccomp):" /proc/self/status;'
                              ' mount -t tmpfs none /tmp; echo $?'])
""")
    lines = r.stdout.decode().split()
    assert lines[:4] == ["NoNewPrivs:", "1", "Seccomp:", "2"], lines
    assert lines[-1] != "0", lines
