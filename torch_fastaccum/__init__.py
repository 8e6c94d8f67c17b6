"""Fused gradient accumulation + AMP unscale + SGD momentum for PyTorch.

    from torch_fastaccum import AccumOptimizer, GradScaler
"""

import torch  # noqa: F401  (loads libtorch before our extension)

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

__all__ = ["AccumOptimizer", "GradScaler"]
__version__ = "0.1.0"
