"""The CUDA kernels' own code, run on the CPU by the host emulator.

No GPU is needed: tests/emulator/programs.py compiles the kernel headers
(csrc/cuda/*.cuh: functors, metadata fill, chunk loop, block reduction,
launcher) against csrc/emulator instead of the CUDA runtime, with ASan and
UBSan, and the programs compare every result with a sequential reference from
csrc/sgd_math.h, bit for bit. See NOTE: [emulator model] in
csrc/emulator/cuda_emulator.h for what this does and does not model; the
kernels' behaviour on a real GPU is tests/test_cuda.py's business.

The five programs start together (two cores run them side by side) and each
test waits for its own.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "emulator"))
import programs as emulator_programs  # noqa: E402

if sys.platform != "linux":
    pytest.skip("the emulator's fibers use Linux ucontext and the sanitizers", allow_module_level=True)


@pytest.fixture(scope="module")
def running():
    exes = emulator_programs.build()
    procs = {name: emulator_programs.start(exe) for name, exe in exes.items()}
    yield procs
    for p in procs.values():
        if p.poll() is None:
            p.kill()


@pytest.mark.parametrize("program", emulator_programs.PROGRAMS)
def test_emulated_program(running, program):
    rc, output = emulator_programs.finish(running[program])
    summary = [line for line in output.splitlines() if "case(s)" in line]
    assert rc == 0, f"{program} failed (exit {rc}):\n{output[-6000:]}"
    assert summary and " 0 failed" in summary[-1], output[-3000:]
    # Every case ran: a program that registered none would pass vacuously.
    assert sum(line.startswith("ok ") for line in output.splitlines()) >= 6, output[-3000:]
