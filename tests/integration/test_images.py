"""The self-contained Debian image (images/debian, built by `make image-debian`) runs scripts like the host
image does, with its own /usr."""
from __future__ import annotations

import os
import pathlib

import pytest

ROOTFS = pathlib.Path(__file__).resolve().parents[2] / "images" / "debian" / "rootfs"


@pytest.fixture
def debian(sandbox):
    if not (ROOTFS / "usr" / "bin" / "python3").exists():
        if os.environ.get("CI"):
            pytest.fail("CI must build the Debian image first (make image-debian)")
        pytest.skip("the Debian image is not built (make image-debian)")
    return sandbox


def test_python_runs_in_the_debian_image(debian):
    code = ("import sys, os, sqlite3, ssl, zlib, hashlib, json\n"
            "print(sys.version.split()[0], os.path.exists('/usr/share/debootstrap'), os.getuid() >= 1000)\n"
            "print(open('/etc/os-release').read() if os.path.exists('/etc/os-release') else 'no os-release')")
    r = debian.run(code, "python-debian")
    assert r.outcome == "exited", (r, r.stderr)
    first = r.stdout.decode().splitlines()[0].split()
    assert first[0].startswith("3.") and first[2] == "True"


def test_debian_image_is_what_the_sandbox_sees(debian):
    """A program the host has and the image lacks must be invisible: /usr comes from the image."""
    host_only = sorted(set(os.listdir("/usr/bin")) - set(os.listdir(ROOTFS / "usr" / "bin")))
    image_only = sorted(set(os.listdir(ROOTFS / "usr" / "bin")) - set(os.listdir("/usr/bin")))
    assert host_only
    probe = host_only[:20] + image_only[:20]
    r = debian.run(f"import os\nprint([os.path.exists('/usr/bin/' + n) for n in {probe!r}])", "python-debian")
    seen = eval(r.stdout)
    assert seen == [False] * len(host_only[:20]) + [True] * len(image_only[:20])
