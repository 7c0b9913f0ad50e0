"""The default seccomp profile on the real kernel.

Every case runs in a fresh Python child that imports sandboxd.sandbox.seccomp, calls apply() with the compiled
default profile, then makes one raw syscall through ctypes and prints its errno (or dies by SIGSYS). apply() never
runs in the pytest process: it sets no_new_privs and filters for good.

Each denial case also runs once without the filter (the control). Its outcome must differ from the filtered one,
which shows the answer came from the profile and not from the kernel: remove or loosen the rule and the case
fails. Arguments are chosen so that the unfiltered call, made as root, is harmless (bad paths, bad descriptors,
invalid flags, or an effect confined to the child).

x86_64 only: syscall numbers are the x86_64 table (cross-checked against libseccomp below).
"""
from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sandboxd.sandbox import seccomp

pytestmark = pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86_64 syscall numbers")

REPO = Path(__file__).resolve().parents[2]
DEFAULT = REPO / "sandboxd" / "seccomp" / "default.toml"

NR = {
    "ioctl": 16, "getpid": 39, "socket": 41, "socketpair": 53, "clone": 56, "ptrace": 101, "syslog": 103,
    "mknod": 133, "personality": 135, "modify_ldt": 154, "pivot_root": 155, "adjtimex": 159, "chroot": 161,
    "acct": 163, "settimeofday": 164, "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168,
    "reboot": 169, "sethostname": 170, "setdomainname": 171, "iopl": 172, "ioperm": 173, "init_module": 175,
    "delete_module": 176, "quotactl": 179, "nfsservctl": 180, "lookup_dcookie": 212, "clock_settime": 227,
    "add_key": 248, "request_key": 249, "keyctl": 250, "mknodat": 259, "unshare": 272, "perf_event_open": 298,
    "fanotify_init": 300, "fanotify_mark": 301, "name_to_handle_at": 303, "open_by_handle_at": 304,
    "clock_adjtime": 305, "setns": 308, "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312,
    "finit_module": 313, "kexec_file_load": 320, "bpf": 321, "userfaultfd": 323, "kexec_load": 246,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428, "move_mount": 429,
    "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "clone3": 435, "pidfd_getfd": 438,
    "process_madvise": 440, "mount_setattr": 442, "memfd_secret": 447,
}

# The child: imports first (as the real child does before its last step), then the filter, then the case.
HARNESS = textwrap.dedent(r"""
    import ctypes, errno, mmap, os, socket, subprocess, sys, tempfile, threading
    sys.path.insert(0, sys.argv[1])
    if sys.argv[2] != "-" or "apply(" in sys.argv[3]:      # control runs skip the import: 20 ms each
        from sandboxd.sandbox.seccomp import apply

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    NR = eval(sys.argv[4])
    NOPATH = b"/nonexistent-sandboxd-seccomp-test"
    CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET, SIGCHLD = 0x20000, 0x10000000, 0x40000000, 17
    TIOCSTI, TIOCLINUX, FIONREAD = 0x5412, 0x541C, 0x541B
    S_IFCHR, S_IFBLK, S_IFIFO, S_IFREG, S_IFSOCK = 0o020000, 0o060000, 0o010000, 0o100000, 0o140000

    def arg(a):
        if isinstance(a, bytes):
            return ctypes.c_char_p(a)
        if isinstance(a, int):
            return ctypes.c_long(a) if a < 0 else ctypes.c_ulong(a)
        return a

    def call(nr, *args):
        nr = NR[nr] if isinstance(nr, str) else nr
        ctypes.set_errno(0)
        r = libc.syscall(ctypes.c_long(nr), *map(arg, args))
        return r, (ctypes.get_errno() if r == -1 else 0)

    def report(r, e=0):
        print("RESULT", errno.errorcode.get(e, str(e)) if r == -1 else "ok", flush=True)

    def check(nr, *args):
        report(*call(nr, *args))

    def int80(eax):
        # mov eax, imm32; int 0x80; ret -- an i386 syscall from this 64-bit process
        page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        page.write(b"\xb8" + eax.to_bytes(4, "little") + b"\xcd\x80\xc3")
        return ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))()

    if sys.argv[2] != "-":
        apply(open(sys.argv[2], "rb").read())
    exec(sys.argv[3])
""")

