"""The step plan: which (param, grad) pairs a boundary step touches, split
into (device, dtype) buckets for the kernels, plus the sparse ones.

Built once per boundary step, before any state changes (every user error is
raised here), and used by both the GradScaler's check pass and the update.
The rules for what goes to the kernels as it is live in csrc/fusable.h; the
C++ triage returns kinds, this module only acts on them.

A param listed twice in a group: NOTE: [params listed twice] in _repeats.py.
"""

from __future__ import annotations

import enum
import operator

import torch
from torch import Tensor

from . import _dtensor, _ops
from ._hyper import as_float
from ._repeats import occurrence_numbers, occurrence_rounds


class PairKind(enum.IntEnum):
    """csrc/fusable.h's PairKind (same numbers)."""

    NO_GRAD = 0
    FUSABLE = 1
    STAND_IN = 2  # complex, or not dense / not laid out like its param
    SPARSE = 3
    MISMATCH = 4
    BAD_DTYPE = 5
    BAD_LAYOUT = 6


class Bucket:
    """The (param, grad) pairs of one param group on one (device, dtype).

    `plain` buckets go to the kernels as they are; the others hold complex or
    non-dense tensors that need a real view or a dense stand-in first.
    `verify_state`: check that existing momentum state still matches its
    params (moved or cast in place since it was made); skipped in the steady
    state of a plain bucket, where nothing about them changed.
    `params`/`grads` are what the kernels see: for DTensor params their local
    shards, with the params themselves (the state's keys) in `keys`, and in
    `reduce` the process groups over which the bucket's inf/NaN flag and norm
    are reduced (NOTE: [DTensor params] in _dtensor.py); otherwise `keys` is
    `params` and `reduce` is ().
    """

    __slots__ = ("device", "params", "grads", "keys", "reduce", "plain", "verify_state")

    def __init__(self, device: torch.device, plain: bool, verify_state: bool = True, reduce: tuple = ()):
        self.device = device
        self.params: list[Tensor] = []
        self.grads: list[Tensor] = []
        self.keys: list[Tensor] = self.params
        self.reduce = reduce
        self.plain = plain
        self.verify_state = verify_state

    @property
    def sharded(self) -> bool:
        return self.keys is not self.params


class GroupPlan:
    """One param group's work. `buckets` and `sparse` hold each param once:
    what the check pass and the norm read. A param listed twice or more in
    the group (NOTE: [params listed twice] in _repeats.py) is stepped again by the buckets
    of `repeats` (one per further occurrence and bucket, in order) and by
    `sparse_order` (indices into `sparse`, one per occurrence)."""

    __slots__ = ("group", "params", "grads", "signature", "sharded", "buckets", "sparse", "repeats",
                 "sparse_order")

    def __init__(self, group: dict, grads: list, signature: int | None, buckets: list[Bucket], sparse: list,
                 sharded: bool = False, repeats: list[Bucket] | None = None, sparse_order: list[int] | None = None):
        self.group = group
        self.sharded = sharded  # holds DTensors
        self.params = group["params"]
        self.grads = grads  # p.grad of every param, None included, at planning
        self.signature = signature  # the C++ triage's; None: per-tensor path
        self.buckets = buckets
        self.sparse: list[tuple[Tensor, Tensor]] = sparse
        self.repeats: list[Bucket] = repeats or []
        self.sparse_order = sparse_order

    def sparse_steps(self) -> list[tuple[Tensor, Tensor]]:
        """The sparse pairs as the update steps them: every occurrence."""
        if self.sparse_order is None:
            return self.sparse
        return [self.sparse[i] for i in self.sparse_order]


class StepPlan:
    """The work of the boundary step that follows micro-batch `micro_step`."""

    __slots__ = ("groups", "micro_step")

    def __init__(self, groups: list[GroupPlan], micro_step: int):
        self.groups = groups
        self.micro_step = micro_step

    def still_valid(self, param_groups: list[dict], micro_step: int) -> bool:
        """Nothing the plan rests on changed since it was made (between a
        scaler's check pass and the update): same window position, groups,
        grad objects, and devices and dtypes of the params."""
        if micro_step != self.micro_step or len(param_groups) != len(self.groups):
            return False
        for gp, group in zip(self.groups, param_groups):
            params = group["params"]
            if gp.group is not group or gp.params is not params or gp.signature is None:
                return False
            grads, first, signature, _, _ = _triage(params, gp.sharded)
            if len(grads) != len(gp.grads) or not all(map(operator.is_, grads, gp.grads)):
                return False
            if first >= 0 or signature != gp.signature:
                return False
        return True


