"""The /metrics endpoint as an operator sees it: a real Prometheus scrapes a real daemon while runs of every
outcome go through it, and the values it stores are the ones the runs explain.

Also: the exposition passes `promtool check metrics`, the shipped alert rules pass `promtool check rules` (and
evaluate without error in the live Prometheus), and every expression of the shipped Grafana dashboard names
series the daemon exposes. Prometheus is Debian's package, installed here when missing, started as a plain
process on a free port with a throwaway TSDB, and always stopped by pid.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from sandboxd import __version__
from sandboxd.client import SandboxdError

from conftest import ROOT

PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "sandboxd-dashboard.json"
JOB = "sandboxd"
REJECT_REASONS = ("unauthenticated", "permission_denied", "queue_full", "rate_limited", "invalid", "shutting_down")
RUN_ID = re.compile(r"[0-9a-f]{28}")  # service.new_run_id: 12 hex digits of ms + 16 random ones
KNOWN_STDOUT = 12345


def setup_module():
    if os.geteuid() != 0:
        pytest.skip("sandboxd tests need root")
    if not (os.path.exists(PROMETHEUS) and os.path.exists(PROMTOOL)):
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "prometheus"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        # policy-rc.d on CI machines keeps the packaged service from starting; it is never started here.
        if subprocess.run(install, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=True)
            subprocess.run(install, env=env, capture_output=True, check=True)


# -- helpers ---------------------------------------------------------------------------------------------------

def metrics_address(d, timeout: float = 10.0) -> str:
    """HOST:PORT of a daemon's /metrics, from its start-up line ("metrics http://HOST:PORT/metrics")."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(r"metrics http://([^/\s]+)/metrics", d.log())
        if m:
            return m.group(1)
        time.sleep(0.05)
    raise AssertionError(f"no metrics address in the daemon log:\n{d.log()[-2000:]}")


def scrape(addr: str) -> str:
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as resp:
        return resp.read().decode()


def exposition_samples(text: str) -> dict[str, float]:
    """'name{labels}' -> value for every sample line of a text exposition."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def exposed_names(text: str) -> set[str]:
    """Every series name a query may use: sample names, plus the names a declared family will have once it has
    children (a labelled counter or histogram shows no sample before its first observation)."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names |= {name + s for s in ("_bucket", "_count", "_sum")} if kind == "histogram" else {name}
        elif line and not line.startswith("#"):
            names.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
    return names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float, what: str, interval: float = 0.2, last=None):
    """Poll `condition` until it returns something true; fail with `what` and `last()` (what was seen)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f"; saw {last()!r}" if last else ""))


class Prometheus:
    """A prometheus process of our own: 127.0.0.1 on a free port, a temp TSDB, a generated config."""

    def __init__(self, target: str, rule_files: tuple[pathlib.Path, ...] = ()):
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="sandboxd-prometheus-"))
        self.proc: subprocess.Popen | None = None
        config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                  "rule_files": [str(p) for p in rule_files],
                  "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [target]}]}]}
        # JSON is YAML: no YAML library needed to write the config.
        (self.dir / "prometheus.yml").write_text(json.dumps(config, indent=2))
        self.log_path = self.dir / "prometheus.log"

    def start(self) -> "Prometheus":
        for _attempt in range(3):  # the free port can be taken between probing it and prometheus binding it
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(
                    [PROMETHEUS, f"--config.file={self.dir / 'prometheus.yml'}",
                     f"--storage.tsdb.path={self.dir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
                     "--storage.tsdb.retention.time=1h", "--log.level=warn"],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.dir)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                        if resp.status == 200:
                            return self
                except (urllib.error.URLError, OSError):
                    pass
                time.sleep(0.1)
            self.stop()
        raise RuntimeError(f"prometheus did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def api(self, path: str, **params) -> dict:
        url = f"{self.url}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as e:
            body = json.load(e)
        assert body["status"] == "success", f"{url}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def values(self, expr: str, by: str) -> dict:
        """An instant vector as {value of label `by`: value}; `by` must tell the series apart."""
        result = self.query(expr)
        out = {r["metric"].get(by): float(r["value"][1]) for r in result}
        assert len(out) == len(result), f"{expr}: label {by!r} does not tell the series apart: {result}"
        return out

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        assert len(result) <= 1, f"{expr}: more than one series: {result}"
        return float(result[0]["value"][1]) if result else None


@pytest.fixture
def prometheus_for():
    started = []

    def start(target: str, **kw) -> Prometheus:
        p = Prometheus(target, **kw)
        started.append(p)
        return p.start()

    yield start
    for p in started:
        p.close()
    for p in started:
        assert not p.dir.exists()


def dashboard_exprs() -> list[str]:
    exprs = []

    def walk(panels):
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", ()) if t.get("expr"))
            walk(panel.get("panels", ()))
    dash = json.loads(DASHBOARD.read_text())
    walk(dash["panels"])
    for var in dash.get("templating", {}).get("list", ()):
        q = var.get("query")
        if var.get("type") == "query":
            exprs.append(q["query"] if isinstance(q, dict) else q)
    return exprs


def as_query(expr: str) -> str:
    """A dashboard expression with Grafana's variables filled in, so Prometheus can evaluate it."""
    for var, value in (("$__rate_interval", "1m"), ("$__interval", "15s"), ("$__range", "5m"),
                       ("$instance", ".*"), ("${instance:regex}", ".*"), ("$job", JOB)):
        expr = expr.replace(var, value)
    if expr.startswith("label_values("):  # a templating query, not PromQL
        inner = expr[len("label_values("):-1]
        expr = inner.rsplit(",", 1)[0] if "," in inner else inner
    return expr


