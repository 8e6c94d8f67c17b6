"""AccumOptimizer under Hugging Face Accelerate and PyTorch Lightning: skipped
windows reported to the framework, and fused clipping at the boundary.

Neither framework is imported here (nor needed): Accelerate's wrapper is
recognised by the module it comes from, Lightning's hooks are plain functions
to assign in a LightningModule's class body.

Why skips need an opt-in. A fused optimizer skips an overflowing window on
the device: the found-inf flag is a device tensor that ``step()`` never
reads. A framework asks with a host bool (Accelerate's ``step_was_skipped``,
which it sets from whether ``optimizer.step`` was called at all; torch's
non-fused path reads the flag with ``.item()`` to decide that), so someone
has to read the flag on the host. ``report_skips`` moves that read out of
``step()`` to the moment the framework asks, and makes it at most once per
window: zero reads when nobody asks, one when the scheduler or the user does.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from .optimizer import AccumOptimizer

__all__ = ["report_skips", "step_was_skipped", "lightning_configure_gradient_clipping",
           "lightning_lr_scheduler_step"]

_RECORD = "_fastaccum_skip_record"
_ACCELERATE_SUBCLASS = "AcceleratedOptimizerReportingSkips"


class _SkipRecord:
    """What the last ``step()`` of an AccumOptimizer handed its update: the
    found-inf device tensor at a boundary (None without an enabled scaler, or
    inside a window), and the host bool once somebody read it."""

    def __init__(self) -> None:
        self.found_inf: torch.Tensor | None = None
        self.skipped: bool | None = False

    def record(self, optimizer: AccumOptimizer, args, kwargs) -> None:
        # A step pre-hook: runs before the window moves. Keeps a reference to
        # the flag (torch's GradScaler, and this package's, set it as an
        # attribute before calling step); reads nothing.
        found_inf = getattr(optimizer, "found_inf", None) if optimizer.is_accumulation_boundary else None
        self.found_inf = found_inf
        self.skipped = False if found_inf is None else None

    def read(self) -> bool:
        if self.skipped is None:
            self.skipped = bool(self.found_inf.item())  # the one host read of the window
            self.found_inf = None
        return self.skipped


def _accum_optimizer(optimizer: Any) -> AccumOptimizer:
    """The AccumOptimizer inside a framework's wrappers (Accelerate's
    AcceleratedOptimizer, Lightning's LightningOptimizer: ``.optimizer``)."""
    inner = optimizer
    for _ in range(8):
        if isinstance(inner, AccumOptimizer):
            return inner
        inner = getattr(inner, "optimizer", None)
    raise TypeError(f"expected an AccumOptimizer or a framework wrapper of one, got {type(optimizer).__qualname__}")


def _is_accelerated_optimizer(optimizer: Any) -> bool:
    module = sys.modules.get("accelerate.optimizer")
    return module is not None and isinstance(optimizer, module.AcceleratedOptimizer)


def _accelerate_subclass():
    """AcceleratedOptimizer with a ``step_was_skipped`` that also sees the
    device-side skips of the AccumOptimizer inside it. Made on first use (so
    accelerate is imported only by whoever has it); module-level by name, so
    a pickled one unpickles."""
    cls = globals().get(_ACCELERATE_SUBCLASS)
    if cls is not None:
        return cls
    from accelerate.optimizer import AcceleratedOptimizer

    def skipped(self) -> bool:
        """Whether the last update was skipped: Accelerate's own test (the
        optimizer's step not called), or the found-inf flag of the
        AccumOptimizer's last boundary step, read on the host once per window
        when asked (torch_fastaccum.report_skips)."""
        return self._is_overflow or step_was_skipped(self.optimizer)

    def __setstate__(self, state):
        AcceleratedOptimizer.__setstate__(self, state)
        _track(_accum_optimizer(self.optimizer))

    cls = type(_ACCELERATE_SUBCLASS, (AcceleratedOptimizer,), {
        "__module__": __name__, "__qualname__": _ACCELERATE_SUBCLASS,
        "step_was_skipped": property(skipped), "__setstate__": __setstate__,
    })
    globals()[_ACCELERATE_SUBCLASS] = cls
    return cls


def __getattr__(name: str):
    # Unpickling an AcceleratedOptimizer that report_skips changed, in a
    # process that has not called it yet.
    if name == _ACCELERATE_SUBCLASS:
        return _accelerate_subclass()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _track(opt: AccumOptimizer) -> _SkipRecord:
    record = opt.__dict__.get(_RECORD)
    if record is None:
        record = _SkipRecord()
        opt.register_step_pre_hook(record.record)
        opt.__dict__[_RECORD] = record
    return record


