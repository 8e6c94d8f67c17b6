"""The fused clip norm at scale, against a float64 reference.

torch's ``_foreach_norm`` was once silently wrong for long tensor lists and
large tensors (pytorch/pytorch#140066). Here ``opt.clip_grad_norm_`` and
``scaler.clip_grad_norm_`` (fastaccum::norm_check_) are checked:

* in CI: 12,000+ grads of varied sizes (empty ones, ones spanning several
  16K-element CPU chunks, magnitudes over six decades) in float32, bfloat16,
  float16 and float64 groups; a few seconds.
* with FASTACCUM_BIG_TESTS=1 only (4-9 GiB of memory, a minute or two on 2
  cores): one bfloat16 grad of more than 2^31 elements (64-bit indexing
  within a tensor), and float32 grads of more than 2^31 elements in all.

Tolerance (L2). The kernel squares x in the opmath type (float32 for
float32/bf16/fp16 grads; float64 for float64), sums each SIMD lane over at
most 64 vectors (kFlush) in that type, then adds the lane sums in float64;
the (device, dtype) partial is stored as float32 (float64 for float64
grads), the partials are added in float64 and the norm is rounded to the
grads' promoted dtype. With u = 2^-24, every term non-negative: a lane sum
is off by at most 64u relative (63 additions and the rounding of each
square), the float32 partial adds u, so the sum of squares is within 66u and
its square root within 33u; the final float32 rounding adds u: 34u, 2.0e-6.
Float64 accumulation errors (< 1e-12 here) are below that by far. The inf
norm involves no rounding: it must be exact.
"""

from __future__ import annotations

import functools
import math
import os
import time

import pytest
import torch

from torch_fastaccum import AccumOptimizer, GradScaler

U32 = 2.0**-24
L2_RTOL = 34 * U32
BIG = os.environ.get("FASTACCUM_BIG_TESTS") == "1"
requires_big = pytest.mark.skipif(
    not BIG, reason="set FASTACCUM_BIG_TESTS=1: grads of > 2^31 elements, 4-9 GiB of memory, minutes on 2 cores"
)


# --------------------------------------------------------------------------
# the reference
# --------------------------------------------------------------------------


def reference_norm(grads, norm_type: float, mul: float = 1.0, piece: int = 1 << 26) -> float:
    """The norm of x = g * mul, x rounded to g's dtype (what .grad holds after
    an unscale), computed in float64, `piece` elements at a time (no float64
    copy of a large grad)."""
    sumsq, top = 0.0, 0.0
    wide = torch.empty(min(piece, max((g.numel() for g in grads), default=0)), dtype=torch.float64)
    for g in grads:
        flat = g.reshape(-1)
        for s in range(0, flat.numel(), piece):
            x = flat[s : s + piece]
            if mul != 1.0:
                x = (x * mul).to(g.dtype)
            if norm_type == math.inf:  # exact in any dtype
                lo, hi = x.aminmax() if x.numel() else (x.new_zeros(()), x.new_zeros(()))
                top = max(top, abs(lo.item()), abs(hi.item()))
            else:
                w = wide[: x.numel()]
                w.copy_(x)  # exact
                sumsq += torch.dot(w, w).item()
    return top if norm_type == math.inf else math.sqrt(sumsq)


def assert_norm(ours: torch.Tensor, ref: float, norm_type: float, what: str = "norm") -> float:
    """Returns the relative error."""
    got = ours.double().item()
    rel = abs(got - ref) / ref
    if norm_type == math.inf:
        assert got == ref, f"{what}: inf norm {got!r} != reference {ref!r}"
    else:
        assert rel <= L2_RTOL, f"{what}: {got!r} vs float64 {ref!r}: relative error {rel:.3g} > {L2_RTOL:.3g}"
    return rel


# --------------------------------------------------------------------------
# CI: many tensors
# --------------------------------------------------------------------------

# (dtype, number of grads) per param group; 12,600 in all.
GROUPS = ((torch.float32, 6000), (torch.bfloat16, 3000), (torch.float16, 3000), (torch.float64, 600))


def _sizes(n: int, gen: torch.Generator) -> list[int]:
    """Mostly 0-200 elements; every 50th empty, every 997th 20K-50K (several
    CPU chunks, an odd tail)."""
    sizes = torch.randint(1, 200, (n,), generator=gen).tolist()
    for i in range(0, n, 50):
        sizes[i] = 0
    for i in range(7, n, 997):
        sizes[i] = int(torch.randint(20_000, 50_000, (1,), generator=gen))
    return sizes


