"""What a result file records about its run (so that two files can be told
apart and traced back to code), and where it is written (never over an
earlier run's files)."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUFFIXES = (".json", ".md", ".png")


def package_version() -> str | None:
    """torch_fastaccum.__version__, else the installed distribution's version."""
    try:
        import torch_fastaccum

        v = getattr(torch_fastaccum, "__version__", None)
        if v:
            return str(v)
    except ImportError:
        pass
    try:
        from importlib import metadata

        return metadata.version("torch_fastaccum")
    except Exception:
        return None


def git_state(path: str = ROOT) -> dict:
    """{"commit", "dirty"} of the git checkout holding `path`; both None when
    `path` is not in a checkout (an unpacked sdist, say) or git is missing.
    dirty: tracked files differ from the commit (untracked files do not
    count: result folders and build outputs live there)."""
    def git(*args):
        return subprocess.run(["git", "-C", path, *args], capture_output=True, text=True, timeout=20)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        status = git("status", "--porcelain", "--untracked-files=no")
        dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
        return {"commit": head.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.*)", f.read())
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def last_level_cache_bytes(device: str) -> tuple[str, int | None]:
    """("L3", bytes) of the CPU (sysfs, Linux) or ("L2", bytes) of the GPU;
    None where it cannot be read."""
    if device == "cuda":
        try:
            return "L2", int(torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size)
        except Exception:
            return "L2", None
    best = None
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in os.listdir(base):
            try:
                with open(os.path.join(base, idx, "level")) as f:
                    level = int(f.read())
                with open(os.path.join(base, idx, "size")) as f:
                    size = f.read().strip()
            except (OSError, ValueError):
                continue
            m = re.fullmatch(r"(\d+)([KMG]?)", size)
            if not m:
                continue
            nbytes = int(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)]
            if best is None or level > best[0]:
                best = (level, nbytes)
    except OSError:
        pass
    if best is None:
        return "L3", None
    return f"L{best[0]}", best[1]


def machine(device: str) -> dict:
    """The hardware and software a run measured."""
    info = {
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
    }
    try:
        info["cpu_kernels"] = torch.ops.fastaccum._cpu_capability()
    except Exception:
        info["cpu_kernels"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    name, size = last_level_cache_bytes(device)
    info["last_level_cache"] = name
    info["last_level_cache_bytes"] = size
    return info


def loadavg() -> float | None:
    """The 1-minute load average (None where the OS has none): a run made
    while it exceeds the CPU count shared the cores with other work."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def run_info(argv: list[str], args, started: dt.datetime) -> dict:
    """Code version, command line and time of a run."""
    return {
        "package": "torch_fastaccum",
        "package_version": package_version(),
        "git": git_state(),
        "argv": list(argv),
        "sys_argv": list(sys.argv),
        "args": {k: v for k, v in sorted(vars(args).items())},
        "date": started.date().isoformat(),
        "datetime": started.isoformat(timespec="seconds"),
        "loadavg_start": loadavg(),
    }


def unique_stem(folder: str, base: str) -> str:
    """folder/base, or folder/base-2, -3, ...: the first stem none of whose
    .json/.md/.png exists yet. The .json is created here (exclusively), so
    two runs started at once cannot pick the same stem."""
    n = 1
    while True:
        stem = os.path.join(folder, base if n == 1 else f"{base}-{n}")
        if not any(os.path.exists(stem + s) for s in SUFFIXES):
            try:
                with open(stem + ".json", "x"):
                    pass
                return stem
            except FileExistsError:
                pass
        n += 1
