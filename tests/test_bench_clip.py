"""benchmarks/clip.py: the "step with clipping" section of python -m
benchmarks (torch's unscale_ + clip_grad_norm_ against the fused
scaler.clip_grad_norm_), its byte counts, that every timed step really clips
the same grads, and its place in the report, on a few tensors."""

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
from benchmarks import clip, speed  # noqa: E402
from benchmarks.budget import MIN_REPEATS  # noqa: E402

SIZES = [64, 3, 200]
TINY = [("tiny clip 2K / 2 tensors", [1_000, 1_000], torch.float32)]


@pytest.fixture(scope="module")
def case():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return speed.annotate_copy_fraction(
            clip.time_clip_case("tiny", SIZES, torch.float32, "cpu", repeats=4, warmup=1), 10.0)
    finally:
        torch.set_num_threads(n)


# --- byte counts -------------------------------------------------------------


def test_byte_counts_follow_the_derivation():
    # torch: unscale_ (grad r+w) + clip norm (grad r) + clip multiply (grad r+w)
    # + SGD (param r+w, momentum r+w, grad r)
    assert clip.ACCESSES["torch_default"] == clip.ACCESSES["torch_fused"] == 2 + 1 + 2 + 5
    # ours: norm/check pass (grad r) + update (grad r, param r+w, momentum r+w) [+ grad write-back]
    assert clip.ACCESSES["fastaccum"] == 1 + 5 + 1 and clip.ACCESSES["fastaccum_no_writeback"] == 1 + 5
    assert clip.TORCH_UNSCALED == 1 + 2 + 5  # torch's scaler disabled: no unscale_
    fp32 = {p: clip.bytes_per_element(p, 4) for p in clip.PATHS}
    assert fp32 == {"torch_default": 40, "torch_fused": 40, "fastaccum": 28, "fastaccum_no_writeback": 24}
    # ours moves the same bytes as the step without clipping (speed.py)
    assert fp32["fastaccum"] == 4 * speed.ACCESSES["fastaccum"]
    assert fp32["fastaccum_no_writeback"] == 4 * speed.ACCESSES["fastaccum_no_writeback"]
    assert clip.bytes_per_element("fastaccum", 2) == 14 and clip.bytes_per_element("torch_fused", 2) == 20
    assert clip.bytes_per_element("torch_default", 2, torch_scaled=False) == 16
    assert clip.bytes_per_element("fastaccum", 2, torch_scaled=False) == 14  # ours keeps its scaler


def test_case_records_the_bytes(case):
    numel = sum(SIZES)
    assert case["numel"] == numel and case["tensors"] == len(SIZES) and case["dtype"] == "float32"
    assert case["bytes_per_element"] == {"torch_default": 40, "torch_fused": 40, "fastaccum": 28,
                                         "fastaccum_no_writeback": 24}
    for p, v in case["paths"].items():
        assert v["min_bytes"] == case["bytes_per_element"][p] * numel
        assert v["gbps"] == pytest.approx(v["min_bytes"] / v["ms"] / 1e6)
        assert v["gbps_at_min"] == pytest.approx(v["min_bytes"] / v["min_ms"] / 1e6)


# --- cases and structure -----------------------------------------------------


def test_cases():
    (full,) = clip.cases("cpu", quick=False)
    assert full[0] == "10M fp32 / 160 tensors" and len(full[1]) == 160 and sum(full[1]) == 10_000_000
    assert full[2] is torch.float32
    (quick,) = clip.cases("cpu", quick=True)
    assert len(quick[1]) == 160 and sum(quick[1]) == 1_000_000 and quick[2] is torch.float32
    assert clip.cases("cuda", False) == speed.cases("cuda", False)
    assert any(dtype is torch.bfloat16 for _, _, dtype in clip.cases("cuda", False))


