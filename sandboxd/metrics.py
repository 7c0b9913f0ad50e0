"""Every Prometheus series sandboxd exports, defined in one place (docs/metrics.md documents each).

Labels are bounded: runner names come from configuration, outcomes and reasons from fixed enums; run ids and
principals never appear. A private registry keeps tests (several daemons in one process) independent.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from . import __version__

disable_created_metrics()  # *_created series double the exposition and no dashboard uses them

BUCKETS_FAST = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BUCKETS_RUN = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
REJECT_REASONS = ("unauthenticated", "permission_denied", "queue_full", "rate_limited", "invalid", "shutting_down")


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.runs = Counter("sandboxd_runs", "Runs that reached an outcome.", ["runner", "outcome"], registry=r)
        self.duration = Histogram("sandboxd_run_duration_seconds", "Wall time of the user's code.", ["runner"],
                                  buckets=BUCKETS_RUN, registry=r)
        self.setup = Histogram("sandboxd_sandbox_setup_seconds",
                               "From request accepted until the user's code starts.", ["runner"],
                               buckets=BUCKETS_FAST, registry=r)
        self.queue_wait_s = Histogram("sandboxd_queue_wait_seconds", "Time a run waited for a slot.",
                                      buckets=BUCKETS_FAST, registry=r)
        self.active = Gauge("sandboxd_runs_active", "Runs holding a slot now.", registry=r)
        self.queue_depth = Gauge("sandboxd_queue_depth", "Runs waiting for a slot now.", registry=r)
        self.uids_quarantined = Gauge("sandboxd_uids_quarantined", "Sandbox uids held out of use until restart "
                                      "because their run's cgroup could not be removed.", registry=r)
        self.rejected_total = Counter("sandboxd_rejected", "Requests refused before running.", ["reason"],
                                      registry=r)
        self.output_bytes = Counter("sandboxd_output_bytes", "Bytes written by scripts.", ["stream"], registry=r)
        self.cpu = Counter("sandboxd_run_cpu_seconds", "CPU time used by runs.", ["runner"], registry=r)
        self.oom = Counter("sandboxd_oom_kills", "Processes OOM-killed inside runs.", registry=r)
        self.reloads = Counter("sandboxd_config_reloads", "Configuration reloads.", ["result"], registry=r)
        self.sessions_live = Gauge("sandboxd_sessions_live", "Live sessions.", ["runner"], registry=r)
        self.session_lifetime = Histogram("sandboxd_session_lifetime_seconds", "How long sessions lived.",
                                          buckets=(1, 10, 60, 300, 900, 1800, 3600, 7200, 21600, 86400), registry=r)
        self.sessions_closed = Counter("sandboxd_sessions_closed", "Sessions that ended, by why.", ["reason"],
                                       registry=r)
        self.session_calls = Counter("sandboxd_session_calls", "Calls into sessions.", ["kind", "outcome"],
                                     registry=r)
        self.file_bytes = Counter("sandboxd_session_file_bytes", "Bytes of files moved into or out of sandboxes.",
                                  ["direction"], registry=r)
        self.egress_connections = Counter("sandboxd_egress_connections",
                                          "Egress connection attempts of runs, by the proxy's decision.",
                                          ["decision"], registry=r)
        self.egress_bytes = Counter("sandboxd_egress_bytes", "Bytes relayed by the egress proxy (in: to runs).",
                                    ["direction"], registry=r)
        self.pool_ready = Gauge("sandboxd_pool_ready", "Pooled sandboxes ready to be claimed.", ["runner"],
                                registry=r)
        self.pool_claims = Counter("sandboxd_pool_claims", "Runs that claimed a pooled sandbox (hit) or took the "
                                   "cold path (miss), for runners with a pool.", ["runner", "result"], registry=r)
        self.pool_sessions_ready = Gauge("sandboxd_pool_sessions_ready", "Pooled session sandboxes ready to be "
                                         "claimed by CreateSession.", ["runner"], registry=r)
        self.pool_session_claims = Counter("sandboxd_pool_session_claims", "Sessions that claimed a pooled sandbox "
                                           "(hit) or were built cold (miss), for runners with a session pool.",
                                           ["runner", "result"], registry=r)
        self.pool_refill = Histogram("sandboxd_pool_refill_seconds", "Time to build one pooled sandbox.",
                                     ["runner"], buckets=BUCKETS_FAST, registry=r)
        self.build = Gauge("sandboxd_build_info", "Version of the running daemon.", ["version"], registry=r)
        self.build.labels(__version__).set(1)
        for reason in REJECT_REASONS:
            self.rejected_total.labels(reason)
        for stream in ("stdout", "stderr"):
            self.output_bytes.labels(stream)
        for result in ("success", "failure"):
            self.reloads.labels(result)
        for direction in ("in", "out"):
            self.file_bytes.labels(direction)
        for decision in ("allowed", "denied", "error"):
            self.egress_connections.labels(decision)
        for direction in ("in", "out"):
            self.egress_bytes.labels(direction)

    def rejected(self, reason: str) -> None:
        # not_found / too_large / unavailable are all the caller's mistake: counted as "invalid".
        self.rejected_total.labels(reason if reason in REJECT_REASONS else "invalid").inc()

    def queue_wait(self, seconds: float) -> None:
        self.queue_wait_s.observe(seconds)

    def egress_connection(self, decision: str, bytes_in: int, bytes_out: int) -> None:
        self.egress_connections.labels(decision).inc()
        self.egress_bytes.labels("in").inc(bytes_in)
        self.egress_bytes.labels("out").inc(bytes_out)

    def run_finished(self, runner: str, result) -> None:
        self.runs.labels(runner, result.outcome.value).inc()
        if result.setup_seconds is not None:
            self.setup.labels(runner).observe(result.setup_seconds)
            self.duration.labels(runner).observe(result.wall_seconds)
        self.output_bytes.labels("stdout").inc(result.stdout_bytes)
        self.output_bytes.labels("stderr").inc(result.stderr_bytes)
        self.cpu.labels(runner).inc(result.cpu_seconds)
        if result.oom_kills:
            self.oom.inc(result.oom_kills)

    def session_opened(self, runner: str) -> None:
        self.sessions_live.labels(runner).inc()

    def session_closed(self, runner: str, reason: str, lifetime: float) -> None:
        self.sessions_live.labels(runner).dec()
        self.sessions_closed.labels(reason).inc()
        self.session_lifetime.observe(max(lifetime, 0.0))

    def session_call(self, kind: str, outcome: str) -> None:
        self.session_calls.labels(kind, outcome).inc()
