"""Claims of README.md and docs/security.md about what a run sees and what its record keeps, checked against a
real run (the security battery covers the attacks; these pin the plain facts the docs state)."""
from __future__ import annotations

import hashlib
import json


def test_etc_holds_the_generated_files_and_the_images_read_only_ones(sandbox):
    """README: /etc has six generated files and, from the host image, six files bound read-only."""
    r = sandbox.run("import os, json\n"
                    "print(json.dumps({n: [os.path.islink('/etc/' + n), os.access('/etc/' + n, os.W_OK)]\n"
                    "                  for n in sorted(os.listdir('/etc'))}))", runner="python")
    assert r.outcome == "exited", r
    seen = json.loads(r.stdout)
    generated = {"passwd", "group", "hosts", "hostname", "nsswitch.conf", "resolv.conf"}
    from_image = {"ld.so.cache", "alternatives", "localtime", "mime.types", "protocols", "services"}
    assert generated <= set(seen) <= generated | from_image, sorted(seen)
    assert not any(writable for _, writable in seen.values())


def test_tmp_work_and_dev_shm_are_the_writable_places(sandbox):
    """README: writable tmpfs only for /tmp, /work and /dev/shm."""
    r = sandbox.run("import os\n"
                    "for d in ('/tmp', '/work', '/dev/shm', '/', '/usr', '/etc', '/dev', '/var', '/home'):\n"
                    "    try:\n"
                    "        open(os.path.join(d, 'probe'), 'w').close(); print(d, 'writable')\n"
                    "    except OSError:\n"
                    "        print(d, 'read-only')\n", runner="python")
    writable = {line.split()[0] for line in r.stdout.decode().splitlines() if line.endswith(" writable")}
    assert writable == {"/tmp", "/work", "/dev/shm"}, r.stdout


def test_env_values_and_arguments_are_hashed_in_the_record(sandbox):
    """security.md: the record keeps env names and argument hashes, never the values."""
    secret, arg = "env-canary-5f1c2", "arg-canary-8d0e3"
    r = sandbox.run("print('ok')", runner="python", env={"APP_TOKEN": secret}, args=[arg])
    assert r.outcome == "exited", r
    rec = sandbox.get_run(r.run_id)
    text = json.dumps(rec)
    assert secret not in text and arg not in text
    sha = lambda v: "sha256:" + hashlib.sha256(v.encode()).hexdigest()  # noqa: E731
    assert rec["spec"]["env"]["APP_TOKEN"] == sha(secret) and sha(arg) in rec["spec"]["argv"]
