"""AccumOptimizer under Hugging Face Accelerate and PyTorch Lightning: the
README's recipes ("With Accelerate or Lightning") against the plain-torch
reference loop, and the trap the README warns about.

Accumulation is set in one place only. Either the framework accumulates
(``Accelerator(gradient_accumulation_steps=K)``, ``Trainer(accumulate_grad_batches=K)``)
and ``AccumOptimizer(accumulation_steps=1)``, or AccumOptimizer accumulates and
the framework's setting stays 1. Set in both, the framework calls ``step()``
on every K-th micro-batch only, and AccumOptimizer updates on every K-th of
those calls: one update per K*K micro-batches, which the trap tests pin.

Every run trains the same fp32 MLP on the same 32 micro-batches with K = 4
(8 updates; SGD with momentum and weight decay) and is compared with the
reference: ``torch.optim.SGD`` on its default path, ``(loss / K).backward()``,
``step(); zero_grad()`` on every K-th micro-batch. With K and the loss scale
powers of two, every factor 1/K, 1/scale is exact on both sides and the fused
kernels round like torch's op chain (tests/test_bitwise_parity.py), so the
parameters must be equal bit for bit. That holds on the AVX2 kernels; on a
CPU running the baseline build, whose roundings need not match torch's own
vectorised path, they are compared within rtol 1e-6 / atol 1e-7 instead.
The number of real updates and the lr each of them used must be equal too.

accelerate and lightning are optional: each test imports its framework
itself (pytest.importorskip), so a missing one skips with the reason, and the
imports (and the warning filters they install) stay inside the tests. CI
installs both (Makefile ``setup``; ``.ci/run`` checks they import).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from _helpers import Fp16Autocast, make_batches, make_mlp, run_ref
from torch_fastaccum import AccumOptimizer, GradScaler

K = 4
MICRO_BATCHES = 32  # 8 updates
BATCH = 8
HYPER = dict(lr=0.05, momentum=0.9, weight_decay=1e-2)
# A power-of-two scale that grows on every second update: the scale history is
# compared as well.
SCALER = dict(init_scale=2.0**10, growth_interval=2)
EXACT = torch.ops.fastaccum._cpu_capability() == "avx2"

# Lightning's own use of a torch API that torch deprecated; nothing to do with this package.
pytestmark = pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")


def step_lr(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)


def loss_of(model, x, y):
    # .float(): an fp16 autocast output is compared in fp32 (a no-op otherwise).
    return F.mse_loss(model(x).float(), y)


def batches():
    return make_batches("mlp", MICRO_BATCHES, seed=1, batch=BATCH)


def loader():
    """The same micro-batches, in order, as a DataLoader."""
    xs, ys = zip(*batches())
    data = torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ys))
    return torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=False)


def record_updates(opt) -> list:
    """The lr used by every ``step()`` of ``opt`` that updates the parameters:
    every call for torch's SGD, the boundary calls for an AccumOptimizer.
    Read in a step pre-hook, so it sees the calls the framework really makes."""
    lrs = []

    def hook(optimizer, args, kwargs):
        if getattr(optimizer, "is_accumulation_boundary", True):
            lrs.append(optimizer.param_groups[0]["lr"])

    opt.register_step_pre_hook(hook)
    return lrs


@dataclasses.dataclass
class Run:
    params: list
    lrs: list  # one entry per real update
    scale: float | None = None


def finished(model, lrs, scaler=None) -> Run:
    return Run([p.detach().clone() for p in model.parameters()], list(lrs),
               None if scaler is None else scaler.get_scale())


def reference(window: int = K, *, scheduler=True, scaled=False, autocast=False) -> Run:
    """Plain torch: SGD default path, ``(loss / window).backward()``, step (and
    scheduler step) every ``window``-th micro-batch; torch's GradScaler if scaled."""
    model = make_mlp(seed=0)
    if autocast:
        model = Fp16Autocast(model)  # the counterpart of Lightning's "16-mixed" on the CPU
    opt = torch.optim.SGD(model.parameters(), foreach=False, **HYPER)
    lrs = record_updates(opt)
    scaler = torch.amp.GradScaler("cpu", **SCALER) if scaled else None
    run_ref(model, batches(), window, opt=opt, scaler=scaler, loss_fn=lambda out, y: F.mse_loss(out.float(), y),
            scheduler_fn=step_lr if scheduler else None)
    assert len(lrs) == MICRO_BATCHES // window
    return finished(model, lrs, scaler)


