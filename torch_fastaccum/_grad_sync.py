"""What ``AccumOptimizer.accumulate(model)`` switches off on micro-batches
that do not end a window: DDP's all-reduce (``no_sync``) and FSDP2's
reduce-scatter (``set_requires_gradient_sync``). Either wrapper's state is
restored when the block exits, exception or not."""

from __future__ import annotations

import contextlib
import sys

import torch


def _fsdp_modules(model: torch.nn.Module) -> list:
    # fully_shard's module class, if that module was imported at all (no model
    # can be sharded otherwise, and importing it costs every user).
    fsdp = sys.modules.get("torch.distributed.fsdp")
    cls = getattr(fsdp, "FSDPModule", None)
    if cls is None:
        return []
    return [m for m in model.modules() if isinstance(m, cls)]


@contextlib.contextmanager
def skipped_grad_sync(model: torch.nn.Module):
    """The gradient sync of `model` off inside the block (nothing for a model
    that neither DDP nor FSDP2 wraps)."""
    ddp = getattr(torch.nn.parallel, "DistributedDataParallel", None)
    if ddp is not None and isinstance(model, ddp):
        with model.no_sync():
            yield
        return
    sharded = _fsdp_modules(model)
    if not sharded:
        yield
        return
    # FSDP2 has no getter for the flag; it syncs unless told otherwise, so the
    # block restores syncing, as no_sync restores DDP's default.
    for m in sharded:
        m.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for m in sharded:
            m.set_requires_gradient_sync(True, recurse=False)
