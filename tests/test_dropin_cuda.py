"""Drop-in checks that need CUDA: params spread over two GPUs, CPU
checkpoints resumed on a GPU, CPU and GPU steps agreeing, the GradScaler
hand-over on the GPU, a step's peak memory, and a tensor past 2**31
elements. Each skips, with its reason, where its hardware is missing.

(The CUDA cases of the parity, state-dict and API modules: DEVICES in
tests/_helpers.py; the CUDA kernels themselves: tests/test_cuda.py.)
"""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from torch import nn

from _dropin import Float32Shadow, assert_same, half_step_tolerance, net_batch, sgd, small_net_pair, train, values
from torch_fastaccum import AccumOptimizer

HAS_CUDA = torch.cuda.is_available()
GPUS = torch.cuda.device_count() if HAS_CUDA else 0
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device; none here")
requires_two_gpus = pytest.mark.skipif(GPUS < 2, reason=f"needs two CUDA devices; {GPUS} here")
BIG = 2**32 + 5  # elements: index arithmetic past 2**31
requires_big_gpu = pytest.mark.skipif(
    not HAS_CUDA or torch.cuda.get_device_properties(0).total_memory < 5 * BIG * 2,
    reason="needs a CUDA device with room for a 2**32-element float16 param, grad and buffer (40 GiB)",
)

KW = dict(lr=0.05, momentum=0.9, weight_decay=0.01)
SETTINGS = {
    "plain": dict(lr=0.05),
    "momentum-wd": KW,
    "nesterov-maximize": dict(lr=0.02, momentum=0.9, nesterov=True, maximize=True, weight_decay=0.1),
    "dampening-tensor-lr": dict(lr=torch.tensor(0.03), momentum=0.8, dampening=0.5),
}
# CUDA code may contract a*b+c into fused multiply-adds where torch's does
# not: one step from the same point agrees to about one unit in the last place.
GPU_TOL = dict(rtol=1e-5, atol=1e-6)


def half_tol(dtype):
    return half_step_tolerance(dtype, exact=False)



@requires_two_gpus
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_params_on_two_gpus(setting):
    """A weight on cuda:0 and a bias on cuda:1, under a StepLR: SGD's steps,
    and the loss moves the way the setting asks."""
    runs = []
    for make in (sgd, AccumOptimizer):
        torch.manual_seed(81)
        weight = nn.Parameter(torch.randn(6, 4, device="cuda:0"))
        bias = nn.Parameter(torch.randn(6, device="cuda:1"))
        x = torch.randn(4, device="cuda:0")
        opt = make([weight, bias], **copy.deepcopy(SETTINGS[setting]))
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
        losses = []
        for _ in range(20):
            opt.zero_grad()
            loss = ((weight @ x).to("cuda:1") + bias).pow(2).sum()
            loss.backward()
            losses.append(loss.item())
            opt.step()
            sched.step()
        runs.append((losses, values([weight, bias])))
    (ref_losses, ref_params), (losses, params) = runs
    assert_same(params, ref_params, "params", **GPU_TOL)
    assert (losses[-1] > losses[0]) if SETTINGS[setting].get("maximize") else (losses[-1] < losses[0])


@requires_two_gpus
def test_mixed_devices_and_dtypes_in_one_group():
    """float64/float32/float16/bfloat16 params on cuda:0 and cuda:1 in one
    group: full precision as SGD's, half types as SGD's float32 step rounded."""
    dtypes = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
    params = [nn.Parameter(torch.rand(2, 3, dtype=dt, device=dev)) for dev in ("cuda:0", "cuda:1") for dt in dtypes]
    full = [p for p in params if p.dtype in (torch.float64, torch.float32)]
    refs = [nn.Parameter(p.detach().clone()) for p in full]
    ours = AccumOptimizer(params, **KW)
    ref = sgd(refs, **KW)
    shadows = [Float32Shadow([p], KW) for p in params if p.dtype in (torch.float16, torch.bfloat16)]
    for step in range(5):
        for p in params:
            p.grad = torch.randn_like(p)
        for p, r in zip(full, refs):
            r.grad = p.grad.clone()
        for shadow in shadows:
            shadow.step(ours)
        ours.step()
        ref.step()
        assert_same(values(full), values(refs), f"step {step} full-precision params", **GPU_TOL)
        for shadow in shadows:
            want, _ = shadow.expected()
            assert_same(values(shadow.ours), want, f"step {step} half params", **half_tol(shadow.ours[0].dtype))


