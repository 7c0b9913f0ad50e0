"""Run the cgroup2-marked tests in a throwaway VM whose kernel has only cgroup v2 mounted (`make test-cgroup2`).

Hosts that run cgroup v1 or hybrid cannot exercise the v2 driver, and most users run pure v2. So: boot a stock
Debian 6.1 kernel under qemu (software emulation, -accel tcg: the /dev/kvm on these machines only runs
special guest kernels), share the host's root read-only and the project directory writable over 9p, mount
only cgroup2 and run `pytest -m cgroup2 tests` with the project's own .venv. See /work/shared/cgroup2-vm.md.

    .venv/bin/python tests/vm/run_cgroup2_vm.py [pytest args, e.g. -x tests/integration/test_cgroups.py]

Runs on the host as root. Installs what is missing (apt-get: qemu-system-x86, busybox-static), downloads the
kernel package once into tests/vm/.cache (never installs it), builds the initramfs (busybox, the virtio/9p
modules, init.sh), boots, prints the guest console, and exits with pytest's status from inside the VM
(qemu itself exits 0 whatever happened inside; pytest's 5, "no tests collected", counts as a failure).
"""
from __future__ import annotations

import fcntl
import lzma
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parents[1]
CACHE = HERE / ".cache"
TIMEOUT = 15 * 60
HOST_PACKAGES = ("qemu-system-x86", "busybox-static")
BUSYBOX = Path("/bin/busybox")
# Under emulation (-accel tcg) every pass of the security battery costs minutes, so the VM runs what cgroup v2
# changes: the one-shot pass, and the session pass of the memory and process groups (the cgroup's limits and kill
# as a session sees them). The pooled pass and the other session cases run on the host.
PYTEST_ARGS = ("-q", "-m", "cgroup2 and not pooled", "-k", "not (session and (test_compat or test_time or test_filesystem))")
DEFAULT_TESTS = ("tests",)
# Built as modules in Debian's 6.1 generic kernel (memcg, pids, devtmpfs, the serial console are built in);
# dependencies first, as insmod does not resolve them.
MODULES = ("virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
           "9pnet", "9pnet_virtio", "netfs", "fscache", "9p")
MODULE_DIRS = ("drivers/virtio", "net/9p", "fs/netfs", "fs/fscache", "fs/9p")


def log(message: str) -> None:
    print(f"run_cgroup2_vm: {message}", flush=True)


def run(*cmd: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, text=True, **kwargs)


def apt_env() -> dict[str, str]:
    return {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}


def installed(package: str) -> bool:
    query = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return query.returncode == 0 and "install ok installed" in query.stdout


def ensure_host_packages() -> None:
    missing = [p for p in HOST_PACKAGES if not installed(p)]
    if missing:
        log(f"installing {' '.join(missing)}")
        run("apt-get", "update", "-q", env=apt_env(), stdout=subprocess.DEVNULL)
        run("apt-get", "install", "-y", "-q", "--no-install-recommends", *missing, env=apt_env(),
            stdout=subprocess.DEVNULL)


def kernel_package() -> str:
    """The generic 6.1 kernel package linux-image-amd64 points to, e.g. linux-image-6.1.0-50-amd64."""
    for attempt in range(2):
        depends = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True)
        match = re.search(r"linux-image-6\.1\.0-\d+-amd64", depends.stdout)
        if match:
            return match.group(0)
        if attempt == 0:
            run("apt-get", "update", "-q", env=apt_env(), stdout=subprocess.DEVNULL)
    sys.exit("run_cgroup2_vm: apt knows no linux-image-amd64 pointing to a 6.1 kernel (a Debian 12 source needed)")


def fetch_kernel() -> Path:
    """Download and unpack the kernel package once, keeping only what the VM boots with: the cache directory
    holds vmlinux and modules/ (the MODULES present as .ko files, plus "order", their load order)."""
    package = kernel_package()
    target = CACHE / package
    if (target / "vmlinux").exists():
        return target
    log(f"fetching {package}")
    for stale in CACHE.glob("linux-image-*"):
        shutil.rmtree(stale)
    work = CACHE / "download"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    # As root into a directory _apt cannot write: say so rather than have apt warn about it.
    download = ("apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", package)
    if subprocess.run(download, cwd=work).returncode != 0:
        # the package list may name a version the mirror no longer has
        run("apt-get", "update", "-q", env=apt_env(), stdout=subprocess.DEVNULL)
        run(*download, cwd=work)
    run("dpkg", "-x", str(next(work.glob("*.deb"))), str(work / "root"))
    (target / "modules").mkdir(parents=True)
    modules_root = next((work / "root" / "lib" / "modules").iterdir()) / "kernel"
    order = []
    for name in MODULES:
        found = [p for d in MODULE_DIRS for p in (modules_root / d).glob(f"{name}.ko*")]
        if found:       # absent means built in
            data = found[0].read_bytes()
            # busybox insmod cannot load compressed modules (Debian compresses them from 6.12 on)
            (target / "modules" / f"{name}.ko").write_bytes(lzma.decompress(data) if found[0].suffix == ".xz"
                                                            else data)
            order.append(f"{name}.ko")
    (target / "modules" / "order").write_text("\n".join(order) + "\n")
    vmlinuz = next((work / "root" / "boot").glob("vmlinuz-*"))
    # Booting the uncompressed ELF (PVH entry) saves the in-guest decompression, 1-2 s under TCG.
    data = vmlinuz.read_bytes()
    start = data.find(b"\xfd7zXZ\x00")
    kernel = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[start:]) if start >= 0 else data
    (target / "vmlinux.tmp").write_bytes(kernel)
    (target / "vmlinux.tmp").rename(target / "vmlinux")      # last: its presence marks a complete cache
    shutil.rmtree(work)
    return target


