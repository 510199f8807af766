"""Reference run of timm's aligned Xceptions (PyTorch), inside the reference venv (scripts/setup_ref_venv.sh).

    python ref_timm_aligned.py OUTDIR INPUT.npy [INPUT.npy ...]

For each of xception41, xception65 and xception71: random weights (no download) with non-trivial BatchNorm
(running statistics from a training-mode pass, then perturbed; random gamma/beta), saved as ``VARIANT.safetensors``,
and the eval-mode logits ``NAME.VARIANT.npy`` of each input ``NAME.npy``. Prints one JSON line: versions, and per
variant the trainable parameter count (timm's ``sum(p.numel() for p in model.parameters())``) and the default
pretrained config of the ``.tf_in1k`` tag.
"""
import json
import os
import sys

import numpy as np
import safetensors.torch
import timm
import torch
from ref_common import randomise_batchnorm

VARIANTS = ("xception41", "xception65", "xception71")


def randomised(variant: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(variant, pretrained=False)
    return randomise_batchnorm(model, torch.rand(2, 3, 128, 128) * 2 - 1)


def main() -> None:
    out_dir, inputs = sys.argv[1], sys.argv[2:]
    summary = {"torch": torch.__version__, "timm": timm.__version__, "variants": {}}
    for variant in VARIANTS:
        model = randomised(variant)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        safetensors.torch.save_file(state, os.path.join(out_dir, f"{variant}.safetensors"))
        cfg = timm.models.get_pretrained_cfg(f"{variant}.tf_in1k").to_dict()
        summary["variants"][variant] = {
            "parameters": sum(p.numel() for p in model.parameters()), "tensors": len(state),
            "config": {k: cfg[k] for k in ("input_size", "crop_pct", "interpolation", "mean", "std")}}
        with torch.no_grad():
            for path in inputs:
                logits = model(torch.from_numpy(np.load(path))).numpy()
                np.save(path[:-4] + f".{variant}.npy", logits)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