# (id, code run after apply, expected outcome: "ok", an errno name, or "SIGSYS")
DENIED = [
    # mounts and the filesystem view
    ("mount", 'check("mount", b"none", NOPATH, b"tmpfs", 0, 0)', "EPERM"),
    ("umount2", 'check("umount2", NOPATH, 0)', "EPERM"),
    ("pivot_root", 'check("pivot_root", NOPATH, NOPATH)', "EPERM"),
    ("chroot", 'check("chroot", NOPATH)', "EPERM"),
    ("fsopen", 'check("fsopen", b"sandboxd-nonexistent-fs", 0)', "EPERM"),
    ("fsconfig", 'check("fsconfig", -1, 0, 0, 0, 0)', "EPERM"),
    ("fsmount", 'check("fsmount", -1, 0, 0)', "EPERM"),
    ("fspick", 'check("fspick", -100, NOPATH, 0)', "EPERM"),
    ("move_mount", 'check("move_mount", -100, NOPATH, -100, NOPATH, 0)', "EPERM"),
    ("open_tree", 'check("open_tree", -100, NOPATH, 0)', "EPERM"),
    ("mount_setattr", 'check("mount_setattr", -100, NOPATH, 0, 0, 0)', "EPERM"),
    # namespaces
    ("unshare-newuser", 'check("unshare", CLONE_NEWUSER)', "EPERM"),
    ("unshare-newns", 'check("unshare", CLONE_NEWNS)', "EPERM"),
    ("setns", 'check("setns", -1, 0)', "EPERM"),
    *[(f"clone-{name}", textwrap.dedent(f"""
        r, e = call("clone", {flag} | SIGCHLD, 0, 0, 0, 0)
        if r == 0:
            os._exit(0)
        if r > 0:
            os.waitpid(r, 0)
        report(r, e)
      """), "EPERM") for name, flag in [("newns", "CLONE_NEWNS"), ("newuser", "CLONE_NEWUSER"),
                                         ("newnet", "CLONE_NEWNET")]],
    ("clone3", 'check("clone3", 0, 0)', "ENOSYS"),
    # other processes
    ("ptrace", 'check("ptrace", 16, 0x3ffffff0, 0, 0)', "EPERM"),                # PTRACE_ATTACH, no such pid
    ("process_vm_readv", 'check("process_vm_readv", 0x3ffffff0, 0, 0, 0, 0, 0)', "EPERM"),
    ("process_vm_writev", 'check("process_vm_writev", 0x3ffffff0, 0, 0, 0, 0, 0)', "EPERM"),
    ("kcmp", 'check("kcmp", 0x3ffffff0, 0x3ffffff0, 0, 0, 0)', "EPERM"),
    ("pidfd_getfd", 'check("pidfd_getfd", -1, 0, 0)', "EPERM"),
    ("process_madvise", 'check("process_madvise", -1, 0, 0, 0, 0)', "EPERM"),
    # kernel attack surface
    ("keyctl", 'check("keyctl", 0, -1, 0)', "EPERM"),                          # KEYCTL_GET_KEYRING_ID thread
    ("add_key", 'check("add_key", b"sandboxd-nonexistent-type", b"x", 0, 0, -2)', "EPERM"),
    ("request_key", 'check("request_key", b"user", b"sandboxd-nonexistent", 0, 0)', "EPERM"),
    ("bpf", 'check("bpf", 9999, 0, 0)', "EPERM"),
    ("perf_event_open", 'check("perf_event_open", 0, 0, -1, -1, 0)', "EPERM"),
    ("userfaultfd", 'check("userfaultfd", 0xffff)', "EPERM"),
    ("io_uring_setup", 'check("io_uring_setup", 0, 0)', "EPERM"),
    ("io_uring_enter", 'check("io_uring_enter", -1, 0, 0, 0, 0, 0)', "EPERM"),
    ("io_uring_register", 'check("io_uring_register", -1, 0, 0, 0)', "EPERM"),
    ("memfd_secret", 'check("memfd_secret", 0xffff)', "EPERM"),
    ("modify_ldt", 'check("modify_ldt", 99, 0, 0)', "EPERM"),
    ("fanotify_init", 'check("fanotify_init", 0xffffffff, 0)', "EPERM"),
    ("fanotify_mark", 'check("fanotify_mark", -1, 0, 0, -100, NOPATH)', "EPERM"),
    ("lookup_dcookie", 'check("lookup_dcookie", 0, 0, 0)', "EPERM"),
    ("open_by_handle_at", 'check("open_by_handle_at", -1, 0, 0)', "EPERM"),
    ("name_to_handle_at", 'check("name_to_handle_at", -100, NOPATH, 0, 0, 0)', "EPERM"),
    # machine administration
    ("kexec_load", 'check("kexec_load", 0, 0, 0, 0xffff0000)', "EPERM"),
    ("kexec_file_load", 'check("kexec_file_load", -1, -1, 0, 0, 0)', "EPERM"),
    ("init_module", 'check("init_module", 0, 0, b"")', "EPERM"),
    ("finit_module", 'check("finit_module", -1, b"", 0)', "EPERM"),
    ("delete_module", 'check("delete_module", b"sandboxd_nonexistent", 0)', "EPERM"),
    ("reboot", 'check("reboot", 0, 0, 0, 0)', "EPERM"),                        # wrong magic
    ("swapon", 'check("swapon", NOPATH, 0)', "EPERM"),
    ("swapoff", 'check("swapoff", NOPATH)', "EPERM"),
    ("acct", 'check("acct", NOPATH)', "EPERM"),
    ("syslog", 'check("syslog", 10, 0, 0)', "EPERM"),                           # SYSLOG_ACTION_SIZE_BUFFER
    ("quotactl", 'check("quotactl", 0, 0, 0, 0)', "EPERM"),
    ("nfsservctl", 'check("nfsservctl", 0, 0, 0)', "EPERM"),
    ("sethostname", 'check("sethostname", 0, 100000)', "EPERM"),
    ("setdomainname", 'check("setdomainname", 0, 100000)', "EPERM"),
    ("iopl", 'check("iopl", 4)', "EPERM"),
    ("ioperm", 'check("ioperm", 0x10000, 1, 1)', "EPERM"),
    # time
    ("settimeofday", 'check("settimeofday", 0, 0)', "EPERM"),                   # NULL, NULL: a no-op if allowed
    ("clock_settime", 'check("clock_settime", 0x7fffffff, 0)', "EPERM"),
    ("clock_adjtime", 'check("clock_adjtime", 0x7fffffff, 0)', "EPERM"),
    ("adjtimex", 'check("adjtimex", 0)', "EPERM"),
    # device nodes
    ("mknod-chr", 'check("mknod", NOPATH + b"/x", S_IFCHR | 0o600, 0x103)', "EPERM"),
    ("mknod-blk", 'check("mknod", NOPATH + b"/x", S_IFBLK | 0o600, 0x800)', "EPERM"),
    ("mknod-chr-high-bits", 'check("mknod", NOPATH + b"/x", (1 << 32) | S_IFCHR | 0o600, 0x103)', "EPERM"),
    ("mknodat-chr", 'check("mknodat", -100, NOPATH + b"/x", S_IFCHR | 0o600, 0x103)', "EPERM"),
    # personalities other than Docker's five
    ("personality-bsd", 'check("personality", 6)', "EPERM"),                    # PER_BSD
    ("personality-addr-no-randomize", 'check("personality", 0x0040000)', "EPERM"),
    ("personality-read-implies-exec", 'check("personality", 0x0400000)', "EPERM"),
    # socket families
    ("socket-netlink", 'check("socket", 16, 3, 0)', "EPERM"),                    # AF_NETLINK, SOCK_RAW, ROUTE
    ("socket-packet", 'check("socket", 17, 3, 0)', "EPERM"),                     # AF_PACKET, SOCK_RAW
    ("socket-alg", 'check("socket", 38, 5, 0)', "EPERM"),                        # AF_ALG, SOCK_SEQPACKET
    ("socket-vsock", 'check("socket", 40, 1, 0)', "EPERM"),                      # AF_VSOCK
    ("socket-unix-high-bits", 'check("socket", (1 << 32) | 1, 1, 0)', "EPERM"),  # kernel would see AF_UNIX
    ("socket-inet-high-bits", 'check("socket", (1 << 63) | 2, 1, 0)', "EPERM"),
    ("socketpair-inet", 'check("socketpair", 2, 1, 0, ctypes.byref((ctypes.c_int * 2)()))', "EPERM"),
    ("socketpair-unix-high-bits",
     'check("socketpair", (1 << 32) | 1, 1, 0, ctypes.byref((ctypes.c_int * 2)()))', "EPERM"),
    # terminal injection, whatever the high half of the request says (stdin is /dev/null: ENOTTY if allowed)
    ("ioctl-tiocsti", 'check("ioctl", 0, TIOCSTI, ctypes.byref(ctypes.c_char(b"x")))', "EPERM"),
    ("ioctl-tiocsti-high-bits",
     'check("ioctl", 0, (1 << 32) | TIOCSTI, ctypes.byref(ctypes.c_char(b"x")))', "EPERM"),
    ("ioctl-tiocsti-sign-extended",
     'check("ioctl", 0, 0xffffffff00000000 | TIOCSTI, ctypes.byref(ctypes.c_char(b"x")))', "EPERM"),
    ("ioctl-tioclinux", 'check("ioctl", 0, TIOCLINUX, ctypes.byref(ctypes.c_char(b"\\x02")))', "EPERM"),
    ("ioctl-tioclinux-high-bits",
     'check("ioctl", 0, (7 << 40) | TIOCLINUX, ctypes.byref(ctypes.c_char(b"\\x02")))', "EPERM"),
    # other architectures and numbers outside the table
    ("x32-getpid", 'check(NR["getpid"] | 0x40000000)', "SIGSYS"),
    ("x32-mount", 'check(NR["mount"] | 0x40000000, 0, 0, 0, 0, 0)', "SIGSYS"),
    ("i386-int80-getpid", "int80(20); report(0)", "SIGSYS"),
    ("i386-int80-getuid", "int80(24); report(0)", "SIGSYS"),
    ("huge-number", "check(4000)", "EPERM"),
    ("below-x32-bit", "check(0x3fffffff)", "EPERM"),
    ("minus-one", "check(-1)", "EPERM"),
    # a filter stacked on top cannot loosen: allow-everything (RET ALLOW) and ptrace is still denied
    ("stacked-allow-all-filter",
     'apply(b"\\x06\\x00\\x00\\x00\\x00\\x00\\xff\\x7f"); check("ptrace", 16, 0x3ffffff0, 0, 0)', "EPERM"),
    # threads and exec'd children inherit the filter
    ("thread-inherits", textwrap.dedent("""
        out = []
        t = threading.Thread(target=lambda: out.append(call("ptrace", 16, 0x3ffffff0, 0, 0)))
        t.start(); t.join()
        report(*out[0])
      """), "EPERM"),
    ("exec-inherits", textwrap.dedent("""
        code = "import ctypes,errno; l=ctypes.CDLL(None,use_errno=True); r=l.syscall(101,16,0x3ffffff0,0,0); "
        code += "print(errno.errorcode.get(ctypes.get_errno()) if r == -1 else 'ok')"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip()
        print("RESULT", out)
      """), "EPERM"),
]

