"""python -m benchmarks --time-budget: the plan against a fake clock, and a
tiny real run whose cuts and skips must all be written down."""

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
from benchmarks.budget import MIN_REPEATS, TimeBudget, repeats_that_fit  # noqa: E402
from benchmarks.parity import run_parity  # noqa: E402
from benchmarks.speed import time_case  # noqa: E402


class FakeClock:
    """Advances `step` seconds on every reading."""

    def __init__(self, step=0.0):
        self.t = 100.0
        self.step = step

    def __call__(self):
        self.t += self.step
        return self.t


def test_budget_accounting():
    clock = FakeClock()
    b = TimeBudget(50, clock=clock)
    assert b.left() == 50 and b.deadline(0.4) == pytest.approx(120.0)
    clock.t += 30
    assert b.elapsed() == pytest.approx(30) and b.left() == pytest.approx(20)
    assert b.speed_share(cases_left=2, reserve=10) == pytest.approx(5)
    clock.t += 100
    assert b.left() == 0 and b.speed_share(3, 0) == 0
    with pytest.raises(ValueError):
        TimeBudget(0)


def test_expected_min_cost_scales_up_from_the_largest_case():
    b = TimeBudget(10, clock=FakeClock())
    assert b.expected_min_cost(1000) == 0.0  # nothing measured yet: the first case always runs
    b.record_case_min_cost(1_000, 0.5)
    b.record_case_min_cost(10_000, 2.0)
    assert b.expected_min_cost(5_000) == pytest.approx(2.0)  # never scaled down
    assert b.expected_min_cost(100_000) == pytest.approx(20.0)


@pytest.mark.parametrize(
    "planned,done,per_round,left,want",
    [(20, 5, 1.0, 100.0, 20), (20, 5, 1.0, 7.5, 12), (20, 5, 1.0, 0.0, 5), (20, 5, 1.0, -3.0, 5),
     (5, 5, 1.0, 100.0, 5), (20, 5, 0.0, 1.0, 20)],
)
def test_repeats_that_fit(planned, done, per_round, left, want):
    assert repeats_that_fit(planned, done, per_round, now=0.0, deadline=left) == want


def test_time_case_cuts_repeats_but_keeps_the_minimum():
    clock = FakeClock(step=1.0)  # every reading "takes" a second: nothing more fits
    out = time_case("tiny", [64, 3], torch.float32, "cpu", repeats=20, warmup=1,
                    deadline=clock.t + 2.0, clock=clock)
    assert out["budget"]["repeats_taken"] == MIN_REPEATS and out["budget"]["cut_by_budget"]
    assert all(p["samples"] == MIN_REPEATS for p in out["paths"].values())
    # Without a deadline: every repeat, and no budget entry.
    out = time_case("tiny", [64, 3], torch.float32, "cpu", repeats=6, warmup=1)
    assert "budget" not in out and all(p["samples"] == 6 for p in out["paths"].values())


def test_parity_stops_after_the_window_that_passes_its_deadline():
    r = run_parity(updates=3, k=2, overflow_at=[0, 5], device="cpu", deadline=0.0)
    assert r["updates"] == 1 and r["updates_planned"] == 3 and r["cut_by_budget"]
    assert r["micro_batches"] == 2 and r["overflow_micro_batches"] == [0]
    assert r["pass"]


def test_tiny_budget_run_records_every_cut(tmp_path, single_thread):
    rc = bench_main.main(["--device", "cpu", "--quick", "--updates", "3", "--e2e-blocks", "1",
                          "--time-budget", "0.05", "--out", str(tmp_path)])
    assert rc == 0
    (jpath,) = tmp_path.glob("*.json")
    result = json.loads(jpath.read_text())
    notes = result["budget"]["notes"]
    assert result["parity"]["cut_by_budget"] and any(n.startswith("parity: stopped") for n in notes)
    assert {c["case"] for c in result["speed_skipped"]} | {c["case"] for c in result["speed"]} == {
        name for name, _, _ in bench_main.cases("cpu", True)}
    assert len(result["speed_skipped"]) >= 1
    assert "e2e" not in result and result["e2e_skipped"]
    assert any(n.startswith("end to end") for n in notes)
    md = jpath.with_suffix(".md").read_text()
    assert "## Time budget (`--time-budget 0.05`)" in md and "skipped" in md
    assert "cut by the time budget" in md  # the parity line
