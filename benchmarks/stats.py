"""How a benchmark reports repeated timings, and when it does not trust them.

Every timed path keeps all its samples; the tables show three numbers of them:

* min: the fastest repeat, the closest to what the code costs on an idle
  machine (noise only ever adds time);
* median: the typical repeat, what the speed-ups are computed from;
* spread = (p90 - min) / median: how far the slow tail reaches, relative to
  the typical repeat (p90: the 90th percentile, linear interpolation between
  the sorted samples as numpy's default does). 0 means every repeat but the
  slowest tenth took the same time.

A path is *noisy* when median / min > NOISY_RATIO: at least half of its
repeats took 30% longer than its fastest one, which on a CPU means something
else (another process, the OS, frequency changes) took the cores during the
run. Its median then overstates the cost: rerun on a quiet machine.

A path's bandwidth that exceeds the measured copy bandwidth cannot have come
from DRAM: part of its working set stayed in the last-level cache between
its passes. Such a figure is flagged `cache_resident` rather than read as a
fraction of memory bandwidth.
"""

from __future__ import annotations

import math
import statistics

NOISY_RATIO = 1.3  # median / min above which a path's timings are not trusted

SPREAD_DEFINITION = "(p90 - min) / median"


def percentile(values, q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between the sorted
    values (numpy.percentile's default method)."""
    xs = sorted(values)
    if not xs:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(samples_s, scale: float = 1e3) -> dict:
    """min / median / p90 / max (in seconds times `scale`: ms by default),
    spread, median/min and the noisy flag of one path's timed repeats."""
    xs = [float(s) for s in samples_s]
    if not xs:
        raise ValueError("no samples to summarize")
    lo, med, p90 = min(xs), statistics.median(xs), percentile(xs, 90)
    ratio = med / lo if lo > 0 else math.inf
    return {
        "samples": len(xs),
        "min_ms": lo * scale,
        "median_ms": med * scale,
        "p90_ms": p90 * scale,
        "max_ms": max(xs) * scale,
        "spread": (p90 - lo) / med if med > 0 else 0.0,
        "median_over_min": ratio,
        "noisy": ratio > NOISY_RATIO,
        "samples_ms": [x * scale for x in xs],
    }


def fraction_of_copy(gbps: float, copy_gbps: float | None) -> tuple[float | None, bool]:
    """(gbps / copy_gbps, cache_resident): a path moving its minimum bytes
    faster than the best plain copy moved its own must have found part of
    them in cache, so its fraction is no DRAM figure."""
    if not copy_gbps or copy_gbps <= 0:
        return None, False
    frac = gbps / copy_gbps
    return frac, frac > 1.0
