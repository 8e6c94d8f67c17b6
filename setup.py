"""Builds torch_fastaccum._C with torch.utils.cpp_extension.

The build picks its backend by itself (torchao's rule, not a GPU probe): CPU and
CUDA sources when the installed torch has CUDA (torch.version.cuda) and nvcc is
found (CUDA_HOME); CPU sources alone otherwise. It prints which one it built.

Environment:
  USE_CUDA=0            force the CPU-only build
  TORCH_CUDA_ARCH_LIST  CUDA archs (default "8.0;9.0" when unset)
  MAX_JOBS              parallel compile jobs (ninja -j)
  NVCC_THREADS          nvcc --threads per job (default 4)
  DEBUG=1               -Og -g (nvcc: -O0 -g) instead of -O3 -g0
"""

import glob
import os
import sys

from setuptools import setup

def _isolated_build():
    # pip's isolated build runs setup.py in a throw-away environment holding
    # only [build-system].requires: a torch installed next to pip is invisible.
    return any("pip-build-env-" in p for p in sys.path)


try:
    import torch
    from torch.utils.cpp_extension import (
        CUDA_HOME,
        BuildExtension,
        CppExtension,
        CUDAExtension,
    )
except ImportError:  # pragma: no cover - the message is the point
    if _isolated_build():
        why = (
            "pip is building torch_fastaccum in an isolated environment, which cannot see the\n"
            "torch installed in your environment (this package builds against that torch, so\n"
            "torch is deliberately not a build requirement). Build without isolation:\n"
            "    pip install --no-build-isolation .      # regular install\n"
            "    pip install --no-build-isolation -e .   # editable install\n"
            "    pip wheel --no-build-isolation --no-deps -w dist .   # a wheel (or: make wheel)\n"
        )
    else:
        why = (
            "torch_fastaccum builds against the torch already installed in this environment,\n"
            "and there is none. Install torch first, then build without isolation:\n"
            "    pip install torch==2.13.0   # or the torch you use\n"
            "    pip install --no-build-isolation -e .\n"
        )
    sys.exit(
        why + "(An isolated build would need torch as a build requirement: pip would download the\n"
        "newest CUDA torch, gigabytes, and compile against an ABI you do not run.)"
    )

HERE = os.path.dirname(os.path.abspath(__file__))
DEBUG = os.getenv("DEBUG", "0") == "1"


def _want_cuda():
    if os.getenv("USE_CUDA", "1") == "0":
        return False, "USE_CUDA=0"
    if not torch.version.cuda:
        return False, "torch %s has no CUDA" % torch.__version__
    if CUDA_HOME is None:
        return False, "no nvcc found (CUDA_HOME unset)"
    return True, "torch CUDA %s, nvcc at %s" % (torch.version.cuda, CUDA_HOME)


def _sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


use_cuda, why = _want_cuda()
cpp_sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
cuda_sources = _sources("csrc/cuda/*.cu") if use_cuda else []
if use_cuda and not cuda_sources:
    use_cuda, why = False, "no CUDA sources yet"

# No -march=native: the wheel must run on any x86-64 CPU torch supports. The
# CPU kernels are memory-bound and reach bandwidth with the baseline ISA (see
# benchmarks/results); fp16/bf16 conversion is the only place wider ISAs help.
# -g0: Python's own CFLAGS (sysconfig) carry -g, which would make the
# extension 10 MB of debug info instead of ~300 KB.
# DEBUG uses -Og, not -O0: g++ 12.2 at -O0 stops with an internal compiler
# error (convert_move, expr.cc:220) on csrc/cpu/kernels_avx2.cpp.
cxx_flags = ["-Og", "-g"] if DEBUG else ["-O3", "-DNDEBUG", "-g0"] + os.getenv("FASTACCUM_EXTRA_CFLAGS", "").split()
cxx_flags += ["-fopenmp"] if sys.platform.startswith("linux") else []
nvcc_flags = (["-O0", "-g", "-lineinfo"] if DEBUG else ["-O3", "-DNDEBUG", "-lineinfo"]) + [
    "--expt-relaxed-constexpr",
    "--extended-lambda",
    "--threads",
    os.getenv("NVCC_THREADS", "4"),
]
if use_cuda and not os.getenv("TORCH_CUDA_ARCH_LIST"):
    # Without a visible GPU, cpp_extension would guess; pin the archs we ship.
    os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"


