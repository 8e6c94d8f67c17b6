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

from _helpers import Fp16Autocast, Trace, make_batches, make_mlp, run_ref
from torch_fastaccum import (
    AccumOptimizer,
    GradScaler,
    lightning_configure_gradient_clipping,
    lightning_lr_scheduler_step,
    report_skips,
    step_was_skipped,
)

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
    every call for torch's SGD (its GradScaler does not call it on a skip), the
    boundary calls for an AccumOptimizer whose found-inf flag (handed over by a
    GradScaler) is clear. Read in a step pre-hook, so it sees the calls the
    framework really makes (the test's ``.item()`` here is no part of the
    package's step)."""
    lrs = []

    def hook(optimizer, args, kwargs):
        found_inf = getattr(optimizer, "found_inf", None)
        skipped = found_inf is not None and bool(found_inf)
        if getattr(optimizer, "is_accumulation_boundary", True) and not skipped:
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


class SkipAwareScheduler:
    """The reference's scheduler that does not step after a skipped update
    (the scaler backed off), as Accelerate's prepared scheduler does."""

    def __init__(self, sched, trace):
        self.sched, self.trace = sched, trace

    def step(self):
        if not self.trace.skipped[-1]:
            self.sched.step()


def reference(window: int = K, *, scheduler=True, scaled=False, autocast=False, inf_at=None,
              skip_aware=False) -> Run:
    """Plain torch: SGD default path, ``(loss / window).backward()``, step (and
    scheduler step) every ``window``-th micro-batch; torch's GradScaler if scaled.
    ``inf_at``: that micro-batch's loss is multiplied by inf, so its window is
    skipped; ``skip_aware``: the scheduler does not step after a skip."""
    model = make_mlp(seed=0)
    if autocast:
        model = Fp16Autocast(model)  # the counterpart of Lightning's "16-mixed" on the CPU
    opt = torch.optim.SGD(model.parameters(), foreach=False, **HYPER)
    lrs = record_updates(opt)
    scaler = torch.amp.GradScaler("cpu", **SCALER) if scaled else None
    trace = Trace()
    sched_fn = None
    if scheduler:
        sched_fn = (lambda o: SkipAwareScheduler(step_lr(o), trace)) if skip_aware else step_lr
    run_ref(model, batches(), window, opt=opt, scaler=scaler, loss_fn=lambda out, y: F.mse_loss(out.float(), y),
            scheduler_fn=sched_fn, trace=trace, inject=None if inf_at is None else {inf_at: "loss_inf"})
    skips = 0 if inf_at is None else 1
    assert len(lrs) == MICRO_BATCHES // window - skips
    if scaled:
        assert trace.skipped.count(True) == skips
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


# -- skipped windows (issue 27, item 5) ---------------------------------------
#
# One window overflows: micro-batch INF_AT's loss is multiplied by inf, so the
# second window's gradients are not finite and the scaler skips its update (and
# backs off). torch's SGD + torch.amp.GradScaler under Accelerate: the scaler
# does not call SGD.step(), Accelerate notices and reports the skip, and its
# prepared scheduler does not step. AccumOptimizer's step is fused: it is always
# called and skips on the device, so by default Accelerate reports nothing and
# steps the scheduler; torch_fastaccum.report_skips makes it report the skip.

INF_AT = 5  # micro-batch 5: the second window (micro-batches 4-7) is skipped
WINDOWS = MICRO_BATCHES // K
SKIP_REPORTED = [w == INF_AT // K for w in range(WINDOWS)]  # what torch's SGD makes Accelerate say
ACCELERATE_SKIP_CASES = {
    # id: (recipe, the scaler given to the Accelerator); recipe 1: Accelerate
    # accumulates, recipe 2: AccumOptimizer does (README, both recipes).
    "accelerate-accumulates-torch-scaler": (1, "torch"),
    "accelerate-accumulates-fastaccum-scaler": (1, "fastaccum"),
    "optimizer-accumulates-fastaccum-scaler": (2, "fastaccum"),
}


def make_scaler(kind):
    return (GradScaler if kind == "fastaccum" else torch.amp.GradScaler)("cpu", **SCALER)


def accelerate_skip_run(accelerate, recipe, scaler, *, sgd=False, report=False, before_step=None, after_step=None):
    """A README recipe with fp16-style scaling (the scaler set before prepare())
    and the inf at INF_AT. Returns the Run, accelerator.optimizer_step_was_skipped
    after every window's last step, and the scheduler's step count.
    Recipe 2: ``before_step()`` runs right before ``a_opt.step()``, and
    ``after_step(a_opt, sched, boundary)``, if given, replaces the scheduler
    step (to count host reads)."""
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=K if recipe == 1 else 1)
    accelerator.scaler = make_scaler(scaler)
    model = make_mlp(seed=0)
    if sgd:
        opt = torch.optim.SGD(model.parameters(), foreach=False, **HYPER)
    else:
        opt = AccumOptimizer(model.parameters(), accumulation_steps=1 if recipe == 1 else K, **HYPER)
    lrs = record_updates(opt)
    model, a_opt, data, sched = accelerator.prepare(model, opt, loader(), step_lr(opt))
    if report:
        assert report_skips(a_opt) is a_opt
    reported = []
    for i, (x, y) in enumerate(data):
        scale = float("inf") if i == INF_AT else 1.0
        if recipe == 1:
            with accelerator.accumulate(model):
                accelerator.backward(loss_of(model, x, y) * scale)
                a_opt.step()
                sched.step()
                a_opt.zero_grad()
            if accelerator.sync_gradients:
                reported.append(accelerator.optimizer_step_was_skipped)
            continue
        boundary = opt.is_accumulation_boundary
        with opt.accumulate(model):
            loss = loss_of(model, x, y) * scale
        accelerator.backward(loss)
        if before_step is not None:
            before_step()
        a_opt.step()
        if after_step is not None:
            after_step(a_opt, sched, boundary)
        elif boundary:
            sched.step()
            reported.append(accelerator.optimizer_step_was_skipped)
        a_opt.zero_grad()
    return finished(model, lrs, accelerator.scaler), reported, sched.scheduler.last_epoch


def test_accelerate_reports_a_skipped_window_of_torch_sgd(accelerate):
    """The reference: torch.optim.SGD + torch.amp.GradScaler, Accelerate
    accumulating. optimizer_step_was_skipped is true after the skipped window
    and the prepared scheduler steps 7 times in 8 windows."""
    got, reported, sched_steps = accelerate_skip_run(accelerate, 1, "torch", sgd=True)
    assert reported == SKIP_REPORTED
    assert sched_steps == WINDOWS - 1 == 7
    assert_same_run(got, reference(scaled=True, inf_at=INF_AT, skip_aware=True))


@pytest.mark.parametrize("case", ACCELERATE_SKIP_CASES)
def test_accelerate_does_not_see_a_fused_skip_by_default(accelerate, case):
    """The documented default: the fused step is always called, so Accelerate
    reports no skip and steps its scheduler after the skipped window too (as it
    does for torch's fused optimizers). The update itself was skipped (one lr
    fewer, the scale backed off): the run is the reference loop whose scheduler
    steps in every window."""
    got, reported, sched_steps = accelerate_skip_run(accelerate, *ACCELERATE_SKIP_CASES[case])
    assert reported == [False] * WINDOWS
    assert sched_steps == WINDOWS == 8
    assert_same_run(got, reference(scaled=True, inf_at=INF_AT))


@pytest.mark.parametrize("case", ACCELERATE_SKIP_CASES)
def test_report_skips_under_accelerate(accelerate, case):
    """report_skips(a_opt) after prepare(): Accelerate reports the skipped
    window and does not step its scheduler there, exactly as with torch's
    SGD: same reports, same scheduler steps, same parameters."""
    got, reported, sched_steps = accelerate_skip_run(accelerate, *ACCELERATE_SKIP_CASES[case], report=True)
    assert reported == SKIP_REPORTED
    assert sched_steps == WINDOWS - 1 == 7
    assert_same_run(got, reference(scaled=True, inf_at=INF_AT, skip_aware=True))


def test_report_skips_reads_the_flag_once_per_window_and_never_in_step(accelerate, monkeypatch):
    """Recipe 2 with report_skips: step() makes no host read (Tensor.item) of
    its own; the prepared scheduler's step at a boundary makes one, and asking
    again in that window (accelerator.optimizer_step_was_skipped) none."""
    reads = []
    item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append(t) or item(t))
    counts = []  # per micro-batch: host reads in a_opt.step(), in sched.step(), in asking again
    reported = []

    def after_step(a_opt, sched, boundary):
        in_step = len(reads)
        if boundary:
            sched.step()
        in_sched = len(reads)
        reported.append(a_opt.step_was_skipped)
        counts.append((in_step, in_sched - in_step, len(reads) - in_sched))

    accelerate_skip_run(accelerate, 2, "fastaccum", report=True, before_step=reads.clear, after_step=after_step)
    assert counts == [(0, 1, 0) if (i + 1) % K == 0 else (0, 0, 0) for i in range(MICRO_BATCHES)]
    assert reported == [(i + 1) % K == 0 and i // K == INF_AT // K for i in range(MICRO_BATCHES)]


def test_report_skips_survives_pickling_and_needs_an_accum_optimizer(accelerate):
    """A pickled copy of a reporting AcceleratedOptimizer reports too; one
    hook however often report_skips is called; clear errors otherwise."""
    import pickle

    accelerator = accelerate.Accelerator(cpu=True)
    accelerator.scaler = GradScaler("cpu", **SCALER)
    model = make_mlp(seed=0)
    _, a_opt = accelerator.prepare(model, AccumOptimizer(model.parameters(), accumulation_steps=1, **HYPER))
    report_skips(report_skips(a_opt))  # twice: one hook
    clone = pickle.loads(pickle.dumps(a_opt))
    assert type(clone) is type(a_opt) and isinstance(clone, accelerate.optimizer.AcceleratedOptimizer)
    for opt in (a_opt, clone):  # a skipped step, through Accelerate's step()
        opt.scaler.scale(torch.ones(()))
        for p in opt.optimizer.param_groups[0]["params"]:
            p.grad = torch.full_like(p, float("inf"))
        opt.step()
        assert opt.step_was_skipped and step_was_skipped(opt.optimizer)
    assert len(a_opt.optimizer._optimizer_step_pre_hooks) == 1
    with pytest.raises(RuntimeError, match="report_skips"):
        step_was_skipped(AccumOptimizer(make_mlp().parameters()))
    with pytest.raises(TypeError, match="AccumOptimizer"):
        report_skips(torch.optim.SGD(make_mlp().parameters()))


# ---------------------------------------------------------------------------
# Lightning
# ---------------------------------------------------------------------------


@pytest.fixture
def lightning():
    return pytest.importorskip("lightning")


def lightning_fit(L, tmp_path, *, opt_k, scheduler=None, manual=False, keep_grads_in_validation=False,
                  sgd=False, inf_at=None, fastaccum_hooks=False, **trainer_kw):
    """Fit a LightningModule around the MLP on the micro-batches, one epoch.

    ``scheduler``: the lr_scheduler config (without the scheduler) that
    configure_optimizers returns, or None. ``manual``: manual optimization,
    the scheduler stepped in training_step after a boundary step(). ``sgd``:
    torch.optim.SGD instead of AccumOptimizer. ``inf_at``: that batch's loss
    is multiplied by inf. ``fastaccum_hooks``: the module uses this package's
    configure_gradient_clipping and lr_scheduler_step, with report_skips(opt)."""
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
            if batch_idx == inf_at:
                loss = loss * float("inf")
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
            if fastaccum_hooks:
                lightning_configure_gradient_clipping(self, optimizer, gradient_clip_val, gradient_clip_algorithm)
            else:
                super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

        if fastaccum_hooks:
            lr_scheduler_step = lightning_lr_scheduler_step  # as the README assigns it

        def configure_optimizers(self):
            if sgd:
                opt = torch.optim.SGD(self.parameters(), foreach=False, **HYPER)
            else:
                opt = AccumOptimizer(self.parameters(), accumulation_steps=opt_k, **HYPER)
            if fastaccum_hooks:
                report_skips(opt)
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
    AccumOptimizer, which unscales inside step() (this package's hook clips:
    test_lightning_gradient_clip_val_with_fastaccum_hook)."""
    from lightning.pytorch.plugins import MixedPrecision

    _, _, module = lightning_fit(lightning, tmp_path, opt_k=1, accumulate_grad_batches=K, gradient_clip_val=1.0)
    assert module.clips == MICRO_BATCHES // K
    _, _, module = lightning_fit(lightning, tmp_path, opt_k=K, gradient_clip_val=1.0)
    assert module.clips == MICRO_BATCHES
    fp16 = MixedPrecision("16-mixed", "cpu", scaler=GradScaler("cpu", **SCALER))
    with pytest.raises(RuntimeError, match="gradient clipping"):
        lightning_fit(lightning, tmp_path, opt_k=1, accumulate_grad_batches=K, gradient_clip_val=1.0, plugins=[fp16])


# -- skipped windows under Lightning (issue 27, item 5) -------------------------
#
# Lightning steps an interval="step" scheduler on its own count of batches, and
# never asks whether the update was skipped: after the skipped window it steps
# the scheduler with torch's SGD + torch.amp.GradScaler too. AccumOptimizer
# matches that by default; lightning_lr_scheduler_step (with report_skips) does
# not step it there, as Accelerate does for torch's SGD.

LIGHTNING_SKIP_CASES = {
    # id: (lightning_fit arguments, the scaler in Lightning's MixedPrecision)
    "lightning-accumulates-torch-scaler": (dict(opt_k=1, accumulate_grad_batches=K, scheduler={"interval": "step"}),
                                           "torch"),
    "lightning-accumulates-fastaccum-scaler": (dict(opt_k=1, accumulate_grad_batches=K,
                                                    scheduler={"interval": "step"}), "fastaccum"),
    "optimizer-accumulates-fastaccum-scaler": (dict(opt_k=K, scheduler={"interval": "step", "frequency": K}),
                                               "fastaccum"),
}


def lightning_skip_fit(L, tmp_path, case, **kw):
    from lightning.pytorch.plugins import MixedPrecision

    fit_kw, scaler = LIGHTNING_SKIP_CASES[case]
    plugins = [MixedPrecision("16-mixed", "cpu", scaler=make_scaler(scaler))]
    return lightning_fit(L, tmp_path, inf_at=INF_AT, plugins=plugins, **fit_kw, **kw)


def test_lightning_steps_the_scheduler_after_a_skipped_window_of_torch_sgd(lightning, tmp_path):
    """The reference: torch's SGD + torch.amp.GradScaler, Lightning accumulating
    in "16-mixed". The update of the second window is skipped (7 updates), yet
    the interval="step" scheduler steps 8 times, as global_step counts."""
    got, trainer, module = lightning_skip_fit(lightning, tmp_path, "lightning-accumulates-torch-scaler", sgd=True)
    assert trainer.global_step == module.sched.last_epoch == WINDOWS
    assert_same_run(got, reference(scaled=True, autocast=True, inf_at=INF_AT))


@pytest.mark.parametrize("case", LIGHTNING_SKIP_CASES)
def test_lightning_steps_the_scheduler_after_a_fused_skip_by_default(lightning, tmp_path, case):
    """AccumOptimizer without the hook: the same as torch's SGD (the update
    skipped, the scheduler stepped in all 8 windows)."""
    got, _, module = lightning_skip_fit(lightning, tmp_path, case)
    assert module.sched.last_epoch == WINDOWS
    assert_same_run(got, reference(scaled=True, autocast=True, inf_at=INF_AT))


@pytest.mark.parametrize("case", LIGHTNING_SKIP_CASES)
def test_lightning_lr_scheduler_step_skips_after_a_skipped_window(lightning, tmp_path, case):
    """lr_scheduler_step = lightning_lr_scheduler_step, report_skips(opt) in
    configure_optimizers: the scheduler does not step after the skipped window
    (7 steps), and the run is the reference loop whose scheduler skips it too."""
    got, trainer, module = lightning_skip_fit(lightning, tmp_path, case, fastaccum_hooks=True)
    assert module.sched.last_epoch == WINDOWS - 1
    assert trainer.global_step == (WINDOWS if case.startswith("lightning") else MICRO_BATCHES)
    assert_same_run(got, reference(scaled=True, autocast=True, inf_at=INF_AT, skip_aware=True))


# -- clipping under Lightning (issue 27, item 6) --------------------------------

MAX_NORM = 0.5  # the windows' mean-gradient norms run 0.40-0.74: 6 of 8 are clipped
CLIP_VALUE = 0.1
CLIP_CASES = {
    # id: (lightning_fit arguments, the scaler in "16-mixed", or None for "32-true")
    "lightning-accumulates-32-true": (dict(opt_k=1, accumulate_grad_batches=K), None),
    "lightning-accumulates-16-mixed-torch-scaler": (dict(opt_k=1, accumulate_grad_batches=K), "torch"),
    "lightning-accumulates-16-mixed-fastaccum-scaler": (dict(opt_k=1, accumulate_grad_batches=K), "fastaccum"),
    "optimizer-accumulates-32-true": (dict(opt_k=K), None),
    "optimizer-accumulates-16-mixed-fastaccum-scaler": (dict(opt_k=K), "fastaccum"),
}


def reference_clipped(algorithm, scaled) -> Run:
    """The plain-torch loop with clipping: SGD, ``(loss / K).backward()``, and
    every K-th micro-batch torch's GradScaler ``unscale_`` (if scaled), then
    ``clip_grad_norm_(MAX_NORM)`` or ``clip_grad_value_(CLIP_VALUE)``, step."""
    model = make_mlp(seed=0)
    if scaled:
        model = Fp16Autocast(model)
    opt = torch.optim.SGD(model.parameters(), foreach=False, **HYPER)
    lrs = record_updates(opt)
    scaler = torch.amp.GradScaler("cpu", **SCALER) if scaled else None
    clipped = 0
    for i, (x, y) in enumerate(batches()):
        loss = loss_of(model, x, y) / K
        (loss if scaler is None else scaler.scale(loss)).backward()
        if (i + 1) % K:
            continue
        if scaler is not None:
            scaler.unscale_(opt)
        params = list(model.parameters())
        if algorithm == "norm":
            clipped += bool(torch.nn.utils.clip_grad_norm_(params, MAX_NORM) > MAX_NORM)
        else:
            clipped += any(bool((p.grad.abs() > CLIP_VALUE).any()) for p in params)
            torch.nn.utils.clip_grad_value_(params, CLIP_VALUE)
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()
    assert clipped >= WINDOWS // 2, "clipping must change most updates, or the comparison is vacuous"
    return finished(model, lrs, scaler)


def assert_close_run(got: Run, want: Run):
    """A fused clip computes the norm in its own summation order: parameters
    agree to rounding, not bit for bit."""
    assert got.lrs == want.lrs, "updates (one lr per update) differ"
    assert got.scale == want.scale
    for i, (a, b) in enumerate(zip(got.params, want.params)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m: f"param {i}: {m}")


@pytest.mark.parametrize("algorithm", ["norm", "value"])
@pytest.mark.parametrize("case", CLIP_CASES)
def test_lightning_gradient_clip_val_with_fastaccum_hook(lightning, tmp_path, case, algorithm):
    """configure_gradient_clipping = lightning_configure_gradient_clipping:
    Trainer(gradient_clip_val=...) clips the window's unscaled mean gradient at
    each boundary, fused for "norm", also in "16-mixed", where Lightning's own
    hook refuses AccumOptimizer; the run is the plain-torch clipping loop's."""
    from lightning.pytorch.plugins import MixedPrecision

    fit_kw, scaler = CLIP_CASES[case]
    kw = {} if scaler is None else {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=make_scaler(scaler))]}
    clip_val = MAX_NORM if algorithm == "norm" else CLIP_VALUE
    got, _, module = lightning_fit(lightning, tmp_path, fastaccum_hooks=True, gradient_clip_val=clip_val,
                                   gradient_clip_algorithm=algorithm, **fit_kw, **kw)
    assert module.clips == (MICRO_BATCHES if fit_kw["opt_k"] == K else WINDOWS)  # asked on every step()
    want = reference_clipped(algorithm, scaled=scaler is not None)
    assert_close_run(got, want)
    assert_params_differ(got, reference(scheduler=False, scaled=scaler is not None, autocast=scaler is not None))


def test_package_imports_without_accelerate_or_lightning():
    """The framework helpers import neither framework: with both (and
    pytorch_lightning) made not installed, torch_fastaccum imports, and its
    helpers work on a plain AccumOptimizer."""
    import subprocess
    import sys

    from _module_hider import hider_source

    code = hider_source(["accelerate", "lightning", "pytorch_lightning"]) + (
        "import torch, torch_fastaccum as fa\n"
        "opt = fa.report_skips(fa.AccumOptimizer([torch.nn.Parameter(torch.ones(2))]))\n"
        "assert fa.step_was_skipped(opt) is False\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in HIDDEN]\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
