"""Wall-clock budget of one benchmark run (``python -m benchmarks --time-budget S``).

Without a budget nothing here changes what the benchmark does. With one, the
run plans its stages against the clock, in this order:

* parity: may use up to PARITY_SHARE of the budget; past that it stops at the
  end of the current accumulation window and judges the windows it ran;
* copy bandwidth (the reference of the speed table): 2 warm-up copies and
  the best of 7 timed ones (5 in a quick run), never cut;
* speed cases: each case gets an equal share of what is left (less the
  end-to-end reserve). A case runs its warm-up and MIN_REPEATS timed rounds,
  then keeps only as many further rounds as its share still holds. A case
  that is not even expected to fit its minimum is skipped;
* host time (benchmarks/host_time.py): skipped when nothing is left but the
  end-to-end reserve; otherwise its set-up, warm-up and MIN_REPEATS timed
  rounds, then as many further rounds as end before that reserve;
* end to end: its warm-up block is timed, then as many timed blocks as the
  rest of the budget holds (none: skipped).

Every cut and skip is written down (``notes``) and ends up in the JSON and the
Markdown: the budget never changes the output silently.
"""

from __future__ import annotations

import time

MIN_REPEATS = 5  # timed rounds a speed case keeps, whatever the budget
PARITY_SHARE = 0.4  # of the whole budget
E2E_SHARE = 0.15  # of the whole budget, held back from the speed cases


class TimeBudget:
    """Seconds allotted to a run, measured with ``clock`` from construction."""

    def __init__(self, seconds: float, clock=time.perf_counter):
        if seconds <= 0:
            raise ValueError("a time budget must be positive, got %r" % seconds)
        self.total = float(seconds)
        self.clock = clock
        self.start = clock()
        self.notes: list[str] = []
        self.stages: dict[str, float] = {}
        self._min_costs: list[tuple[int, float]] = []  # (numel, s) of finished speed cases

    def now(self) -> float:
        return self.clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        return max(0.0, self.total - self.elapsed())

    def deadline(self, share: float | None = None) -> float:
        """Clock value at which `share` of the budget (all of it by default) is spent."""
        return self.start + self.total * (1.0 if share is None else share)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def record_stage(self, name: str, seconds: float) -> None:
        self.stages[name] = round(seconds, 3)

    # speed cases ------------------------------------------------------------

    def speed_share(self, cases_left: int, reserve: float) -> float:
        """Seconds the next speed case may use: an equal part of what is left
        once `reserve` (the end-to-end share) is held back."""
        return max(0.0, self.left() - reserve) / max(1, cases_left)

    def record_case_min_cost(self, numel: int, seconds: float) -> None:
        """Time a case took for its fixed part (set-up, warm-up, MIN_REPEATS rounds)."""
        self._min_costs.append((numel, seconds))

    def expected_min_cost(self, numel: int) -> float:
        """Rough guess of a case's fixed part (0 before any case ran): the cost
        of the largest case run so far, scaled up (never down) by element
        count. It errs towards skipping: a small case's cost is mostly fixed
        overhead, which the linear scaling overstates."""
        if not self._min_costs:
            return 0.0
        n, s = max(self._min_costs)
        return s * max(1.0, numel / max(1, n))

    def as_dict(self) -> dict:
        return {
            "seconds": self.total,
            "used_s": round(self.elapsed(), 3),
            "min_repeats": MIN_REPEATS,
            "parity_share": PARITY_SHARE,
            "e2e_share": E2E_SHARE,
            "stages_s": dict(self.stages),
            "notes": list(self.notes),
        }


def repeats_that_fit(planned: int, done: int, per_round: float, now: float, deadline: float) -> int:
    """Total timed rounds to take when `done` rounds took `per_round` s each and
    the case must end by `deadline`: never fewer than `done` (at least the
    minimum already run), never more than `planned`."""
    if per_round <= 0:
        return planned
    more = int(max(0.0, deadline - now) // per_round)
    return max(done, min(planned, done + more))
