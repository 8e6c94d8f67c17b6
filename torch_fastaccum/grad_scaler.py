"""GradScaler: torch.amp.GradScaler that drives AccumOptimizer without a host sync.

With any other optimizer it is torch's GradScaler, unchanged. With an
AccumOptimizer:
* the inf/NaN check is one read-only fastaccum kernel pass per (device, dtype);
  the unscale (1/scale, times 1/K) and the skip happen inside the fused update,
  which reads found_inf and the scale from device tensors: no ``.item()``;
* on micro-batches that are not an accumulation boundary, ``step`` only counts
  and ``update`` changes nothing, so the scale is fixed within a window;
* ``unscale_`` at a boundary leaves the *mean* unscaled gradient in ``.grad``
  (1/K folded in), so clipping sees what the reference ``loss / K`` loop sees,
  also when the scaler is disabled (then it only averages); inside a window it
  raises: the grads there are a partial, scaled sum.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch.amp.grad_scaler import OptState

from .optimizer import AccumOptimizer

__all__ = ["GradScaler"]

# The per-optimizer stage after a step() inside an accumulation window: it
# only counted the micro-batch (no check, so nothing for update() to read).
# Beside torch's OptState stages (READY, UNSCALED, STEPPED).
_COUNTED = "fastaccum_counted"
# Set in a per-optimizer state by clip_grad_norm_: its norm pass checked the
# grads already, so step() must not check them again.
_CHECKED = "fastaccum_checked"


class GradScaler(torch.amp.GradScaler):
    """A ``torch.amp.GradScaler`` stepping an AccumOptimizer with no host sync.

    A subclass of torch's, with its arguments, methods and ``state_dict``
    format (state dicts load both ways; the window position is saved by the
    optimizer, not here). With other optimizers it is torch's scaler. With an
    ``AccumOptimizer(..., accumulation_steps=K)``:

    * ``step(opt)`` and ``update()`` may run on every micro-batch. Inside a
      window ``step`` only counts the micro-batch and ``update`` changes
      nothing, so the K micro-batches share one loss scale.
    * At a boundary, ``step`` makes one read-only inf/NaN check pass and gives
      the scale and the found-inf flag to the fused update as device tensors;
      the update unscales (1/scale and 1/K, applied once) or skips on the
      device. torch's ``found_inf.item()`` before the step, its one host
      sync, does not happen.
    * ``unscale_(opt)`` is allowed only at a boundary (inside a window it
      raises) and leaves the unscaled *mean* gradient, 1/K included: what the
      reference ``(loss / K).backward()`` loop clips. The clip pattern:

          scaler.scale(loss).backward()
          if opt.is_accumulation_boundary:
              scaler.unscale_(opt)
              torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
          scaler.step(opt)
          scaler.update()

    * ``clip_grad_norm_(opt, max_norm)`` at a boundary replaces
      ``unscale_(opt); torch.nn.utils.clip_grad_norm_(params, max_norm)``:
      one read pass computes the norm with the inf/NaN check, and the
      update applies the clip coefficient with 1/scale and 1/K (no pass over
      the grads of its own, no host sync)::

          scaler.scale(loss).backward()
          if opt.is_accumulation_boundary:
              scaler.clip_grad_norm_(opt, max_norm)
          scaler.step(opt)
          scaler.update()

    * ``enabled=False``: ``scale`` returns the loss unchanged, ``step`` is
      ``opt.step()`` and ``update`` does nothing, as in torch, but
      ``unscale_`` still divides the grads by K at a boundary
      (``opt.average_grads_()``): an ``enabled=use_amp`` loop clips the same
      gradient either way.

    ``torch.amp.GradScaler`` works with an AccumOptimizer only when K == 1:
    it would check and update the scale on every micro-batch, changing it
    inside a window.
    """

    def __init__(
        self,
        device: str = "cuda",
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        enabled: bool = True,
    ) -> None:
        """The arguments of ``torch.amp.GradScaler``, with its defaults:
        ``device`` of the scale, the initial scale, the growth and backoff
        factors, the growth interval in (boundary) steps without inf/NaN,
        and ``enabled`` (for False, see the class docstring)."""
        super().__init__(device, init_scale, growth_factor, backoff_factor, growth_interval, enabled)

    def _new_found_inf(self) -> torch.Tensor:
        # Both callers come after torch's _check_scale_growth_tracker, which
        # made sure the scale exists.
        return torch.zeros((), dtype=torch.float32, device=self._scale.device)

    # torch's step() calls this for optimizers with _step_supports_amp_scaling.
    def _check_inf_per_device(self, optimizer):
        if not isinstance(optimizer, AccumOptimizer):
            return super()._check_inf_per_device(optimizer)
        state = self._per_optimizer_states[id(optimizer)]
        if not state.get(_CHECKED):
            state["found_inf_per_device"] = optimizer.check_grads_(self._new_found_inf())
        return state["found_inf_per_device"]

    def clip_grad_norm_(
        self,
        optimizer: torch.optim.Optimizer,
        max_norm: float,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = False,
    ) -> torch.Tensor:
        """``unscale_(optimizer)`` then ``torch.nn.utils.clip_grad_norm_`` over
        every parameter of the optimizer, in one call; returns the total norm
        of the unscaled gradient (``inf``/``nan`` when it overflowed: the
        step is then skipped).

        With an AccumOptimizer, fused and at a boundary only: one read pass
        computes the norm of the unscaled *mean* gradient (1/scale and 1/K)
        together with the inf/NaN check that ``step`` then uses, and the
        update applies the clip coefficient with 1/scale and 1/K: clipping
        costs no extra pass over gradient memory and no host sync
        (``error_if_nonfinite=True`` syncs to raise as torch does). norm_type
        2.0 or inf. ``.grad`` holds the clipped unscaled mean after the step
        (the default ``grad_writeback``), as the reference loop leaves it.
        Raises inside a window, after ``step``, on a second call in one
        window and for bad arguments, before anything changes. Disabled:
        ``optimizer.clip_grad_norm_`` (1/K only). With other optimizers:
        torch's ``unscale_`` and ``clip_grad_norm_``."""
        if not isinstance(optimizer, AccumOptimizer):
            self.unscale_(optimizer)
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite)
        if not self._enabled:
            return optimizer.clip_grad_norm_(max_norm, norm_type, error_if_nonfinite)
        self._check_scale_growth_tracker("clip_grad_norm_")
        state = self._per_optimizer_states[id(optimizer)]
        if state["stage"] is OptState.STEPPED or state["stage"] == _COUNTED:
            raise RuntimeError("clip_grad_norm_() is being called after step().")
        if state["stage"] is OptState.UNSCALED:
            # unscale_ ran: the grads hold the unscaled mean and its check.
            return optimizer.clip_grad_norm_(max_norm, norm_type, error_if_nonfinite)
        norm, state["found_inf_per_device"] = optimizer.clip_grads_(
            max_norm, norm_type, error_if_nonfinite, grad_scale=self._scale, found_inf=self._new_found_inf()
        )
        state[_CHECKED] = True
        return norm

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Unscale the optimizer's gradients in place, e.g. to clip them.

        With an AccumOptimizer: only at an accumulation boundary (it raises
        inside a window). One fused pass per (device, dtype) divides the
        grads by scale * K, leaving the unscaled mean gradient of the window,
        and records the inf/NaN flag that ``step`` uses. Disabled, it only
        divides by K. At most once between ``update`` calls, and before
        ``step``. With other optimizers: torch's ``unscale_``."""
        if not isinstance(optimizer, AccumOptimizer):
            return super().unscale_(optimizer)
        if not self._enabled:
            # Nothing to unscale, but the 1/K of the window still applies: an
            # `enabled=use_amp` loop must clip the same mean gradient either way.
            optimizer.unscale_grads_(None, None)
            return
        self._check_scale_growth_tracker("unscale_")
        state = self._per_optimizer_states[id(optimizer)]
        if state["stage"] is OptState.UNSCALED:
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
        if state["stage"] is OptState.STEPPED or state["stage"] == _COUNTED:
            raise RuntimeError("unscale_() is being called after step().")
        with torch.no_grad():
            state["found_inf_per_device"] = optimizer.unscale_grads_(self._scale, self._new_found_inf())
        state["stage"] = OptState.UNSCALED

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any):
        """Call ``optimizer.step(*args, **kwargs)`` unless its gradients hold
        inf/NaN; returns what that returns.

        With an AccumOptimizer, inside a window: only counts the micro-batch
        (no check, no update). At a boundary: the inf/NaN check (unless
        ``unscale_`` made it), then the fused update, which unscales and
        applies 1/K or skips on the device, with no host sync. A ``closure``
        keyword raises while enabled, as in torch. Disabled, or with other
        optimizers: torch's ``step``."""
        if not (self._enabled and isinstance(optimizer, AccumOptimizer)):
            return super().step(optimizer, *args, **kwargs)
        if not optimizer.is_accumulation_boundary:
            if "closure" in kwargs:
                raise RuntimeError("Closure use is not currently supported if GradScaler is enabled.")
            self._check_scale_growth_tracker("step")
            state = self._per_optimizer_states[id(optimizer)]
            if state["stage"] is OptState.STEPPED or state["stage"] == _COUNTED:
                raise RuntimeError("step() has already been called since the last update().")
            retval = optimizer.step(*args, **kwargs)  # counts the micro-batch
            state["stage"] = _COUNTED
            return retval
        try:
            return super().step(optimizer, *args, **kwargs)
        finally:
            # torch hands grad_scale/found_inf over as attributes and deletes them
            # only when optimizer.step() returns; after an exception a retry would
            # multiply the stale scale in (unscaling by 1/scale^2). Never leave them.
            for name in ("grad_scale", "found_inf"):
                optimizer.__dict__.pop(name, None)

    def update(self, new_scale: float | torch.Tensor | None = None) -> None:
        """Adjust the scale after ``step``, as torch does: back off after an
        inf/NaN, grow after ``growth_interval`` clean steps; ``new_scale``
        sets it directly.

        Call it on every micro-batch. While every AccumOptimizer stepped
        since the last call is inside its window, it changes nothing (the
        scale is fixed within a window); at a boundary it reads only that
        boundary's inf/NaN flag. Disabled: does nothing."""
        if self._enabled:
            states = self._per_optimizer_states
            counted = [key for key, s in states.items() if s["stage"] == _COUNTED]
            if new_scale is None and states and len(counted) == len(states):
                # Inside an accumulation window: the scale must stay fixed.
                self._check_scale_growth_tracker("update")
                self._per_optimizer_states = defaultdict(torch.amp.grad_scaler._refresh_per_optimizer_state)
                return
            # Optimizers still mid-window recorded no inf check; torch's update
            # must only see those that did.
            for key in counted:
                del states[key]
        return super().update(new_scale)
