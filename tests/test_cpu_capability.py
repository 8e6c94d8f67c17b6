"""Both CPU kernel builds (baseline x86-64 and AVX2, csrc/cpu/kernels_*.cpp)
compute the same results as a float64 torch reference: each build runs in its
own process, picked with FASTACCUM_CPU_CAPABILITY."""

import os
import subprocess
import sys

import pytest
import torch

import torch_fastaccum  # noqa: F401

SIZES = [0, 1, 7, 8, 15, 16, 17, 33, 1000, 65537]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

SCRIPT = r"""
import sys, torch, torch_fastaccum
out = {"capability": torch.ops.fastaccum._cpu_capability(), "cases": []}
g = torch.Generator().manual_seed(0)
for dtype in [torch.float32, torch.float64, torch.float16, torch.bfloat16]:
    params = [torch.randn(n, generator=g).to(dtype) for n in SIZES]
    grads = [torch.randn(n, generator=g).to(dtype) for n in SIZES]
    bufs = [torch.randn(n, generator=g).to(dtype) for n in SIZES]
    steps = [torch.full((), float(i % 2)) for i in range(len(SIZES))]
    inputs = [t.clone() for t in params + grads + bufs]
    torch.ops.fastaccum.fused_sgd_(params, grads, bufs, steps, lr=0.1, weight_decay=0.01,
        momentum=0.9, dampening=0.1, nesterov=False, maximize=True, grad_factor=0.25,
        grad_scale=torch.tensor(8.0))
    found, sumsq = torch.zeros(()), torch.zeros(())
    torch.ops.fastaccum.nonfinite_check_(grads, found, sumsq)
    bad = [t.clone() for t in grads]
    bad[-1][12345] = float("nan")
    found_bad = torch.zeros(())
    torch.ops.fastaccum.nonfinite_check_(bad, found_bad)
    out["cases"].append(dict(dtype=dtype, inputs=inputs, params=params, bufs=bufs, steps=steps,
                             found=found, sumsq=sumsq, found_bad=found_bad))
torch.save(out, sys.argv[1])
""".replace("SIZES", repr(SIZES))


def _run(capability: str, tmp_path) -> dict:
    path = tmp_path / f"{capability}.pt"
    env = dict(os.environ, FASTACCUM_CPU_CAPABILITY=capability)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], env=env, capture_output=True, text=True)
    if proc.returncode != 0 and "has no AVX2" in proc.stderr:
        pytest.skip(f"{capability}: this CPU or build has no AVX2")
    assert proc.returncode == 0, proc.stderr
    return torch.load(path, weights_only=False)


def _reference(case):
    n = len(SIZES)
    p0, g0, b0 = case["inputs"][:n], case["inputs"][n : 2 * n], case["inputs"][2 * n :]
    params, bufs = [], []
    inv = 0.25 / 8.0
    for i, (p, g, b) in enumerate(zip(p0, g0, b0)):
        p, g, b = p.double(), g.double(), b.double()
        g = -(g * inv)
        g = g + 0.01 * p
        b = g if i % 2 == 0 else 0.9 * b + 0.9 * g  # steps alternate 0 (first update) / 1
        params.append(p - 0.1 * b)
        bufs.append(b)
    return params, bufs


TOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_capability_build_matches_float64_reference(capability, tmp_path):
    out = _run(capability, tmp_path)
    assert out["capability"] == capability
    for case in out["cases"]:
        dtype = case["dtype"]
        ref_p, ref_b = _reference(case)
        tol = TOL[dtype]
        for got, want in zip(case["params"] + case["bufs"], ref_p + ref_b):
            assert got.dtype == dtype
            # One rounding to the storage dtype, plus float32 math for half types.
            torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
        assert [s.item() for s in case["steps"]] == [float(i % 2) + 1 for i in range(len(SIZES))]
        assert case["found"].item() == 0.0 and case["found_bad"].item() == 1.0
        grads = case["inputs"][len(SIZES) : 2 * len(SIZES)]
        want_sumsq = sum(float((g.double() ** 2).sum()) for g in grads)
        assert abs(case["sumsq"].item() - want_sumsq) <= 1e-5 * want_sumsq


def test_capabilities_agree(tmp_path):
    a, b = _run("default", tmp_path), _run("avx2", tmp_path)
    for ca, cb in zip(a["cases"], b["cases"]):
        for x, y in zip(ca["params"] + ca["bufs"], cb["params"] + cb["bufs"]):
            # FMA contraction may differ by one rounding.
            torch.testing.assert_close(x, y, rtol=TOL[ca["dtype"]], atol=TOL[ca["dtype"]])


def test_unknown_capability_is_a_clear_error(tmp_path):
    env = dict(os.environ, FASTACCUM_CPU_CAPABILITY="avx9000")
    proc = subprocess.run(
        [sys.executable, "-c", "import torch, torch_fastaccum; torch.ops.fastaccum._cpu_capability()"],
        env=env, capture_output=True, text=True,
    )
    assert proc.returncode != 0
    assert "FASTACCUM_CPU_CAPABILITY must be 'default' or 'avx2'" in proc.stderr