# -- tests -----------------------------------------------------------------------------------------------------

def test_prometheus_scrapes_what_the_runs_did(start_daemon, prometheus_for):
    d = start_daemon()  # a fresh daemon: every counter starts at zero
    addr = metrics_address(d)
    prom = prometheus_for(addr, rule_files=(ALERTS,))
    wait_for(lambda: prom.value(f'up{{job="{JOB}"}}') == 1, 15, "the first scrape")

    plan = [  # (runner, code, limits, expected outcome)
        ("python", "print('a')", {}, "exited"),
        ("python", "import sys\nsys.exit(3)", {}, "exited"),
        ("python", f"import sys\nsys.stdout.write('m' * {KNOWN_STDOUT})", {}, "exited"),
        ("sh", "echo hi", {}, "exited"),
        ("sh", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; echo $i", {}, "exited"),
        ("python", "import time\ntime.sleep(30)", {"wall_time": 1}, "timeout"),
        ("python", "b = []\nfor _ in range(25): b.append(b'\\1' * (8 << 20))", {"memory": 48 << 20},
         "memory_limit"),
        ("python", "import sys\nwhile True: sys.stdout.write('x' * 65536)", {"output": 100_000}, "output_limit"),
    ]
    results = []
    with d.client() as c:
        for runner, code, limits, expected in plan:
            r = c.run(code, runner=runner, **limits)
            assert r.outcome == expected, r
            results.append((runner, r))
        with pytest.raises(SandboxdError) as refused:  # counted as reason "invalid", and as no run
            c.run("print(1)", runner="no-such-runner")
        assert refused.value.code == "NOT_FOUND"
    assert results[2][1].stdout == b"m" * KNOWN_STDOUT

    # SIGHUP with the file unchanged reloads; with invalid TOML it is refused and counted. Each reload is
    # confirmed on /metrics before the next signal, so the two never coalesce.
    def reloads(result):
        return exposition_samples(scrape(addr)).get(f'sandboxd_config_reloads_total{{result="{result}"}}')
    original = d.config_path.read_bytes()
    os.kill(d.proc.pid, signal.SIGHUP)
    wait_for(lambda: reloads("success") == 1, 10, "the reload to succeed", last=lambda: reloads("success"))
    try:
        d.config_path.write_text("[server\nthis is = not toml\n")
        os.kill(d.proc.pid, signal.SIGHUP)
        wait_for(lambda: reloads("failure") == 1, 10, "the reload to be refused", last=lambda: reloads("failure"))
    finally:
        d.config_path.write_bytes(original)
    assert reloads("success") == 1

    # Bounded wait until Prometheus has scraped the end state (the last counter to move is the failed reload).
    def scraped():
        return (prom.value(f'sandboxd_config_reloads_total{{job="{JOB}",result="failure"}}'),
                prom.value(f'sum(sandboxd_runs_total{{job="{JOB}"}})'))
    wait_for(lambda: scraped() == (1, len(results)) or None, 30, "Prometheus to scrape the final counters",
             last=scraped)
    sel = f'job="{JOB}"'

    runs = {(r["metric"]["runner"], r["metric"]["outcome"]): float(r["value"][1])
            for r in prom.query(f"sandboxd_runs_total{{{sel}}}")}
    assert runs == {("python", "exited"): 3, ("sh", "exited"): 2, ("python", "timeout"): 1,
                    ("python", "memory_limit"): 1, ("python", "output_limit"): 1}

    assert prom.values(f"sandboxd_run_duration_seconds_count{{{sel}}}", "runner") == {"python": 6, "sh": 2}
    assert prom.values(f"sandboxd_run_duration_seconds_sum{{{sel}}}", "runner")["python"] >= 1  # the timeout
    assert prom.values(f"sandboxd_sandbox_setup_seconds_count{{{sel}}}", "runner") == {"python": 6, "sh": 2}
    buckets = prom.values(f'sandboxd_sandbox_setup_seconds_bucket{{{sel},runner="python"}}', "le")
    assert "+Inf" in buckets and len(buckets) >= 10, buckets
    assert buckets["+Inf"] == 6
    assert sorted(buckets.values()) == [buckets[le] for le in sorted(buckets, key=float)]  # cumulative
    p99 = prom.value(f"histogram_quantile(0.99, sum by (le) (sandboxd_sandbox_setup_seconds_bucket{{{sel}}}))")
    assert p99 is not None and 0 < p99 <= 10
    assert prom.value(f"sandboxd_queue_wait_seconds_count{{{sel}}}") == len(results)
    assert prom.value(f"sandboxd_runs_active{{{sel}}}") == 0
    assert prom.value(f"sandboxd_queue_depth{{{sel}}}") == 0

    rejected = prom.values(f"sandboxd_rejected_total{{{sel}}}", "reason")
    assert set(rejected) == set(REJECT_REASONS), rejected
    assert rejected["invalid"] == 1
    assert all(v == 0 for reason, v in rejected.items() if reason != "invalid"), rejected

    output = prom.values(f"sandboxd_output_bytes_total{{{sel}}}", "stream")
    assert output["stdout"] >= KNOWN_STDOUT + 100_000
    assert output["stdout"] == sum(r.stdout_bytes for _, r in results), [r.stdout_bytes for _, r in results]
    assert output["stderr"] == sum(r.stderr_bytes for _, r in results)

    cpu = prom.values(f"sandboxd_run_cpu_seconds_total{{{sel}}}", "runner")
    assert cpu["python"] > 0 and cpu["sh"] > 0, cpu
    for runner in ("python", "sh"):
        assert cpu[runner] == pytest.approx(sum(r.cpu_time for n, r in results if n == runner), rel=1e-6)

    assert prom.value(f"sandboxd_oom_kills_total{{{sel}}}") >= 1
    assert prom.values(f"sandboxd_config_reloads_total{{{sel}}}", "result") == {"success": 1, "failure": 1}
    assert prom.values(f"sandboxd_build_info{{{sel}}}", "version") == {__version__: 1}
    assert prom.value(f'up{{job="{JOB}"}}') == 1

    # Cardinality: labels come from configuration and enums; no run id (or anything shaped like one) ever.
    series = prom.api("series", **{"match[]": f'{{__name__=~"sandboxd_.*",{sel}}}'})
    assert len(series) < 200, len(series)
    run_ids = {r.run_id for _, r in results}
    for s in series:
        for label, value in s.items():
            assert not RUN_ID.search(value) and value not in run_ids, f"run id in a label: {s}"
            if label == "runner":
                assert value in ("python", "sh"), s
    assert not any(run_id in scrape(addr) for run_id in run_ids)

    # The shipped rules load and evaluate against real data; the dashboard's queries are valid PromQL.
    def rules_evaluated():
        rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
        return rules if rules and all(r["lastEvaluation"].startswith("2") for r in rules) else None
    rules = wait_for(rules_evaluated, 10, "every alert rule to be evaluated")
    assert not [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    firing = {r["name"] for r in rules if r["state"] == "firing"}
    assert not {name for name in firing if "Down" in name or "Absent" in name}, firing

    def alert_states():
        return {r["name"]: r["state"] for g in prom.api("rules")["groups"] for r in g["rules"]}
    wait_for(lambda: alert_states()["SandboxdConfigReloadFailed"] == "firing", 10,
             "the refused reload to fire its alert", last=alert_states)
    for expr in dashboard_exprs():
        prom.query(as_query(expr))  # raises on a parse or evaluation error


def test_exposition_passes_promtool(daemon):
    with daemon.client() as c:  # every family with a labelled child, histograms included
        assert c.run("print(1)", runner="python").ok
    text = scrape(metrics_address(daemon))
    for family in ("sandboxd_runs_total", "sandboxd_run_duration_seconds_bucket", "sandboxd_build_info"):
        assert f"\n{family}{{" in text
    p = subprocess.run([PROMTOOL, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
    assert p.returncode == 0, f"promtool check metrics failed:\n{p.stdout.decode()}{p.stderr.decode()}\n{text}"


def test_alert_rules_pass_promtool():
    p = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, timeout=30)
    assert p.returncode == 0, f"promtool check rules failed:\n{p.stdout.decode()}{p.stderr.decode()}"
    example = ROOT / "deploy" / "prometheus" / "prometheus.yml"
    p = subprocess.run([PROMTOOL, "check", "config", str(example)], capture_output=True,
                       timeout=30, cwd=example.parent)
    assert p.returncode == 0, f"promtool check config failed:\n{p.stdout.decode()}{p.stderr.decode()}"


def test_alert_rules_name_only_exposed_series(daemon, prometheus_for):
    addr = metrics_address(daemon)
    names = exposed_names(scrape(addr))
    prom = prometheus_for(addr, rule_files=(ALERTS,))  # Prometheus parses the YAML: no YAML library needed
    exprs = [r["query"] for g in prom.api("rules")["groups"] for r in g["rules"]]
    used = {n for expr in exprs for n in re.findall(r"\bsandboxd_[a-zA-Z0-9_]+", expr)}
    assert used, "the alert rules name no sandboxd series"
    assert not used - names, f"alert rules name series the daemon does not expose: {sorted(used - names)}"


def test_dashboard_queries_name_only_exposed_series(daemon):
    dash = json.loads(DASHBOARD.read_text())
    assert dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    names = exposed_names(scrape(metrics_address(daemon)))
    exprs = dashboard_exprs()
    assert len(exprs) >= 11
    for expr in exprs:
        used = set(re.findall(r"\bsandboxd_[a-zA-Z0-9_]+", expr))
        assert used, f"a dashboard query names no sandboxd series: {expr}"
        assert used <= names, f"{expr}: no such series: {sorted(used - names)}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_quarantined_uids_are_exported_from_the_start(daemon):
    """docs/metrics.md: sandboxd_uids_quarantined counts the uids held out because a cgroup stayed behind."""
    assert exposition_samples(scrape(metrics_address(daemon)))["sandboxd_uids_quarantined"] == 0
