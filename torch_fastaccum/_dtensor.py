"""DTensor parameters (FSDP2's ``fully_shard``): the kernels run on the local
shards, and what must agree across shards is reduced with one collective.

NOTE: [DTensor params]
A step plan maps every DTensor param, grad and momentum buffer to its local
tensor (what ``to_local()`` returns under no_grad: the DTensor's own
storage, no copy), and
the fused kernels update those in place. The state keeps DTensors (momentum
buffers placed like their params, as torch's SGD keeps them), so
``torch.distributed.checkpoint`` saves and reshards them.

Why unwrap rather than register DTensor sharding strategies for the ops: the
update is pointwise on local shards whatever the placement (param, grad and
buffer share it), so a strategy would only add a per-call DTensor dispatch
over every tensor of the list; and the two results that are not pointwise,
the inf/NaN flag and the clip norm, would still need a collective that no
strategy expresses for a plain found_inf tensor (torch special-cases its own
``_amp_foreach_non_finite_check_and_unscale_`` with a handler for this).

The collectives, as torch's handler does them: over each mesh dim where the
grad is not Replicate (a shard lives there), ``all_reduce`` MAX of the device's
found_inf flag, and SUM of the local sums of squares (MAX of the local max |g|
for the inf norm). They are stream-ordered collectives, not host syncs.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor


def dtensor_type():
    """DTensor, or None while torch.distributed.tensor is not imported (then
    no DTensor exists, and the package does not import it for nothing)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def any_dtensor(tensors) -> bool:
    cls = dtensor_type()
    return cls is not None and any(isinstance(t, cls) for t in tensors)


def is_dtensor(t) -> bool:
    cls = dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t):
    """The local tensor of a DTensor (what to_local() returns under no_grad:
    its storage, no copy); others as they are."""
    return t._local_tensor if is_dtensor(t) else t


def locals_of(tensors: list) -> list:
    """local() of each (None stays None)."""
    cls = dtensor_type()
    return [t._local_tensor if isinstance(t, cls) else t for t in tensors]


def placed_alike(params: list, grads: list) -> bool:
    """Every grad is a DTensor exactly where its param is, on the same mesh
    with the same placements (FSDP2's are); the per-step check, cheap."""
    cls = dtensor_type()
    for p, g in zip(params, grads):
        if g is None:
            continue
        p_dt = isinstance(p, cls)
        if p_dt != isinstance(g, cls):
            return False
        if p_dt:
            ps, gs = p._spec, g._spec
            if ps.placements != gs.placements or not (ps.mesh is gs.mesh or ps.mesh == gs.mesh):
                return False
    return True


def reduce_key(t, cache: dict, where: str) -> tuple:
    """The process groups over which values computed on `t`'s local shard must be
    reduced: one per mesh dim where `t` is not Replicate; () for a plain tensor.
    `cache` holds them per (mesh, placements)."""
    if not is_dtensor(t):
        return ()
    spec = (t.device_mesh, tuple(t.placements))
    key = cache.get(spec)
    if key is None:
        from torch.distributed.tensor import Partial, Replicate

        mesh, placements = spec
        if any(isinstance(pl, Partial) for pl in placements):
            raise RuntimeError(
                f"AccumOptimizer: {where} has Partial placements {placements}; the fused step "
                "needs reduced (Shard or Replicate) parameters and grads"
            )
        key = cache[spec] = tuple(mesh.get_group(d) for d, pl in enumerate(placements) if not isinstance(pl, Replicate))
    return key


def check_pair(p, g, where: str) -> None:
    """A DTensor param's grad must be a DTensor placed like it (FSDP2's are):
    the kernels pair local shards element by element."""
    if g is None:
        return
    p_dt, g_dt = is_dtensor(p), is_dtensor(g)
    if not (p_dt or g_dt):
        return
    if p_dt != g_dt:
        kinds = ("a DTensor", "a plain tensor")
        raise RuntimeError(
            f"AccumOptimizer: {where} is {kinds[not p_dt]} but its grad is {kinds[not g_dt]}; "
            "a DTensor parameter needs a DTensor grad with the same placements"
        )
    if p.device_mesh != g.device_mesh or tuple(p.placements) != tuple(g.placements):
        raise RuntimeError(
            f"AccumOptimizer: {where} is placed {tuple(p.placements)} on {p.device_mesh}, but its grad "
            f"{tuple(g.placements)} on {g.device_mesh}; redistribute the grad like its parameter first"
        )


def wrap_like(key, local_tensor: Tensor):
    """`local_tensor` as a DTensor placed like param `key` (no communication);
    `local_tensor` itself when key is a plain tensor."""
    if not is_dtensor(key):
        return local_tensor
    cls = dtensor_type()
    return cls.from_local(local_tensor, key.device_mesh, key.placements, run_check=False,
                          shape=key.shape, stride=key.stride())


def all_reduce(t: Tensor, groups: tuple, op_name: str) -> None:
    """In place, over each group in turn (SUM or MAX compose that way)."""
    import torch.distributed as dist

    op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op_name]
    for group in groups:
        dist.all_reduce(t, op=op, group=group)


def reduce_flags(per_device: dict, keys_per_device: dict) -> None:
    """MAX of each device's inf/NaN flag over the groups of its sharded grads,
    so every rank makes the same skip decision."""
    for device, keys in keys_per_device.items():
        flag = per_device.get(device)
        if flag is None:
            continue
        for key in keys:
            all_reduce(flag, key, "max")


def replicated_like(value: Tensor, grads) -> Tensor:
    """`value` (the same on every rank) as the Replicate DTensor torch's
    clip_grad_norm_ returns for DTensor grads; `value` itself without any."""
    cls = dtensor_type()
    first = next((g for g in grads if cls is not None and isinstance(g, cls)), None)
    if first is None:
        return value
    from torch.distributed.tensor import Replicate

    mesh = first.device_mesh
    return cls.from_local(value, mesh, [Replicate()] * mesh.ndim, run_check=False)
