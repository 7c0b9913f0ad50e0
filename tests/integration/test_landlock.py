"""Landlock on the real kernel.

apply() never runs in the pytest process (it is irreversible). Each case runs in a fresh Python child that drops to
an unprivileged uid (after no_new_privs, as the payload does), calls landlock.apply([W]) with W a writable temp dir,
and reports the outcome of a list of file, exec, socket and signal operations as JSON: "ok" or an errno name.

A control child runs the same operations with no apply(). Every denial case asserts the Landlock child got the
error AND the control child succeeded, so the answer came from Landlock and not from permissions: the other dir O
is 0777 and the files in it belong to the child's uid. Every case that must keep working asserts success in both
children and that the same Landlock child was denied a write outside W (the "sentinel"), so a silently skipped
apply() fails those tests too.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from sandboxd.sandbox import landlock

REPO = Path(__file__).resolve().parents[2]
UID = GID = 65534

pytestmark = [
    pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86_64 syscall numbers"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to an unprivileged uid and mknod"),
]

CHILD = textwrap.dedent(r"""
    import ctypes, errno, json, os, shutil, signal, socket, subprocess, sys
    sys.path.insert(0, sys.argv[1])
    from sandboxd.sandbox import landlock
    mode, W, O = sys.argv[2], sys.argv[3], sys.argv[4]

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(38, 1, 0, 0, 0)                    # no_new_privs, then drop to the unprivileged uid, as creds does
    os.setgroups([]); os.setresgid(%(gid)d, %(gid)d, %(gid)d); os.setresuid(%(uid)d, %(uid)d, %(uid)d)
    libc.prctl(4, 1, 0, 0, 0)                     # PR_SET_DUMPABLE, as execve will: /proc/self is ours again

    # Made before apply(), so outside any Landlock domain: a process of ours, an abstract socket, a memfd.
    outsider = subprocess.Popen(["/bin/cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(b"\0sandboxd-landlock-test-%%d" %% os.getpid()); listener.listen(1)
    memfd = os.memfd_create("stdin"); os.write(memfd, b"input")
    pipe_r, pipe_w = os.pipe()                    # made by our uid: reopening it through /proc needs no privilege

    result = {}
    if mode == "landlock":
        result["abi"] = landlock.apply([W])
    elif mode == "deny_tcp":
        result["abi"] = landlock.apply([W], deny_tcp=True)
    elif mode == "missing":
        try:
            landlock.apply([W, W + "/does-not-exist"])
            result["missing"] = "ok"
        except OSError as e:
            result["missing"] = errno.errorcode[e.errno]

    def create(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644); os.write(fd, b"x"); os.close(fd)

    def read(path):
        with open(path, "rb") as f: assert f.read()

    def read4(path):
        fd = os.open(path, os.O_RDONLY); assert len(os.read(fd, 4)) == 4; os.close(fd)

    def write_existing(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND); os.write(fd, b"more"); os.close(fd)

    def dev_write(path):
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC); os.write(fd, b"x"); os.close(fd)

    def tcgets(path):                             # what isatty() does; a device that is not a tty says ENOTTY
        fd = os.open(path, os.O_RDONLY)
        try:
            if libc.ioctl(fd, 0x5401, ctypes.create_string_buffer(64)) != 0:
                raise OSError(ctypes.get_errno(), "TCGETS")
        finally:
            os.close(fd)

    def run(argv):
        subprocess.run(argv, check=True, stdin=subprocess.DEVNULL)

    def unix_bind(path):
        s = socket.socket(socket.AF_UNIX); s.bind(path); s.close()

    def rename_within():
        os.mkdir(W + "/a"); os.mkdir(W + "/b"); create(W + "/a/f"); os.rename(W + "/a/f", W + "/b/f")

    def exec_in_w():
        shutil.copy("/bin/true", W + "/true"); os.chmod(W + "/true", 0o755); run([W + "/true"])

    def tcp(op):
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", 0))
            if op == "connect":
                peer = socket.socket(); peer.bind(("127.0.0.1", 0)); peer.listen(1)
                s.connect(peer.getsockname()); peer.close()
        finally:
            s.close()

    def abstract_connect():
        c = socket.socket(socket.AF_UNIX); c.connect(listener.getsockname()); c.close()

    CHECKS = {
        # must keep working
        "write_inside": lambda: create(W + "/new"),
        "mkdir_inside": lambda: os.mkdir(W + "/dir"),
        "truncate_inside": lambda: (create(W + "/t"), os.truncate(W + "/t", 0)),
        "rename_within": rename_within,
        "fifo_inside": lambda: os.mkfifo(W + "/fifo"),
        "unix_bind_inside": lambda: unix_bind(W + "/sock"),
        "read_outside": lambda: read(O + "/existing"),
        "read_etc": lambda: read("/etc/passwd"),
        "listdir_outside": lambda: os.listdir(O),
        "exec_bin_true": lambda: run(["/bin/true"]),
        "exec_in_w": exec_in_w,
        "dev_null_write": lambda: dev_write("/dev/null"),
        "dev_urandom_read": lambda: read4("/dev/urandom"),
        "dev_null_isatty_enotty": lambda: tcgets("/dev/null"),   # expected ENOTTY, never EACCES
        "proc_fd_pipe_reopen": lambda: os.close(os.open("/proc/self/fd/%%d" %% pipe_w, os.O_WRONLY)),
        "memfd_reopen": lambda: read("/proc/self/fd/%%d" %% memfd),
        "tcp_bind_loopback": lambda: tcp("bind"),
        "tcp_connect_loopback": lambda: tcp("connect"),
        # must be denied under Landlock
        "create_outside": lambda: create(O + "/new"),
        "mkdir_outside": lambda: os.mkdir(O + "/dir"),
        "symlink_outside": lambda: os.symlink("/etc/passwd", O + "/link"),
        "fifo_outside": lambda: os.mkfifo(O + "/fifo"),
        "unix_bind_outside": lambda: unix_bind(O + "/sock"),
        "write_existing_outside": lambda: write_existing(O + "/existing"),
        "truncate_outside": lambda: os.truncate(O + "/existing", 0),
        "unlink_outside": lambda: os.unlink(O + "/victim"),
        "rename_out": lambda: (create(W + "/r"), os.rename(W + "/r", O + "/r")),
        "link_out": lambda: (create(W + "/l"), os.link(W + "/l", O + "/l")),
        "link_in_refer": lambda: os.link(O + "/existing", W + "/hard"),
        "ioctl_other_device": lambda: tcgets(O + "/nulldev"),
        "proc_write": lambda: write_existing("/proc/self/comm"),
        "signal_outside_domain": lambda: os.kill(outsider.pid, 0),
        "abstract_unix_outside_domain": abstract_connect,
    }
    only = sys.argv[5].split(",") if len(sys.argv) > 5 else list(CHECKS)
    for name in only:
        try:
            CHECKS[name]()
            result[name] = "ok"
        except OSError as e:
            result[name] = errno.errorcode.get(e.errno, str(e.errno))
        except subprocess.CalledProcessError as e:
            result[name] = "exit %%d" %% e.returncode
    outsider.stdin.close(); outsider.wait()     # EOF, no signal needed
    print(json.dumps(result))
""") % {"uid": UID, "gid": GID}


def _dirs(tmp: Path) -> tuple[str, str]:
    """W (writable under Landlock) and O (writable by permissions only), both 0777, with files owned by the child."""
    w, o = tmp / "w", tmp / "o"
    for d in (w, o):
        d.mkdir()
        d.chmod(0o777)
    for name in ("existing", "victim"):
        (o / name).write_text("content")
        os.chown(o / name, UID, GID)
    os.mknod(o / "nulldev", 0o666 | stat.S_IFCHR, os.makedev(1, 3))   # same device as /dev/null, no rule for it
    return str(w), str(o)


def _run(mode: str, checks: list[str] | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="sandboxd-landlock-") as tmp:
        os.chmod(tmp, 0o755)
        w, o = _dirs(Path(tmp))
        argv = [sys.executable, "-c", CHILD, str(REPO), mode, w, o] + ([",".join(checks)] if checks else [])
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"{mode} child failed:\n{proc.stderr}"
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def abi() -> int:
    found = landlock.abi_version()
    if found == 0:
        pytest.skip("the kernel has no Landlock (not built, or not in lsm= at boot)")
    return found


@pytest.fixture(scope="module")
def runs(abi: int) -> tuple[dict, dict]:
    locked, control = _run("landlock"), _run("control")
    assert locked["abi"] == abi
    return locked, control


def test_abi_version_is_positive_here():
    if landlock.abi_version() == 0:
        pytest.skip("the kernel has no Landlock (not built, or not in lsm= at boot)")
    assert landlock.abi_version() == landlock.probe() >= 1


def test_struct_layouts_and_sizes():
    assert landlock.ruleset_attr_size(1) == landlock.ruleset_attr_size(3) == 8
    assert landlock.ruleset_attr_size(4) == landlock.ruleset_attr_size(5) == 16
    assert landlock.ruleset_attr_size(6) == landlock.ruleset_attr_size(7) == 24
    assert landlock._PathBeneathAttr.allowed_access.offset == 0
    assert landlock._PathBeneathAttr.parent_fd.offset == 8
    import ctypes
    assert ctypes.sizeof(landlock._PathBeneathAttr) == 12
    assert landlock.handled_access_fs(1) == 0x1FFF
    assert landlock.handled_access_fs(2) == 0x3FFF
    assert landlock.handled_access_fs(4) == 0x7FFF
    assert landlock.handled_access_fs(5) == landlock.handled_access_fs(7) == 0xFFFF


ALLOWED = ["write_inside", "mkdir_inside", "truncate_inside", "rename_within", "fifo_inside", "unix_bind_inside",
           "read_outside", "read_etc", "listdir_outside", "exec_bin_true", "exec_in_w", "dev_null_write",
           "dev_urandom_read", "proc_fd_pipe_reopen", "memfd_reopen", "tcp_bind_loopback", "tcp_connect_loopback"]


@pytest.mark.parametrize("check", ALLOWED)
def test_still_allowed(runs, check):
    locked, control = runs
    assert locked["create_outside"] == "EACCES", "sentinel: Landlock was not in force"
    assert control[check] == "ok", f"control: {control[check]}"
    assert locked[check] == "ok", f"{check} under Landlock: {locked[check]}"


def test_isatty_on_dev_null_still_says_enotty(runs):
    # IOCTL_DEV is granted on the five devices: a denial would turn isatty()'s ENOTTY into EACCES.
    locked, control = runs
    assert locked["create_outside"] == "EACCES", "sentinel: Landlock was not in force"
    assert control["dev_null_isatty_enotty"] == locked["dev_null_isatty_enotty"] == "ENOTTY"


DENIED = {
    "create_outside": ("EACCES",),
    "mkdir_outside": ("EACCES",),
    "symlink_outside": ("EACCES",),
    "fifo_outside": ("EACCES",),
    "unix_bind_outside": ("EACCES",),
    "write_existing_outside": ("EACCES",),
    "unlink_outside": ("EACCES",),
    "rename_out": ("EACCES", "EXDEV"),
    "link_out": ("EACCES", "EXDEV"),
    "proc_write": ("EACCES",),
}


@pytest.mark.parametrize("check", sorted(DENIED))
def test_denied(runs, check):
    locked, control = runs
    assert control[check] == "ok", f"control must succeed, got {control[check]}"
    assert locked[check] in DENIED[check], f"{check} under Landlock: {locked[check]}"


def test_link_into_writable_dir_needs_refer(runs, abi):
    # W grants MAKE_REG, so only REFER (missing on O) can refuse this link: EXDEV.
    locked, control = runs
    assert control["link_in_refer"] == "ok"
    assert locked["link_in_refer"] == "EXDEV"


def test_truncate_outside_denied(runs, abi):
    if abi < 3:
        pytest.skip(f"LANDLOCK_ACCESS_FS_TRUNCATE needs ABI 3, kernel has {abi}")
    locked, control = runs
    assert control["truncate_outside"] == "ok"
    assert locked["truncate_outside"] == "EACCES"


def test_ioctl_on_other_device_denied(runs, abi):
    if abi < 5:
        pytest.skip(f"LANDLOCK_ACCESS_FS_IOCTL_DEV needs ABI 5, kernel has {abi}")
    locked, control = runs
    assert control["ioctl_other_device"] == "ENOTTY"
    assert locked["ioctl_other_device"] == "EACCES"


@pytest.mark.parametrize("check", ["signal_outside_domain", "abstract_unix_outside_domain"])
def test_scopes(runs, abi, check):
    if abi < 6:
        pytest.skip(f"Landlock scopes need ABI 6, kernel has {abi}")
    locked, control = runs
    assert control[check] == "ok"
    assert locked[check] == "EPERM"


def test_deny_tcp(abi):
    if abi < 4:
        pytest.skip(f"Landlock TCP rights need ABI 4, kernel has {abi}")
    checks = ["tcp_bind_loopback", "create_outside", "write_inside"]
    result = _run("deny_tcp", checks)
    assert result["abi"] == abi
    assert result["tcp_bind_loopback"] == "EACCES"
    assert result["create_outside"] == "EACCES"
    assert result["write_inside"] == "ok"


def test_missing_writable_path_fails_closed(abi):
    result = _run("missing", ["create_outside"])
    assert result["missing"] == "ENOENT"
    assert result["create_outside"] == "ok", "apply() failed, so nothing may have been restricted"


# -- through the daemon: what a run demands and what it got ------------------------------------------------------
def test_each_run_records_the_landlock_abi_it_applied(start_daemon, abi):
    """The record says what the payload applied (reported by the payload itself, before execve), not what the
    daemon probed at start-up."""
    d = start_daemon()
    with d.client() as c:
        r = c.run("print('hi')")
        assert r.outcome == "exited", r
        rec = c.get_run(r.run_id)
    assert rec["landlock_abi"] == abi
    assert rec["sandbox_profile"]["landlock"] == "required: ABI 1 or later"
    assert rec["spec"]["landlock_min_abi"] == 1


def test_a_required_abi_the_kernel_lacks_fails_closed(start_daemon, abi):
    """landlock_min_abi above the kernel's ABI: every run ends setup_failed naming landlock, and no code runs
    (the script would print)."""
    d = start_daemon("[sandbox]\nlandlock_min_abi = 99")
    with d.client() as c:
        r = c.run("print('ran without the Landlock it was promised')")
        rec = c.get_run(r.run_id)
    assert r.outcome == "setup_failed", r
    assert r.stdout == b""
    assert "landlock" in r.message and "requires ABI 99" in r.message and f"ABI {abi}" in r.message, r.message
    assert rec["outcome"] == "setup_failed" and rec["landlock_abi"] is None


def test_landlock_not_required_runs_anyway_and_records_what_it_got(start_daemon, abi):
    d = start_daemon("[sandbox]\nrequire_landlock = false\nlandlock_min_abi = 99")
    with d.client() as c:
        r = c.run("print('hi')")
        rec = c.get_run(r.run_id)
    assert r.outcome == "exited", r
    assert rec["landlock_abi"] == abi and rec["sandbox_profile"]["landlock"] == "not required"
