"""Session latencies as an agent sees them, end to end through gRPC with records (issue 8's report; issue 10's
session targets).

    .venv/bin/python bench/sessions.py [--runs N]     (make bench prints the session targets: bench/targets.py)

Measured on one private daemon, each N times, median and p95 wall time per call from the Python client:
CreateSession (and its close), Exec of `true` in a live session, RunCode of `1+1` in a warm kernel, and a 1 MiB
PutFiles and GetFiles. Beside them, for scale, the bare host running `/bin/true` and `python3 -c 1+1` (fork+exec
of a fresh interpreter, which is what a cell replaces). Results go to stdout and bench/results/sessions.json.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from startup import timed  # noqa: E402


def stats(samples: list[float]) -> dict:
    s = sorted(samples)
    return {"median_ms": round(statistics.median(s) * 1000, 2), "p95_ms": round(s[int(len(s) * 0.95) - 1] * 1000, 2),
            "n": len(s)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=40)
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/sessions.py needs root (it starts a private sandboxd)")
    from conftest import Daemon
    n = args.runs
    results = {}
    results["bare /bin/true"] = stats(timed(lambda: subprocess.run(["/bin/true"], check=True), n))
    results["bare python3 -c 1+1"] = stats(timed(lambda: subprocess.run(["/usr/bin/python3", "-c", "1+1"],
                                                                        check=True), n))
    mib = os.urandom(1 << 20)
    with tempfile.TemporaryDirectory(prefix="sandboxd-bench-") as tmp:
        d = Daemon(pathlib.Path(tmp))
        try:
            with d.client() as c:
                def create():
                    c.session(runner="python").close()
                results["CreateSession + CloseSession"] = stats(timed(create, n))
                with c.session(runner="python") as s:
                    results["Exec true"] = stats(timed(lambda: s.exec(["true"]), n))
                    results["RunCode 1+1"] = stats(timed(lambda: s.run_code("1+1"), n))
                    results["PutFiles 1 MiB"] = stats(timed(lambda: s.write("one.bin", mib), n))
                    results["GetFiles 1 MiB"] = stats(timed(lambda: s.read("one.bin"), n))
        finally:
            d.stop()
    print(f"{'call':<32}{'median':>10}{'p95':>10}")
    for name, r in results.items():
        print(f"{name:<32}{r['median_ms']:>8.2f}ms{r['p95_ms']:>8.2f}ms")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "sessions.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
