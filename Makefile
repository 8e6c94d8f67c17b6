# Fresh machine: `make bench` (parity verdict + speed table) or `make test`.
# Each target installs what it needs first (see `setup`).
PYTHON ?= python
# The torch to install when none is present; keep the one you have otherwise.
TORCH_SPEC ?= torch==2.13.0
BENCH_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup bench test cuda-compile clean

setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_SPEC)"
	@$(PYTHON) -c "import ninja, pytest, hypothesis, expecttest" 2>/dev/null || \
		$(PYTHON) -m pip install ninja pytest hypothesis expecttest numpy
	@# A non-isolated build uses this environment's setuptools: it needs bdist_wheel.
	@$(PYTHON) -c "import setuptools.command.bdist_wheel" 2>/dev/null || \
		$(PYTHON) -m pip install "setuptools>=70.1"
	# --no-build-isolation: build against the torch installed above, never a
	# freshly downloaded one (see README, "Building").
	$(PYTHON) -m pip install --no-build-isolation --no-deps -e .
	@$(PYTHON) -c "import torch, torch_fastaccum as t; from torch_fastaccum import _ops; \
		print('torch_fastaccum built:', 'CPU+CUDA' if _ops.has_kernel_for('cuda') else 'CPU-only', \
		'(CPU kernels: ' + torch.ops.fastaccum._cpu_capability() + ', torch ' + torch.__version__ + ')')"

bench: setup
	@$(PYTHON) -c "import matplotlib" 2>/dev/null || $(PYTHON) -m pip install matplotlib
	$(PYTHON) -m benchmarks $(BENCH_ARGS)

test: setup
	@# Only the tests need them (tests/test_frameworks.py); pinning the
	@# installed torch keeps pip from swapping it.
	@$(PYTHON) -c "import accelerate, lightning" 2>/dev/null || $(PYTHON) -m pip install accelerate lightning "torch==$$($(PYTHON) -c 'import torch; print(torch.__version__)')"
	$(PYTHON) -m pytest tests -ra $(PYTEST_ARGS)

cuda-compile:
	bash .ci/compile_cuda.sh

clean:
	rm -rf build *.egg-info torch_fastaccum/_C*.so bench_out
