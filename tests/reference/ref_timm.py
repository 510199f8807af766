"""Reference run of timm's ``legacy_xception`` (PyTorch), inside the reference venv (scripts/setup_ref_venv.sh).

    python ref_timm.py OUTDIR INPUT.npy [INPUT.npy ...]

Random weights (no download) with non-trivial BatchNorm: running statistics taken from a training-mode pass, then
perturbed, and random gamma/beta, so a wrong BN mapping cannot hide behind mean 0 / var 1. Writes to OUTDIR:
``timm.safetensors`` and ``timm.pth`` (the state dict, timm's own formats), ``cadene.pth`` (the same weights in the
old Cadene layout: 2-D pointwise weights, ``last_linear``, no ``num_batches_tracked``) and, for each input
``NAME.npy`` (N, 3, H, W), the eval-mode logits ``NAME.timm.npy``. Prints a JSON summary line.
"""
import json
import os
import sys

import numpy as np
import safetensors.torch
import timm
import torch
from ref_common import randomise_batchnorm


def main() -> None:
    out_dir, inputs = sys.argv[1], sys.argv[2:]
    torch.manual_seed(0)
    model = timm.create_model("legacy_xception", pretrained=False)
    randomise_batchnorm(model, torch.rand(4, 3, 160, 160) * 2 - 1)
    assert not any(m.training for m in model.modules()), "eval mode everywhere"
    assert not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, os.path.join(out_dir, "timm.safetensors"))
    torch.save(state, os.path.join(out_dir, "timm.pth"))
    cadene = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.endswith("pointwise.weight"):
            value = value[:, :, 0, 0].clone()
        cadene[key.replace("fc.", "last_linear.", 1) if key.startswith("fc.") else key] = value
    torch.save(cadene, os.path.join(out_dir, "cadene.pth"))

    summary = {"torch": torch.__version__, "timm": timm.__version__, "tensors": len(state), "logits": {}}
    with torch.no_grad():
        for path in inputs:
            x = torch.from_numpy(np.load(path))
            logits = model(x).numpy()
            np.save(path[:-4] + ".timm.npy", logits)
            summary["logits"][os.path.basename(path)] = {"shape": list(logits.shape),
                                                         "abs_max": float(np.abs(logits).max()),
                                                         "std": float(logits.std())}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
