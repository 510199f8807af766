"""Run the converter's timm reader where torch exists (the reference venv): a ``.pth`` file -> our names, as .npz.

    python read_with_converter.py SRC.pth OUT.npz

The reader needs no MXNet, so it runs here; the test compares the result with what our venv reads from the
``.safetensors`` copy of the same weights.
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from xception_mx.weight_formats import read_timm, timm_to_params  # noqa: E402


def main() -> None:
    src, out = sys.argv[1], sys.argv[2]
    mapped = timm_to_params(read_timm(src))
    assert not mapped.unused, mapped.unused
    np.savez(out, **mapped.arrays)
    assert "mxnet" not in sys.modules
    print(len(mapped.arrays))


if __name__ == "__main__":
    main()
