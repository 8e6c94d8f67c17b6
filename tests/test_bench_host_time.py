"""benchmarks/host_time.py: the per-step host-time section of python -m
benchmarks (many small CPU tensors), its structure, that no path times a
no-op, and its place in the report, on a few tensors."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `benchmarks` is a top-level package of the repository
    sys.path.insert(0, ROOT)

from benchmarks import __main__ as bench_main  # noqa: E402
from benchmarks import host_time  # noqa: E402

N = 50


@pytest.fixture(scope="module")
def result():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return host_time.measure_host_time(n_tensors=N, numel=10, k=4, runs=4, warmup=1)
    finally:
        torch.set_num_threads(n)


def test_structure(result):
    assert result["n_tensors"] == N and result["numel"] == 10 and result["accumulation_steps"] == 4
    assert result["runs"] == 4 and result["warmup"] == 1 and result["threads"] >= 1
    assert "cut_by_budget" not in result  # no deadline, no budget entry
    assert tuple(result["paths"]) == host_time.PATHS
    for key, p in result["paths"].items():
        assert p["samples"] == 4 and len(p["samples_ms"]) == 4, key
        assert 0 < p["min_us"] <= p["us"] <= p["p90_us"], key
        assert p["us"] == pytest.approx(p["median_ms"] * 1e3)
        assert p["us_per_tensor"] == pytest.approx(p["us"] / N)
        assert p["us_per_tensor_min"] == pytest.approx(p["min_us"] / N)
        assert p["spread"] == pytest.approx((p["p90_ms"] - p["min_ms"]) / p["median_ms"])
        assert isinstance(p["noisy"], bool)
    assert result["noisy"] == any(p["noisy"] for p in result["paths"].values())
    r, p = result["ratios"], result["paths"]
    assert len(result["counting_position_median_us"]) == 3  # K-1 counting micro-steps per window
    assert result["counting_position_median_us"][0] == pytest.approx(p["fastaccum_scaler_count_first"]["us"])
    assert result["counting_position_median_us"][-1] == pytest.approx(p["fastaccum_scaler_count_last"]["us"])
    assert r["torch_fused_over_fastaccum"] == pytest.approx(p["torch_fused"]["us"] / p["fastaccum"]["us"])
    json.dumps(result)  # goes into the .json as it is


def test_every_path_updated_every_parameter(result):
    for key, p in result["paths"].items():
        assert p["params_changed"] == (None if key in host_time.COUNTING else 1.0), key
    for key in ("fastaccum_scaler", "torch_amp_fused"):  # no step was skipped for inf/NaN
        assert result["paths"][key]["final_scale"] == host_time.SCALE, key


@pytest.mark.parametrize("key", ["torch_default", "torch_fused", "fastaccum", "fastaccum_scaler",
                                 "torch_amp_fused"])
def test_each_timed_step_updates(key, single_thread):
    """Checked from outside measure_host_time: the step a path times changes
    every parameter, and for the K=4 path only the boundary does."""
    s = host_time._Path(key, host_time.initial(N, 10), k=4)
    before = s.flat()
    if s.k > 1:
        for _ in range(s.k - 1):
            s.step()
        assert torch.equal(s.flat(), before)  # counting micro-steps change nothing
        assert s.opt.is_accumulation_boundary
    s.step()
    assert (s.flat() != before).any(dim=1).all()
    if s.k > 1:  # the boundary wrote the unscaled mean back; restore_grads undoes it
        assert not torch.equal(s.params[0].grad, s.grads0[0])
        s.restore_grads()
        assert all(torch.equal(p.grad, g) for p, g in zip(s.params, s.grads0))


def test_deadline_keeps_the_minimum_rounds():
    h = host_time.measure_host_time(n_tensors=10, runs=8, warmup=0, deadline=0.0)
    assert h["runs"] == host_time.MIN_REPEATS and h["runs_planned"] == 8 and h["cut_by_budget"]
    assert all(p["samples"] == host_time.MIN_REPEATS for p in h["paths"].values())


def test_bad_arguments():
    with pytest.raises(ValueError):
        host_time.measure_host_time(n_tensors=2, k=2)
    with pytest.raises(ValueError):
        host_time.measure_host_time(n_tensors=2, runs=0)


def test_section_renders(result):
    md = "\n".join(bench_main._host_time({"host_time": result}))
    assert f"## Per-step host time: {N} tensors of 10 fp32 elements on the CPU" in md
    for key in host_time.PATHS:
        row = next(line for line in md.splitlines() if line.startswith(f"| {host_time.path_name(key, 4)} |"))
        assert row.count("|") == 13, row
        assert ("| none (counts only) |" if key in host_time.COUNTING else "| 100% |") in row, row
    assert "µs/tensor (median)" in md and "Median ratios" in md
    skipped = "\n".join(bench_main._host_time({"host_time_skipped": "`--skip-speed`"}))
    assert "Skipped: `--skip-speed`." in skipped


def test_main_writes_the_section(tmp_path, monkeypatch, capsys, single_thread):
    monkeypatch.setattr(bench_main, "cases", lambda device, quick: [("tiny 2K / 2 tensors", [1_000, 1_000],
                                                                     torch.float32)])
    monkeypatch.setattr(bench_main, "copy_numel", lambda device, cache, quick=False: 100_000)
    assert bench_main.main(["--device", "cpu", "--quick", "--updates", "2", "--repeats", "3", "--e2e-blocks",
                            "0", "--host-time-tensors", "20", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "## Per-step host time: 20 tensors of 10 fp32 elements on the CPU" in out
    (jpath,) = tmp_path.glob("*.json")
    result = json.loads(jpath.read_text())
    h = result["host_time"]
    assert h["n_tensors"] == 20 and h["runs"] == host_time.RUNS[True] and h["threads"] == 1
    assert "host_time" in result["run"]["stages_s"]
    assert "## Per-step host time" in jpath.with_suffix(".md").read_text()
