"""The accumulation window of an AccumOptimizer: where the micro-batch counter
lives and the one place that decides the gradient factor of a boundary step.

A plain object, not int attributes of the optimizer: torch.compile (dynamo)
drops attribute writes on an Optimizer instance inside a compiled step (so a
compiled ``opt.step`` never advanced an int counter and never reached a
boundary), while it replays writes on an ordinary object like this one.
"""

from __future__ import annotations


class AccumulationWindow:
    """``micro_step`` counts every ``step()`` call since construction (or as
    loaded); ``averaged`` says the grads already hold the unscaled mean of the
    current window (``GradScaler.unscale_`` or ``average_grads_`` ran)."""

    def __init__(self, micro_step: int = 0, averaged: bool = False) -> None:
        self.micro_step = micro_step
        self.averaged = averaged

    def is_boundary(self, k: int) -> bool:
        """Whether the next ``step()`` updates."""
        return (self.micro_step + 1) % k == 0

    def at_start(self, k: int) -> bool:
        """Right after a boundary step (or before the first micro-batch)."""
        return self.micro_step % k == 0

    def position(self, k: int) -> int:
        """1-based index of the next micro-batch within its window."""
        return self.micro_step % k + 1

    def grad_factor(self, k: int) -> float:
        """What the boundary update multiplies the stored grads by (besides
        the loss-scale reciprocal): 1/K unless they hold the mean already."""
        return 1.0 if k == 1 or self.averaged else 1.0 / k

    def count(self) -> None:
        """A micro-batch that does not update."""
        self.micro_step += 1

    def close(self) -> None:
        """The boundary step: the next micro-batch opens a new window."""
        self.micro_step += 1
        self.averaged = False

    def __repr__(self) -> str:
        return f"AccumulationWindow(micro_step={self.micro_step}, averaged={self.averaged})"
