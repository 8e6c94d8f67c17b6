"""python -m benchmarks output: timing statistics and the noisy flag, the
cache-resident flag, the run metadata, and result files that a second run
does not overwrite."""

from __future__ import annotations

import json
import os
import re
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `benchmarks` is a top-level package of the repository
    sys.path.insert(0, ROOT)

from benchmarks import __main__ as bench_main  # noqa: E402
from benchmarks import speed  # noqa: E402
from benchmarks.meta import git_state, unique_stem  # noqa: E402
from benchmarks.stats import NOISY_RATIO, fraction_of_copy, percentile, summarize  # noqa: E402

# --- statistics ------------------------------------------------------------


def test_percentile_interpolates_like_numpy():
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 5.0 and percentile(xs, 50) == 3.0
    assert percentile(xs, 90) == pytest.approx(4.6)  # numpy.percentile(xs, 90)
    assert percentile([7.0], 90) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_summarize_min_median_spread():
    st = summarize([0.001, 0.001, 0.001, 0.001, 0.002])  # seconds in, ms out
    assert st["samples"] == 5
    assert st["min_ms"] == pytest.approx(1.0) and st["median_ms"] == pytest.approx(1.0)
    assert st["p90_ms"] == pytest.approx(1.6) and st["max_ms"] == pytest.approx(2.0)
    assert st["spread"] == pytest.approx(0.6)  # (p90 - min) / median
    assert st["median_over_min"] == pytest.approx(1.0) and st["noisy"] is False
    assert st["samples_ms"] == pytest.approx([1, 1, 1, 1, 2])


@pytest.mark.parametrize("median,noisy", [(1.0, False), (NOISY_RATIO, False), (1.31, True), (3.0, True)])
def test_noisy_when_median_over_min_exceeds_the_ratio(median, noisy):
    st = summarize([1.0, median, median], scale=1.0)
    assert st["median_over_min"] == pytest.approx(median)
    assert st["noisy"] is noisy


# --- cache-resident flag ---------------------------------------------------


def test_fraction_of_copy_flags_more_than_the_copy_as_cache():
    assert fraction_of_copy(30.0, 40.0) == (pytest.approx(0.75), False)
    assert fraction_of_copy(40.0, 40.0) == (pytest.approx(1.0), False)
    assert fraction_of_copy(60.0, 40.0) == (pytest.approx(1.5), True)
    assert fraction_of_copy(60.0, None) == (None, False)


def test_annotate_copy_fraction_marks_each_path():
    case = {"paths": {"a": {"gbps": 10.0}, "b": {"gbps": 50.0}}}
    speed.annotate_copy_fraction(case, 40.0)
    assert case["paths"]["a"]["cache_resident"] is False and case["paths"]["a"]["fraction_of_copy"] == 0.25
    assert case["paths"]["b"]["cache_resident"] is True and case["cache_resident"] is True


def test_time_case_keeps_min_median_spread_per_path(single_thread):
    out = speed.time_case("tiny", [64, 3], torch.float32, "cpu", repeats=4, warmup=1)
    for p in out["paths"].values():
        assert p["samples"] == 4 and len(p["samples_ms"]) == 4
        assert p["min_ms"] <= p["median_ms"] <= p["p90_ms"] <= p["max_ms"]
        assert p["ms"] == p["median_ms"] and isinstance(p["noisy"], bool)
        assert p["spread"] == pytest.approx((p["p90_ms"] - p["min_ms"]) / p["median_ms"])
    assert out["noisy"] == any(p["noisy"] for p in out["paths"].values())


# --- file names ------------------------------------------------------------


def test_unique_stem_never_reuses_a_stem(tmp_path):
    base = str(tmp_path / "cpu-2026-01-01")
    assert unique_stem(str(tmp_path), "cpu-2026-01-01") == base
    assert os.path.exists(base + ".json")  # claimed at once
    assert unique_stem(str(tmp_path), "cpu-2026-01-01") == base + "-2"
    (tmp_path / "cpu-2026-01-01-3.png").write_text("")  # any of the three files takes the stem
    assert unique_stem(str(tmp_path), "cpu-2026-01-01") == base + "-4"
    assert unique_stem(str(tmp_path), "cuda-2026-01-01") == str(tmp_path / "cuda-2026-01-01")


# --- metadata --------------------------------------------------------------


def test_git_state_outside_a_checkout_is_null(tmp_path):
    assert git_state(str(tmp_path)) == {"commit": None, "dirty": None}


def test_git_state_in_this_checkout():
    st = git_state(ROOT)
    if st["commit"] is None:
        pytest.skip("not run from a git checkout")
    assert re.fullmatch(r"[0-9a-f]{40}", st["commit"]) and isinstance(st["dirty"], bool)


def _tiny_cases(device, quick):
    return [("tiny 2K / 2 tensors", [1_000, 1_000], torch.float32)]


