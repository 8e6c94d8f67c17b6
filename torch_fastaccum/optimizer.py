"""AccumOptimizer: a drop-in for torch.optim.SGD with fused gradient accumulation.

Python here only validates, groups tensors by (device, dtype) and keeps state;
every per-element operation runs in the fastaccum kernels (csrc/).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.sgd import sgd as _torch_sgd

from . import _ops
from ._window import AccumulationWindow

__all__ = ["AccumOptimizer"]

_MOMENTUM = "momentum_buffer"
# Real updates of a param's momentum buffer, a float32 0-dim tensor on its
# device: 0 means "never written", so the next real update sets b = g. It stays
# on the device so a step skipped on inf/NaN needs no host read to keep it.
# Not "step": that key means an optimizer step count (torch's dtype rules and
# tools read it), and this is internal state that state_dict() never exports.
_STEP = "momentum_updates"
# SGD's __setstate__ defaults for keys that older state dicts lack.
_SGD_GROUP_DEFAULTS = {"nesterov": False, "maximize": False, "foreach": None, "differentiable": False, "fused": False}


def _validate_hyper(lr, momentum, dampening, weight_decay, nesterov, where: str) -> None:
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(f"{where}Tensor lr must be 1-element")
    if lr < 0.0:
        raise ValueError(f"{where}Invalid learning rate: {lr}")
    if momentum < 0.0:
        raise ValueError(f"{where}Invalid momentum value: {momentum}")
    if weight_decay < 0.0:
        raise ValueError(f"{where}Invalid weight_decay value: {weight_decay}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(f"{where}Nesterov momentum requires a momentum and zero dampening")


def _validate_accumulation_steps(k) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"Invalid accumulation_steps: {k!r} (must be an int >= 1)")


def _float(x) -> float:
    return x.item() if isinstance(x, Tensor) else float(x)


def _is_dense(t: Tensor) -> bool:
    """Non-overlapping and dense: the elements fill one span of numel slots."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda e: e[1]):
        if size != 1:
            if stride != expected:
                return False
            expected *= size
    return True


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """`t` on `device`, without a sync where the kernels read it on the device.
    A copy to the CPU is blocking: the CPU kernels read it at once, and a
    non-blocking device-to-host copy may not have landed yet."""
    return t.to(device, non_blocking=device.type != "cpu")


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _check_view(g: Tensor) -> Tensor:
    """A dense real tensor with g's values (a view where g is dense)."""
    g = _real(g)
    return g if _is_dense(g) else g.contiguous()


def _like(t: Tensor, ref: Tensor) -> Tensor:
    """`t` with the element order of `ref` (a dense copy only when it differs)."""
    if t.stride() == ref.stride() or all(
        s == 1 or a == b for s, a, b in zip(ref.shape, t.stride(), ref.stride())
    ):
        return t
    return torch.empty_like(ref).copy_(t)


