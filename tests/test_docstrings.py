"""What `help(AccumOptimizer)` and `help(GradScaler)` show: plain text that
fits a terminal, every constructor argument described, a runnable example,
and our own text (not torch's) on the methods we override."""

from __future__ import annotations

import doctest
import inspect
import re

import pytest
import torch

from torch_fastaccum import AccumOptimizer, GradScaler

PUBLIC = (AccumOptimizer, GradScaler)


@pytest.mark.parametrize("cls", PUBLIC, ids=lambda c: c.__name__)
def test_class_docstring_is_plain_text_for_a_terminal(cls):
    doc = inspect.cleandoc(cls.__doc__)
    assert ".. math::" not in doc and "\\" not in doc  # no LaTeX / reST math
    long = [line for line in doc.splitlines() if len(line) > 78]
    assert not long, long


def test_accum_optimizer_args_cover_the_signature():
    doc = inspect.cleandoc(AccumOptimizer.__doc__)
    args = doc.split("Args:\n", 1)[1].split("\n\n", 1)[0]
    described = set(re.findall(r"^    (\w+(?:, \w+)*)[ :(]", args, flags=re.M))
    described = {name for entry in described for name in entry.split(", ")}
    wanted = set(inspect.signature(AccumOptimizer.__init__).parameters) - {"self"}
    assert wanted <= described, sorted(wanted - described)


def test_accum_optimizer_example_runs():
    finder = doctest.DocTestFinder(recurse=False)
    (test,) = finder.find(AccumOptimizer, "AccumOptimizer", globs={})
    assert test.examples
    result = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS).run(test)
    assert result.failed == 0 and result.attempted == len(test.examples)


@pytest.mark.parametrize("name", ["__init__", "step", "update", "unscale_"])
def test_grad_scaler_overrides_have_their_own_docstrings(name):
    ours = GradScaler.__dict__[name].__doc__
    assert ours and ours != getattr(torch.amp.GradScaler, name).__doc__
    assert "AccumOptimizer" in ours or name == "__init__"


def test_accum_optimizer_public_methods_are_documented():
    for name, member in vars(AccumOptimizer).items():
        if name.startswith("_"):
            continue
        target = member.fget if isinstance(member, property) else member
        if callable(target):
            assert inspect.getdoc(target), name