ALLOWED = [
    ("getpid", 'check("getpid")'),
    ("threads", textwrap.dedent("""
        seen = []
        ts = [threading.Thread(target=lambda: seen.append(threading.get_native_id())) for _ in range(4)]
        [t.start() for t in ts]; [t.join() for t in ts]
        report(0 if len(set(seen)) == 4 else -1, errno.EINVAL)
      """)),
    ("fork-exec-true", 'report(0 if subprocess.run(["/bin/true"]).returncode == 0 else -1, errno.EINVAL)'),
    ("os-fork", textwrap.dedent("""
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        report(0 if os.waitpid(pid, 0)[1] == 7 << 8 else -1, errno.EINVAL)
      """)),
    ("python-starts", textwrap.dedent("""
        code = "import asyncio, hashlib, json, multiprocessing, ssl, sqlite3, subprocess, tempfile; print('up')"
        r = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True)
        report(0 if r.returncode == 0 and r.stdout == "up\\n" else -1, errno.EINVAL)
        sys.stderr.write(r.stderr)
      """)),
    ("file-io", textwrap.dedent("""
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "a")
            with open(p, "w") as f:
                f.write("data")
            os.rename(p, p + "b"); os.chmod(p + "b", 0o600); os.symlink(p + "b", p + "l"); os.link(p + "b", p + "h")
            ok = open(p + "l").read() == "data" and sorted(os.listdir(d)) == ["ab", "ah", "al"]
            os.mkdir(os.path.join(d, "sub")); os.rmdir(os.path.join(d, "sub")); os.unlink(p + "h")
        report(0 if ok else -1, errno.EINVAL)
      """)),
    ("mkfifo-regular-socket-nodes", textwrap.dedent("""
        with tempfile.TemporaryDirectory() as d:
            os.mkfifo(os.path.join(d, "fifo"))
            for name, mode in (("reg", S_IFREG), ("zero", 0), ("sock", S_IFSOCK)):
                r, e = call("mknod", os.path.join(d, name).encode(), mode | 0o600, 0)
                if r == -1:
                    report(r, e); break
            else:
                check("mknodat", -100, os.path.join(d, "fifo2").encode(), S_IFIFO | 0o600, 0)
      """)),
    ("socket-inet-loopback", textwrap.dedent("""
        srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
        cli = socket.create_connection(srv.getsockname()); conn, _ = srv.accept()
        cli.sendall(b"ping"); got = conn.recv(4)
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", 0))
        u.sendto(b"x", u.getsockname())
        report(0 if got == b"ping" and u.recv(1) == b"x" else -1, errno.EINVAL)
      """)),
    ("socket-inet6", 'socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close(); report(0)'),
    ("socket-unix", 'a, b = socket.socketpair(); a.send(b"u"); s = socket.socket(socket.AF_UNIX); '
                    'report(0 if b.recv(1) == b"u" else -1, errno.EINVAL)'),
    ("ioctl-fionread", textwrap.dedent("""
        r, w = os.pipe(); os.write(w, b"abc"); n = ctypes.c_int()
        res = call("ioctl", r, FIONREAD, ctypes.byref(n))
        report(res[0] if n.value == 3 else -1, res[1] or errno.EINVAL)
      """)),
    ("ioctl-fionread-sign-extended", textwrap.dedent("""
        r, w = os.pipe(); os.write(w, b"abc"); n = ctypes.c_int()
        check("ioctl", r, 0xffffffff00000000 | FIONREAD, ctypes.byref(n))   # musl passes int requests this way
      """)),
    ("personality-query", 'check("personality", 0xffffffff)'),
    ("personality-linux32", 'check("personality", 0x0008)'),
    ("clone-plain", textwrap.dedent("""
        r, e = call("clone", SIGCHLD, 0, 0, 0, 0)
        if r == 0:
            os._exit(0)
        if r > 0:
            os.waitpid(r, 0)
        report(r, e)
      """)),
    ("status-shows-filter", textwrap.dedent("""
        status = open("/proc/self/status").read()
        report(0 if "Seccomp:\\t2" in status and "NoNewPrivs:\\t1" in status else -1, errno.EINVAL)
      """)),
]


