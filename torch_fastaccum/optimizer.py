"""AccumOptimizer: a drop-in for torch.optim.SGD with fused gradient accumulation.

The public API only; the work is done by small modules, one concern each:
_window (K, the micro-batch counter, the grad factor), _plan (what a boundary
step touches), _check_pass / _update_pass (the kernels over a plan),
_momentum (per-param state), _checkpoint (the state-dict format), _hyper
(argument checks). Every per-element operation runs in the kernels (csrc/).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _checkpoint, _clip, _momentum
from ._check_pass import run_check
from ._grad_sync import skipped_grad_sync
from ._hyper import check_fused_request, validate_group, validate_options, validate_sgd
from ._plan import Planner
from ._update_pass import run_update
from ._window import AccumulationWindow

__all__ = ["AccumOptimizer"]

_UNSCALE, _UNSCALE_USAGE = "unscale_()", "scaler.unscale_(opt); clip_grad_norm_(...)"


class AccumOptimizer(Optimizer):
    """SGD (with momentum) + gradient accumulation + AMP unscale, fused.

    A drop-in for ``torch.optim.SGD``: same arguments, update math and
    state-dict format (plus a micro-batch counter), and ``accumulation_steps``
    (K). With K > 1, run ``zero_grad()``, ``backward()`` and ``step()`` on
    every micro-batch, and do NOT divide the loss by K:

    * ``step()`` counts the call; only every K-th call (a boundary, see
      ``is_accumulation_boundary``) updates, the others change nothing.
    * ``zero_grad()`` acts only right after a boundary step (or before the
      first), so ``.grad`` sums the K micro-batch gradients in between.
    * A boundary step runs, per (device, dtype), one fused pass of:

          g = (g_1 + ... + g_K) / (K * s)   s: the loss scale, 1 without one
          g = -g                            if maximize
          g = g + weight_decay * p
          if momentum != 0:
              b = g                         on b's first real update, else
              b = momentum * b + (1 - dampening) * g
              g = g + momentum * b          if nesterov, else g = b
          p = p - lr * g                    (fp16/bf16 tensors: math in fp32)

    * After it ``.grad`` holds the unscaled mean gradient, as after the
      reference ``(loss / K).backward()`` loop, also when a GradScaler skipped
      the step. Inside a window it holds the running sum (scaled, with AMP).
    * With K > 1 use ``torch_fastaccum.GradScaler``, not torch's. Clip only at
      a boundary, fused: ``scaler.clip_grad_norm_(opt, max_norm)`` with a
      scaler, ``opt.clip_grad_norm_(max_norm)`` without one.

    Args:
        params: parameters, or dicts of param groups, as for SGD.
        lr (float or 1-element Tensor): learning rate. Default 1e-3.
        momentum (float): momentum factor. Default 0 (no momentum buffers).
        dampening (float): dampening of the momentum. Default 0.
        weight_decay (float or Tensor): L2 penalty. Default 0.
        nesterov (bool): Nesterov momentum; needs momentum > 0 and dampening 0.
        maximize (bool): maximize the objective instead. Default False.
        accumulation_steps (int): K >= 1, micro-batches per update, the same for
            every group. Default 1: ``step()`` updates on every call, as SGD.
        grad_writeback (bool): write the unscaled mean gradient into ``.grad``
            during the update (default True, +4 bytes/param for fp32). False
            leaves the scaled sum there, for loops that zero the grads next.
        foreach, fused (bool or None): accepted for SGD compatibility; the
            fused kernels always run. ``fused=True`` refuses, at the first
            ``step()``, the params torch's fused SGD refuses (meta, complex,
            non-float), with its error.
        differentiable (bool): must be False (True raises ValueError).

    Sparse gradients take torch's unfused SGD math in the same step (they need
    weight_decay=0); params not dense in memory go through a dense copy;
    complex params use their real view; meta params get a shape-only step
    (unless ``fused=True``: torch's fused SGD refuses them).

    Example::

        >>> import torch
        >>> from torch_fastaccum import AccumOptimizer
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = AccumOptimizer(model.parameters(), lr=0.1, momentum=0.9,
        ...                      accumulation_steps=4)
        >>> for x in torch.randn(8, 3, 4):        # 8 micro-batches: 2 updates
        ...     opt.zero_grad()
        ...     model(x).square().mean().backward()  # not divided by 4
        ...     opt.step()
        >>> opt.is_accumulation_boundary          # the next step() only counts
        False
    """

    # GradScaler hands over grad_scale/found_inf instead of syncing. A class
    # attribute, so copies and unpickled optimizers keep it.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        accumulation_steps: int = 1,
        grad_writeback: bool = True,
        foreach: bool | None = None,
        fused: bool | None = None,
        differentiable: bool = False,
    ) -> None:
        validate_sgd(lr, momentum, dampening, weight_decay, nesterov)
        validate_options(accumulation_steps, grad_writeback, differentiable)
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            maximize=maximize, foreach=foreach, differentiable=differentiable, fused=fused,
            accumulation_steps=accumulation_steps, grad_writeback=grad_writeback,
        )
        self._window = AccumulationWindow(accumulation_steps)
        # Made here, not lazily inside step(): a compiled step must find it.
        self._planner = Planner()
        # SGD(fused=True)'s first step checks the params (check_fused_request):
        # None while no group is fused, True until it has checked, then False.
        self._fused_check: bool | None = None
        super().__init__(params, defaults)

    @property
    def _micro_step(self) -> int:
        """The window's counter (what state_dict saves; tests read it)."""
        return self._window.micro_step

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        _checkpoint.fill_defaults(self.defaults, self.param_groups[-1:])
        try:
            validate_group(self.param_groups[-1], self.accumulation_steps, f"param_groups[{len(self.param_groups) - 1}]: ")
        except ValueError:
            self.param_groups.pop()
            raise
        if self.param_groups[-1]["fused"] and self._fused_check is None:
            self._fused_check = True

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        if "_window" not in state and "_window" not in self.__dict__:  # an old pickle
            state["_window"] = AccumulationWindow(1, state.pop("_micro_step", 0), state.pop("_grads_averaged", False))
        super().__setstate__(state)  # also the end of torch's load_state_dict
        self._planner = Planner()
        _checkpoint.fill_defaults(self.defaults, self.param_groups)
        self._window.k = self.defaults["accumulation_steps"]
        _momentum.after_load(self.state)
        if "_fused_check" not in self.__dict__:  # unpickled: checks again, as SGD (load_state_dict does not)
            self._fused_check = True if any(g["fused"] for g in self.param_groups) else None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # defaults, state, param_groups
        state["_window"] = self._window.copy()  # copy.copy must not share it
        return state

    # -- accumulation --------------------------------------------------------

    @property
    def accumulation_steps(self) -> int:
        """K: the number of ``step()`` calls (micro-batches) per update."""
        return self._window.k

    @property
    def is_accumulation_boundary(self) -> bool:
        """Whether the next ``step()`` performs a real update."""
        return self._window.is_boundary()

    @contextlib.contextmanager
    def accumulate(self, model: torch.nn.Module):
        """Skip the gradient reduction of micro-batches that do not update.

        ``with opt.accumulate(model): loss = ...; loss.backward()``. Unless
        the next ``step()`` is a boundary: for a ``DistributedDataParallel``
        model this is ``model.no_sync()``; for a model with FSDP2
        (``fully_shard``) modules, ``set_requires_gradient_sync(False)`` on
        each of them, set back to True on exit. The boundary micro-batch then
        reduces the whole window's sum once. DDP decides in the forward, so
        the backward may follow the block; FSDP2 reduces in the backward, so
        run it inside. For any other model it does nothing."""
        if self.is_accumulation_boundary:
            yield
        else:
            with skipped_grad_sync(model):
                yield

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As :meth:`torch.optim.SGD.zero_grad`, but only right after a boundary
        ``step()`` (or before the first): inside a window it keeps the gradients
        accumulating."""
        if self._window.at_start():
            super().zero_grad(set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        """Count a micro-batch; every K-th call performs the fused update.

        The other calls change neither parameters nor ``.grad``. Returns
        the closure's loss, if one is given (it runs on every call). Under
        AMP call ``scaler.step(opt)``, which calls this."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        window = self._window
        if self._fused_check and not torch.compiler.is_compiling():
            self._fused_check = not check_fused_request(self.param_groups)
        # (Not while compiling: DCP calls the eager step, and the frame walk
        # and the state's size would only add guards to a compiled one.)
        if not torch.compiler.is_compiling() and not self.state and _checkpoint.is_dcp_state_init():
            self._make_state_for_dcp()
            return loss
        if not window.is_boundary():
            window.count()
            return loss
        grad_factor = window.grad_factor()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        clip_coef = window.clip_coef
        # Raises every user error before any state changes.
        plan = self._planner.boundary_plan(self.param_groups, window.micro_step, keep=False)
        window.close()
        run_update(plan, self.state, grad_factor, grad_scale, found_inf, clip_coef)
        return loss

    def _make_state_for_dcp(self) -> None:
        """DCP's state-making step (_checkpoint.is_dcp_state_init): what SGD's
        step does there (zero grads, lr 0: momentum buffers made, params
        unchanged), without moving the window; the grads DCP made are dropped
        here, as its zero_grad() after this would not inside a window."""
        plan = self._planner.plan(self.param_groups, self._window.micro_step)
        run_update(plan, self.state, 1.0, None, None)
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    # -- the mean gradient before the step (clipping) --------------------------

    @torch.no_grad()
    def average_grads_(self) -> None:
        """At a boundary, without a loss scaler: divide the accumulated
        gradients by K in place, so that ``.grad`` holds the mean gradient of
        the window (what the reference ``loss / K`` loop holds) for clipping or
        inspection; the next ``step()`` then uses them as they are. A no-op
        when K == 1 or when they hold the mean already (a second call, or
        after ``GradScaler.unscale_``). ``GradScaler(enabled=False).unscale_``
        calls it, so ``enabled=use_amp`` loops clip the same gradient either
        way. Inside a window it raises."""
        window = self._window
        window.require_boundary("average_grads_()")
        factor = window.grad_factor()
        if factor == 1.0:
            return
        # Each grad once, also of a param listed twice.
        grads = dict.fromkeys(p.grad for group in self.param_groups for p in group["params"] if p.grad is not None)
        dense = [g for g in grads if not g.is_sparse]
        if dense:  # one foreach call (it splits by device and dtype); it refuses an empty list
            torch._foreach_mul_(dense, factor)
        for g in grads:
            if g.is_sparse:
                g._values().mul_(factor)
        window.mark_averaged()

    def clip_grad_norm_(
        self,
        max_norm: float,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = False,
        foreach: bool | None = None,
    ) -> Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over every parameter of this
        optimizer, fused, at a boundary, for loops without a loss scaler (or
        with a disabled one; with an enabled one call
        ``scaler.clip_grad_norm_(opt, ...)``, or ``scaler.unscale_(opt)``
        first).

        Returns what torch's returns there: the total norm of the window's
        mean gradient (1/K applied), a 0-dim tensor on the first grad's
        device, ``inf``/``nan`` if a grad is not finite; no host sync. One
        read pass computes it (norm_type 2.0 or inf); the coefficient
        ``min(1, max_norm / (norm + 1e-6))`` is applied by the next
        ``step()`` with 1/K, so ``.grad`` holds the unclipped sum until then
        and the clipped mean after it (the default ``grad_writeback``), as
        the reference loop leaves it. ``error_if_nonfinite=True`` raises as
        torch does, after a host sync. Raises inside a window, on a second
        call in one window, for ``max_norm`` <= 0 or not finite, and for
        other norm types. ``foreach`` is accepted and ignored."""
        return self.clip_grads_(max_norm, norm_type, error_if_nonfinite)[0]

    # -- what torch_fastaccum.GradScaler calls: these methods, and
    # -- is_accumulation_boundary; nothing else ------------------------------

    def clip_grads_(
        self,
        max_norm: float,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = False,
        *,
        grad_scale: Tensor | None = None,
        found_inf: Tensor | None = None,
    ) -> tuple[Tensor, dict[torch.device, Tensor]]:
        """For ``GradScaler.clip_grad_norm_`` (and :meth:`clip_grad_norm_`):
        at a boundary, the norm of the window's unscaled mean gradient
        (``grad_scale``, the loss scale, and 1/K unless the grads hold the
        mean already) in one read-only pass per (device, dtype) that also
        checks for inf/NaN as :meth:`check_grads_` does (``found_inf``: a
        zeroed float32 0-dim tensor; a scratch one when None). The clip
        coefficient is kept for the next ``step()``. Returns the norm and the
        flag of every device. The plan it makes is reused by that step."""
        window = self._window
        window.require_boundary("clip_grad_norm_()", "scaler.clip_grad_norm_(opt, max_norm)")
        window.require_unclipped()
        max_norm, norm_type = _clip.validate(max_norm, norm_type)
        if found_inf is None:
            device = next((p.grad.device for g in self.param_groups for p in g["params"] if p.grad is not None),
                          torch.device("cpu"))
            found_inf = torch.zeros((), dtype=torch.float32, device=device)
        plan = self._planner.boundary_plan(self.param_groups, window.micro_step, keep=True)
        factor = window.grad_factor()
        with torch.no_grad():
            # fp16 grads with a loss scale: torch's unscale_ refuses them.
            norm, per_device = _clip.total_norm(plan, norm_type, found_inf, grad_scale, factor,
                                                allow_fp16=grad_scale is None)
            if error_if_nonfinite:
                _clip.check_finite(norm, norm_type)
            window.clip_coef = _clip.coefficient(norm, max_norm)
        return norm, per_device

    def check_grads_(self, found_inf: Tensor) -> dict[torch.device, Tensor]:
        """For ``GradScaler.step`` at a boundary: the read-only inf/NaN check
        of the gradients the next ``step()`` updates, one fused pass per
        (device, dtype). ``found_inf`` (float32 0-dim, zeroed) is set where one
        is found; returns the flag of every device (``found_inf`` itself on
        its own). The plan it makes is reused by that ``step()``."""
        window = self._window
        window.require_boundary("check_grads_()")
        plan = self._planner.boundary_plan(self.param_groups, window.micro_step, keep=True)
        return run_check(plan, found_inf)

    def unscale_grads_(self, grad_scale: Tensor | None, found_inf: Tensor | None) -> dict[torch.device, Tensor]:
        """For ``GradScaler.unscale_``; only at a boundary (inside a window it
        raises). Divides the grads in place by the loss scale, and by K unless
        they hold the mean already, in one fused pass per (device, dtype) that
        also checks them as :meth:`check_grads_` does: ``.grad`` then holds the
        window's unscaled mean, and the next ``step()`` applies neither factor
        again. ``grad_scale=None`` (a disabled scaler): only the 1/K."""
        window = self._window
        window.require_boundary(_UNSCALE, _UNSCALE_USAGE)
        if grad_scale is None:
            self.average_grads_()
            return {}
        plan = self._planner.boundary_plan(self.param_groups, window.micro_step, keep=True)
        per_device = run_check(plan, found_inf, grad_scale, window.grad_factor(), allow_fp16=False)
        window.mark_averaged()
        return per_device

    # -- checkpoints ---------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """SGD's format (``momentum_buffer`` per param; a param whose first real
        update has not happened has none), plus the micro-batch counter in
        ``"accumulation"``. User post-hooks see the finished dict."""
        return _checkpoint.save(self, self._window, super().state_dict)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads an AccumOptimizer or torch.optim.SGD state dict. It is
        validated after the user's pre-hooks and before anything changes; the
        user's post-hooks see the restored counter and momentum state."""
        _checkpoint.load(self, self._window, super().load_state_dict, state_dict)