def _libstdcxx_link_args():
    """Links the libstdc++.so.6 this process loaded with torch, ahead of the
    compiler's own -lstdc++.

    A compiler whose driver links libstdc++ statically, in whole or in part
    (a GCC built without a shared libstdc++, -static-libstdc++ in its specs,
    devtoolset's libstdc++_nonshared.a), puts a second copy of iostreams and
    locales into the extension. c10's error messages are built in a stream
    that both copies then touch: `<< size_t` gave a truncated message here and
    a segfault on the H200 build machine (/opt/gcc; benchmarks/results/
    nvidia-h200-2026-11-30-notes.md). With the shared library first on the
    link line, every symbol it has resolves to it, as in torch's own
    libraries; only symbols newer than it could still come from an archive.
    Linux only; nothing is added when no libstdc++ is mapped."""
    if not sys.platform.startswith("linux"):
        return []
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libstdc++.so" in line}
    except OSError:
        return []
    paths = sorted(p for p in paths if os.path.isabs(p))
    if not paths:
        return []
    # --no-as-needed: recorded as a dependency whatever else the line holds.
    return ["-Wl,--push-state,--no-as-needed", paths[0], "-Wl,--pop-state"]


link_args = (["-fopenmp"] if sys.platform.startswith("linux") else []) + _libstdcxx_link_args()

# py_limited_api=True: cpp_extension itself defines Py_LIMITED_API (its minimum
# CPython); defining it here too could disagree with another torch version.
define_macros = []
if use_cuda:
    ext = CUDAExtension(
        "torch_fastaccum._C",
        cpp_sources + cuda_sources,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_args,
        define_macros=define_macros + [("FASTACCUM_WITH_CUDA", "1")],
        py_limited_api=True,
    )
else:
    ext = CppExtension(
        "torch_fastaccum._C",
        cpp_sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_args,
        define_macros=define_macros,
        py_limited_api=True,
    )

print(
    "torch_fastaccum: building %s extension (%s)" % ("CPU+CUDA" if use_cuda else "CPU-only", why),
    flush=True,
)


def _has_bdist_wheel():
    # setuptools >= 70.1 has it built in; older ones need the wheel package.
    # Naming an absent command in `options` breaks even `pip install -e .`.
    for mod in ("setuptools.command.bdist_wheel", "wheel.bdist_wheel"):
        try:
            __import__(mod)
            return True
        except ImportError:
            pass
    return False


def _torch_requirement():
    # The binary links against this torch's C++ symbols and dispatch-key
    # numbering, which change between minor releases (README, "Wheels and the
    # torch ABI"): the wheel asks for this minor release, +cpu or +cuXXX alike.
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return "torch==%s.%s.*" % (major, minor)


def _write_build_info():
    # Read at import (torch_fastaccum/_build_info.py, not in git): a running
    # torch of another minor release is refused before _C is loaded.
    with open(os.path.join(HERE, "torch_fastaccum", "_build_info.py"), "w") as f:
        f.write('"""Written by setup.py at build time."""\n\nTORCH_VERSION = %r\nWITH_CUDA = %r\n'
                % (torch.__version__, use_cuda))


_write_build_info()

setup(
    ext_modules=[ext],
    install_requires=[_torch_requirement()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    # One abi3 wheel for every CPython >= 3.10 (the extension uses the limited API).
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if _has_bdist_wheel() else {},
)