@pytest.fixture(scope="module")
def bpf_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("seccomp") / "default.bpf"
    path.write_bytes(seccomp.compile_profile(DEFAULT).bpf)
    return path


def _run(bpf: str, code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", HARNESS, str(REPO), bpf, code, repr(NR)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
    )
    if proc.returncode == -signal.SIGSYS:
        return "SIGSYS"
    results = [line.split(" ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or len(results) != 1:
        return f"rc={proc.returncode} stdout={proc.stdout!r} stderr={proc.stderr[-1500:]!r}"
    return results[0]


@pytest.fixture(scope="module")
def outcomes(bpf_file) -> dict[tuple[str, str], str]:
    """Every case, filtered and (for denials) unfiltered, run concurrently: the whole module takes seconds."""
    jobs = {(case, "filtered"): (str(bpf_file), code) for case, code, _ in DENIED}
    jobs |= {(case, "control"): ("-", code) for case, code, _ in DENIED}
    jobs |= {(case, "filtered"): (str(bpf_file), code) for case, code in ALLOWED}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(4, 2 * (os.cpu_count() or 1))) as pool:
        futures = {key: pool.submit(_run, *job) for key, job in jobs.items()}
        return {key: f.result() for key, f in futures.items()}


@pytest.mark.parametrize("case, expected", [(c, e) for c, _, e in DENIED], ids=[c for c, _, _ in DENIED])
def test_denied(outcomes, case, expected):
    assert outcomes[case, "filtered"] == expected


@pytest.mark.parametrize("case, expected", [(c, e) for c, _, e in DENIED], ids=[c for c, _, _ in DENIED])
def test_control_differs(outcomes, case, expected):
    """Without the filter the same call ends differently, so the filtered answer is the profile's doing."""
    got = outcomes[case, "control"]
    if got == expected == "EPERM":
        pytest.skip(f"the host kernel itself refuses {case} with EPERM (sysctl or lockdown)")
    assert got != expected
    assert not got.startswith("rc="), got


@pytest.mark.parametrize("case", [c for c, _ in ALLOWED])
def test_allowed(outcomes, case):
    assert outcomes[case, "filtered"] == "ok"


def test_syscall_numbers_match_libseccomp():
    pyseccomp = pytest.importorskip("pyseccomp")
    for name, nr in NR.items():
        assert pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name) == nr, name


