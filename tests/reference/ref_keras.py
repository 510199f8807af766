"""Reference run of Keras's ``applications.Xception(weights=None)`` (Keras 3, torch backend), in the reference venv.

    KERAS_BACKEND=torch python ref_keras.py OUTDIR INPUT.npy [INPUT.npy ...]

Random weights with non-trivial BatchNorm (moving statistics from a training-mode pass with momentum 0, then
perturbed; random gamma/beta; random classifier bias). Writes ``keras.h5`` in Keras's legacy HDF5 weights layout
(that of ``xception_weights_tf_dim_ordering_tf_kernels.h5``: ``layer_names``, one group per layer with
``weight_names``) and, for each input ``NAME.npy`` (N, 3, H, W, fed to Keras as NHWC), the eval-mode logits
``NAME.keras.npy`` (no softmax: ``classifier_activation=None``). Prints a JSON summary line.
"""
import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "torch")

import h5py  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras.src.legacy.saving import legacy_h5_format  # noqa: E402


def build(height: int, width: int) -> keras.Model:
    return keras.applications.Xception(weights=None, include_top=True, input_shape=(height, width, 3),
                                       classifier_activation=None)


def main() -> None:
    assert keras.backend.backend() == "torch", keras.backend.backend()
    out_dir, inputs = sys.argv[1], sys.argv[2:]
    keras.utils.set_random_seed(0)
    model = build(299, 299)
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for bn in bns:
        bn.momentum = 0.0
    rng = np.random.RandomState(1)
    model(rng.uniform(-1, 1, (2, 299, 299, 3)).astype("float32"), training=True)
    for bn in bns:
        var = keras.ops.convert_to_numpy(bn.moving_variance) * rng.uniform(0.5, 2.0, bn.moving_variance.shape)
        mean = keras.ops.convert_to_numpy(bn.moving_mean) + 0.2 * rng.standard_normal(var.shape) * np.sqrt(var)
        bn.moving_variance.assign(var.astype("float32"))
        bn.moving_mean.assign(mean.astype("float32"))
        bn.gamma.assign(rng.uniform(0.5, 1.5, var.shape).astype("float32"))
        bn.beta.assign((0.1 * rng.standard_normal(var.shape)).astype("float32"))
    head = model.get_layer("predictions")
    head.bias.assign((0.1 * rng.standard_normal(head.bias.shape)).astype("float32"))
    assert not any(isinstance(layer, keras.layers.Dropout) for layer in model.layers)

    with h5py.File(os.path.join(out_dir, "keras.h5"), "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)

    summary = {"keras": keras.__version__, "layers_with_weights": sum(1 for layer in model.layers if layer.weights),
               "epsilon": bns[0].epsilon, "logits": {}}
    weights = model.get_weights()
    for path in inputs:
        x = np.load(path).transpose(0, 2, 3, 1)
        net = model if x.shape[1:3] == (299, 299) else build(*x.shape[1:3])
        if net is not model:
            net.set_weights(weights)
        logits = keras.ops.convert_to_numpy(net(x, training=False))
        np.save(path[:-4] + ".keras.npy", logits)
        summary["logits"][os.path.basename(path)] = {"shape": list(logits.shape),
                                                     "abs_max": float(np.abs(logits).max()),
                                                     "std": float(logits.std())}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
