"""Issue 10's six speed targets, each beside its reference measured in the same run (make bench).

    .venv/bin/python bench/targets.py [--runs N] [--quick] [--only NAME,...]

References, all measured here, now:
  bare        the python runner's own command line, `/usr/bin/python3 -I -u main.py` with main.py = print(1),
              run directly on the host (fork+exec from this process, like every other column)
  bubblewrap  the same command in a comparable bubblewrap sandbox (all namespaces, read-only /usr, fresh /proc,
              /dev, tmpfs /tmp; no cgroup, seccomp, Landlock, record or RPC)
  sandboxd    end to end through gRPC over the unix socket with records, as an agent sees it
  launcher    the launcher alone (sandboxd.sandbox.launcher driven directly: cgroup, namespaces, root, seccomp,
              Landlock, exec, teardown; no gRPC, no records)

Targets (medians): 1 warm <= 0.5 x bare; 2 cold: launcher - bare <= (bubblewrap - bare) + 2 ms, end to end
<= bare + 10 ms; 3 throughput at concurrency 4 (cold and warm) >= bubblewrap's; 4 sessions: Exec `true` <= 3 ms,
RunCode `1+1` <= 2 ms, CreateSession <= 5 ms; 5 scale: 1000 concurrent runs printing a timestamped line a
second for 20 s all complete, all start within 10 s of submission, daemon RSS <= 150 MB, p99 line delay <=
50 ms, no error; 6 output: 256 MiB streamed to the Python client at >= 400 MB/s. Also the idle cost of the warm
pool. `--quick` scales everything down (a smoke run: it checks the script, not the machine). Results go to stdout
and bench/results/targets.json. Needs root; bwrap for the bubblewrap column.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from startup import bwrap_cmd, timed  # noqa: E402

PRINT1 = "print(1)\n"
TICKER = """import sys, time
n = int(sys.argv[1])
t0 = time.time()
for i in range(n):
    print(f"{time.time():.6f}", flush=True)
    time.sleep(max(0.0, t0 + i + 1 - time.time()))
"""
FLOOD = """import sys
chunk = b"x" * (1 << 20)
w = sys.stdout.buffer.write
for _ in range(int(sys.argv[1])):
    w(chunk)
"""
SCALE_UIDS = 1100
# The benchmark's own daemon: admission and uids raised for the scale target, output ceiling for the flood.
CONFIG = f"""[admission]
max_concurrent = {SCALE_UIDS - 60}
max_queue = 2000
max_queue_per_principal = 2000
[limits.max]
output = "512MiB"
"""


def med_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def p95_ms(samples: list[float]) -> float:
    s = sorted(samples)
    return s[max(0, int(len(s) * 0.95) - 1)] * 1000


# The warm pool of the benchmark's daemon: python only, deep enough for four clients back to back, and two
# session sandboxes for CreateSession.
POOL = """[pool]
max_total = 8
refill_concurrency = 2
runners = { python = 4 }
sessions = { python = 2 }
"""


class BenchDaemon:
    """The tests' private daemon helper with a uid range of its own, wide enough for the scale target (`slot` 1:
    the cold daemon's, beside it)."""

    def __new__(cls, workdir: pathlib.Path, config_extra: str = "", slot: int = 0):
        from conftest import Daemon

        class _D(Daemon):
            def _place(self, workdir):
                super()._place(workdir)
                self.uid_start = 3_000_000 + (os.getpid() % 1000) * 2 * SCALE_UIDS + slot * SCALE_UIDS
                self.uid_count = SCALE_UIDS
        return _D(workdir, config_extra)


def pool_ready(d, n: int = 1, timeout: float = 30.0, kind: str = "ready") -> None:
    """Wait until the pooled daemon has `n` sandboxes ready (so a warm sample measures a claim, not a miss);
    kind "sessions_ready": session sandboxes."""
    deadline = time.monotonic() + timeout
    while metric(d, f'sandboxd_pool_{kind}{{runner="python"}}') < n and time.monotonic() < deadline:
        time.sleep(0.005)