class Planner:
    """Makes step plans. Caches each group's (device, dtype) split on what
    decides it, so the steady state does no per-tensor device/dtype lookups
    in Python."""

    def __init__(self) -> None:
        self._splits: dict[int, tuple] = {}
        self._sharded: dict[int, tuple] = {}
        self._reduce_keys: dict = {}
        self._devices_ok: set[str] = set()
        self._kept: StepPlan | None = None

    def boundary_plan(self, param_groups: list[dict], micro_step: int, keep: bool) -> StepPlan:
        """The plan of the boundary step after `micro_step`: the one a check
        pass kept for it (`keep`), if still valid, else a new one. A compiled
        step always plans anew (nothing kept crosses into its graph)."""
        plan, self._kept = self._kept, None
        if plan is None or torch.compiler.is_compiling() or not plan.still_valid(param_groups, micro_step):
            plan = self.plan(param_groups, micro_step)
        if keep:
            self._kept = plan
        return plan

    def plan(self, param_groups: list[dict], micro_step: int) -> StepPlan:
        groups = []
        for gi, group in enumerate(param_groups):
            params = group["params"]
            sharded = self._has_dtensor(gi, params)
            grads, first_bad, signature, kparams, kgrads = _triage(params, sharded)
            if first_bad < 0:
                buckets, repeats = self._plain(gi, params, kparams, kgrads, signature, sharded)
                groups.append(GroupPlan(group, grads, signature, buckets, [], sharded, repeats))
            else:
                buckets, sparse, repeats, sparse_order = self._per_tensor(gi, group, grads, sharded)
                groups.append(GroupPlan(group, grads, None, buckets, sparse, sharded, repeats, sparse_order))
        return StepPlan(groups, micro_step)

    def _plain(self, gi: int, params: list[Tensor], kparams: list[Tensor], kgrads: list, signature: int,
               sharded: bool) -> list[Bucket]:
        """The buckets of a group whose pairs all go to the kernels as they
        are (`kparams`/`kgrads`: the params and grads, or their local shards)."""
        key = (len(params), signature)
        hit = self._splits.get(gi)
        # The entry holds the list itself (not its id, which can be reused).
        miss = hit is None or hit[0] is not params or hit[1] != key
        if miss:
            split: dict[tuple, list[int]] = {}
            for i, (p, g) in enumerate(zip(params, kgrads)):
                if g is not None:
                    where = f"param_groups[{gi}]['params'][{i}]"
                    reduce = _dtensor.reduce_key(p, self._reduce_keys, where) if sharded else ()
                    split.setdefault((p.device, p.dtype, reduce), []).append(i)
            for device, _, _ in split:
                self.require_kernels(device, f"param_groups[{gi}]")
            hit = self._splits[gi] = (params, key, [(device, reduce, rounds) for (device, _, reduce), idx in split.items()
                                                    for rounds in [occurrence_rounds(params, idx)]])
        buckets, repeats = [], []
        for device, reduce, rounds in hit[2]:
            for r, idx in enumerate(rounds):
                b = Bucket(device, plain=True, verify_state=miss, reduce=reduce)
                b.params = b.keys = [kparams[i] for i in idx]
                b.grads = [kgrads[i] for i in idx]
                if sharded:
                    b.keys = [params[i] for i in idx]
                (repeats if r else buckets).append(b)
        return buckets, repeats

    def _has_dtensor(self, gi: int, params: list[Tensor]) -> bool:
        """Whether the group holds DTensors (FSDP2), cached on the list and its
        length: a scan per step would cost every user, sharded or not."""
        if _dtensor.dtensor_type() is None:
            return False
        hit = self._sharded.get(gi)
        if hit is None or hit[0] is not params or hit[1] != len(params):
            hit = self._sharded[gi] = (params, len(params), _dtensor.any_dtensor(params))
        return hit[2]

    def _per_tensor(self, gi: int, group: dict, grads: list, sharded: bool = False):
        """Precise errors, sparse, complex, odd layouts, DTensors (their local
        shards, split by the groups their results reduce over)."""
        params = group["params"]
        keys = params
        if sharded:
            for pi, (p, g) in enumerate(zip(params, grads)):
                _dtensor.check_pair(p, g, f"param_groups[{gi}]['params'][{pi}]")
            params, grads = _dtensor.locals_of(params), _dtensor.locals_of(grads)
        kinds = torch.ops.fastaccum._pair_kinds.default(params, grads)
        split: dict[tuple, Bucket] = {}
        sparse: list[tuple[Tensor, Tensor]] = []
        sparse_order: list[int] = []
        sparse_at: dict[Tensor, int] = {}
        # A param listed twice has one grad: both occurrences are NO_GRAD or neither.
        for pi, (key, p, g, kind, r) in enumerate(zip(keys, params, grads, kinds, occurrence_numbers(keys))):
            if kind == PairKind.NO_GRAD:
                continue
            where = f"param_groups[{gi}]['params'][{pi}]"
            _raise_for(kind, where, p, g)
            self.require_kernels(p.device, where)
            if sharded and kind == PairKind.SPARSE:
                raise RuntimeError(f"AccumOptimizer: {where} is a DTensor with a sparse grad; not supported")
            if kind == PairKind.SPARSE:
                if as_float(group["weight_decay"]) != 0:
                    raise RuntimeError(
                        f"AccumOptimizer: {where} has a sparse grad, and param_groups[{gi}] has "
                        "weight_decay != 0; sparse gradients do not support weight decay "
                        "(torch.optim.SGD fails there too: add(sparse, dense) is not supported)"
                    )
                if r == 0:
                    sparse_at[p] = len(sparse)
                    sparse.append((p, g))
                sparse_order.append(sparse_at[p])
                continue
            plain = kind == PairKind.FUSABLE
            reduce = _dtensor.reduce_key(key, self._reduce_keys, where) if sharded else ()
            b = split.get((r, p.device, p.dtype, plain, reduce))
            if b is None:
                b = split[(r, p.device, p.dtype, plain, reduce)] = Bucket(p.device, plain, reduce=reduce)
                if sharded:
                    b.keys = []
            b.params.append(p)
            b.grads.append(g)
            if sharded:
                b.keys.append(key)
        buckets = [b for (r, *_), b in split.items() if r == 0]
        repeats = [b for (r, *_), b in sorted(split.items(), key=lambda kv: kv[0][0]) if r > 0]
        has_repeats = len(sparse_order) != len(sparse)
        return buckets, sparse, repeats, sparse_order if has_repeats else None

    def require_kernels(self, device: torch.device, where: str) -> None:
        if device.type in self._devices_ok:
            return
        if not _ops.has_kernel_for(device.type):
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
        self._devices_ok.add(device.type)