@functools.lru_cache(maxsize=None)
def many_params(groups: tuple, seed: int = 0, mul: float = 1.0) -> tuple[list[dict], list[torch.Tensor]]:
    """Param groups whose params hold grads of magnitudes 1e-3..1e3 (per
    tensor; times `mul`; the first group's last grad 1e4), in the order the optimizer sees them. Cached: the
    tests only read them."""
    gen = torch.Generator().manual_seed(seed)
    param_groups, grads = [], []
    for gi, (dtype, n) in enumerate(groups):
        params = []
        sizes = _sizes(n, gen)
        for i, size in enumerate(sizes):
            p = torch.nn.Parameter(torch.zeros(size, dtype=dtype))
            scale = 10.0 ** float(torch.empty(()).uniform_(-3, 3, generator=gen))
            if gi == 0 and i == len(sizes) - 1:
                scale = 1e4  # the largest |x| last in the longest list: dropping the list's end moves the inf norm too
            # fp16 stays finite: |x| < 65504
            g = (torch.randn(size, generator=gen, dtype=torch.float64) * scale).clamp(-6e4, 6e4).to(dtype)
            p.grad = g * mul  # mul: a power of two, exact
            params.append(p)
            grads.append(p.grad)
        param_groups.append({"params": params})
    assert sum(g.numel() == 0 for g in grads) > 200
    return param_groups, grads


@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["l2", "inf"])
def test_optimizer_clip_norm_of_many_grads(norm_type):
    groups, grads = many_params(GROUPS, seed=1)
    assert len(grads) >= 10_000
    opt = AccumOptimizer([dict(g) for g in groups], lr=0.1, momentum=0.9)
    norm = opt.clip_grad_norm_(1.0, norm_type)
    assert norm.dtype == torch.float64  # promoted with the float64 group
    assert_norm(norm, reference_norm(grads, norm_type), norm_type)


@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["l2", "inf"])
def test_scaler_clip_norm_of_many_grads(norm_type):
    """Through GradScaler (loss scale 2^10, K=2: x = g * 2^-10 * 1/2); fp16
    grads: torch's unscale_ refuses them, so float32 and bfloat16 only."""
    groups, grads = many_params(((torch.float32, 7000), (torch.bfloat16, 5000)), seed=2, mul=1024.0)
    opt = AccumOptimizer([dict(g) for g in groups], lr=0.1, accumulation_steps=2)
    scaler = GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.zeros(()))  # the scale is made here, as for a loss
    scaler.step(opt)  # the first micro-batch of the window; the grads are its sum already
    scaler.update()
    scaler.scale(torch.zeros(()))
    assert opt.is_accumulation_boundary and scaler.get_scale() == 1024.0
    norm = scaler.clip_grad_norm_(opt, 1.0, norm_type)
    assert norm.dtype == torch.float32
    assert_norm(norm, reference_norm(grads, norm_type, mul=1.0 / 2048), norm_type)
    assert opt._micro_step == 1  # nothing stepped


# The shapes of pytorch/pytorch#140066's first failing list (FSDP1 flat
# shards: large grads with empty ones between), scaled down 16x, and the
# same with the empty grads first and last.
SHARD_SIZES = {
    "issue": [307200, 307200, 307200, 153600, 0, 0, 307200],
    "ends": [0, 307200, 0, 153601, 0, 0, 16383, 16385, 0],
}


@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["l2", "inf"])
@pytest.mark.parametrize("sizes", list(SHARD_SIZES), ids=list(SHARD_SIZES))
def test_clip_norm_with_empty_grads_between_large_ones(sizes, norm_type):
    gen = torch.Generator().manual_seed(5)
    params = []
    for i, n in enumerate(SHARD_SIZES[sizes]):
        p = torch.nn.Parameter(torch.zeros(n))
        p.grad = torch.randn(n, generator=gen) * (i + 1)  # each grad weighs differently
        params.append(p)
    opt = AccumOptimizer(params, lr=0.1)
    norm = opt.clip_grad_norm_(1.0, norm_type)
    assert_norm(norm, reference_norm([p.grad for p in params], norm_type), norm_type)


# --------------------------------------------------------------------------
# FASTACCUM_BIG_TESTS=1: more than 2^31 elements
# --------------------------------------------------------------------------