def metric(d, name: str) -> float:
    import re
    import urllib.request
    port = re.search(r"metrics http://127\.0\.0\.1:(\d+)", d.log()).group(1)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def pool_idle_memory(d) -> tuple[int, float]:
    """Pooled sandboxes waiting, and the mean memory charged to each one's cgroup (init, its tmpfs, page tables)."""
    from conftest import find_cgroup_dirs
    sizes = []
    for top in find_cgroup_dirs(d.parent_name):
        for name in os.listdir(top):
            for f in ("memory.usage_in_bytes", "memory.current"):
                path = os.path.join(top, name, f)
                if name.startswith("run-pool-") and os.path.exists(path):
                    sizes.append(int(open(path).read()))
    return len(sizes), (statistics.mean(sizes) if sizes else 0.0)


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def concurrent_rate(fn, total: int, concurrency: int = 4) -> float:
    """Runs per second of `total` calls of fn from `concurrency` threads, each calling it back to back."""
    fn()
    left = [total]
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
            fn()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return total / (time.perf_counter() - t)


async def launcher_alone(d, n: int) -> list[float]:
    """Per-run wall time of the launcher driven directly with the daemon's own plan for print(1)."""
    from sandboxd import config as config_mod
    from sandboxd.policy import RunRequest, plan_run
    from sandboxd.sandbox.launcher import Launcher
    from sandboxd.state import build_catalog
    cfg = config_mod.load(str(d.config_path))
    cat = build_catalog(cfg)
    staging = str(d.workdir / "launcher-staging")
    launcher = Launcher(staging, cgroup_parent_name=f"{d.parent_name}-launcher")
    await launcher.start()
    samples = []
    try:
        for i in range(n + 1):
            spec, _ = plan_run(RunRequest("python", PRINT1.encode()), cat.runners, cat.images, cat.seccomp,
                               f"bench{i:05d}", 1 << 24)
            import dataclasses
            spec = dataclasses.replace(spec, uid=d.uid_start + d.uid_count - 1, gid=d.uid_start + d.uid_count - 1)
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            t = time.perf_counter()
            handle = await launcher.run(spec, b"", out_w, err_w)
            os.close(out_w)
            os.close(err_w)
            fin = await handle.finished
            elapsed = time.perf_counter() - t
            out = os.read(out_r, 100)
            os.close(out_r)
            os.close(err_r)
            assert fin.exit_code == 0 and out == b"1\n", (fin, out)
            if i:
                samples.append(elapsed)
    finally:
        await launcher.stop()
    return samples


