"""The extension shares torch's libstdc++ rather than carrying its own copy.

A compiler that links libstdc++ statically (seen: the H200 machine's /opt/gcc)
put a second copy of iostreams into _C; c10's error messages, built in a
stream that both copies touch, then lost everything after an integer
(`grads[`) or crashed the process. setup.py links the libstdc++.so.6 torch
loaded first (_libstdcxx_link_args); these tests catch a build without it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

import torch_fastaccum._C as ext

ops = torch.ops.fastaccum


def test_op_error_message_keeps_the_integers():
    grads = [torch.randn(3), torch.randn(3, dtype=torch.float64), torch.randn(3)]
    with pytest.raises(RuntimeError) as info:
        ops.nonfinite_check_(grads, torch.zeros(()))
    assert "grads[1] has dtype Double but grads[0] has Float" in str(info.value)


def test_sgd_error_message_keeps_the_integers():
    p = [torch.randn(3), torch.randn(4)]
    g = [torch.randn(3), torch.randn(5)]
    with pytest.raises(RuntimeError) as info:
        ops.fused_sgd_(p, g, [], [], lr=0.1, weight_decay=0.0, momentum=0.0, dampening=0.0,
                       nesterov=False, maximize=False)
    assert "grads[1] has shape [5] but its param has [4]" in str(info.value)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF and libstdc++: Linux only")
@pytest.mark.skipif(shutil.which("nm") is None, reason="binutils' nm is not installed: symbol table not read")
def test_extension_defines_no_libstdcxx_stream_code():
    out = subprocess.run(["nm", "-D", "--defined-only", ext.__file__], capture_output=True, text=True,
                         check=True).stdout
    # Mangled names of libstdc++'s own stream, locale and codecvt code: present
    # in _C only when an archive copy of the library was linked into it.
    own = [line for line in out.splitlines()
           if any(m in line for m in ("_ZNSo9_M_insert", "_ZNSt6locale", "_ZNSt7codecvt", "_ZNSt8ios_base"))]
    assert not own, f"{len(own)} libstdc++ symbols defined in {ext.__file__}, e.g. {own[:3]}"
