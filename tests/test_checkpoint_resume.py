"""Checkpoint / resume.

1. Resume in a FRESH PROCESS: one uninterrupted run (AccumOptimizer, K=4,
   GradScaler, momentum + dampening + weight decay, an inf in the first window
   and a NaN in window 3) saves checkpoints (torch.save of model state,
   optimizer state_dict, scaler state_dict and the current .grads) at every
   position of a window -- 0..3 micro-batches into it (0 = right at a
   boundary, after the boundary step), after backward but before step
   (including just before the boundary step), inside the skipped first window
   and inside a window whose grads already hold a NaN. For each checkpoint a
   new Python process (tests/_resume_worker.py) builds everything from scratch,
   loads it and trains to the end; its final parameters, optimizer state, scaler
   state and skip/scale history must equal the uninterrupted run's bit for bit
   (the same code on the same machine, single-threaded: deterministic).
2. load_state_dict with a mismatched parameter count, group count or buffer
   shape raises ValueError and changes nothing (params, state, micro counter).
3. A torch.optim.SGD (+ torch.amp.GradScaler) checkpoint taken mid-training
   loads into AccumOptimizer (+ our GradScaler) and the reverse; the continued
   run matches the uninterrupted reference.
"""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import _resume_common as C
from _helpers import assert_params_close, make_batches, make_mlp, run_ours, run_ref
from torch_fastaccum import AccumOptimizer, GradScaler

pytestmark = pytest.mark.usefixtures("single_thread")

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_resume_worker.py")
SUBPROCESS_TIMEOUT_S = 90
PARALLEL = 2

SAVE_POINTS = {
    "w0-pos2-inf-in-grads": (2, "before_zero_grad"),
    "w1-pos0-right-at-boundary": (4, "before_zero_grad"),
    "w1-pos0-after-backward": (4, "before_step"),
    "w1-pos1": (5, "before_zero_grad"),
    "w1-pos2": (6, "before_zero_grad"),
    "w1-pos3": (7, "before_zero_grad"),
    "w1-pos3-after-backward-before-boundary-step": (7, "before_step"),
    "w3-pos2-nan-in-grads": (14, "before_zero_grad"),
}


