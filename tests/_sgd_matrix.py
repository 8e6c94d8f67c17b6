"""The SGD option matrix that torch itself tests SGD with, read from the SGD
entry of torch's installed OptimizerInfo database
(``torch.testing._internal.common_optimizers.optim_db``): its option sets,
its error inputs and its learning-rate scheduler combinations.

torch's test helpers import expecttest (and numpy). A test module that
imports this one first calls ``pytest.importorskip(MATRIX_MODULE,
reason=MATRIX_REASON)`` (tests/_dropin.py), so that where they are missing it
skips visibly, under its own name, instead of failing collection.
"""

from __future__ import annotations

import copy

import pytest
import torch

from _dropin import MATRIX_MODULE, MATRIX_REASON

_db = pytest.importorskip(MATRIX_MODULE, reason=MATRIX_REASON)

SGD_ENTRY = next(info for info in _db.optim_db if info.optim_cls is torch.optim.SGD)
ErrorWhen = _db.OptimizerErrorEnum


def _slug(desc: str) -> str:
    return "-".join(desc.replace("/", "").split())


def _option_inputs():
    return SGD_ENTRY.optim_inputs_func(device="cpu", dtype=torch.float32)


OPTION_NAMES = [_slug(oi.desc) for oi in _option_inputs()]


def options(name: str) -> dict:
    """A fresh copy of the kwargs of option set ``name`` (a tensor lr is
    mutated by schedulers, so never share one between optimizers)."""
    for oi in _option_inputs():
        if _slug(oi.desc) == name:
            return copy.deepcopy(oi.kwargs)
    raise KeyError(name)


def option_names(where: "callable | None" = None) -> list[str]:
    """Names of the option sets whose kwargs satisfy ``where``."""
    return [n for n in OPTION_NAMES if where is None or where(options(n))]


def has_momentum(kw: dict) -> bool:
    return kw.get("momentum", 0) != 0


def error_inputs():
    return SGD_ENTRY.optim_error_inputs_func(device="cpu", dtype=torch.float32)


ERROR_NAMES = [_slug(e.optimizer_error_input.desc) for e in error_inputs()]

# Lists of scheduler factories (lambda opt: scheduler) torch steps SGD with.
SCHEDULER_SETS = SGD_ENTRY.scheduler_inputs


def scheduler_set_name(i: int) -> str:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    names = [type(make(opt)).__name__ for make in SCHEDULER_SETS[i]]
    return f"{i}-" + "+".join(names)


SCHEDULER_SET_NAMES = [scheduler_set_name(i) for i in range(len(SCHEDULER_SETS))]

# Flags that SGD grew after its first release; an old checkpoint lacks them.
LATE_FLAGS = tuple(SGD_ENTRY.not_og_supported_flags)
