"""benchmarks/fsdp2.py end to end on a tiny model: both ranks run, every
path updates the parameters (none times a no-op), and the JSON and the
table hold every path with its ratio to fastaccum."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with gloo is not available",
)


def test_fsdp2_benchmark_runs_and_reports(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.fsdp2", "--params", "20000", "--tensors", "4",
           "--repeats", "3", "--warmup", "1", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "round 4/4" in done.stderr  # progress
    (js,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    result = json.load(open(tmp_path / js))
    paths = result["paths"]
    assert list(paths) == ["torch_default", "torch_foreach", "fastaccum"]
    for name, p in paths.items():
        assert p["updates_params"] is True, name
        assert p["samples"] == 3 and len(p["median_ms_per_rank"]) == 2
        assert p["min_ms"] > 0 and p["gbps_min_bytes"] > 0
    assert paths["fastaccum"]["median_over_fastaccum"] == 1.0
    assert result["world"] == 2 and result["tensors"] == 4 and result["machine"]["cpu_count"]
    table = open(tmp_path / js.replace(".json", ".md")).read()
    for name in paths:
        assert f"| {name} |" in table
