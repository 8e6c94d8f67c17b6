"""Fresh-process half of tests/test_checkpoint_resume.py:

    python tests/_resume_worker.py CKPT OUT

Builds a model/optimizer/scaler from scratch (a different model seed, so every
value must come from the checkpoint), loads CKPT (torch.load with the default
weights_only=True: the checkpoint must be plain data), restores the grads,
continues training from the saved position to the end, and torch.saves the
final parameters, optimizer and scaler state and the boundary trace to OUT.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import _resume_common as C  # noqa: E402


def main(ckpt_path, out_path):
    torch.set_num_threads(1)  # the parent runs its reference single-threaded too
    ckpt = torch.load(ckpt_path)
    model = C.make_model(seed=999)
    opt, scaler = C.build(model)
    C.restore(ckpt, model, opt, scaler)
    pos = tuple(ckpt["position"])
    if pos[1] == "before_step":
        # torch.amp.GradScaler creates its scale tensor lazily in scale(); a
        # process resumed between backward and step never called it (torch's
        # own scaler needs the same nudge). scale() of a dummy changes nothing.
        scaler.scale(torch.zeros(()))
    trace = C.train(model, opt, scaler, C.data(), start=pos)
    torch.save(C.final_state(model, opt, scaler, trace), out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
