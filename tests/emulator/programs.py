"""Builds and runs the emulator test programs (tests/emulator/test_*.cpp).

Each program includes the CUDA kernel headers (csrc/cuda/*.cuh) with the host
emulator (csrc/emulator) in place of the CUDA runtime, and is built with
AddressSanitizer and UndefinedBehaviorSanitizer, every finding fatal. Builds
are cached under build/emulator/<hash of flags and sources>, so a second run
with nothing changed starts at once.

    python tests/emulator/programs.py            # build, then run every program
    python tests/emulator/programs.py --only test_fused_sgd_kernel -- --only fp16

tests/test_cuda_kernels_emulated.py runs them under pytest (and so in CI).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PROGRAMS = ("test_cuda_emulator", "test_fused_sgd_kernel", "test_nonfinite_check_kernel",
            "test_norm_check_kernel", "test_chunk_loop")
RUNTIME = "csrc/emulator/cuda_emulator.cpp"

# -O1 keeps the sanitizers fast enough; -ffp-contract=off keeps the kernels'
# and the reference's roundings identical (both are host code here).
FLAGS = [
    "-std=c++20", "-O1", "-g", "-fno-omit-frame-pointer", "-ffp-contract=off",
    "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
    "-Wall", "-Wextra", "-Wno-unknown-pragmas",
]
# Fibers switch stacks; ASan knows (the emulator tells it), but its
# use-after-return check keeps fake frames per stack that fibers would share.
# No leak check: the kernels allocate nothing, and LeakSanitizer fails in
# some sandboxes (under ptrace) for reasons of its own.
RUN_ENV = {
    "ASAN_OPTIONS": "detect_stack_use_after_return=0:detect_leaks=0:abort_on_error=1",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}


def torch_include() -> str:
    from torch.utils.cpp_extension import include_paths

    return include_paths()[0]


def compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    return cxx


def _sources(root: Path) -> list[Path]:
    files = [p for p in (root / "csrc").rglob("*") if p.suffix in (".h", ".cuh", ".cpp")]
    files += [p for p in (root / "tests" / "emulator").glob("*") if p.suffix in (".h", ".cpp")]
    return sorted(files)


def build_key(root: Path, cxx: str, include: str) -> str:
    h = hashlib.sha256()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    h.update("\0".join([cxx, version, include, *FLAGS]).encode())
    for p in _sources(root):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def build(root: Path = ROOT, programs=PROGRAMS, out_dir: Path | None = None, log=print) -> dict[str, Path]:
    """Compiles the runtime and `programs` (in parallel) from the sources
    under `root`; returns {program: executable}. Raises on a failed build."""
    cxx, include = compiler(), torch_include()
    key = build_key(root, cxx, include)
    out = out_dir or (ROOT / "build" / "emulator" / key)
    exes = {name: out / name for name in programs}
    if all(p.exists() for p in exes.values()):
        return exes
    if out_dir is None:  # builds of older sources are of no further use
        for old in out.parent.glob("*"):
            if old.is_dir() and old != out:
                shutil.rmtree(old, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    common = [cxx, *FLAGS, "-isystem", include]
    jobs = {"cuda_emulator.o": [*common, "-c", str(root / RUNTIME), "-o", str(out / "cuda_emulator.o")]}
    for name in programs:
        jobs[name + ".o"] = [*common, "-c", str(root / "tests" / "emulator" / (name + ".cpp")),
                             "-o", str(out / (name + ".o"))]
    t0 = time.perf_counter()
    log(f"building {len(programs)} emulator test program(s) with {Path(cxx).name} "
        f"(ASan+UBSan) in {out} ...")
    _run_parallel(jobs)
    for name in programs:
        cmd = [cxx, "-fsanitize=address,undefined", str(out / (name + ".o")), str(out / "cuda_emulator.o"),
               "-o", str(exes[name])]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"linking {name} failed:\n{r.stderr}")
    log(f"built in {time.perf_counter() - t0:.0f} s")
    return exes


def _run_parallel(jobs: dict[str, list[str]]) -> None:
    width = max(1, os.cpu_count() or 1)
    pending = list(jobs.items())
    running: list[tuple[str, subprocess.Popen]] = []
    errors = []
    while pending or running:
        while pending and len(running) < width:
            name, cmd = pending.pop(0)
            running.append((name, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                   text=True)))
        name, proc = running.pop(0)
        output, _ = proc.communicate()
        if proc.returncode != 0:
            errors.append(f"compiling {name} failed:\n{output}")
    if errors:
        raise RuntimeError("\n".join(errors))


def start(exe: Path, args=(), seed: int | None = None) -> subprocess.Popen:
    """Starts a built program; read its result with finish()."""
    env = dict(os.environ, **RUN_ENV)
    seed = seed if seed is not None else int(os.environ.get("FASTACCUM_EMU_SEED", "1"))
    return subprocess.Popen([str(exe), "--seed", str(seed), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    output, _ = proc.communicate(timeout=timeout)
    return proc.returncode, output


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=PROGRAMS, help="program(s) to build and run")
    ap.add_argument("--seed", type=int, default=None, help="emulator seed (default $FASTACCUM_EMU_SEED or 1)")
    ap.add_argument("args", nargs="*", help="arguments for the programs, after --")
    a = ap.parse_args(argv)
    exes = build(programs=a.only or PROGRAMS)
    procs = {name: start(exe, a.args, a.seed) for name, exe in exes.items()}
    worst = 0
    for name, proc in procs.items():
        rc, output = finish(proc)
        print(f"===== {name}: exit {rc}\n{output}")
        worst = worst or rc
    return worst


if __name__ == "__main__":
    sys.exit(main())