def test_structure(case):
    assert tuple(case["paths"]) == clip.PATHS
    assert "budget" not in case  # no deadline, no budget entry
    for p in case["paths"].values():
        assert p["samples"] == 4 and len(p["samples_ms"]) == 4
        assert p["min_ms"] <= p["median_ms"] <= p["p90_ms"] <= p["max_ms"] and p["ms"] == p["median_ms"]
        assert isinstance(p["noisy"], bool) and "fraction_of_copy" in p and "cache_resident" in p
    p = case["paths"]
    assert case["best_torch"] == min(clip.TORCH_PATHS, key=lambda k: p[k]["ms"])
    assert case["speedup_vs_best_torch"] == pytest.approx(p[case["best_torch"]]["ms"] / p["fastaccum"]["ms"])
    assert case["speedup_vs_best_torch"] == min(case["speedup_vs_torch_default"], case["speedup_vs_torch_fused"])
    assert case["writeback_cost"] == pytest.approx(p["fastaccum"]["ms"] / p["fastaccum_no_writeback"]["ms"])
    assert case["noisy"] == any(v["noisy"] for v in p.values())
    assert case["torch_scaler_enabled"] is True and case["loss_scale"] == speed.SCALE


def test_every_path_clips_the_same_norm(case):
    assert case["max_norm"] == pytest.approx(clip.CLIP_FRACTION * case["grad_norm"])
    assert case["clipped"]
    for v in case["paths"].values():
        # every timed step saw the initial grads (restored): the norm never shrank
        assert v["norm"] == pytest.approx(case["grad_norm"], rel=1e-5)
        assert v["clip_coef"] == pytest.approx(clip.CLIP_FRACTION, rel=1e-5)
    assert case["norm_max_rel_diff"] < 1e-5


def test_restore_keeps_every_step_clipping():
    init = speed._initial(SIZES, torch.float32, "cpu", seed=clip.SEED)
    norm0 = clip.grad_norm([g for _, g in init])
    max_norm = clip.CLIP_FRACTION * norm0
    for key in clip.PATHS:
        s = clip._Path(key, SIZES, torch.float32, "cpu", init, max_norm)
        for _ in range(3):
            s.restore_grads()
            s.step()
            assert float(s.norm) == pytest.approx(norm0, rel=1e-5), key
        left = clip.grad_norm([p.grad for p in s.params], scale=1.0)
        if key == "fastaccum_no_writeback":  # .grad keeps the scaled grads
            assert left == pytest.approx(norm0 * speed.SCALE, rel=1e-5)
        else:  # unscaled and clipped: the next step, unrestored, would not clip
            assert left == pytest.approx(max_norm, rel=1e-4), key
            s.step()
            assert float(s.norm) < max_norm
    # the initial grads themselves were never written
    assert clip.grad_norm([g for _, g in init]) == norm0


def test_deadline_keeps_the_minimum():
    class FakeClock:
        t = 100.0

        def __call__(self):
            self.t += 1.0  # every reading "takes" a second: nothing more fits
            return self.t

    clock = FakeClock()
    out = clip.time_clip_case("tiny", [64, 3], torch.float32, "cpu", repeats=20, warmup=1,
                              deadline=clock.t + 2.0, clock=clock)
    assert out["budget"]["repeats_taken"] == MIN_REPEATS and out["budget"]["cut_by_budget"]
    assert all(p["samples"] == MIN_REPEATS for p in out["paths"].values())


# --- the report --------------------------------------------------------------


def _result(case, **extra):
    return {"machine": {"last_level_cache": "L3", "last_level_cache_bytes": 2**25}, "clip": [case], **extra}


def test_section_renders(case):
    md = "\n".join(bench_main._clip(_result(case)))
    assert "## Step with clipping" in md
    assert "| torch default ms (40 B) | torch fused ms (40 B) | fastaccum ms (28 B) | vs best torch |" in md
    assert "`grad_writeback=False` ms (24 B)" in md
    row = next(line for line in md.splitlines() if line.startswith("| tiny |"))
    assert row.count("|") == 14, row
    assert f"**{case['speedup_vs_best_torch']:.2f}x**" in row
    assert "clipped by 0.5." in md and "NOT every path clipped" not in md
    timings = [line for line in md.splitlines() if line.startswith("| tiny | ")]
    assert len(timings) == 1 + len(clip.PATHS)  # the main row and one per path
    assert "Host syncs" not in md  # CPU: no counts


