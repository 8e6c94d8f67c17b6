"""The README's code blocks run as written (on the CPU: "cuda" becomes "cpu"
and fp16 autocast bf16), against a small model and loader defined here."""

import os
import re

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_blocks():
    with open(os.path.join(ROOT, "README.md")) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_usage_example_trains():
    block = next(b for b in _python_blocks() if "AccumOptimizer(model.parameters()" in b and "for x, y in loader" in b)
    code = block.replace('"cuda"', '"cpu"').replace("torch.float16", "torch.bfloat16")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(4, 8, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(12)]
    before = [p.detach().clone() for p in model.parameters()]
    scope = {"torch": torch, "model": model, "loader": loader, "loss_fn": torch.nn.CrossEntropyLoss()}
    exec(compile(code, "README.md", "exec"), scope)
    opt = scope["opt"]
    assert opt.accumulation_steps == 4 and opt._micro_step == 12  # 3 updates of 4 micro-batches
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_ddp_recipe_runs_on_a_plain_model():
    # accumulate() is a no-op for a model that is not DDP; the loop must run as written.
    block = next(b for b in _python_blocks() if "DistributedDataParallel(model)" in b)
    code = block.replace("model = DistributedDataParallel(model)\n", "").replace('"cuda"', '"cpu"')
    model = torch.nn.Linear(5, 2)
    loader = [(torch.randn(3, 5), torch.randint(0, 2, (3,))) for _ in range(6)]
    import torch_fastaccum

    # The recipe continues the usage block, whose import line it does not repeat.
    scope = {"torch": torch, "model": model, "loader": loader, "loss_fn": torch.nn.CrossEntropyLoss(), "K": 3,
             "AccumOptimizer": torch_fastaccum.AccumOptimizer, "GradScaler": torch_fastaccum.GradScaler}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["opt"]._micro_step == 6


def test_cpu_usage_example_runs_as_written():
    # The bf16 CPU block is complete: it runs with no names supplied, and its
    # 2 updates are the reference loop's (loss / 4, clip the mean, SGD).
    block = next(b for b in _python_blocks() if 'torch.autocast("cpu"' in b)
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    opt, model = scope["opt"], scope["model"]
    assert opt.accumulation_steps == 4 and opt._micro_step == 8

    setup = block.split("\nfor x, y in batches:")[0]  # same seed: same model and data
    ref_scope = {}
    exec(compile(setup, "README.md", "exec"), ref_scope)
    ref_model, batches = ref_scope["model"], ref_scope["batches"]
    before = [p.detach().clone() for p in ref_model.parameters()]
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    for i, (x, y) in enumerate(batches):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(ref_model(x), y)
        (loss / 4).backward()
        if (i + 1) % 4 == 0:
            torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 1.0)
            ref_opt.step()
            ref_opt.zero_grad()
    for p, r, b in zip(model.parameters(), ref_model.parameters(), before):
        assert not torch.equal(r, b)
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)


def test_launch_count_block_prints_what_it_says():
    # Each call in the "CUDA launches" block is followed by its result as a
    # comment: the comment must be what the call returns here.
    import ast

    block = next(b for b in _python_blocks() if "cuda_launch_count(" in b)
    scope = {"torch": torch}
    lines = block.splitlines()
    checked = 0
    for line, nxt in zip(lines, lines[1:] + [""]):
        if not line.startswith("from ") and "cuda_launch_count(" in line and nxt.startswith("# {"):
            exec(compile("\n".join(b for b in lines if b.startswith("from ")), "README.md", "exec"), scope)
            assert eval(line, scope) == ast.literal_eval(nxt[2:]), line
            checked += 1
    assert checked == 2