def test_profile_denied_list_is_covered():
    """Every syscall the brief and THREATS.md name is in `denied` and has a case here."""
    profile = seccomp.load_profile(DEFAULT)
    tested = {code.split('"')[1] for _, code, _ in DENIED if code.startswith('check("')}
    must = {"mount", "umount2", "pivot_root", "chroot", "fsopen", "fsconfig", "fsmount", "fspick", "move_mount",
            "open_tree", "mount_setattr", "unshare", "setns", "ptrace", "process_vm_readv", "process_vm_writev",
            "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd", "io_uring_setup",
            "io_uring_enter", "io_uring_register", "kexec_load", "kexec_file_load", "init_module", "finit_module",
            "delete_module", "reboot", "swapon", "swapoff", "acct", "syslog", "settimeofday", "clock_settime",
            "clock_adjtime", "adjtimex", "open_by_handle_at", "name_to_handle_at", "lookup_dcookie", "quotactl",
            "nfsservctl", "iopl", "ioperm", "setdomainname", "sethostname", "fanotify_init"}
    assert must <= set(profile.denied)
    assert must <= tested


def test_apply_rejects_malformed_programs():
    code = textwrap.dedent("""
        import errno, sys
        sys.path.insert(0, sys.argv[1])
        from sandboxd.sandbox.seccomp import apply
        for prog in (b"", b"1234567", b"\\x00" * 8 * 4097, b"\\xff\\xff\\x00\\x00\\x00\\x00\\x00\\x00"):
            try:
                apply(prog)
            except OSError as e:
                print(errno.errorcode[e.errno])
            else:
                print("loaded")
    """)
    out = subprocess.run([sys.executable, "-I", "-c", code, str(REPO)], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["EINVAL"] * 4, out.stderr


def test_apply_covers_threads_started_before_it(bpf_file):
    """TSYNC: a thread that already exists when apply() runs is filtered too."""
    code = textwrap.dedent("""
        import ctypes, errno, sys, threading
        sys.path.insert(0, sys.argv[1])
        from sandboxd.sandbox.seccomp import apply
        libc = ctypes.CDLL(None, use_errno=True)
        go, out = threading.Event(), []
        def worker():
            go.wait()
            r = libc.syscall(101, 16, 0x3ffffff0, 0, 0)             # ptrace(PTRACE_ATTACH, no such pid)
            out.append(errno.errorcode.get(ctypes.get_errno()) if r == -1 else "ok")
        t = threading.Thread(target=worker)
        t.start()
        apply(open(sys.argv[2], "rb").read())
        go.set(); t.join()
        print(out[0])
    """)
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(REPO), str(bpf_file)],
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "EPERM", proc.stderr
