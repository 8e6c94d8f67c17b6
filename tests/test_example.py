"""The seed-pipeline example runs end to end in its quick mode, with our
optimizer and with the torch reference, and prints its per-class report."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "train_seed_pipeline.py")


@pytest.mark.parametrize("extra", [[], ["--reference"]], ids=["fastaccum", "torch-reference"])
def test_seed_pipeline_quick(extra):
    proc = subprocess.run(
        [sys.executable, EXAMPLE, "--quick", "--workers", "2", *extra],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert ("torch.optim.SGD" if extra else "AccumOptimizer") in out
    rows = [line for line in out.splitlines() if re.match(r"\s+\d+\s+\d\.\d{3}\s+\d\.\d{3}\s+\d\.\d{3}\s+\d+$", line)]
    assert len(rows) == 10, out  # one precision/recall/F1 row per class
    assert sum(int(r.split()[-1]) for r in rows) == 256  # every test image counted once
    accuracy = float(re.search(r"accuracy (\d\.\d+)", out).group(1))
    assert 0.0 <= accuracy <= 1.0
    assert "100%" in proc.stderr  # the progress bar reached the end


def test_seed_pipeline_help_lists_every_option():
    out = subprocess.run([sys.executable, EXAMPLE, "--help"], capture_output=True, text=True, timeout=60).stdout
    for opt in ("--reference", "--quick", "--epochs", "--train-size", "--batch-size", "--accumulation-steps",
                "--lr", "--workers", "--device", "--seed"):
        assert opt in out