def assert_same_run(got: Run, want: Run):
    assert got.lrs == want.lrs, "updates (one lr per update) differ"
    assert got.scale == want.scale
    assert len(got.params) == len(want.params)
    for i, (a, b) in enumerate(zip(got.params, want.params)):
        if EXACT:
            assert torch.equal(a, b), f"param {i}: max |diff| {(a - b).abs().max().item():.3g}"
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m: f"param {i}: {m}")


def assert_params_differ(got: Run, want: Run):
    assert any(not torch.equal(a, b) for a, b in zip(got.params, want.params))


# ---------------------------------------------------------------------------
# Accelerate
# ---------------------------------------------------------------------------


@pytest.fixture
def accelerate():
    """The accelerate module (skips when it is not installed). Its process-wide
    singletons (AcceleratorState, PartialState, GradientState) are reset before
    and after, so no test sees another's accumulation setting."""
    acc = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    def reset():
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    reset()
    yield acc
    reset()


def test_accelerate_accumulates(accelerate):
    """Recipe 1: Accelerator(gradient_accumulation_steps=K), accumulation_steps=1.
    Accelerate divides the loss by K and forwards step()/zero_grad() and the
    scheduler's step only at the end of each window."""
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=K)
    model = make_mlp(seed=0)
    opt = AccumOptimizer(model.parameters(), accumulation_steps=1, **HYPER)
    lrs = record_updates(opt)
    model, a_opt, data, sched = accelerator.prepare(model, opt, loader(), step_lr(opt))
    for x, y in data:
        with accelerator.accumulate(model):
            accelerator.backward(loss_of(model, x, y))
            a_opt.step()
            sched.step()
            a_opt.zero_grad()
    assert_same_run(finished(model, lrs), reference())


@pytest.mark.parametrize("scaled", [False, True], ids=["fp32", "fastaccum-scaler"])
def test_optimizer_accumulates_under_accelerate(accelerate, scaled):
    """Recipe 2: Accelerator() (gradient_accumulation_steps=1), accumulation_steps=K.
    Accelerate sees every micro-batch as a step: the scheduler is stepped only
    when the step() just made was a boundary. With a scaler, this package's
    GradScaler replaces Accelerate's before prepare() (on the CPU Accelerate
    makes none; on CUDA with fp16 it would make a torch.amp.GradScaler)."""
    accelerator = accelerate.Accelerator(cpu=True)
    if scaled:
        accelerator.scaler = GradScaler("cpu", **SCALER)
    model = make_mlp(seed=0)
    opt = AccumOptimizer(model.parameters(), accumulation_steps=K, **HYPER)
    lrs = record_updates(opt)
    model, a_opt, data, sched = accelerator.prepare(model, opt, loader(), step_lr(opt))
    for x, y in data:
        boundary = opt.is_accumulation_boundary
        with opt.accumulate(model):
            loss = loss_of(model, x, y)
        accelerator.backward(loss)
        a_opt.step()
        if boundary:
            sched.step()
        a_opt.zero_grad()
    assert_same_run(finished(model, lrs, accelerator.scaler), reference(scaled=scaled))


def test_accelerate_and_optimizer_both_accumulating_update_every_k_squared(accelerate):
    """The trap: K in both places. Accelerate forwards every K-th step() and
    AccumOptimizer updates on every K-th of those: 2 updates in 32
    micro-batches instead of 8, each with the mean gradient of 16."""
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=K)
    model = make_mlp(seed=0)
    opt = AccumOptimizer(model.parameters(), accumulation_steps=K, **HYPER)
    lrs = record_updates(opt)
    model, a_opt, data = accelerator.prepare(model, opt, loader())
    for x, y in data:
        with accelerator.accumulate(model):
            accelerator.backward(loss_of(model, x, y))
            a_opt.step()
            a_opt.zero_grad()
    got = finished(model, lrs)
    assert len(got.lrs) == MICRO_BATCHES // (K * K) == 2
    assert_same_run(got, reference(K * K, scheduler=False))
    assert_params_differ(got, reference(K, scheduler=False))