def report_skips(optimizer):
    """Let frameworks see the windows an AccumOptimizer skipped; returns
    ``optimizer``. Call it once, before training (after
    ``accelerator.prepare``; in Lightning's ``configure_optimizers``).

    ``optimizer``: an AccumOptimizer, or Accelerate's or Lightning's wrapper
    of one. From then on every ``step()`` keeps the found-inf device tensor a
    GradScaler (this package's or torch's) hands its boundary update, without
    reading it. :func:`step_was_skipped` reads it, once per window, when
    asked. For Accelerate's ``AcceleratedOptimizer`` (what ``prepare``
    returns) its ``step_was_skipped`` then asks too, so
    ``accelerator.optimizer_step_was_skipped`` is true after a skipped
    window, and a prepared scheduler does not step on it, as with
    ``torch.optim.SGD`` and torch's GradScaler. Without it both say False
    and the scheduler steps: the fused step is always called.

    The cost: one host read of a 0-dim tensor per window in which the
    framework (or you) asks; on CUDA that waits for the work queued before
    it, the window's update included. ``step()`` itself reads nothing."""
    _track(_accum_optimizer(optimizer))
    if _is_accelerated_optimizer(optimizer):
        cls = _accelerate_subclass()
        if not isinstance(optimizer, cls):
            if type(optimizer) is not cls.__bases__[0]:
                raise TypeError(f"report_skips supports accelerate's AcceleratedOptimizer, not its subclass "
                                f"{type(optimizer).__qualname__}")
            optimizer.__class__ = cls
    return optimizer


def step_was_skipped(optimizer) -> bool:
    """Whether the last ``step()`` of ``optimizer`` (an AccumOptimizer given
    to :func:`report_skips`, or a framework wrapper of one) was a boundary
    whose update a GradScaler skipped for inf/NaN gradients. False inside a
    window and without an enabled scaler. The first call after a boundary
    reads the device flag (one host sync); later calls reuse it. Raises
    RuntimeError for an optimizer not given to report_skips."""
    record = _accum_optimizer(optimizer).__dict__.get(_RECORD)
    if record is None:
        raise RuntimeError("step_was_skipped needs torch_fastaccum.report_skips(opt) before training: the skip "
                           "flag of a step is kept only for optimizers given to it")
    return record.read()


# ---------------------------------------------------------------------------
# Lightning hooks: assign them in a LightningModule's class body.
# ---------------------------------------------------------------------------


def _active_scaler(module):
    scaler = getattr(getattr(module.trainer, "precision_plugin", None), "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def lightning_configure_gradient_clipping(module, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
    """``LightningModule.configure_gradient_clipping`` for an AccumOptimizer:
    ``Trainer(gradient_clip_val=...)`` clips the window's unscaled mean
    gradient once, at its boundary, as the reference loop (``loss / K``,
    ``unscale_``, ``clip_grad_norm_`` every K-th micro-batch) does. Use it as

        class Model(LightningModule):
            configure_gradient_clipping = lightning_configure_gradient_clipping

    It works where Lightning's own refuses: its MixedPrecision plugin refuses
    ``gradient_clip_val`` for optimizers that unscale in ``step()``
    (``_step_supports_amp_scaling``), AccumOptimizer and torch's fused ones.
    Inside a window (K in the AccumOptimizer) it does nothing. At a boundary,
    "norm": the fused clip, ``scaler.clip_grad_norm_(opt, val)`` with this
    package's GradScaler in "16-mixed", ``opt.clip_grad_norm_(val)`` without
    a scaler ("32-true", "bf16-mixed"), and with torch's GradScaler (K = 1
    only) torch's ``unscale_`` first; no host sync. "value": the gradients
    are unscaled to the mean, then ``torch.nn.utils.clip_grad_value_``.
    Other optimizers get Lightning's default, ``module.clip_gradients``."""
    try:
        opt = _accum_optimizer(optimizer)
    except TypeError:
        return module.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
    if not gradient_clip_val or not opt.is_accumulation_boundary:
        return None
    algorithm = str(getattr(gradient_clip_algorithm, "value", gradient_clip_algorithm) or "norm").lower()
    if algorithm not in ("norm", "value"):
        raise ValueError(f"gradient_clip_algorithm must be 'norm' or 'value', got {gradient_clip_algorithm!r}")
    from .grad_scaler import GradScaler

    scaler = _active_scaler(module)
    if algorithm == "norm" and isinstance(scaler, GradScaler):
        return scaler.clip_grad_norm_(opt, gradient_clip_val)
    if scaler is not None:
        scaler.unscale_(opt)  # this package's: the unscaled mean; torch's: the unscaled sum
    if algorithm == "norm":
        return opt.clip_grad_norm_(gradient_clip_val)  # applies 1/K unless the grads hold the mean
    opt.average_grads_()  # a no-op once they hold the mean
    params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
    torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
    return None


def lightning_lr_scheduler_step(module, scheduler, metric=None):
    """``LightningModule.lr_scheduler_step`` that does not step a scheduler of
    an AccumOptimizer after a skipped window (what Accelerate does for a
    skipped step). Lightning's default steps it anyway, for every optimizer
    and scaler. Needs ``report_skips(opt)`` in ``configure_optimizers``;
    costs the host read :func:`report_skips` describes, once per scheduler
    step. Other schedulers are stepped as Lightning's default does."""
    try:
        opt = _accum_optimizer(getattr(scheduler, "optimizer", None))
    except TypeError:
        opt = None
    if opt is not None and step_was_skipped(opt):
        return
    if metric is None:
        scheduler.step()
    else:
        scheduler.step(metric)
