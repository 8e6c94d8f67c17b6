"""The accumulation window of an AccumOptimizer: K, the micro-batch counter,
and the one place that decides the gradient factor of a boundary step.

A plain object, not int attributes of the optimizer: torch.compile (dynamo)
drops attribute writes on an Optimizer instance inside a compiled step (so a
compiled ``opt.step`` never advanced an int counter and never reached a
boundary), while it replays writes on an ordinary object like this one.
"""

from __future__ import annotations


class AccumulationWindow:
    """``k`` micro-batches per update; ``micro_step`` counts every ``step()``
    call since construction (or as loaded); ``averaged`` says the grads hold
    the unscaled mean of the current window already (``GradScaler.unscale_``
    or ``average_grads_`` ran), so the boundary step must not apply 1/K;
    ``clip_coef`` is the coefficient of a fused ``clip_grad_norm_`` of this
    window (a float32 0-dim tensor), for the boundary step to apply."""

    def __init__(self, k: int = 1, micro_step: int = 0, averaged: bool = False) -> None:
        self.k = k
        self.micro_step = micro_step
        self.averaged = averaged
        self.clip_coef = None

    def is_boundary(self) -> bool:
        """Whether the next ``step()`` updates."""
        return (self.micro_step + 1) % self.k == 0

    def at_start(self) -> bool:
        """Right after a boundary step (or before the first micro-batch)."""
        return self.micro_step % self.k == 0

    def grad_factor(self) -> float:
        """What the stored grads still need besides the loss-scale reciprocal
        to be the mean of the window: 1/K, or 1 once they hold it."""
        return 1.0 if self.k == 1 or self.averaged else 1.0 / self.k

    def mark_averaged(self) -> None:
        """The grads now hold the window's mean (grad_factor() was applied)."""
        self.averaged = True

    def require_unclipped(self) -> None:
        """A second fused clip of a window would clip twice."""
        if self.clip_coef is not None:
            raise RuntimeError(
                "clip_grad_norm_() was already called in this accumulation window; clip once per "
                "window, at its boundary, before step()"
            )

    def count(self) -> None:
        """A micro-batch that does not update."""
        self.micro_step += 1

    def close(self) -> None:
        """The boundary step: the next micro-batch opens a new window."""
        self.micro_step += 1
        self.averaged = False
        self.clip_coef = None

    def restart_at(self, micro_step: int, k: int) -> None:
        """A loaded checkpoint's position (its grads are not averaged)."""
        self.micro_step, self.k, self.averaged = micro_step, k, False
        self.clip_coef = None

    def require_boundary(self, what: str, usage: str = "...") -> None:
        """Unscaling or clipping a partial sum would act on the wrong gradient
        (and, with a loss scaler, mix scaled and unscaled micro-batches)."""
        if not self.is_boundary():
            raise RuntimeError(
                f"{what} was called inside an accumulation window (micro-batch "
                f"{self.micro_step % self.k + 1} of {self.k}); the gradients are a partial sum "
                f"(still scaled, with a loss scaler). Call it only at the boundary: "
                f"`if opt.is_accumulation_boundary: {usage}`"
            )

    def copy(self) -> "AccumulationWindow":
        w = AccumulationWindow(self.k, self.micro_step, self.averaged)
        w.clip_coef = self.clip_coef
        return w

    def __setstate__(self, state: dict) -> None:
        # Windows pickled before K moved here have no `k`; the optimizer's
        # __setstate__ sets it from its defaults.
        self.__dict__.update({"k": 1, "clip_coef": None, **state})

    def __repr__(self) -> str:
        return f"AccumulationWindow(k={self.k}, micro_step={self.micro_step}, averaged={self.averaged})"