def test_two_runs_write_two_sets_of_files_with_metadata(tmp_path, monkeypatch, capsys, single_thread):
    monkeypatch.setattr(bench_main, "cases", _tiny_cases)
    monkeypatch.setattr(bench_main, "copy_numel", lambda device, cache, quick=False: 100_000)
    args = ["--device", "cpu", "--quick", "--updates", "2", "--repeats", "3", "--e2e-blocks", "0",
            "--host-time-tensors", "20", "--out", str(tmp_path)]
    assert bench_main.main(args) == 0
    first = capsys.readouterr().out
    assert bench_main.main(args + ["--skip-speed"]) == 0
    second = capsys.readouterr().out

    stems = sorted({p.name.rsplit(".", 1)[0] for p in tmp_path.iterdir()})
    assert len(stems) == 2 and stems[1] == stems[0] + "-2", stems
    for stem in stems:
        for suffix in (".json", ".md"):
            assert (tmp_path / (stem + suffix)).stat().st_size > 0
    for out, stem in ((first, stems[0]), (second, stems[1])):
        assert "wrote:" in out and str(tmp_path / (stem + ".json")) in out and str(tmp_path / (stem + ".md")) in out

    result = json.loads((tmp_path / (stems[0] + ".json")).read_text())
    run, mach = result["run"], result["machine"]
    for key in ("package_version", "git", "argv", "sys_argv", "args", "date", "datetime", "wall_s",
                "loadavg_start", "loadavg_end"):
        assert key in run, key
    assert run["argv"] == args and run["args"]["updates"] == 2 and run["args"]["quick"] is True
    assert set(run["git"]) == {"commit", "dirty"}
    assert run["package_version"]
    for key in ("torch", "threads", "cpu", "device", "python"):
        assert mach[key] is not None, key
    assert mach["torch"] == torch.__version__
    assert result["files"][:2] == [str(tmp_path / (stems[0] + s)) for s in (".json", ".md")]
    p = result["speed"][0]["paths"]["fastaccum"]
    for key in ("min_ms", "median_ms", "spread", "noisy", "fraction_of_copy", "cache_resident"):
        assert key in p, key
    assert result["copy"]["runs"] == len(result["copy"]["runs_gbps"]) >= 3
    md = (tmp_path / (stems[0] + ".md")).read_text()
    for text in ("| date |", "| code |", "| command |", "| torch |", "| device |", "| threads |",
                 run["datetime"], torch.__version__, "--updates 2"):
        assert text in md, text
    assert "min ms" in md and "median ms" in md and "spread" in md
    md2 = (tmp_path / (stems[1] + ".md")).read_text()
    assert "skipped (`--skip-speed`)" in md2


def test_markdown_marks_noisy_rows_and_cache_figures(tmp_path, monkeypatch, capsys, single_thread):
    real = speed.time_case

    def noisy_time_case(*a, **kw):  # the fused path's repeats: median 2x the min
        out = real(*a, **kw)
        out["paths"]["torch_fused"].update(summarize([0.001, 0.002, 0.002]))
        out["noisy"] = True
        return out

    def slow_copy(device, numel, runs=7, warmup=2, cache_bytes=None):  # every path beats this copy
        return {"gbps": 1e-6, "median_gbps": 1e-6, "runs_gbps": [1e-6] * runs, "runs": runs, "numel": numel,
                "working_set_bytes": 8 * numel, "exceeds_cache": True, "noisy": False, "median_over_min": 1.0}

    monkeypatch.setattr(bench_main, "cases", _tiny_cases)
    monkeypatch.setattr(bench_main, "time_case", noisy_time_case)
    monkeypatch.setattr(bench_main, "measure_copy", slow_copy)
    assert bench_main.main(["--device", "cpu", "--quick", "--updates", "2", "--repeats", "3",
                            "--e2e-blocks", "0", "--host-time-tensors", "20", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    (jpath,) = tmp_path.glob("*.json")
    result = json.loads(jpath.read_text())
    paths = result["speed"][0]["paths"]
    assert paths["torch_fused"]["noisy"] is True and result["noisy"] is True
    assert all(p["cache_resident"] for p in paths.values()) and result["speed"][0]["cache_resident"]
    md = jpath.with_suffix(".md").read_text()
    fused_row = next(line for line in md.splitlines() if "| torch `fused=True` |" in line)
    assert fused_row.endswith("⚠ noisy |") and "| 2.00 |" in fused_row  # median/min
    main_row = next(line for line in md.splitlines() if line.startswith("| tiny 2K"))
    cache = result["machine"]["last_level_cache"]  # L3 here; L2 where that is the last level
    assert "⚠" in main_row and f"({cache})" in main_row
    assert "median/min > 1.3" in md and "not a fraction of DRAM bandwidth" in md
