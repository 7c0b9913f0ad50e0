"""Start-up latency, side by side in one run: bare exec, bubblewrap, and sandboxd end to end.

    .venv/bin/python bench/startup.py [--runs N]     (needs root, and bwrap for the middle column)

Each column runs the same trivial program (`/bin/true`, then `python3 -c pass`) N times and reports the
median and p95 wall time per run as seen by the caller. sandboxd's numbers include everything an agent pays:
the gRPC round trip, planning, the record written before the result, the cgroup, namespaces, mounts, seccomp,
exec, and teardown. bubblewrap gets a comparable sandbox (all namespaces, read-only /usr, fresh /proc, /dev,
tmpfs /tmp) but no cgroup, no seccomp and no record. Results go to stdout as a table and to
bench/results/startup.json.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def timed(fn, n: int) -> list[float]:
    fn()  # warm caches
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def bwrap_cmd(argv: list[str]) -> list[str]:
    cmd = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--ro-bind", "/usr", "/usr",
           "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--hostname", "sandbox"]
    for link in ("bin", "lib", "lib64", "sbin"):
        if os.path.islink(f"/{link}"):
            cmd += ["--symlink", os.readlink(f"/{link}"), f"/{link}"]
    return cmd + argv


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=50)
    args = p.parse_args()
    from conftest import Daemon  # the same private-daemon helper the tests use
    workloads = {"true": (["/bin/true"], "sh", ""), "python3 -c pass": (["/usr/bin/python3", "-c", "pass"],
                                                                          "python", "pass")}
    rows = {}
    with tempfile.TemporaryDirectory(prefix="sandboxd-bench-") as tmp:
        d = Daemon(pathlib.Path(tmp))
        try:
            with d.client() as c:
                for name, (argv, runner, code) in workloads.items():
                    cols = {"bare exec": timed(lambda: subprocess.run(argv, check=True), args.runs)}
                    if shutil.which("bwrap"):
                        cols["bubblewrap"] = timed(lambda: subprocess.run(bwrap_cmd(argv), check=True), args.runs)

                    def one():
                        r = c.run(code, runner)
                        assert r.outcome == "exited" and r.exit_code == 0, r
                    cols["sandboxd"] = timed(one, args.runs)
                    rows[name] = {k: {"median_ms": statistics.median(v) * 1000,
                                      "p95_ms": sorted(v)[int(len(v) * 0.95) - 1] * 1000} for k, v in cols.items()}
        finally:
            d.stop()
    print(f"{'workload':<18}{'column':<14}{'median ms':>10}{'p95 ms':>10}   ({args.runs} runs, {os.cpu_count()} CPUs)")
    for name, cols in rows.items():
        for col, v in cols.items():
            print(f"{name:<18}{col:<14}{v['median_ms']:>10.2f}{v['p95_ms']:>10.2f}")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "startup.json").write_text(json.dumps({"runs": args.runs, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
