"""The emulator tests can fail: each deliberate break of the kernel code in
tests/emulator/mutations.py (a tail bound off by one, the block reduction's
barrier removed, the alignment test skipped, the step counters advanced
before the update reads them, a step-counter or norm ticket off by one or
not reset, a launch table reused after its pointers changed, a clipped grad
not written back, the norm's partials misnumbered across launches or one
left out, the chunk loop's 8-byte packs taken or dropped wrongly) is built in
a copy of csrc/ and must make the emulator test program that covers it fail.

The mutants build two at a time while the tests wait for their own.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "emulator"))
import mutations  # noqa: E402

if sys.platform != "linux":
    pytest.skip("the emulator's fibers use Linux ucontext and the sanitizers", allow_module_level=True)


@pytest.fixture(scope="module")
def results():
    pool = ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1)))
    futures = {m.name: pool.submit(mutations.run, m) for m in mutations.MUTATIONS}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("name", [m.name for m in mutations.MUTATIONS])
def test_mutation_is_caught(results, name):
    caught, evidence = results[name].result(timeout=900)
    assert caught, f"the emulator tests did not notice mutation {name}: {evidence}"
