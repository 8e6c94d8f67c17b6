"""Params listed twice or more in one group.

NOTE: [params listed twice]
torch.optim.SGD warns about a param listed twice in a group (a tied weight
given as `list(head.parameters()) + list(model.parameters())`) and steps it
once per occurrence, in order, with the same .grad, sharing one momentum
buffer; its loop reads every occurrence's buffer first, so on the buffer's
first real update each occurrence sets b = g. The step plan (_plan.py)
keeps that: its buckets hold each param once (what the check pass and the
norm read: each grad counted once, as clip_grad_norm_(model.parameters())
counts it), and repeat buckets step the further occurrences after them,
with the grad the first one used (the unscaled mean, once written back;
else the same factors again) and copies of the update counters taken
before the step (first_counts). One kernel call never sees a tensor twice,
so no two threads update it at once. torch's GradScaler.unscale_ divides
such a grad by the scale once per occurrence; ours divides it once.
"""

from __future__ import annotations

from typing import Iterable

from torch import Tensor

from . import _momentum


def occurrence_numbers(params: Iterable[Tensor]) -> list[int]:
    """For each param, how often it came before in `params` (0: a first)."""
    seen: dict[Tensor, int] = {}
    out = []
    for p in params:
        r = seen.get(p, 0)
        seen[p] = r + 1
        out.append(r)
    return out


def occurrence_rounds(params: list[Tensor], idx: list[int]) -> list[list[int]]:
    """`idx` (indices into `params`) split by occurrence: round 0 holds each
    param's first, round r its (r+1)-th."""
    numbers = occurrence_numbers(params[i] for i in idx)
    rounds: list[list[int]] = [[] for _ in range(max(numbers, default=0) + 1)]
    for i, r in zip(idx, numbers):
        rounds[r].append(i)
    return rounds


def first_counts(repeats: list, state) -> list[list[Tensor]]:
    """The update counters the repeat buckets run with: copies taken before
    any launch of the step, so that every occurrence of a param whose buffer
    had no real update yet sets b = g. The state they belong to is made here
    if missing."""
    return [[c.clone() for c in _momentum.kernel_state(state, b.keys, b.params, True, b.sharded)[1]]
            for b in repeats]
