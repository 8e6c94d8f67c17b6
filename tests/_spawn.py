"""Start the ranks of a distributed test worker as separate processes on
127.0.0.1 and a free port, bounded in time: a hang fails the test instead of
hanging CI. Each rank writes OUT/rank{R}.pt; their output goes to
OUT/rank{R}.log and into the failure message. run_rank is the workers' side:
their entry point."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import traceback

import pytest
import torch


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(worker: str, world: int, out_dir, args: list[str], timeout_s: float, what: str) -> list:
    """Run `world` ranks of `worker` with --rank/--port/--out and `args`;
    return what each rank saved, or fail with their output."""
    port = free_port()
    procs, logs = [], []
    for rank in range(world):
        log = open(os.path.join(out_dir, f"rank{rank}.log"), "w+")
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [sys.executable, worker, "--rank", str(rank), "--port", str(port), "--out", str(out_dir), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    deadline = time.monotonic() + timeout_s
    timed_out = False
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
    if timed_out:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    report = "\n".join(f"--- rank {r} (rc={p.returncode}) ---\n{o[-4000:]}" for r, (p, o) in enumerate(zip(procs, outputs)))
    if timed_out:
        pytest.fail(f"{what} workers did not finish within {timeout_s} s (hang?)\n{report}")
    if any(p.returncode != 0 for p in procs):
        pytest.fail(f"{what} workers failed\n{report}")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]


def run_rank(main) -> None:
    """A worker's `if __name__ == "__main__"`: main(), then exit at once, 1
    with the traceback on any error. Interpreter teardown after gloo (and
    DCP) sometimes aborts ("terminate called without an active exception")
    once the results are written and the group is destroyed: it is skipped."""
    try:
        main()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