def _triage(params: list[Tensor], sharded: bool = False) -> tuple:
    """The params' grads, the C++ triage of them (csrc/fusable.cpp): the
    first pair that is not fusable as it is (-1: none) and the device/dtype
    signature, and the tensors the kernels take (the params and grads, or
    for DTensors their local shards). DTensor pairs placed unlike each
    other count as not fusable (the per-tensor path names them)."""
    grads = [p.grad for p in params]
    kparams, kgrads = params, grads
    if sharded:
        if not _dtensor.placed_alike(params, grads):
            return grads, 0, 0, None, None
        kparams, kgrads = _dtensor.locals_of(params), _dtensor.locals_of(grads)
    first, signature = torch.ops.fastaccum._first_unfusable.default(kparams, kgrads)
    return grads, first, signature, kparams, kgrads


def _raise_for(kind: int, where: str, p: Tensor, g: Tensor) -> None:
    if kind == PairKind.MISMATCH:
        raise RuntimeError(
            f"AccumOptimizer: {where} (shape {tuple(p.shape)}, {p.dtype}, {p.device}) has a "
            f"grad of shape {tuple(g.shape)}, {g.dtype}, {g.device}; the grad must match its "
            "parameter's dtype, shape and device"
        )
    if kind == PairKind.BAD_DTYPE:
        raise RuntimeError(
            f"AccumOptimizer: {where} has dtype {p.dtype}; the fused kernels update float32, "
            "float64, float16 and bfloat16 parameters, and complex ones of those"
        )
    if kind == PairKind.BAD_LAYOUT:
        raise RuntimeError(
            f"AccumOptimizer: {where} is a {p.layout} parameter with a {g.layout} grad; only "
            "strided parameters with strided or sparse COO grads are supported"
        )