def cpio_entry(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0), ino: int = 0) -> bytes:
    # newc format: a 110-byte ASCII header, the name, the data, each padded to 4 bytes.
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
    header = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
    header += b"\0" * (-len(header) % 4)
    return header + data + b"\0" * (-len(data) % 4)


def build_initramfs(kernel_dir: Path, path: Path) -> None:
    entries = [("dev", 0o40755, b"", (0, 0)), ("dev/console", 0o20600, b"", (5, 1)), ("bin", 0o40755, b"", (0, 0)),
               ("proc", 0o40755, b"", (0, 0)), ("sys", 0o40755, b"", (0, 0)), ("host", 0o40755, b"", (0, 0)),
               ("modules", 0o40755, b"", (0, 0)),
               ("bin/busybox", 0o100755, BUSYBOX.read_bytes(), (0, 0)),
               ("init", 0o100755, (HERE / "init.sh").read_bytes(), (0, 0))]
    entries += [(f"modules/{p.name}", 0o100644, p.read_bytes(), (0, 0)) for p in (kernel_dir / "modules").iterdir()]
    archive = b"".join(cpio_entry(n, m, d, r, ino=i + 1) for i, (n, m, d, r) in enumerate(entries))
    path.write_bytes(archive + cpio_entry("TRAILER!!!", 0))


def boot(kernel_dir: Path, initramfs: Path, run_dir: Path) -> None:
    rel = run_dir.relative_to(PROJECT)
    cmd = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-m", "2048", "-smp", "2",
           "-kernel", str(kernel_dir / "vmlinux"), "-initrd", str(initramfs),
           "-append", f"console=ttyS0 quiet panic=-1 PROJ={PROJECT} RUN={rel}",
           "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot", "-nic", "none",
           "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
           "-virtfs", f"local,path={PROJECT},mount_tag=proj,security_model=none,multidevs=remap"]
    try:
        qemu = subprocess.run(cmd, stdin=subprocess.DEVNULL, timeout=TIMEOUT)
        if qemu.returncode != 0:
            log(f"qemu exited with status {qemu.returncode}")
    except subprocess.TimeoutExpired:
        log(f"the VM did not finish within {TIMEOUT}s and was killed")


def main() -> int:
    if os.geteuid() != 0:
        sys.exit("run_cgroup2_vm: must run as root (qemu shares / and the tests create cgroups)")
    if not (PROJECT / ".venv" / "bin" / "python").exists():
        sys.exit(f"run_cgroup2_vm: {PROJECT}/.venv is missing: run `make install` first")
    started = time.monotonic()
    CACHE.mkdir(exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)        # concurrent runs share the package cache
        ensure_host_packages()
        kernel_dir = fetch_kernel()
    run_dir = CACHE / f"run-{os.getpid()}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    try:
        (run_dir / "args").write_text("\n".join([*PYTEST_ARGS, *(sys.argv[1:] or DEFAULT_TESTS)]) + "\n")
        build_initramfs(kernel_dir, run_dir / "initramfs.cpio")
        log(f"booting {kernel_dir.name} (prepared in {time.monotonic() - started:.1f}s)")
        boot_started = time.monotonic()
        boot(kernel_dir, run_dir / "initramfs.cpio", run_dir)
        log(f"VM ran {time.monotonic() - boot_started:.1f}s, {time.monotonic() - started:.1f}s in all")
        status_file = run_dir / "status"
        if not status_file.exists():
            log("no exit status from the guest: it crashed or timed out before pytest finished")
            return 1
        status = int(status_file.read_text())
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    if status == 5:
        log("pytest collected no cgroup2 tests inside the VM: that is a failure")
        return 1
    log(f"pytest in the VM exited with status {status}")
    return status


if __name__ == "__main__":
    sys.exit(main())
