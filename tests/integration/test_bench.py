"""The benchmark script runs end to end (make bench): a smoke run with tiny parameters. It checks that the script
works and prints every target line, never how fast anything is (benchmarks are not tests)."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the benchmark starts a private daemon: needs root")


def test_bench_targets_quick_prints_every_target():
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "targets.py"), "--quick"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    names = ["warm: Execute print(1)", "cold: Execute print(1)", "throughput x4 cold", "throughput x4 warm",
             "sessions: Exec true", "sessions: RunCode 1+1", "sessions: CreateSession", "scale:",
             "scale: daemon RSS", "scale: p99 line delay", "output:", "pool: idle memory"]
    if shutil.which("bwrap"):
        names.append("cold: launcher alone")
    for name in names:
        assert name in p.stdout, f"no line for {name!r}:\n{p.stdout}"
    saved = json.loads((ROOT / "bench" / "results" / "targets.json").read_text())
    assert saved["raw"]["quick"] is True and saved["targets"]