def _equal_nested(a, b, path="sd"):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), f"{path}: {type(a)} vs {type(b)}"
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert torch.equal(a, b) or (a.isnan() == b.isnan()).all() and torch.equal(a.nan_to_num(), b.nan_to_num()), (
            f"{path}: tensors differ (max abs diff {(a - b).abs().max().item()})"
        )
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            _equal_nested(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: lengths differ"
        for j, (x, y) in enumerate(zip(a, b)):
            _equal_nested(x, y, f"{path}[{j}]")
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def _run_workers(jobs):
    """jobs: name -> (ckpt, out). At most PARALLEL processes at a time, each
    bounded by SUBPROCESS_TIMEOUT_S. Returns name -> (returncode, output)."""
    pending = list(jobs.items())
    running = {}
    results = {}
    while pending or running:
        while pending and len(running) < PARALLEL:
            name, (ckpt, out) = pending.pop(0)
            p = subprocess.Popen(
                [sys.executable, WORKER, str(ckpt), str(out)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            running[name] = (p, time.monotonic())
        for name, (p, t0) in list(running.items()):
            if p.poll() is not None:
                results[name] = (p.returncode, p.stdout.read())
                del running[name]
            elif time.monotonic() - t0 > SUBPROCESS_TIMEOUT_S:
                p.kill()
                p.wait()
                results[name] = (None, f"timed out after {SUBPROCESS_TIMEOUT_S} s\n" + p.stdout.read())
                del running[name]
        time.sleep(0.02)
    return results


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        wanted = {pos: name for name, pos in SAVE_POINTS.items()}
        saved = {}

        model = C.make_model()
        opt, scaler = C.build(model)

        def on_position(i, phase):
            name = wanted.get((i, phase))
            if name is not None:
                ck = C.checkpoint(model, opt, scaler)
                ck["position"] = [i, phase]
                path = d / f"{name}.pt"
                torch.save(ck, path)
                saved[name] = path

        trace = C.train(model, opt, scaler, C.data(), on_position=on_position)
        full = C.final_state(model, opt, scaler, trace)
        assert set(saved) == set(SAVE_POINTS)

        # the same run without saving anything: state_dict() must not perturb training
        m2 = C.make_model()
        o2, s2 = C.build(m2)
        clean = C.final_state(m2, o2, s2, C.train(m2, o2, s2, C.data()))

        jobs = {name: (path, d / f"{name}.out.pt") for name, path in saved.items()}
        t0 = time.monotonic()
        procs = _run_workers(jobs)
        elapsed = time.monotonic() - t0
    finally:
        torch.set_num_threads(n_threads)
    resumed = {}
    for name, (rc, output) in procs.items():
        resumed[name] = torch.load(jobs[name][1]) if rc == 0 else (rc, output)
    return dict(full=full, clean=clean, resumed=resumed, elapsed=elapsed)


def test_uninterrupted_run_matches_torch_reference(resume_runs):
    full = resume_runs["full"]
    ref_m = C.make_model()
    ref_opt, t_ref = run_ref(
        ref_m, C.data(), C.K, opt_kwargs=C.OPT_KW,
        scaler=torch.amp.GradScaler("cpu", **C.SCALER_KW), inject=dict(C.FAULTS),
    )
    assert [t[2] for t in full["trace"]] == t_ref.skipped == [True, False, False, True, False, False]
    assert [t[:2] for t in full["trace"]] == t_ref.scales
    assert_params_close(full["params"], ref_m.parameters())
    init = list(C.make_model().parameters())
    assert max((a - b).abs().max().item() for a, b in zip(full["params"], init)) > 1e-3


def test_saving_checkpoints_does_not_perturb_training(resume_runs):
    _equal_nested(resume_runs["full"], resume_runs["clean"], "full-vs-clean")


@pytest.mark.parametrize("name", list(SAVE_POINTS))
def test_resume_in_fresh_process_is_identical(resume_runs, name):
    res = resume_runs["resumed"][name]
    if isinstance(res, tuple):
        pytest.fail(f"resume worker failed (rc={res[0]}):\n{res[1][-4000:]}")
    full = resume_runs["full"]
    i, _ = SAVE_POINTS[name]
    # bit-identical parameters, momentum buffers, micro counter, scaler state
    for j, (a, b) in enumerate(zip(res["params"], full["params"])):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"param {j}: {m}")
    _equal_nested(res["opt"], full["opt"], "optimizer.state_dict()")
    _equal_nested(res["scaler"], full["scaler"], "scaler.state_dict()")
    # the boundaries after the save point: same skips and scale history
    assert res["trace"] == full["trace"][i // C.K :]


# ---------------------------------------------------------------------------
# mismatched state dicts: ValueError, nothing changed
# ---------------------------------------------------------------------------

KW = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2)


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf)


def _trained(hidden=16, n=10, K=4, seed=1, depth=1):
    """An AccumOptimizer left mid-window (n % K != 0) with momentum state."""
    if depth == 1:
        m = make_mlp(seed=seed, hidden=hidden)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            m = torch.nn.Sequential(torch.nn.Linear(10, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, hidden),
                                    torch.nn.Tanh(), torch.nn.Linear(hidden, 3))
    opt, _ = run_ours(m, make_batches("mlp", n, seed=seed + 1), K, opt_kwargs=KW)
    return m, opt


def _bad_state_dicts():
    """name -> a state dict that must not load into _trained()'s optimizer."""
    out = {}
    _, deeper = _trained(depth=2, n=5)  # 6 params instead of 4
    out["param-count"] = deeper.state_dict()
    _, wider = _trained(hidden=12, n=9)  # 4 params, other shapes
    out["buffer-shapes"] = wider.state_dict()
    _, good = _trained(n=5)
    sd = good.state_dict()
    last = max(sd["state"])
    sd["state"][last]["momentum_buffer"] = torch.zeros(7)  # only the last buffer is wrong
    out["last-buffer-shape-only"] = sd
    sd = good.state_dict()
    sd["param_groups"] = sd["param_groups"] + [copy.deepcopy(sd["param_groups"][0])]
    out["group-count"] = sd
    sd = good.state_dict()
    sd["accumulation"] = {**sd["accumulation"], "micro_step": -3}
    out["negative-micro-step"] = sd
    return out


BAD = list(_bad_state_dicts())
# the error must say what is wrong
BAD_MATCH = {
    "param-count": r"(?i)size|match",
    "buffer-shapes": r"(?i)shape",
    "last-buffer-shape-only": r"(?i)shape",
    "group-count": r"(?i)group",
    "negative-micro-step": r"micro_step",
}


@pytest.mark.parametrize("which", BAD)
def test_mismatched_state_dict_raises_and_changes_nothing(which):
    bad = _roundtrip(_bad_state_dicts()[which])
    K = 4
    m, opt = _trained(n=10)  # mid-window: 2 micro-batches into window 2
    twin_m, twin_opt = _trained(n=10)
    assert not opt.is_accumulation_boundary
    params_before = [p.detach().clone() for p in m.parameters()]
    sd_before = copy.deepcopy(opt.state_dict())
    groups_before = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    grads_before = [p.grad.clone() for p in m.parameters()]

    with pytest.raises(ValueError, match=BAD_MATCH[which]):
        opt.load_state_dict(bad)

    for a, b in zip(m.parameters(), params_before):
        assert torch.equal(a.detach(), b)
    for a, b in zip(m.parameters(), grads_before):
        assert torch.equal(a.grad, b)
    _equal_nested(opt.state_dict(), sd_before, "state_dict after failed load")
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups_before
    assert len(opt.param_groups) == 1 and len(opt.param_groups[0]["params"]) == 4
    assert opt.state_dict()["accumulation"]["micro_step"] == 10
    # and training continues exactly like a twin that never saw the bad load
    rest = make_batches("mlp", 14, seed=50)
    run_ours(m, rest, K, opt=opt, start=10)
    run_ours(twin_m, rest, K, opt=twin_opt, start=10)
    assert_params_close(m.parameters(), twin_m.parameters(), rtol=0, atol=0)


# ---------------------------------------------------------------------------
# SGD <-> AccumOptimizer checkpoints (with their scalers), mid-training
# ---------------------------------------------------------------------------

INTER_K = 4
INTER_WINDOWS = 12
INTER_KW = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
INTER_SCALER = dict(init_scale=2.0**10, growth_interval=2)
# window 0 skipped (no momentum yet), window 5 skipped
INTER_FAULTS = {2: "inf", 5 * INTER_K + 3: "nan"}


def _inter_data():
    return make_batches("mlp", INTER_K * INTER_WINDOWS, seed=31)


@pytest.mark.parametrize("at_window", [1, 6], ids=["after-skipped-first-window", "after-6-windows"])
def test_sgd_checkpoint_into_accum_optimizer_continues_identically(at_window):
    K = INTER_K
    cut = at_window * K
    batches = _inter_data()

    full = make_mlp(seed=30, hidden=24)
    _, t_full = run_ref(full, batches, K, opt_kwargs=INTER_KW, scaler=torch.amp.GradScaler("cpu", **INTER_SCALER),
                        inject=INTER_FAULTS)

    m = make_mlp(seed=30, hidden=24)
    sc = torch.amp.GradScaler("cpu", **INTER_SCALER)
    sgd, t = run_ref(m, batches[:cut], K, opt_kwargs=INTER_KW, scaler=sc, inject=INTER_FAULTS)
    ckpt = _roundtrip({"model": m.state_dict(), "opt": sgd.state_dict(), "scaler": sc.state_dict()})
    if at_window == 1:
        assert ckpt["opt"]["state"] == {}  # the only window so far was skipped

    m2 = make_mlp(seed=77, hidden=24)
    m2.load_state_dict(ckpt["model"])
    ours = AccumOptimizer(m2.parameters(), accumulation_steps=K, lr=1.0)
    ours.load_state_dict(ckpt["opt"])
    s2 = GradScaler("cpu")
    s2.load_state_dict(ckpt["scaler"])
    assert ours.param_groups[0]["lr"] == INTER_KW["lr"] and ours.param_groups[0]["nesterov"]
    assert ours.is_accumulation_boundary is (K == 1)
    run_ours(m2, batches[cut:], K, opt=ours, scaler=s2, inject=INTER_FAULTS, trace=t, start=cut)
    assert t.skipped == t_full.skipped and t.scales == t_full.scales
    assert_params_close(m2.parameters(), full.parameters())


@pytest.mark.parametrize("at_window", [1, 6], ids=["after-skipped-first-window", "after-6-windows"])
def test_accum_checkpoint_into_sgd_continues_identically(at_window):
    K = INTER_K
    cut = at_window * K
    batches = _inter_data()

    full = make_mlp(seed=30, hidden=24)
    _, t_full = run_ref(full, batches, K, opt_kwargs=INTER_KW, scaler=torch.amp.GradScaler("cpu", **INTER_SCALER),
                        inject=INTER_FAULTS)

    m = make_mlp(seed=30, hidden=24)
    sc = GradScaler("cpu", **INTER_SCALER)
    ours, t = run_ours(m, batches[:cut], K, opt_kwargs=INTER_KW, scaler=sc, inject=INTER_FAULTS)
    ckpt = _roundtrip({"model": m.state_dict(), "opt": ours.state_dict(), "scaler": sc.state_dict()})
    if at_window == 1:
        assert ckpt["opt"]["state"] == {}  # skipped first window: no momentum_buffer, as SGD

    m2 = make_mlp(seed=77, hidden=24)
    m2.load_state_dict(ckpt["model"])
    sgd = torch.optim.SGD(m2.parameters(), lr=1.0, momentum=0.1, foreach=False)
    sgd.load_state_dict(ckpt["opt"])
    s2 = torch.amp.GradScaler("cpu")
    s2.load_state_dict(ckpt["scaler"])
    run_ref(m2, batches[cut:], K, opt=sgd, scaler=s2, inject=INTER_FAULTS, trace=t, start=cut)
    assert t.skipped == t_full.skipped and t.scales == t_full.scales
    assert_params_close(m2.parameters(), full.parameters())


def test_checkpoint_from_other_accumulation_steps_is_consistent():
    """A checkpoint saved with accumulation_steps=4 (mid-window) loaded into an
    optimizer built with accumulation_steps=2. torch's load_state_dict restores
    the saved hyper-parameters, so either the optimizer adopts K=4 everywhere
    (behaviour, param_groups and state_dict agree) and continues exactly like
    the uninterrupted K=4 run, or it refuses with a ValueError and changes
    nothing. What it must not do is report one K and run another."""
    batches = make_batches("mlp", 16, seed=41)
    full = make_mlp(seed=40)
    run_ours(full, batches, 4, opt_kwargs=KW)

    m = make_mlp(seed=40)
    opt4, _ = run_ours(m, batches[:6], 4, opt_kwargs=KW)
    ckpt = _roundtrip({"model": m.state_dict(), "opt": opt4.state_dict(),
                       "grads": [p.grad for p in m.parameters()]})

    m2 = make_mlp(seed=0)
    m2.load_state_dict(ckpt["model"])
    opt = AccumOptimizer(m2.parameters(), accumulation_steps=2, **KW)
    try:
        opt.load_state_dict(ckpt["opt"])
    except ValueError:
        assert opt.accumulation_steps == 2
        assert all(g["accumulation_steps"] == 2 for g in opt.param_groups)
        assert opt.state_dict()["accumulation"]["micro_step"] == 0 and opt.state_dict()["state"] == {}
        return
    reported = {
        "property": opt.accumulation_steps,
        "defaults": opt.defaults["accumulation_steps"],
        "param_groups": [g["accumulation_steps"] for g in opt.param_groups],
        "state_dict": opt.state_dict()["accumulation"].get("accumulation_steps"),
        "state_dict groups": [g["accumulation_steps"] for g in opt.state_dict()["param_groups"]],
    }
    assert reported == {"property": 4, "defaults": 4, "param_groups": [4], "state_dict": 4,
                        "state_dict groups": [4]}, f"inconsistent accumulation_steps after the load: {reported}"
    for p, g in zip(m2.parameters(), ckpt["grads"]):
        p.grad = g
    run_ours(m2, batches[6:], 4, opt=opt, start=6)
    assert_params_close(m2.parameters(), full.parameters(), rtol=0, atol=0)
