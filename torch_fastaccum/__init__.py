"""Fused gradient accumulation + AMP unscale + SGD momentum for PyTorch.

    from torch_fastaccum import AccumOptimizer, GradScaler
"""

import torch  # noqa: F401  (loads libtorch before our extension)


def _check_torch_release():
    # _C registers its kernels by dispatch-key number and links torch's C++
    # symbols, both of which change between minor releases: loaded into
    # another one it may import cleanly and then fail on every call (2.13 ->
    # 2.12). Refuse here, with the remedy. No build info: not built by setup.py.
    try:
        from ._build_info import TORCH_VERSION as built
    except ImportError:
        return
    def release(v):
        return tuple(v.split("+")[0].split(".")[:2])
    if release(built) != release(torch.__version__):
        raise ImportError(
            f"torch_fastaccum was built against torch {built}, but torch {torch.__version__} is "
            "running; its compiled kernels work only with the torch minor release they were built "
            "against. Rebuild against the torch you run with:\n"
            "    pip install --no-build-isolation --force-reinstall --no-deps .   (or -e ., or make)"
        )


_check_torch_release()

try:
    from . import _C  # noqa: F401  (registers torch.ops.fastaccum.*)
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError(
        "torch_fastaccum's compiled extension (torch_fastaccum._C) is missing or was "
        "built against another torch. Rebuild it against the torch you run with:\n"
        "    pip install --no-build-isolation -e .\n"
        f"(original error: {e})"
    ) from e

from . import _ops  # noqa: E402,F401  (fake impls for torch.compile/opcheck)
from .grad_scaler import GradScaler  # noqa: E402
from .optimizer import AccumOptimizer  # noqa: E402
from ._frameworks import (  # noqa: E402  (imports neither accelerate nor lightning)
    lightning_configure_gradient_clipping,
    lightning_lr_scheduler_step,
    report_skips,
    step_was_skipped,
)

__all__ = [
    "AccumOptimizer", "GradScaler", "report_skips", "step_was_skipped",
    "lightning_configure_gradient_clipping", "lightning_lr_scheduler_step",
]

__version__ = "0.1.0"
