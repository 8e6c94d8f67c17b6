"""Shows that the emulator tests can fail: each mutation below breaks the
kernel code the way a real bug would, in a copy of csrc/, and the emulator
test program that covers it must then fail (a sanitizer finding, an emulator
abort or a result that differs from the reference).

    python tests/emulator/mutations.py            # all of them, 2 at a time
    python tests/emulator/mutations.py --list
    python tests/emulator/mutations.py missing_block_sum_barrier

tests/test_cuda_emulator_mutations.py runs them under pytest. Exit status 0
when every mutation was caught.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import programs as emulator_programs

ROOT = emulator_programs.ROOT


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once
    new: str
    program: str


ADVANCE = ("    if (mode.tables == nullptr && !a.skipped)\n"
           "      advance_steps(l.steps, l.count, a.found_inf, mode.arg_bytes, stream);\n")
UPDATE_CALL = "    multi_tensor_apply_in<3, true>(mode, kUpdateMomentumTable, lists, stream,\n"
READ_STEP = "    const float step = kMomentum ? *c.step : 1.f;\n"

MUTATIONS = [
    Mutation(
        "tail_load_bound",
        "the strided tail loop loads element n (i <= n)",
        "csrc/cuda/chunk_loop.cuh",
        "r[k][d] = (i < n && ",
        "r[k][d] = (i <= n && ",
        "test_fused_sgd_kernel",
    ),
    Mutation(
        "tail_store_bound",
        "the strided tail loop updates and stores element n (i <= n)",
        "csrc/cuda/chunk_loop.cuh",
        "      if (i < n) {\n        op(r[k]);",
        "      if (i <= n) {\n        op(r[k]);",
        "test_fused_sgd_kernel",
    ),
    Mutation(
        "missing_block_sum_barrier",
        "block_sum reads the warp sums without waiting for them (__syncthreads removed)",
        "csrc/cuda/block_reduce.cuh",
        "  if (lane == 0) warp_sums[warp] = v;\n  __syncthreads();\n",
        "  if (lane == 0) warp_sums[warp] = v;\n",
        "test_nonfinite_check_kernel",
    ),
    Mutation(
        "alignment_test_skipped",
        "the 16-byte alignment test is skipped: misaligned lists take the vector path",
        "csrc/cuda/chunk_loop.cuh",
        "    if ((mask >> d) & 1u) bits |= reinterpret_cast<uintptr_t>(ptrs[d]);",
        "    if ((mask >> d) & 1u) (void)ptrs[d];",
        "test_fused_sgd_kernel",
    ),
    Mutation(
        "steps_advanced_before_update",
        "the step counters are advanced by a launch queued before the update",
        "csrc/cuda/fused_sgd_kernel.cuh",
        UPDATE_CALL,
        ADVANCE + UPDATE_CALL,
        "test_fused_sgd_kernel",
    ),
    Mutation(
        "steps_advanced_inside_update",
        "by value, each tensor's first chunk advances its step counter inside the update kernel",
        "csrc/cuda/fused_sgd_kernel.cuh",
        READ_STEP,
        READ_STEP + "    if (kMomentum && c.ticket == nullptr && c.start == 0 && threadIdx.x == 0) atomicAdd(c.step, 1.f);\n",
        "test_fused_sgd_kernel",
    ),
    Mutation(
        "ticket_before_every_read",
        "table mode: a block takes its tensor's ticket without waiting for all its threads to read the counter",
        "csrc/cuda/fused_sgd_kernel.cuh",
        "    __syncthreads();  // every thread of this block has read *c.step\n",
        "",
        "test_fused_sgd_kernel",
    ),
    Mutation(
        "last_ticket_off_by_one",
        "table mode: the counter is advanced by the block that takes the second-to-last ticket",
        "csrc/cuda/fused_sgd_kernel.cuh",
        "if (atomicAdd(c.ticket, 1u) == static_cast<unsigned>(c.chunks - 1)) {",
        "if (atomicAdd(c.ticket, 1u) + 2u == static_cast<unsigned>(c.chunks)) {",
        "test_fused_sgd_kernel",
    ),
    Mutation(
        "ticket_not_reset",
        "table mode: the last block leaves its tensor's ticket at the block count",
        "csrc/cuda/fused_sgd_kernel.cuh",
        "        *c.ticket = 0u;\n",
        "",
        "test_fused_sgd_kernel",
    ),
    Mutation(
        "empty_tensor_no_block",
        "table mode: an empty tensor gets no block, so its step counter never advances",
        "csrc/launch_plan.h",
        "    if (chunks == 0 && empty_gets_block) chunks = 1;\n",
        "",
        "test_fused_sgd_kernel",
    ),
    Mutation(
        "table_cache_ignores_contents",
        "the table cache reuses a table whose pointers changed",
        "csrc/cuda/launch_table.h",
        "e->buffer.bytes() >= total && e->mirror == content) {",
        "e->buffer.bytes() >= total) {",
        "test_fused_sgd_kernel",
    ),
    Mutation(
        "table_cache_ignores_anchor",
        "the table cache keys update tables without their params: two optimizers of one size share a table",
        "csrc/cuda/launch_table.h",
        "           anchor == o.anchor;",
        "           true;",
        "test_fused_sgd_kernel",
    ),
    Mutation(
        "norm_last_block_never_finishes",
        "table mode: no block of the norm pass recognises itself as the last",
        "csrc/cuda/norm_check_kernel.cuh",
        "last = atomicAdd(a.done, 1u) == gridDim.x - 1u ? 1u : 0u;",
        "last = atomicAdd(a.done, 1u) == gridDim.x ? 1u : 0u;",
        "test_norm_check_kernel",
    ),
    Mutation(
        "norm_ticket_not_reset",
        "table mode: the norm's call ticket is not reset, so the next call never finishes",
        "csrc/cuda/norm_check_kernel.cuh",
        "      *a.done = 0u;  // ready for the next call\n",
        "",
        "test_norm_check_kernel",
    ),
    Mutation(
        "clip_not_written_back",
        "with write_grads, a clip without an unscale leaves the grads unclipped",
        "csrc/cuda/fused_sgd_kernel.cuh",
        "a.write_grad && (h.scale_grad || h.clip_grad) ? 0b010u : 0u;",
        "a.write_grad && h.scale_grad ? 0b010u : 0u;",
        "test_fused_sgd_kernel",
    ),
    Mutation(
        "block_base_not_advanced",
        "every launch of a call numbers its blocks from 0: later launches overwrite the partials",
        "csrc/cuda/multi_tensor_apply.cuh",
        "        block_base += static_cast<int64_t>(launch.blocks.size());\n",
        "",
        "test_norm_check_kernel",
    ),
    Mutation(
        "norm_finish_drops_last_partial",
        "the finishing block of the norm stops one partial short",
        "csrc/cuda/norm_check_kernel.cuh",
        "for (int64_t i = threadIdx.x; i < count; i += blockDim.x)",
        "for (int64_t i = threadIdx.x; i + 1 < count; i += blockDim.x)",
        "test_norm_check_kernel",
    ),
    Mutation(
        "eight_byte_packs_on_4_byte_alignment",
        "lists only 4-byte aligned take the 8-byte pack path",
        "csrc/cuda/chunk_loop.cuh",
        "  if (sizeof(scalar_t) < 8 && bits % 8 == 0) return 8;",
        "  if (sizeof(scalar_t) < 8 && bits % 4 == 0) return 8;",
        "test_chunk_loop",
    ),
    Mutation(
        "partial_trip_unbounded",
        "the last, partial trip of packs runs as a full one: packs past the end are loaded and stored",
        "csrc/cuda/chunk_loop.cuh",
        "    for (; v < full; v += stride * kPacks)",
        "    for (; v < packs; v += stride * kPacks)",
        "test_chunk_loop",
    ),
    Mutation(
        "store_only_list_alignment_ignored",
        "the pack width is chosen from the loaded lists alone: a misaligned store-only list gets packs",
        "csrc/cuda/chunk_loop.cuh",
        "vector_bytes(ptrs, load | store)",
        "vector_bytes(ptrs, load)",
        "test_chunk_loop",
    ),
    Mutation(
        "eight_byte_path_dropped",
        "8-byte-aligned half and fp32 lists go to the scalar loop (right values, other threads)",
        "csrc/cuda/chunk_loop.cuh",
        "    if (bytes == 8) done = pack_loop<8, kPacks>(ptrs, n, load, store, op);",
        "    (void)bytes;",
        "test_chunk_loop",
    ),
]


def _copy_tree(dst: Path) -> None:
    shutil.copytree(ROOT / "csrc", dst / "csrc")
    shutil.copytree(ROOT / "tests" / "emulator", dst / "tests" / "emulator",
                    ignore=shutil.ignore_patterns("__pycache__"))


def apply(m: Mutation, root: Path) -> None:
    p = root / m.path
    text = p.read_text()
    if text.count(m.old) != 1:
        raise RuntimeError(f"{m.name}: the text to mutate occurs {text.count(m.old)} times in {m.path} "
                           "(expected once); update the mutation with the code")
    p.write_text(text.replace(m.old, m.new))
    if m.name == "steps_advanced_inside_update":  # and no separate launch
        p.write_text(p.read_text().replace(ADVANCE, ""))


def run(m: Mutation) -> tuple[bool, str]:
    """Builds the mutant and runs its program; (caught, evidence)."""
    with tempfile.TemporaryDirectory(prefix=f"fastaccum_mutant_{m.name}_") as tmp:
        root = Path(tmp)
        _copy_tree(root)
        apply(m, root)
        exes = emulator_programs.build(root, programs=(m.program,), out_dir=root / "build", log=lambda *_: None)
        rc, output = emulator_programs.finish(emulator_programs.start(exes[m.program], ["--fail-fast"]))
    if rc == 0:
        return False, "the program passed:\n" + output[-2000:]
    keep = [line for line in output.splitlines()
            if any(k in line for k in ("FAIL", "ERROR", "runtime error", "CUDA emulator", "SUMMARY"))]
    return True, f"exit {rc}: " + " | ".join(keep[:4])[:600]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="mutations to run (default: all)")
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args(argv)
    if a.list:
        for m in MUTATIONS:
            print(f"{m.name}: {m.what}")
        return 0
    chosen = [m for m in MUTATIONS if not a.names or m.name in a.names]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1))) as pool:
        results = list(pool.map(run, chosen))
    missed = 0
    for m, (caught, evidence) in zip(chosen, results):
        missed += not caught
        print(f"{'caught' if caught else 'MISSED'} {m.name} ({m.what}): {evidence}")
    print(f"{len(chosen) - missed}/{len(chosen)} mutations caught in {time.perf_counter() - t0:.0f} s")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