async def scale(d, runs: int, seconds: int) -> dict:
    """`runs` concurrent runs each printing a timestamped line a second for `seconds` s."""
    from sandboxd.aio import AsyncClient
    from sandboxd.client import Output, Result
    clients = [AsyncClient(d.target) for _ in range(max(1, runs // 100))]
    delays, starts, errors, done = [], [], [], [0]
    peak = [0, 0]
    launcher = next((c.pid for c in __import__("psutil").Process(d.proc.pid).children()), None)

    async def sample():
        while True:
            peak[0] = max(peak[0], rss(d.proc.pid))
            if launcher:
                peak[1] = max(peak[1], rss(launcher))
            await asyncio.sleep(0.25)

    async def one(i: int):
        c = clients[i % len(clients)]
        submitted, buf, first = time.time(), b"", None
        try:
            async for ev in c.execute(TICKER, args=[str(seconds)], wall_time=seconds + 60, cpu_time=30):
                now = time.time()
                if isinstance(ev, Output) and ev.stream == "stdout":
                    buf += ev.data
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        ts = float(line)
                        first = first or ts
                        delays.append(now - ts)
                elif isinstance(ev, Result):
                    if ev.outcome != "exited" or ev.exit_code != 0:
                        errors.append(f"{ev.outcome} {ev.exit_code} {ev.message}")
                    else:
                        done[0] += 1
        except Exception as e:  # noqa: BLE001 - counted, reported
            errors.append(f"{type(e).__name__}: {e}")
        if first is not None:
            starts.append(first - submitted)
    sampler = asyncio.create_task(sample())
    t = time.time()
    await asyncio.gather(*(one(i) for i in range(runs)))
    elapsed = time.time() - t
    sampler.cancel()
    for c in clients:
        await c.close()
    delays.sort()
    return {"runs": runs, "seconds": seconds, "completed": done[0], "errors": len(errors),
            "error_examples": errors[:5], "elapsed_s": round(elapsed, 2),
            "start_max_s": round(max(starts), 3) if starts else None,
            "start_median_s": round(statistics.median(starts), 3) if starts else None,
            "daemon_rss_max_mb": round(peak[0] / 1e6, 1), "launcher_rss_max_mb": round(peak[1] / 1e6, 1),
            "line_delay_p99_ms": round(delays[int(len(delays) * 0.99) - 1] * 1000, 2) if delays else None,
            "lines": len(delays)}


def output_rate(c, mib: int) -> tuple[float, int]:
    from sandboxd.client import Output, Result
    got, result = 0, None
    t = time.perf_counter()
    for ev in c.execute(FLOOD, args=[str(mib)], output=(mib + 1) << 20, wall_time=120):
        if isinstance(ev, Output):
            got += len(ev.data)
        elif isinstance(ev, Result):
            result = ev
    elapsed = time.perf_counter() - t
    assert result is not None and result.outcome == "exited" and got == mib << 20, (result, got)
    return got / elapsed / 1e6, got


def bare_output_rate(mib: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        (pathlib.Path(tmp) / "main.py").write_text(FLOOD)
        t = time.perf_counter()
        p = subprocess.Popen(["/usr/bin/python3", "-I", "-u", "main.py", str(mib)], cwd=tmp, stdout=subprocess.PIPE)
        got = 0
        while chunk := p.stdout.read(1 << 16):
            got += len(chunk)
        p.wait()
        return got / (time.perf_counter() - t) / 1e6


def line(results: list, n: str, name: str, value: str, reference: str, ratio: float | None, target: str,
         met: bool | None) -> None:
    verdict = "n/a" if met is None else ("met" if met else "NOT MET")
    r = f"{ratio:6.2f}" if ratio is not None else "     -"
    print(f"{n:<3}{name:<34}{value:>14}  {reference:<34}ratio {r}  {target:<22}{verdict}", flush=True)
    results.append({"target": n, "name": name, "value": value, "reference": reference, "ratio": ratio,
                    "goal": target, "met": met})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=40, help="samples per latency column (median)")
    p.add_argument("--quick", action="store_true", help="tiny parameters: a smoke run of the script itself")
    p.add_argument("--scale-runs", type=int, default=1000)
    p.add_argument("--scale-seconds", type=int, default=20)
    p.add_argument("--output-mib", type=int, default=256)
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/targets.py needs root (it starts a private sandboxd)")
    if args.quick:
        args.runs, args.scale_runs, args.scale_seconds, args.output_mib = 3, 8, 2, 8
    n, tput_runs = args.runs, max(8, args.runs * 2)
    have_bwrap = shutil.which("bwrap") is not None
    res: list = []
    raw: dict = {"runs": n, "quick": args.quick, "cpus": os.cpu_count()}
    print(f"issue 10 targets: medians of {n} runs, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}"
          f"{' (--quick: a smoke run, not a measurement)' if args.quick else ''}", flush=True)
    with tempfile.TemporaryDirectory(prefix="sandboxd-bench-") as tmp:
        tmp = pathlib.Path(tmp)
        (tmp / "main.py").write_text(PRINT1)
        bare_argv = ["/usr/bin/python3", "-I", "-u", "main.py"]
        bare = timed(lambda: subprocess.run(bare_argv, cwd=tmp, check=True, stdout=subprocess.DEVNULL), n)
        bw_argv = bwrap_cmd(["--ro-bind", str(tmp / "main.py"), "/work/main.py", "--chdir", "/work", *bare_argv])
        bw = timed(lambda: subprocess.run(bw_argv, check=True, stdout=subprocess.DEVNULL), n) if have_bwrap else []
        raw["bare_ms"], raw["bwrap_ms"] = med_ms(bare), med_ms(bw) if bw else None
        (tmp / "daemon").mkdir()
        d = BenchDaemon(tmp / "daemon", CONFIG + POOL)
        dc = None
        try:
            (tmp / "cold").mkdir()
            dc = BenchDaemon(tmp / "cold", CONFIG, slot=1)   # the same daemon with its pool off
            with d.client() as c, dc.client() as cc:
                def e2e(client=c):
                    r = client.run(PRINT1)
                    assert r.outcome == "exited" and r.stdout == b"1\n", r
                warm = []
                for _ in range(n):   # each sample a claim: wait (untimed) for a ready sandbox first
                    pool_ready(d)
                    warm += timed(e2e, 1)
                raw["warm_ms"] = med_ms(warm)
                raw["warm_p95_ms"] = p95_ms(warm)
                cold = timed(lambda: e2e(cc), n)
                raw["cold_ms"] = med_ms(cold)
                raw["cold_p95_ms"] = p95_ms(cold)
                alone = asyncio.run(launcher_alone(d, n))
                raw["launcher_alone_ms"] = med_ms(alone)
                bare_ms = raw["bare_ms"]
                line(res, "1", "warm: Execute print(1)", f"{raw['warm_ms']:.2f} ms", f"bare {bare_ms:.2f} ms",
                     raw["warm_ms"] / bare_ms, "<= 0.50 x bare", raw["warm_ms"] <= 0.5 * bare_ms)
                if bw:
                    over_l, over_b = raw["launcher_alone_ms"] - bare_ms, raw["bwrap_ms"] - bare_ms
                    line(res, "2a", "cold: launcher alone - bare", f"{over_l:.2f} ms",
                         f"bubblewrap - bare {over_b:.2f} ms", over_l / over_b if over_b > 0 else None,
                         "<= bwrap + 2 ms", over_l <= over_b + 2)
                line(res, "2b", "cold: Execute print(1)", f"{raw['cold_ms']:.2f} ms",
                     f"bare + 10 ms = {bare_ms + 10:.2f} ms", raw["cold_ms"] / (bare_ms + 10), "<= bare + 10 ms",
                     raw["cold_ms"] <= bare_ms + 10)
                # Throughput at concurrency 4: each thread runs the program back to back.
                rate_bare = concurrent_rate(lambda: subprocess.run(bare_argv, cwd=tmp, check=True,
                                                                   stdout=subprocess.DEVNULL), tput_runs)
                rate_bw = concurrent_rate(lambda: subprocess.run(bw_argv, check=True, stdout=subprocess.DEVNULL),
                                          tput_runs) if bw else None
                rate_cold = concurrent_rate(lambda: e2e(cc), tput_runs)
                pool_ready(d, 4)
                hits = metric(d, 'sandboxd_pool_claims_total{result="hit",runner="python"}')
                rate_warm = concurrent_rate(e2e, tput_runs)
                # Back to back, four clients outrun the refill: the rest of the runs miss and go cold.
                raw["warm_tput_hits"] = metric(d, 'sandboxd_pool_claims_total{result="hit",runner="python"}') - hits
                raw.update(rate_bare=rate_bare, rate_bwrap=rate_bw, rate_warm=rate_warm, rate_cold=rate_cold)
                for label, rate in (("cold", rate_cold), ("warm", rate_warm)):
                    if rate_bw:
                        line(res, "3", f"throughput x4 {label}", f"{rate:.1f} runs/s",
                             f"bubblewrap {rate_bw:.1f}, bare {rate_bare:.1f}", rate / rate_bw, ">= bubblewrap",
                             rate >= rate_bw)
                # Sessions.
                created = []

                def create():
                    created.append(c.session(runner="python"))
                sess_create = []
                hits = metric(d, 'sandboxd_pool_session_claims_total{result="hit",runner="python"}')
                for _ in range(n):
                    pool_ready(d, 1, kind="sessions_ready")
                    t = time.perf_counter()
                    create()
                    sess_create.append(time.perf_counter() - t)
                    created.pop().close()
                raw["session_create_hits"] = metric(
                    d, 'sandboxd_pool_session_claims_total{result="hit",runner="python"}') - hits
                with c.session(runner="python") as s:
                    s_exec = timed(lambda: s.exec(["true"]), n)
                    s_code = timed(lambda: s.run_code("1+1"), n)
                raw.update(session_create_ms=med_ms(sess_create), exec_true_ms=med_ms(s_exec),
                           run_code_ms=med_ms(s_code))
                for name, key, goal in (("sessions: Exec true", "exec_true_ms", 3.0),
                                        ("sessions: RunCode 1+1", "run_code_ms", 2.0),
                                        ("sessions: CreateSession from the pool", "session_create_ms", 5.0)):
                    line(res, "4", name, f"{raw[key]:.2f} ms", f"goal {goal:g} ms", raw[key] / goal,
                         f"<= {goal:g} ms", raw[key] <= goal)
                # Output.
                mbs, _ = output_rate(c, args.output_mib)
                raw["output_mb_s"], raw["bare_output_mb_s"] = mbs, bare_output_rate(args.output_mib)
                line(res, "6", f"output: {args.output_mib} MiB to the client", f"{mbs:.0f} MB/s",
                     f"goal 400 MB/s (bare pipe {raw['bare_output_mb_s']:.0f})", mbs / 400, ">= 400 MB/s",
                     mbs >= 400)
            # Scale last: it leaves the most behind in the page cache and the store.
            sc = asyncio.run(scale(d, args.scale_runs, args.scale_seconds))
            raw["scale"] = sc
            ok = (sc["completed"] == sc["runs"] and not sc["errors"] and sc["start_max_s"] is not None
                  and sc["start_max_s"] <= 10 and sc["daemon_rss_max_mb"] <= 150
                  and sc["line_delay_p99_ms"] is not None and sc["line_delay_p99_ms"] <= 50)
            line(res, "5", f"scale: {sc['runs']} runs x {sc['seconds']} s",
                 f"{sc['completed']}/{sc['runs']} done",
                 f"errors {sc['errors']}, start max {sc['start_max_s']} s", None,
                 "all, <=10 s, no error", ok)
            line(res, "5", "scale: daemon RSS (launcher beside)", f"{sc['daemon_rss_max_mb']} MB",
                 f"launcher {sc['launcher_rss_max_mb']} MB", sc["daemon_rss_max_mb"] / 150, "<= 150 MB",
                 sc["daemon_rss_max_mb"] <= 150)
            p99 = sc["line_delay_p99_ms"]
            line(res, "5", "scale: p99 line delay", f"{p99} ms", f"{sc['lines']} lines",
                 p99 / 50 if p99 is not None else None, "<= 50 ms", p99 is not None and p99 <= 50)
            pool_ready(d, 4)
            count, mean = pool_idle_memory(d)
            raw["pool_idle_sandboxes"], raw["pool_idle_bytes_mean"] = count, mean
            line(res, "-", "pool: idle memory per sandbox", f"{mean / (1 << 20):.1f} MiB",
                 f"{count} ready sandboxes (cgroup memory)", None, "reported", None)
        finally:
            d.stop()
            if dc is not None:
                dc.stop()
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "targets.json").write_text(json.dumps({"targets": res, "raw": raw}, indent=2))


if __name__ == "__main__":
    main()
