"""One rank of the FSDP2 test (tests/test_fsdp2.py), run as its own process:

    python tests/_fsdp_worker.py --rank R --world W --port P --out DIR --phase PHASE [--ckpt DIR]

It joins a gloo process group on 127.0.0.1:P and, per phase:

* ``train``: runs every scenario in SCENARIOS twice on the same FSDP2 model
  (each Linear and the root wrapped with ``fully_shard``): once with
  AccumOptimizer (+ torch_fastaccum.GradScaler), zero_grad/backward/step on
  every micro-batch and the loss not divided, and once with the reference
  torch.optim.SGD (+ torch.amp.GradScaler), ``loss / K`` and step/update/
  zero_grad every K-th micro-batch, the gradient sync switched the same way
  (``opt.accumulate(model)`` against ``set_requires_gradient_sync``).
  Writes DIR/rank{R}.pt: full (all-gathered) params, momentum buffers,
  scale history, skips and clip norms of both runs.
* ``save``: the RESUME scenario with AccumOptimizer; after micro-batch
  SAVE_AT (inside a window) saves model, optimizer (get_state_dict), the
  accumulated grads and the scaler state with torch.distributed.checkpoint to
  --ckpt, then trains to the end and writes its final params.
* ``hsdp``: the HSDP scenarios the same way, on 4 ranks.
* ``errors``: grads placed unlike their DTensor params; the step must raise
  a clear error and change nothing.
* ``resume``: fresh processes (any world size) load that checkpoint
  (get_state_dict templates, dcp.load, set_state_dict) and train from
  SAVE_AT + 1 to the end; writes the final params.

Data: micro-batch i of the global run is make_batches("mlp", ...)[i] (8
samples); with world W rank r takes rows [r*8/W, (r+1)*8/W). The loss is the
mean over the local rows; FSDP2 averages the reduced grads over the ranks, so
the grads are those of the mean loss over the whole micro-batch.

Faults, by global micro-batch index -> (kind, rank): ``inf_local`` writes
+inf into element 0 of the rank's local shard of the first parameter's grad
after the micro-batch's backward (always a boundary micro-batch, so after the
reduce-scatter): only that rank's shard holds it, and the step must be
skipped on every rank. ``loss_nan`` multiplies the rank's loss by NaN.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _helpers import make_batches, make_mlp  # noqa: E402
from _spawn import run_rank  # noqa: E402

GLOBAL_BATCH = 8
HIDDEN = 32  # 10*32 + 32 + 32*3 + 3 = 451 floats in 4 tensors, each split over 2 ranks
SEED_MODEL = 11
SEED_DATA = 12
SCALER_KW = dict(init_scale=2.0**10, growth_interval=2)

MOMENTUM_NESTEROV = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)
MOMENTUM_DAMPENING = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2)

SCENARIOS = {
    # accumulate(): FSDP2's sync off inside windows; an inf in rank 1's shard
    # at the boundary of window 2.
    "k4_accumulate_reshard": dict(
        K=4, windows=6, accumulate=True, reshard=True, scaler=True, opt=MOMENTUM_NESTEROV,
        faults={2 * 4 + 3: ("inf_local", 1)},
    ),
    # K=1 (every step updates), params kept unsharded after forward.
    "k1_no_reshard": dict(
        K=1, windows=12, accumulate=False, reshard=False, scaler=True, opt=MOMENTUM_DAMPENING,
        faults={5: ("inf_local", 0)},
    ),
    # Sync on every micro-batch: the sharded grads accumulate the reduced
    # micro-batch grads instead.
    "k4_sync_every_micro_batch": dict(
        K=4, windows=6, accumulate=False, reshard=False, scaler=True, opt=MOMENTUM_NESTEROV,
        faults={3 * 4 + 3: ("inf_local", 0)},
    ),
    # bf16 compute (fp32 sharded params and reduction): compared with torch
    # on the same FSDP2 model only.
    "k4_bf16_params": dict(
        K=4, windows=5, accumulate=True, reshard=True, scaler=True, opt=MOMENTUM_NESTEROV,
        faults={1 * 4 + 3: ("inf_local", 1)}, bf16=True,
    ),
    # Fused clipping, L2, with the scaler; `clip` about the median window norm.
    "k4_clip_scaler": dict(
        K=4, windows=6, accumulate=True, reshard=True, scaler=True, opt=MOMENTUM_DAMPENING,
        faults={1 * 4 + 3: ("inf_local", 0)}, clip=0.67, clip_norm_type=2.0,
    ),
    # scaler.unscale_(opt) (one fused pass over the local shards, the flag
    # reduced) and then torch's own clip_grad_norm_ on the DTensor grads.
    "k4_unscale_then_torch_clip": dict(
        K=4, windows=6, accumulate=True, reshard=True, scaler=True, opt=MOMENTUM_NESTEROV,
        faults={2 * 4 + 3: ("inf_local", 1)}, clip=0.67, clip_norm_type=2.0, clip_with="unscale_",
    ),
    # Fused clipping, inf norm, no scaler, maximize.
    "k2_clip_inf_plain": dict(
        K=2, windows=8, accumulate=True, reshard=False, scaler=False,
        opt=dict(lr=0.02, momentum=0.8, nesterov=True, maximize=True, weight_decay=1e-3),
        faults={}, clip=0.2, clip_norm_type=float("inf"),
    ),
}

# HSDP on 4 ranks: a (replicate, shard) mesh, grads all-reduced across the
# replicas after the reduce-scatter; the flag and the norm reduce over the
# shard dim only, as torch's do. A NaN loss on rank 2 at a boundary.
HSDP = {
    "hsdp_k4_clip": dict(
        K=4, windows=5, accumulate=True, reshard=True, scaler=True, opt=MOMENTUM_NESTEROV,
        faults={2 * 4 + 3: ("loss_nan", 2)}, clip=0.67, clip_norm_type=2.0, hsdp=True,
    ),
}

# Checkpoint/resume: saved after micro-batch SAVE_AT, two micro-batches into
# window 2 of K=4 (the grads hold their partial sum).
# The fault is on rank 0, which every world size has.
RESUME = dict(K=4, windows=5, accumulate=False, reshard=True, scaler=True, opt=MOMENTUM_NESTEROV,
              faults={3 * 4 + 3: ("inf_local", 0)})
SAVE_AT = 2 * 4 + 1


def make_model(device="cpu"):
    return make_mlp(seed=SEED_MODEL, device=device, hidden=HIDDEN)


def make_data(n, device="cpu"):
    return make_batches("mlp", n, seed=SEED_DATA, device=device, batch=GLOBAL_BATCH)


def local_rows(t, rank, world):
    per = t.shape[0] // world
    return t[rank * per : (rank + 1) * per]


def shard(model, cfg, world, device):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if cfg.get("hsdp"):  # (replicate, shard): [[0, 1], [2, 3]] on 4 ranks
        mesh = init_device_mesh(device, (world // 2, 2), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device, (world,))
    kw = dict(mesh=mesh, reshard_after_forward=cfg["reshard"])
    if cfg.get("bf16"):
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def full(t):
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().cpu().clone()


def inject(model, cfg, i, rank):
    fault = cfg["faults"].get(i)
    if fault is not None and fault == ("inf_local", rank):
        with torch.no_grad():
            next(model.parameters()).grad.to_local().view(-1)[0] = float("inf")


def forward_loss(model, x, y, rank, world, cfg=None, i=None):
    out = model(local_rows(x, rank, world))
    loss = F.mse_loss(out.float(), local_rows(y, rank, world))
    if cfg is not None and cfg["faults"].get(i) == ("loss_nan", rank):
        loss = loss * float("nan")  # every grad of the rank; the reduction spreads it
    return loss


# Reduce-scatter calls, counted by wrapping the collective FSDP2 calls
# (count_reduce_scatters); recorded per micro-batch by train_ours.
REDUCE_SCATTERS = [0]


def count_reduce_scatters():
    import torch.distributed as dist

    name = "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else "reduce_scatter_tensor"
    inner = getattr(dist, name)

    def counted(*args, **kwargs):
        REDUCE_SCATTERS[0] += 1
        return inner(*args, **kwargs)

    setattr(dist, name, counted)


class Recorder:
    def __init__(self):
        self.scales, self.skipped, self.norms, self.norm_objects = [], [], [], []
        self.reduce_scatters = []  # per micro-batch

    def norm(self, norm):
        self.norms.append(full(norm))
        self.norm_objects.append(norm)

    def boundary(self, scaler, before):
        if scaler is not None:
            after = scaler.get_scale()
            self.scales.append((after, scaler._get_growth_tracker()))
            self.skipped.append(after < before)


def optimizer_step(opt, scaler):
    """step (with the scaler: step and update); returns the scale before it."""
    if scaler is None:
        opt.step()
        return None
    before = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    return before


def train_ours(model, opt, scaler, cfg, batches, rank, world, start=0):
    rec = Recorder()
    K = cfg["K"]
    for j, (x, y) in enumerate(batches):
        i = start + j
        boundary = (i + 1) % K == 0
        assert opt.is_accumulation_boundary == boundary
        opt.zero_grad()
        ctx = opt.accumulate(model) if cfg["accumulate"] else contextlib.nullcontext()
        before_rs = REDUCE_SCATTERS[0]
        with ctx:
            loss = forward_loss(model, x, y, rank, world, cfg, i)
            (scaler.scale(loss) if scaler else loss).backward()
        rec.reduce_scatters.append(REDUCE_SCATTERS[0] - before_rs)
        inject(model, cfg, i, rank)
        if boundary and cfg.get("clip") is not None:
            args = (cfg["clip"], cfg["clip_norm_type"])
            if cfg.get("clip_with") == "unscale_":
                scaler.unscale_(opt)
                norm = torch.nn.utils.clip_grad_norm_(list(model.parameters()), *args)
            else:
                norm = scaler.clip_grad_norm_(opt, *args) if scaler else opt.clip_grad_norm_(*args)
            rec.norm(norm)
        before = optimizer_step(opt, scaler)
        if boundary:
            rec.boundary(scaler, before)
    return rec


def train_torch(model, opt, scaler, cfg, batches, rank, world):
    rec = Recorder()
    K = cfg["K"]
    params = list(model.parameters())
    for i, (x, y) in enumerate(batches):
        boundary = (i + 1) % K == 0
        if cfg["accumulate"]:
            model.set_requires_gradient_sync(boundary)
        loss = forward_loss(model, x, y, rank, world, cfg, i) / K
        (scaler.scale(loss) if scaler else loss).backward()
        inject(model, cfg, i, rank)
        if not boundary:
            continue
        if cfg.get("clip") is not None:
            if scaler:
                scaler.unscale_(opt)
            rec.norm(torch.nn.utils.clip_grad_norm_(params, cfg["clip"], cfg["clip_norm_type"]))
        rec.boundary(scaler, optimizer_step(opt, scaler))
        opt.zero_grad()
    model.set_requires_gradient_sync(True)
    return rec


def results(model, opt, rec):
    return dict(
        params=[full(p) for p in model.parameters()],
        momentum=[None if opt.state[p].get("momentum_buffer") is None else full(opt.state[p]["momentum_buffer"])
                  for p in model.parameters()],
        buffer_types=sorted({type(s["momentum_buffer"]).__name__ for s in opt.state.values() if "momentum_buffer" in s}),
        scales=rec.scales,
        skipped=rec.skipped,
        norms=rec.norms,
        norm_types=[type(n).__name__ for n in rec.norm_objects],
        norm_placements=[str(getattr(n, "placements", None)) for n in rec.norm_objects],
        reduce_scatters=rec.reduce_scatters,
    )


def run_scenario(cfg, rank, world, device):
    from torch_fastaccum import AccumOptimizer, GradScaler

    n = cfg["K"] * cfg["windows"]
    out = {}
    for which in ("ours", "torch"):
        model = shard(make_model(device), cfg, world, device)
        scaler_cls = GradScaler if which == "ours" else torch.amp.GradScaler
        scaler = scaler_cls(device, **SCALER_KW) if cfg["scaler"] else None
        if which == "ours":
            opt = AccumOptimizer(model.parameters(), accumulation_steps=cfg["K"], **cfg["opt"])
            rec = train_ours(model, opt, scaler, cfg, make_data(n, device), rank, world)
        else:
            opt = torch.optim.SGD(model.parameters(), foreach=False, **cfg["opt"])
            rec = train_torch(model, opt, scaler, cfg, make_data(n, device), rank, world)
        out[which] = results(model, opt, rec)
    out["sync_after_exception"] = reduces_after_interrupted_accumulate(model, opt, rank, world, device)
    return out


def reduces_after_interrupted_accumulate(model, opt, rank, world, device):
    """An exception inside accumulate() on a non-boundary micro-batch must leave
    FSDP2 syncing again: the reduce-scatters of one more backward."""
    from torch_fastaccum import AccumOptimizer

    opt2 = AccumOptimizer(model.parameters(), accumulation_steps=2, lr=0.0)
    try:
        with opt2.accumulate(model):
            raise KeyError("interrupt")
    except KeyError:
        pass
    x, y = make_data(1, device)[0]
    before = REDUCE_SCATTERS[0]
    forward_loss(model, x, y, rank, world).backward()
    return REDUCE_SCATTERS[0] - before


def build_resume(world, device):
    from torch_fastaccum import AccumOptimizer, GradScaler

    model = shard(make_model(device), RESUME, world, device)
    opt = AccumOptimizer(model.parameters(), accumulation_steps=RESUME["K"], **RESUME["opt"])
    return model, opt, GradScaler(device, **SCALER_KW)


def phase_save(rank, world, device, ckpt):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, opt, scaler = build_resume(world, device)
    batches = make_data(RESUME["K"] * RESUME["windows"], device)
    rec = train_ours(model, opt, scaler, RESUME, batches[: SAVE_AT + 1], rank, world)
    model_sd, optim_sd = get_state_dict(model, opt)
    grads = {name: p.grad for name, p in model.named_parameters()}
    dcp.save({"model": model_sd, "optim": optim_sd, "grads": grads, "scaler": scaler.state_dict()}, checkpoint_id=ckpt)
    saved_micro = opt._micro_step
    more = train_ours(model, opt, scaler, RESUME, batches[SAVE_AT + 1 :], rank, world, start=SAVE_AT + 1)
    rec.scales += more.scales
    rec.skipped += more.skipped
    return dict(results(model, opt, rec), saved_micro=saved_micro,
                saved_groups=[{k: v for k, v in g.items() if k != "params"} for g in optim_sd["param_groups"]])


def phase_resume(rank, world, device, ckpt):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, opt, scaler = build_resume(world, device)
    model_sd, optim_sd = get_state_dict(model, opt)  # templates: fresh, no grads yet
    template = dict(micro=opt._micro_step, state_keys=sorted(optim_sd["state"]),
                    buffers=sorted(k for k, v in optim_sd["state"].items() if "momentum_buffer" in v),
                    grads=[p.grad for p in model.parameters()])
    grads = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    state = {"model": model_sd, "optim": optim_sd, "grads": grads, "scaler": scaler.state_dict()}
    dcp.load(state, checkpoint_id=ckpt)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    scaler.load_state_dict(state["scaler"])
    for name, p in model.named_parameters():
        p.grad = state["grads"][name]
    loaded_micro = opt._micro_step
    batches = make_data(RESUME["K"] * RESUME["windows"], device)
    rec = train_ours(model, opt, scaler, RESUME, batches[SAVE_AT + 1 :], rank, world, start=SAVE_AT + 1)
    return dict(results(model, opt, rec), template=template, loaded_micro=loaded_micro)


def phase_errors(rank, world, device):
    """Bad grads on DTensor params: each step raises a clear error and changes
    nothing. Returns (message, params unchanged, state empty) per case."""
    from torch.distributed.tensor import Replicate

    from torch_fastaccum import AccumOptimizer

    out = {}
    for case in ("replicate_grad", "plain_grad"):
        model = shard(make_model(device), RESUME, world, device)
        opt = AccumOptimizer(model.parameters(), **RESUME["opt"])
        x, y = make_data(1, device)[0]
        forward_loss(model, x, y, rank, world).backward()
        p = next(model.parameters())
        if case == "replicate_grad":
            p.grad = p.grad.redistribute(placements=[Replicate()])
        else:
            p.grad = p.grad.full_tensor()
        before = [full(q) for q in model.parameters()]
        try:
            opt.step()
            message = None
        except RuntimeError as e:
            message = str(e)
        unchanged = all(torch.equal(a, full(q)) for a, q in zip(before, model.parameters()))
        out[case] = (message, unchanged, len(opt.state) == 0)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", required=True)
    ap.add_argument("--phase", default="train", choices=("train", "hsdp", "save", "resume", "errors"))
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--timeout", type=float, default=60.0)
    a = ap.parse_args(argv)

    import torch.distributed as dist

    torch.set_num_threads(1)  # two ranks on a 2-core machine
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(a.port)
    backend = "gloo"
    if a.device == "cuda":
        torch.cuda.set_device(a.rank)
        backend = "nccl"
    dist.init_process_group(backend, rank=a.rank, world_size=a.world,
                            timeout=datetime.timedelta(seconds=a.timeout))
    count_reduce_scatters()
    try:
        if a.phase == "train":
            res = {name: run_scenario(cfg, a.rank, a.world, a.device) for name, cfg in SCENARIOS.items()}
        elif a.phase == "hsdp":
            res = {name: run_scenario(cfg, a.rank, a.world, a.device) for name, cfg in HSDP.items()}
        elif a.phase == "errors":
            res = phase_errors(a.rank, a.world, a.device)
        elif a.phase == "save":
            res = phase_save(a.rank, a.world, a.device, a.ckpt)
        else:
            res = phase_resume(a.rank, a.world, a.device, a.ckpt)
        torch.save(res, os.path.join(a.out, f"rank{a.rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_rank(main)