def _rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):  # peak resident set
                return int(line.split()[1]) / 2**20
    return float("nan")


def _fill(t: torch.Tensor, gen: torch.Generator, scale: float, piece: int = 1 << 26) -> None:
    flat = t.view(-1)
    for s in range(0, flat.numel(), piece):
        e = min(flat.numel(), s + piece)
        flat[s:e].copy_(torch.randn(e - s, generator=gen).mul_(scale))


def _big_run(params_and_grads, norm_types, label, scaler_too: bool = False):
    """Clip norms of the given grads (plus one small float32 param, so that
    the returned norm is float32 whatever the big grads' dtype), each
    against the float64 reference; prints the numbers."""
    small = torch.nn.Parameter(torch.zeros(3))
    small.grad = torch.tensor([0.5, -0.25, 0.125])
    params = [p for p, _ in params_and_grads]
    grads = [g for _, g in params_and_grads] + [small.grad]
    total = sum(g.numel() for g in grads)
    assert total > 2**31
    rows = []
    for norm_type in norm_types:
        opt = AccumOptimizer([{"params": params}, {"params": [small]}], lr=0.1)
        t0 = time.perf_counter()
        norm = opt.clip_grad_norm_(1.0, norm_type)
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = reference_norm(grads, norm_type)
        t_ref = time.perf_counter() - t0
        rel = assert_norm(norm, ref, norm_type, f"{label} opt.clip_grad_norm_ {norm_type}")
        rows.append((f"opt {norm_type}", norm.item(), ref, rel, t_ours, t_ref))
    if scaler_too:  # x = g * 2^-4: the rounding path of the kernel
        opt = AccumOptimizer([{"params": params}, {"params": [small]}], lr=0.1)
        t0 = time.perf_counter()
        scaler = GradScaler("cpu", init_scale=16.0)
        scaler.scale(torch.zeros(()))
        norm = scaler.clip_grad_norm_(opt, 1.0)
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = reference_norm(grads, 2.0, mul=1 / 16)
        t_ref = time.perf_counter() - t0
        rel = assert_norm(norm, ref, 2.0, f"{label} scaler.clip_grad_norm_")
        rows.append(("scaler 2.0", norm.item(), ref, rel, t_ours, t_ref))
    print(f"\n{label}: {len(grads)} grads, {total} elements ({total / 2**31:.4f} x 2^31), "
          f"{torch.get_num_threads()} threads, peak RSS {_rss_gib():.2f} GiB")
    for name, ours, ref, rel, t_ours, t_ref in rows:
        print(f"  {name:10s} ours {ours!r:<22} fp64 {ref!r:<22} rel {rel:.3g}  "
              f"ours {t_ours:.2f} s  reference {t_ref:.2f} s")


@requires_big
def test_big_single_grad_over_2_pow_31_elements():
    """One bfloat16 grad of 2^31 + 2^20 + 7 elements (4 GiB); the elements
    past 2^31 are 8x larger, so a 32-bit index that drops or wraps them
    moves the norm by far more than the tolerance (and so would the inf
    norm: the largest |x| is among them)."""
    n = 2**31 + 2**20 + 7
    gen = torch.Generator().manual_seed(3)
    p = torch.nn.Parameter(torch.empty(n, dtype=torch.bfloat16))  # never read: its pages stay unallocated
    g = torch.empty(n, dtype=torch.bfloat16)
    _fill(g[: 2**31], gen, 1.0)
    _fill(g[2**31 :], gen, 8.0)
    p.grad = g
    _big_run([(p, g)], [2.0, math.inf], "single bf16 grad", scaler_too=True)


@requires_big
def test_big_total_over_2_pow_31_elements():
    """Four float32 grads of 2^29 + 4099 elements each (8 GiB in all): more
    than 2^31 elements over the list, each under it. Equal magnitudes but
    the last: 131K chunk partials of about one size, the sum most prone to
    lose bits if added in float32."""
    gen = torch.Generator().manual_seed(4)
    pairs = []
    for i in range(4):
        n = 2**29 + 4099
        p = torch.nn.Parameter(torch.empty(n))
        g = torch.empty(n)
        _fill(g, gen, 2.0 if i == 3 else 1.0)  # the largest |x| in the last grad
        p.grad = g
        pairs.append((p, g))
    _big_run(pairs, [2.0, math.inf], "four fp32 grads", scaler_too=True)
