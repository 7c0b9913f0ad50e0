"""An authenticated caller's run latency, idle and during a flood of unauthenticated requests (issue 12, fault 4).

    .venv/bin/python bench/unauth_flood.py [--runs N] [--flooders P] [--seconds S]    (needs root)

A private daemon (the tests' helper) serves a trivial `python3 -c pass` run N times with nothing else going on,
then N times while P processes send Execute requests with an unknown bearer token as fast as they can. Each
refusal is counted (metrics) and summarised in one `auth.refused_summary` event per interval instead of a
durable, fsynced write each, so the flood should cost the authenticated caller little beyond CPU: the target is
a median within 2x of idle. On a small machine the flooders compete for the same CPUs as the daemon; use fewer
flooders than CPUs for a fair picture. Results go to stdout and to bench/results/unauth_flood.json.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import pathlib
import sqlite3
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def flood(target: str, stop, counter) -> None:
    from sandboxd.client import Client, SandboxdError
    with Client(target, token="sbx_" + "A" * 43) as c:
        while not stop.is_set():
            try:
                c.run("pass")
            except SandboxdError:
                with counter.get_lock():
                    counter.value += 1


def latencies(c, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        r = c.run("pass")
        out.append(time.perf_counter() - t)
        assert r.outcome == "exited" and r.exit_code == 0, r
    return out


def summary(v: list[float]) -> dict:
    return {"median_ms": statistics.median(v) * 1000, "p95_ms": sorted(v)[max(int(len(v) * 0.95) - 1, 0)] * 1000}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=40)
    p.add_argument("--flooders", type=int, default=max((os.cpu_count() or 2) // 2, 1))
    args = p.parse_args()
    from conftest import Daemon  # the same private-daemon helper the tests use
    with tempfile.TemporaryDirectory(prefix="sandboxd-bench-") as tmp:
        d = Daemon(pathlib.Path(tmp), '[audit]\nrefusal_summary_interval = "1s"\n')
        try:
            with d.client() as c:
                c.run("pass")   # warm caches
                idle = latencies(c, args.runs)
                stop, counter = multiprocessing.Event(), multiprocessing.Value("l", 0)
                procs = [multiprocessing.Process(target=flood, args=(d.target, stop, counter))
                         for _ in range(args.flooders)]
                for proc in procs:
                    proc.start()
                time.sleep(1.0)  # let the flood get going
                t0, n0 = time.perf_counter(), counter.value
                loaded = latencies(c, args.runs)
                rate = (counter.value - n0) / (time.perf_counter() - t0)
                stop.set()
                for proc in procs:
                    proc.join(30)
            d.stop()
            db = sqlite3.connect(f"file:{d.state_dir / 'sandboxd.db'}?mode=ro", uri=True)
            kinds = dict(db.execute("SELECT kind, COUNT(*) FROM events GROUP BY kind").fetchall())
            summarised = sum(json.loads(t)["total"] for t, in db.execute(
                "SELECT data FROM events WHERE kind = 'auth.refused_summary'"))
            db.close()
        finally:
            d.stop()
    rows = {"idle": summary(idle), "flood": summary(loaded)}
    ratio = rows["flood"]["median_ms"] / rows["idle"]["median_ms"]
    print(f"{'':<8}{'median ms':>10}{'p95 ms':>10}   ({args.runs} runs each, {args.flooders} flooders, "
          f"{os.cpu_count()} CPUs)")
    for name, v in rows.items():
        print(f"{name:<8}{v['median_ms']:>10.2f}{v['p95_ms']:>10.2f}")
    print(f"flood: {rate:.0f} unauthenticated requests/s; median ratio {ratio:.2f}x "
          f"({'within' if ratio <= 2 else 'OVER'} the 2x target)")
    print(f"records: {summarised} refusals in {kinds.get('auth.refused_summary', 0)} summary events, "
          f"{kinds.get('run.denied', 0)} run.denied events")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "unauth_flood.json").write_text(json.dumps({"runs": args.runs, "flooders": args.flooders,
                                                        "flood_rate_per_s": rate, "median_ratio": ratio,
                                                        "summarised_refusals": summarised, "results": rows},
                                                       indent=2))


if __name__ == "__main__":
    main()