class _Bucket:
    """The (param, grad) pairs of one param group on one (device, dtype).

    `plain` buckets go to the kernel as they are; the others hold complex or
    non-dense tensors that need a real view or a dense stand-in first.
    """

    __slots__ = ("device", "params", "grads", "plain", "verify_state")

    def __init__(self, device: torch.device, plain: bool, verify_state: bool = True):
        self.device = device
        self.params: list[Tensor] = []
        self.grads: list[Tensor] = []
        self.plain = plain
        # Check that existing momentum state still matches its params (they
        # may have been moved or cast in place since it was made); skipped in
        # the steady state of a plain bucket, where nothing about them changed.
        self.verify_state = verify_state


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
      a boundary: ``scaler.unscale_(opt)``, or ``clip_grad_norm_`` here.

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
        foreach, fused (bool or None): accepted for SGD compatibility and
            ignored; the fused kernels always run.
        differentiable (bool): must be False (True raises ValueError).

    Sparse gradients take torch's unfused SGD math in the same step (they need
    weight_decay=0); params not dense in memory go through a dense copy;
    complex params use their real view; meta params get a shape-only step.

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
        _validate_hyper(lr, momentum, dampening, weight_decay, nesterov, "")
        _validate_accumulation_steps(accumulation_steps)
        if not isinstance(grad_writeback, bool):
            raise ValueError(f"Invalid grad_writeback: {grad_writeback!r} (must be a bool)")
        if differentiable:
            raise ValueError(
                "AccumOptimizer does not support differentiable=True: its fused "
                "kernels update parameters in place outside autograd"
            )
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": differentiable,
            "fused": fused,
            "accumulation_steps": accumulation_steps,
            "grad_writeback": grad_writeback,
        }
        self._window = AccumulationWindow()
        self._init_caches()
        super().__init__(params, defaults)

    def _init_caches(self) -> None:
        # Made here, not lazily inside step(): a compiled step must find them.
        self._bucket_cache: dict[int, tuple] = {}
        self._devices_checked: set[str] = set()

    @property
    def _micro_step(self) -> int:
        """The window's counter (what state_dict saves; tests read it)."""
        return self._window.micro_step

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        where = f"param_groups[{len(self.param_groups) - 1}]: "
        try:
            _validate_hyper(g["lr"], g["momentum"], g["dampening"], g["weight_decay"], g["nesterov"], where)
            if g["differentiable"]:
                raise ValueError(f"{where}differentiable=True is not supported")
            if g["accumulation_steps"] != self.defaults["accumulation_steps"]:
                raise ValueError(
                    f"{where}accumulation_steps={g['accumulation_steps']!r} differs from the "
                    f"optimizer's {self.defaults['accumulation_steps']!r}; one micro-batch counter "
                    "drives every group"
                )
        except ValueError:
            self.param_groups.pop()
            raise

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        if "_window" not in state and "_window" not in self.__dict__:  # an old pickle
            state["_window"] = AccumulationWindow(state.pop("_micro_step", 0), state.pop("_grads_averaged", False))
        super().__setstate__(state)
        self._init_caches()
        self.defaults.setdefault("grad_writeback", True)
        for group in self.param_groups:
            for k, v in _SGD_GROUP_DEFAULTS.items():
                group.setdefault(k, v)
            # One micro-batch counter drives every group: K is the optimizer's.
            group.setdefault("accumulation_steps", self.defaults["accumulation_steps"])
            group.setdefault("grad_writeback", self.defaults["grad_writeback"])
        self._restore_momentum_state()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # defaults, state, param_groups
        state["_window"] = AccumulationWindow(self._window.micro_step, self._window.averaged)
        return state

    # -- accumulation --------------------------------------------------------

    @property
    def accumulation_steps(self) -> int:
        """K: the number of ``step()`` calls (micro-batches) per update."""
        return self.defaults["accumulation_steps"]

    @property
    def is_accumulation_boundary(self) -> bool:
        """Whether the next ``step()`` performs a real update."""
        return self._window.is_boundary(self.accumulation_steps)

    @contextlib.contextmanager
    def accumulate(self, model: torch.nn.Module):
        """Skip DDP's gradient all-reduce on micro-batches that do not update.

        ``with opt.accumulate(model): loss = ...; loss.backward()``. For a
        ``DistributedDataParallel`` model this is ``model.no_sync()`` unless the
        next ``step()`` is a boundary; for any other model it does nothing.
        """
        ddp = getattr(torch.nn.parallel, "DistributedDataParallel", None)
        if ddp is not None and isinstance(model, ddp) and not self.is_accumulation_boundary:
            with model.no_sync():
                yield
        else:
            yield

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As :meth:`torch.optim.SGD.zero_grad`, but only right after a boundary
        ``step()`` (or before the first): inside a window it keeps the gradients
        accumulating."""
        if self._window.at_start(self.accumulation_steps):
            super().zero_grad(set_to_none)

    # -- the step ------------------------------------------------------------

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
        window, k = self._window, self.accumulation_steps
        if not window.is_boundary(k):
            window.count()
            return loss

        grad_factor = window.grad_factor(k)
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        plan = self._collect()  # validates everything before any state changes
        window.close()
        self._run(plan, grad_factor, grad_scale, found_inf)
        return loss

    # -- the mean gradient before the step (clipping) --------------------------

    def _require_boundary(self, what: str, usage: str = "...") -> None:
        # Unscaling or clipping a partial sum would act on the wrong gradient
        # (and, with a scaler, mix scaled and unscaled micro-batches): refuse.
        if not self.is_accumulation_boundary:
            k = self.accumulation_steps
            raise RuntimeError(
                f"{what} was called inside an accumulation window (micro-batch "
                f"{self._window.position(k)} of {k}); the gradients are a partial sum "
                f"(still scaled, with a loss scaler). Call it only at the boundary: "
                f"`if opt.is_accumulation_boundary: {usage}`"
            )

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
        self._require_boundary("average_grads_()")
        k = self.accumulation_steps
        if k == 1 or self._window.averaged:
            return
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        # One foreach call for the dense ones (it splits by device and dtype).
        torch._foreach_mul_([g for g in grads if not g.is_sparse], 1.0 / k)
        for g in grads:
            if g.is_sparse:
                g._values().mul_(1.0 / k)
        self._window.averaged = True

    def clip_grad_norm_(
        self,
        max_norm: float,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = False,
        foreach: bool | None = None,
    ) -> Tensor:
        """At a boundary, without a loss scaler (or with a disabled one):
        :meth:`average_grads_`, then :func:`torch.nn.utils.clip_grad_norm_`
        over every parameter of this optimizer; returns the total norm of the
        mean gradient. With an enabled GradScaler call ``scaler.unscale_(opt)``
        first (the grads are scaled until then). Inside a window it raises."""
        self._require_boundary("clip_grad_norm_()")
        self.average_grads_()
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite, foreach)

    # -- collecting the work: no state changes here ---------------------------

    def _collect(self) -> list[tuple[dict, list[_Bucket], list[tuple[Tensor, Tensor]]]]:
        """Per param group: its buckets and its sparse (param, grad) pairs."""
        plan = []
        for gi, group in enumerate(self.param_groups):
            params = group["params"]
            grads = [p.grad for p in params]
            first_bad, signature = torch.ops.fastaccum._first_unfusable.default(params, grads)
            if first_bad < 0:
                plan.append((group, self._plain_buckets(gi, params, grads, signature), []))
            else:
                plan.append((group, *self._careful_buckets(gi, params, grads)))
        return plan

    def _plain_buckets(self, gi: int, params: list[Tensor], grads: list, signature: int) -> list[_Bucket]:
        # The (device, dtype) split is cached on what decides it: which params
        # have grads and their devices and dtypes (the C++ triage's signature),
        # so the steady state does no per-tensor device/dtype lookups.
        key = (len(params), signature)
        cache = self._bucket_cache
        hit = cache.get(gi)
        # The entry holds the list itself (not its id, which can be reused).
        miss = hit is None or hit[0] is not params or hit[1] != key
        if miss:
            split: dict[tuple[torch.device, torch.dtype], list[int]] = {}
            for i, (p, g) in enumerate(zip(params, grads)):
                if g is not None:
                    split.setdefault((p.device, p.dtype), []).append(i)
            for device, _ in split:
                self._require_kernels(device, gi)
            hit = cache[gi] = (params, key, [(device, idx) for (device, _), idx in split.items()])
        buckets = []
        for device, idx in hit[2]:
            b = _Bucket(device, plain=True, verify_state=miss)
            b.params = [params[i] for i in idx]
            b.grads = [grads[i] for i in idx]
            buckets.append(b)
        return buckets

    def _careful_buckets(self, gi: int, params: list[Tensor], grads: list):
        """The per-tensor path: precise errors, sparse, complex, odd layouts."""
        split: dict[tuple[torch.device, torch.dtype, bool], _Bucket] = {}
        sparse: list[tuple[Tensor, Tensor]] = []
        for pi, (p, g) in enumerate(zip(params, grads)):
            if g is None:
                continue
            where = f"param_groups[{gi}]['params'][{pi}]"
            if g.dtype != p.dtype or g.shape != p.shape or g.device != p.device:
                raise RuntimeError(
                    f"AccumOptimizer: {where} (shape {tuple(p.shape)}, {p.dtype}, {p.device}) has a "
                    f"grad of shape {tuple(g.shape)}, {g.dtype}, {g.device}; the grad must match its "
                    "parameter's dtype, shape and device"
                )
            if not p.dtype.is_floating_point and not p.dtype.is_complex:
                raise RuntimeError(
                    f"AccumOptimizer: {where} has dtype {p.dtype}; only floating point and "
                    "complex parameters can be optimized"
                )
            self._require_kernels(p.device, gi, pi)
            if g.is_sparse:
                if _float(self.param_groups[gi]["weight_decay"]) != 0:
                    raise RuntimeError(
                        f"AccumOptimizer: {where} has a sparse grad, and param_groups[{gi}] has "
                        "weight_decay != 0; sparse gradients do not support weight decay "
                        "(torch.optim.SGD fails there too: add(sparse, dense) is not supported)"
                    )
                sparse.append((p, g))
                continue
            plain = not p.is_complex() and g.layout == torch.strided and _is_dense(p) and _like(g, p) is g
            b = split.get((p.device, p.dtype, plain))
            if b is None:
                b = split[(p.device, p.dtype, plain)] = _Bucket(p.device, plain)
            b.params.append(p)
            b.grads.append(g)
        return list(split.values()), sparse

    def _require_kernels(self, device: torch.device, gi: int, pi: int | None = None) -> None:
        checked = self._devices_checked
        if device.type in checked:
            return
        if not _ops.has_kernel_for(device.type):
            where = f"param_groups[{gi}]" + ("" if pi is None else f"['params'][{pi}]")
            if device.type == "cuda":
                raise RuntimeError(
                    f"AccumOptimizer: {where} has parameters on {device}, but torch_fastaccum was "
                    "built without CUDA kernels; rebuild it where torch has CUDA and nvcc is "
                    "found (pip install --no-build-isolation -e .)"
                )
            raise RuntimeError(
                f"AccumOptimizer: {where} has parameters on {device}; torch_fastaccum's fused "
                f"kernels support CPU, CUDA and meta (shape-only) parameters, not {device.type}"
            )
        checked.add(device.type)

    def _check_lists(self, writeback: list | None = None) -> dict[torch.device, dict[torch.dtype, list[Tensor]]]:
        """Dense tensors to check for inf/NaN, by device and dtype: the grads
        (real views of complex ones) and the values of sparse grads. A grad
        that is not dense in memory is checked through a dense copy; with
        `writeback`, (grad, copy) pairs are appended there for the caller to
        copy back after writing the copies."""
        out: dict[torch.device, dict[torch.dtype, list[Tensor]]] = {}
        for _, buckets, sparse in self._collect():
            for b in buckets:
                if b.plain:
                    if b.grads:
                        out.setdefault(b.device, {}).setdefault(b.grads[0].dtype, []).extend(b.grads)
                    continue
                for g in b.grads:  # real views may differ in dtype from the param
                    v = _check_view(g)
                    if writeback is not None and v.data_ptr() != _real(g).data_ptr():
                        writeback.append((g, v))
                    out.setdefault(b.device, {}).setdefault(v.dtype, []).append(v)
            for p, g in sparse:
                if g.dtype is torch.float16:  # as torch: fp16 duplicates may overflow once summed
                    p.grad = g = g.coalesce()
                v = _check_view(g._values())
                out.setdefault(v.device, {}).setdefault(v.dtype, []).append(v)
        return out

    # -- running it ----------------------------------------------------------

    def _run(self, plan, grad_factor: float, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        per_device: dict[torch.device, tuple[Tensor | None, Tensor | None]] = {}
        # The stored grads differ from what SGD used only when a factor applies.
        rescaled = grad_factor != 1.0 or grad_scale is not None
        for group, buckets, sparse in plan:
            write_grads = rescaled and bool(group["grad_writeback"])
            momentum = _float(group["momentum"])
            hyper = dict(
                weight_decay=_float(group["weight_decay"]),
                momentum=momentum,
                dampening=_float(group["dampening"]),
                nesterov=bool(group["nesterov"]),
                maximize=bool(group["maximize"]),
            )
            lr = group["lr"]
            for b in buckets:
                if b.device not in per_device:
                    per_device[b.device] = (
                        None if grad_scale is None else _to_device(grad_scale, b.device),
                        None if found_inf is None else _to_device(found_inf, b.device),
                    )
                scale_d, inf_d = per_device[b.device]
                if isinstance(lr, Tensor) and lr.device == b.device:
                    lr_f, lr_t = 1.0, lr
                else:
                    lr_f, lr_t = _float(lr), None
                params, grads, bufs, steps, writeback = self._kernel_lists(b, momentum, write_grads)
                _ops.fused_sgd_(
                    params,
                    grads,
                    bufs,
                    steps,
                    lr=lr_f,
                    lr_tensor=lr_t,
                    grad_factor=grad_factor,
                    grad_scale=scale_d,
                    found_inf=inf_d,
                    write_grads=write_grads,
                    **hyper,
                )
                for t, stand_in in writeback:
                    t.copy_(stand_in)
            if sparse:
                self._sparse_step(group, sparse, hyper, grad_factor, grad_scale, found_inf, write_grads)

    def _kernel_lists(self, b: _Bucket, momentum: float, write_grads: bool):
        """params, grads, momentum buffers, step counters and write-backs of a
        bucket, creating missing state (zeroed buffer, step 0). Dense stand-ins
        of params (and of grads the kernel writes) are copied back after it."""
        params, grads, bufs, steps, writeback = b.params, b.grads, [], [], []
        if not b.plain:
            params, grads = [], []
            for p, g in zip(b.params, b.grads):
                target = p
                if not _is_dense(p):
                    target = p.contiguous()
                    writeback.append((p, target))
                params.append(target)
                g_like = _like(g, target)
                if write_grads and g_like is not g:
                    writeback.append((g, g_like))
                grads.append(g_like)
        if momentum != 0:
            state = self.state
            for p, target in zip(b.params, params):
                s = state[p]
                buf = s.get(_MOMENTUM)
                if buf is None:
                    buf = s[_MOMENTUM] = torch.zeros_like(target)
                    s[_STEP] = torch.zeros((), dtype=torch.float32, device=p.device)
                elif _STEP not in s:  # a buffer that SGD (or load_state_dict) wrote
                    s[_STEP] = torch.ones((), dtype=torch.float32, device=p.device)
                if b.verify_state:
                    # The param was moved or cast since (module.to(), .double()):
                    # follow it, as load_state_dict casts loaded buffers.
                    if buf.dtype != target.dtype or buf.device != target.device:
                        buf = s[_MOMENTUM] = buf.to(device=target.device, dtype=target.dtype)
                    if s[_STEP].device != target.device:
                        s[_STEP] = s[_STEP].to(target.device)
                    buf = s[_MOMENTUM] = _like(buf, target)
                bufs.append(buf)
                steps.append(s[_STEP])
        if not b.plain:
            params = [_real(t) for t in params]
            grads = [_real(t) for t in grads]
            bufs = [_real(t) for t in bufs]
        return params, grads, bufs, steps, writeback

    def _sparse_step(self, group, pairs, hyper, grad_factor, grad_scale, found_inf, write_grads) -> None:
        # Sparse grads take torch's own single-tensor SGD math (unfused); with a
        # scaler this is the one place a host read of found_inf is allowed.
        mul = grad_factor
        if grad_scale is not None:  # torch's unscale_ reciprocal: fp64, then fp32
            mul *= grad_scale.double().reciprocal().float().item()
        if write_grads and mul != 1.0:
            # As the dense kernels: .grad is left unscaled, skipped step or not.
            for _, g in pairs:
                g._values().mul_(mul)
            mul = 1.0
        if found_inf is not None and found_inf.item() != 0:
            return
        params, grads, bufs = [], [], []
        for p, g in pairs:
            params.append(p)
            grads.append(g * mul if mul != 1.0 else g)
            bufs.append(self.state[p].get(_MOMENTUM) if hyper["momentum"] != 0 else None)
        _torch_sgd(
            params, grads, bufs, foreach=False, fused=False, lr=_float(group["lr"]), has_sparse_grad=True, **hyper
        )
        if hyper["momentum"] != 0:
            for p, b in zip(params, bufs):
                self.state[p][_MOMENTUM] = b
                self.state[p].pop(_STEP, None)

    # -- checkpoints ---------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """SGD's format (``momentum_buffer`` per param; a param whose first real
        update has not happened has none), plus the micro-batch counter in
        ``"accumulation"``. User post-hooks see the finished dict."""
        handle = self.register_state_dict_post_hook(AccumOptimizer._pack_state_dict, prepend=True)
        try:
            return super().state_dict()
        finally:
            handle.remove()

    def _pack_state_dict(self, sd: dict[str, Any]) -> dict[str, Any]:
        packed = {}
        for idx, s in sd["state"].items():
            if isinstance(s, dict) and _STEP in s:
                s = dict(s)  # the live state dict is shared: never edit it
                step = s.pop(_STEP)
                # Meta params take shape-only steps: their buffers exist.
                if not step.is_meta and float(step) == 0:  # may sync: not the hot path
                    s.pop(_MOMENTUM, None)
                if not s:
                    continue  # as SGD: no entry before the first real update
            packed[idx] = s
        sd["state"] = packed
        sd["accumulation"] = {"micro_step": self._micro_step, "accumulation_steps": self.accumulation_steps}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads an AccumOptimizer or torch.optim.SGD state dict. It is
        validated after the user's pre-hooks and before anything changes; the
        user's post-hooks see the restored counter and momentum state."""
        handle = self.register_load_state_dict_pre_hook(AccumOptimizer._validate_loaded)
        try:
            super().load_state_dict(state_dict)  # ends in __setstate__
        finally:
            handle.remove()
            self.__dict__.pop("_loading_micro_step", None)
            self.__dict__.pop("_loading_accumulation_steps", None)

    def _validate_loaded(self, state_dict: dict[str, Any]) -> None:
        acc = state_dict.get("accumulation", {})
        micro = acc.get("micro_step", 0) if isinstance(acc, dict) else acc
        if isinstance(micro, bool) or not isinstance(micro, int) or micro < 0:
            raise ValueError(f"state_dict['accumulation']['micro_step'] must be an int >= 0, got {micro!r}")
        self._check_buffer_shapes(state_dict)
        # As torch loads every saved hyper-parameter over the constructor's, the
        # saved K wins too; it must be one valid K for all groups.
        ks = {g.get("accumulation_steps", self.accumulation_steps) for g in state_dict.get("param_groups", [])}
        if len(ks) > 1:
            raise ValueError(f"loaded state dict has param groups with different accumulation_steps: {sorted(ks)}")
        k = ks.pop() if ks else self.accumulation_steps
        try:
            _validate_accumulation_steps(k)
        except ValueError as e:
            raise ValueError(f"loaded state dict: {e}") from None
        self._loading_micro_step = micro
        self._loading_accumulation_steps = k

    def _restore_momentum_state(self) -> None:
        """After a load (torch's load_state_dict ends in __setstate__): a loaded
        momentum buffer has had a real update; an absent one has not."""
        if "_loading_micro_step" in self.__dict__:
            self._window.micro_step = self._loading_micro_step
            self._window.averaged = False
            k = self._loading_accumulation_steps
            self.defaults["accumulation_steps"] = k
            for group in self.param_groups:
                group["accumulation_steps"] = k
        for p, s in self.state.items():
            if not isinstance(p, Tensor) or not isinstance(s, dict):
                continue
            if s.get(_MOMENTUM) is None:
                s.pop(_MOMENTUM, None)
                s.pop(_STEP, None)
            elif _STEP not in s or s[_STEP].device != p.device:
                s[_STEP] = torch.ones((), dtype=torch.float32, device=p.device)

    def _check_buffer_shapes(self, state_dict: dict[str, Any]) -> None:
        # torch checks the group sizes but not the buffers' shapes; a wrong
        # buffer would only fail at the next step, after the load changed state.
        saved_groups = state_dict.get("param_groups", [])
        saved_state = state_dict.get("state", {})
        if len(saved_groups) != len(self.param_groups):
            return  # torch's own ValueError follows
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                return
            for pi, (idx, p) in enumerate(zip(saved["params"], group["params"])):
                buf = saved_state.get(idx, {}).get(_MOMENTUM)
                if isinstance(buf, Tensor) and buf.shape != p.shape:
                    raise ValueError(
                        f"loaded state dict has a momentum_buffer of shape {tuple(buf.shape)} for "
                        f"param_groups[{gi}]['params'][{pi}], whose shape is {tuple(p.shape)}"
                    )