# ---------------------------------------------------------------------------
# Lightning
# ---------------------------------------------------------------------------


@pytest.fixture
def lightning():
    return pytest.importorskip("lightning")


def lightning_fit(L, tmp_path, *, opt_k, scheduler=None, manual=False, keep_grads_in_validation=False,
                  **trainer_kw):
    """Fit a LightningModule around the MLP on the micro-batches, one epoch.

    ``scheduler``: the lr_scheduler config (without the scheduler) that
    configure_optimizers returns, or None. ``manual``: manual optimization,
    the scheduler stepped in training_step after a boundary step()."""
    validate = bool(trainer_kw.get("val_check_interval"))

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_mlp(seed=0)
            self.automatic_optimization = not manual
            self.lrs = []
            self.sched = None
            self.clips = 0  # times Lightning asked to clip (gradient_clip_val set)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = loss_of(self.net, x, y)
            if not manual:
                return loss
            opt, sched = self.optimizers(), self.lr_schedulers()
            boundary = opt.optimizer.is_accumulation_boundary
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            if boundary:
                sched.step()

        if validate:

            def validation_step(self, batch, batch_idx):
                x, y = batch
                return loss_of(self.net, x, y)

        if keep_grads_in_validation:

            def on_validation_model_zero_grad(self):
                # Lightning's default calls module.zero_grad(), which would
                # drop the gradients of a window that is still accumulating.
                pass

        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            self.clips += gradient_clip_val is not None
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

        def configure_optimizers(self):
            opt = AccumOptimizer(self.parameters(), accumulation_steps=opt_k, **HYPER)
            self.lrs = record_updates(opt)
            if scheduler is None and not manual:
                return opt
            self.sched = step_lr(opt)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": self.sched, **(scheduler or {})}}

    module = Module()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **trainer_kw,
    )
    val = {"val_dataloaders": loader()} if validate else {}
    trainer.fit(module, train_dataloaders=loader(), **val)
    return finished(module.net, module.lrs, getattr(trainer.precision_plugin, "scaler", None)), trainer, module


@pytest.mark.parametrize("scaler", [None, "torch", "fastaccum"], ids=["fp32", "16-mixed-torch", "16-mixed-fastaccum"])
def test_lightning_accumulates(lightning, tmp_path, scaler):
    """Recipe 1: Trainer(accumulate_grad_batches=K), accumulation_steps=1. Lightning
    divides the loss by K, steps every K-th batch, and its global_step and
    interval="step" scheduler count updates. With "16-mixed" (fp16 autocast on
    the CPU here) Lightning's MixedPrecision plugin drives either its default
    torch.amp.GradScaler or this package's, given as its scaler."""
    kw = {}
    if scaler is not None:
        from lightning.pytorch.plugins import MixedPrecision

        s = GradScaler("cpu", **SCALER) if scaler == "fastaccum" else torch.amp.GradScaler("cpu", **SCALER)
        kw["plugins"] = [MixedPrecision("16-mixed", "cpu", scaler=s)]
    got, trainer, module = lightning_fit(lightning, tmp_path, opt_k=1, accumulate_grad_batches=K,
                                         scheduler={"interval": "step"}, **kw)
    scaled = scaler is not None
    assert_same_run(got, reference(scaled=scaled, autocast=scaled))
    assert trainer.global_step == MICRO_BATCHES // K == 8
    assert module.sched.last_epoch == 8