def test_section_says_what_torch_skips_and_what_was_skipped(case):
    bf16 = dict(case, case="bf16 case", dtype="bfloat16", torch_scaler_enabled=False,
                paths={k: dict(v, min_bytes=clip.bytes_per_element(k, 2, False) * case["numel"])
                       for k, v in case["paths"].items()})
    md = "\n".join(bench_main._clip(_result(bf16)))
    assert "torch.amp.GradScaler cannot unscale bfloat16 grads" in md and "16 B per element" in md
    counted = dict(case, paths={k: dict(v, host_syncs=1, kernel_launches=9) for k, v in case["paths"].items()})
    assert "| tiny | 1 / 9 | 1 / 9 | 1 / 9 | 1 / 9 |" in "\n".join(bench_main._clip(_result(counted)))
    skipped = "\n".join(bench_main._clip({"clip_skipped": "`--skip-clip`"}))
    assert "## Step with clipping" in skipped and "Skipped: `--skip-clip`." in skipped
    unclipped = dict(case, clipped=False)
    assert "NOT every path clipped" in "\n".join(bench_main._clip(_result(unclipped)))


def _run(tmp_path, monkeypatch, *extra):
    monkeypatch.setattr(bench_main, "cases", lambda device, quick: [("tiny 2K / 2 tensors", [1_000, 1_000],
                                                                     torch.float32)])
    monkeypatch.setattr(clip, "cases", lambda device, quick: TINY)
    monkeypatch.setattr(bench_main, "copy_numel", lambda device, cache, quick=False: 100_000)
    assert bench_main.main(["--device", "cpu", "--quick", "--updates", "2", "--repeats", "3", "--e2e-blocks",
                            "0", "--host-time-tensors", "0", "--out", str(tmp_path), *extra]) == 0
    (jpath,) = tmp_path.glob("*.json")
    return json.loads(jpath.read_text()), jpath.with_suffix(".md").read_text()


def test_main_writes_the_section(tmp_path, monkeypatch, capsys, single_thread):
    result, md = _run(tmp_path, monkeypatch)
    assert "## Step with clipping" in capsys.readouterr().out
    (c,) = result["clip"]
    assert c["case"] == TINY[0][0] and c["clipped"] and c["paths"]["fastaccum"]["samples"] == 3
    for key in ("speedup_vs_best_torch", "best_torch", "writeback_cost", "max_norm", "grad_norm",
                "bytes_per_element", "cache_resident", "no_writeback_speedup_vs_best_torch"):
        assert key in c, key
    for key in ("ms", "gbps", "min_bytes", "fraction_of_copy", "norm", "clip_coef", "noisy", "spread"):
        assert key in c["paths"]["fastaccum"], key
    assert "clip" in result["run"]["stages_s"] and result["settings"]["clip"] is True
    assert "## Step with clipping" in md and f"| {TINY[0][0]} |" in md


def test_skip_clip(tmp_path, monkeypatch, capsys, single_thread):
    result, md = _run(tmp_path, monkeypatch, "--skip-clip")
    capsys.readouterr()
    assert "clip" not in result and result["clip_skipped"] == "`--skip-clip`"
    assert result["settings"]["clip"] is False and result["speed"]
    assert "Skipped: `--skip-clip`." in md


def test_budget_records_the_clip_case(tmp_path, monkeypatch, capsys, single_thread):
    result, md = _run(tmp_path, monkeypatch, "--time-budget", "0.05")
    capsys.readouterr()
    notes = result["budget"]["notes"]
    done = {c["case"] for c in result["clip"]} | {c["case"] for c in result.get("clip_cases_skipped", [])}
    assert done == {TINY[0][0]}
    for c in result["clip"]:
        assert c["budget"]["repeats_taken"] >= min(3, MIN_REPEATS)
    for c in result.get("clip_cases_skipped", []):
        assert any(n.startswith(f"clip {c['case']}: skipped") for n in notes)
        assert c["reason"] in md
    assert "## Time budget" in md


def test_standalone(tmp_path, monkeypatch, capsys, single_thread):
    monkeypatch.setattr(clip, "cases", lambda device, quick: TINY)
    monkeypatch.setattr(speed, "copy_numel", lambda device, cache, quick=False: 100_000)
    out = tmp_path / "clip.json"
    assert clip.main(["--device", "cpu", "--quick", "--repeats", "2", "--json", str(out)]) == 0
    assert "## Step with clipping" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["clip"][0]["paths"]["torch_fused"]["samples"] == 2 and result["copy"]["gbps"] > 0