@requires_cuda
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_cpu_checkpoint_resumes_on_cuda(setting):
    """A CPU checkpoint (saved with fused=True in its groups) loads into an
    optimizer over CUDA copies of the params, leaving the given dict as it
    was; CPU and CUDA then continue alike."""
    cpu_net, _ = small_net_pair(seed=82)
    cpu_opt = AccumOptimizer(cpu_net.parameters(), **copy.deepcopy(SETTINGS[setting]))
    train(cpu_opt, cpu_net, [net_batch(seed=300 + i) for i in range(3)])
    ckpt = copy.deepcopy(cpu_opt.state_dict())
    for g in ckpt["param_groups"]:
        g["fused"] = True
    untouched = copy.deepcopy(ckpt)

    gpu_net = copy.deepcopy(cpu_net).cuda()
    gpu_opt = AccumOptimizer(gpu_net.parameters(), **copy.deepcopy(SETTINGS[setting]), fused=True)
    gpu_opt.load_state_dict(ckpt)
    assert_same(ckpt, untouched, "the checkpoint after loading it", rtol=0, atol=0)
    for p in gpu_net.parameters():
        for v in gpu_opt.state.get(p, {}).values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                assert v.is_cuda
    for i in range(4):
        x, y = net_batch(seed=310 + i)
        train(cpu_opt, cpu_net, [(x, y)])
        train(gpu_opt, gpu_net, [(x.cuda(), y.cuda())])
    assert_same([p.cpu() for p in gpu_net.parameters()], values(cpu_net.parameters()), "params", **GPU_TOL)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_cpu_and_cuda_steps_agree(setting, dtype):
    """The same model on CPU and CUDA: each step agrees (from the same point:
    the CUDA side is set back to the CPU values after every comparison)."""
    cpu_net, _ = small_net_pair(dtype=dtype, seed=83)
    gpu_net = copy.deepcopy(cpu_net).cuda()
    cpu_opt = AccumOptimizer(cpu_net.parameters(), **copy.deepcopy(SETTINGS[setting]))
    gpu_opt = AccumOptimizer(gpu_net.parameters(), **copy.deepcopy(SETTINGS[setting]))
    tol = GPU_TOL if dtype in (torch.float32, torch.float64) else half_tol(dtype)
    for i in range(5):
        x, y = net_batch(dtype=dtype, seed=320 + i)
        train(cpu_opt, cpu_net, [(x, y)])
        for p, q in zip(gpu_net.parameters(), cpu_net.parameters()):  # the same gradients on both
            p.grad = q.grad.cuda()
        gpu_opt.step()
        assert_same([p.cpu() for p in gpu_net.parameters()], values(cpu_net.parameters()), f"step {i}", **tol)
        with torch.no_grad():
            for p, q in zip(gpu_net.parameters(), cpu_net.parameters()):
                p.copy_(q)
                if "momentum_buffer" in gpu_opt.state.get(p, {}):
                    gpu_opt.state[p]["momentum_buffer"].copy_(cpu_opt.state[q]["momentum_buffer"])


@requires_cuda
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_found_inf_on_cuda_leaves_params_alone(setting):
    params = [nn.Parameter(torch.ones(7, device="cuda")) for _ in range(3)]
    for p in params:
        p.grad = torch.ones_like(p)
    opt = AccumOptimizer(params, **copy.deepcopy(SETTINGS[setting]))
    for grad_scale in (None, torch.ones((), device="cuda")):
        opt.grad_scale = grad_scale
        opt.found_inf = torch.ones((), device="cuda")
        opt.step()
        del opt.grad_scale, opt.found_inf
        assert all(torch.equal(p.detach(), torch.ones_like(p)) for p in params)
    assert opt.state_dict()["state"] == {}


@requires_cuda
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_default_flags_on_cuda_take_the_same_step(setting):
    """On CUDA torch's SGD picks its foreach path when foreach is left unset;
    AccumOptimizer keeps foreach=None in its groups, runs its fused kernels,
    and its steps are those of SGD's single-tensor path."""
    runs = []
    for make in (sgd, AccumOptimizer):
        torch.manual_seed(84)
        params = [nn.Parameter(torch.randn(s, device="cuda")) for s in ((7, 3), (129,), ())]
        kw = copy.deepcopy(SETTINGS[setting])
        opt = make(params, **kw)
        gen = torch.Generator().manual_seed(85)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).cuda()
            opt.step()
        runs.append((values(params), opt.param_groups[0]["foreach"]))
    (ref_params, ref_foreach), (params, foreach) = runs
    assert ref_foreach is False and foreach is None
    assert_same(params, ref_params, "params", **GPU_TOL)


@requires_cuda
def test_step_peak_memory_within_sgds_plus_one_param():
    """A step allocates at most one param-sized intermediate more than SGD's
    single-tensor step."""
    peaks = []
    for make in (sgd, AccumOptimizer):
        params = [torch.rand(256, 64, device="cuda", requires_grad=True) for _ in range(10)]
        for p in params:
            p.grad = torch.rand_like(p)
        opt = make(params, **KW)
        opt.step()  # buffers exist from here on
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        opt.step()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        del opt, params
    assert peaks[1] <= peaks[0] + 256 * 64 * 4


@requires_big_gpu
def test_param_past_2_to_the_31_elements():
    p = nn.Parameter(torch.ones(BIG, dtype=torch.float16, device="cuda"))
    p.grad = torch.ones_like(p)
    opt = AccumOptimizer([p], lr=0.25, momentum=0.9)
    opt.step()
    torch.cuda.synchronize()
    for i in (0, 2**31 - 1, 2**31, 2**32, BIG - 1):
        assert p[i].item() == 0.75, i
    del opt, p
    torch.cuda.empty_cache()