@pytest.mark.parametrize("mode", ["frequency", "16-mixed", "manual"])
def test_optimizer_accumulates_under_lightning(lightning, tmp_path, mode):
    """Recipe 2: Trainer(accumulate_grad_batches=1), accumulation_steps=K. Lightning
    calls step() on every batch, so global_step counts micro-batches; the
    scheduler steps on every K-th one through frequency=K ("frequency",
    "16-mixed" with this package's GradScaler in Lightning's MixedPrecision
    plugin, fp16 autocast on the CPU), or in training_step after a boundary
    step() under manual optimization ("manual")."""
    kw = {}
    if mode == "manual":
        kw["manual"] = True
    else:
        kw["scheduler"] = {"interval": "step", "frequency": K}
    if mode == "16-mixed":
        from lightning.pytorch.plugins import MixedPrecision

        kw["plugins"] = [MixedPrecision("16-mixed", "cpu", scaler=GradScaler("cpu", **SCALER))]
    got, trainer, module = lightning_fit(lightning, tmp_path, opt_k=K, **kw)
    scaled = mode == "16-mixed"
    assert_same_run(got, reference(scaled=scaled, autocast=scaled))
    assert trainer.global_step == MICRO_BATCHES == 32
    assert module.sched.last_epoch == 8


def test_lightning_step_scheduler_without_frequency_steps_every_micro_batch(lightning, tmp_path):
    """What the README's frequency=K is for: with K in AccumOptimizer alone, an
    interval="step" scheduler steps on every micro-batch."""
    got, trainer, module = lightning_fit(lightning, tmp_path, opt_k=K, scheduler={"interval": "step"})
    assert trainer.global_step == module.sched.last_epoch == MICRO_BATCHES
    # Update u (micro-batch 4u + 3) finds the scheduler stepped 4u + 3 times.
    assert got.lrs == [HYPER["lr"] * 0.5 ** ((K * u + K - 1) // 3) for u in range(MICRO_BATCHES // K)]
    assert got.lrs != reference().lrs


@pytest.mark.parametrize("keep", [False, True], ids=["default-hook", "hook-overridden"])
def test_lightning_validation_inside_a_window(lightning, tmp_path, keep):
    """With K in AccumOptimizer, Lightning sees no windows: validation after
    micro-batch 6 (inside a window) clears .grad through
    on_validation_model_zero_grad, unless the module overrides that hook."""
    got, _, _ = lightning_fit(lightning, tmp_path, opt_k=K, scheduler={"interval": "step", "frequency": K},
                              keep_grads_in_validation=keep, val_check_interval=6, limit_val_batches=1,
                              num_sanity_val_steps=0)
    want = reference()
    if keep:
        assert_same_run(got, want)
    else:
        assert got.lrs == want.lrs
        assert_params_differ(got, want)


def test_lightning_and_optimizer_both_accumulating_update_every_k_squared(lightning, tmp_path):
    """The trap under Lightning: it reports global_step == 8, but AccumOptimizer
    made 2 updates, each with the mean gradient of 16 micro-batches."""
    got, trainer, _ = lightning_fit(lightning, tmp_path, opt_k=K, accumulate_grad_batches=K)
    assert trainer.global_step == MICRO_BATCHES // K == 8
    assert len(got.lrs) == MICRO_BATCHES // (K * K) == 2
    assert_same_run(got, reference(K * K, scheduler=False))


def test_lightning_gradient_clip_val(lightning, tmp_path):
    """The README's clipping notes. Lightning clips wherever it steps: on every
    K-th batch when it accumulates, on every micro-batch (the partial sums)
    when AccumOptimizer does. With fp16 it refuses gradient_clip_val for
    AccumOptimizer, which unscales inside step()."""
    from lightning.pytorch.plugins import MixedPrecision

    _, _, module = lightning_fit(lightning, tmp_path, opt_k=1, accumulate_grad_batches=K, gradient_clip_val=1.0)
    assert module.clips == MICRO_BATCHES // K
    _, _, module = lightning_fit(lightning, tmp_path, opt_k=K, gradient_clip_val=1.0)
    assert module.clips == MICRO_BATCHES
    fp16 = MixedPrecision("16-mixed", "cpu", scaler=GradScaler("cpu", **SCALER))
    with pytest.raises(RuntimeError, match="gradient clipping"):
        lightning_fit(lightning, tmp_path, opt_k=1, accumulate_grad_batches=K, gradient_clip_val=1.0, plugins=[fp16])
