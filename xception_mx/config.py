"""Training configuration: one schema, filled from defaults, then a YAML file, then command-line flags.

Every key is declared once in :data:`SCHEMA` (type, default, help, check); the CLI's flags are generated from it, so a
YAML key and its flag always agree (``batch_size`` <-> ``--batch-size``). Unknown keys, wrong types and impossible
values raise :class:`UserError` with one line naming the key and what to do.
"""
from __future__ import annotations

import argparse
import difflib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from .console import OneLineParser
from .errors import UserError

__all__ = ["Option", "SCHEMA", "defaults", "load_yaml", "resolve", "build_parser", "dump_yaml",
           "parse_device_list", "wants_serial_engine", "upgrade_saved", "DISTRIBUTED_KV_STORES"]


@dataclass(frozen=True)
class Option:
    name: str
    kind: str  # int, float, str, bool, ints, floats, optional_int
    default: Any
    help: str
    choices: Sequence[str] | None = None
    check: Callable[[Any], str | None] | None = None  # returns an error text or None


def _positive(v):
    return None if v > 0 else "must be > 0"


def _non_negative(v):
    return None if v >= 0 else "must be >= 0"


def _fraction(v):
    return None if 0 <= v < 1 else "must be in [0, 1)"


def _unit_interval(v):
    return None if 0 < v <= 1 else "must be in (0, 1]"


def _three(v):
    return None if len(v) == 3 else "needs 3 values (one per channel)"


def _positive_all(v):
    return None if all(x > 0 for x in v) else "must all be > 0"


def _non_negative_ints(v):
    return None if all(x >= 0 for x in v) else "device ids must be >= 0"


SCHEMA: list[Option] = [
    # Data
    Option("data_dir", "str", None, "folder with train*.rec and val*.rec shards and their .idx (im2rec_tools layout)"),
    Option("train_rec", "str", None, "training shards: a prefix, a glob or a ';'-separated list (overrides data_dir)"),
    Option("val_rec", "str", None, "validation shards: a prefix, a glob or a ';'-separated list (overrides data_dir)"),
    Option("num_classes", "int", 1000, "number of classes", check=_positive),
    Option("input_size", "int", 299, "training and validation crop size in pixels (>= 71)",
           check=lambda v: None if v >= 71 else "must be >= 71 (Xception's smallest input)"),
    Option("crop_pct", "float", 0.8975, "validation: resize shorter side to input_size / crop_pct, centre crop",
           check=_unit_interval),
    Option("interpolation", "str", "bilinear", "validation resize (and the export's protocol): bilinear or bicubic",
           choices=["bilinear", "bicubic"]),
    Option("mean", "floats", [127.5, 127.5, 127.5], "per-channel mean (RGB, 0-255 scale)", check=_three),
    Option("std", "floats", [127.5, 127.5, 127.5], "per-channel std (RGB, 0-255 scale)",
           check=lambda v: _three(v) or _positive_all(v)),
    Option("min_area", "float", 0.08, "random resized crop: smallest area fraction", check=_unit_interval),
    Option("mirror", "bool", True, "random horizontal flips"),
    Option("color_jitter", "float", 0.0, "brightness/contrast/saturation jitter (0 = off)", check=_non_negative),
    Option("pca_noise", "float", 0.0, "PCA lighting noise (0 = off)", check=_non_negative),
    Option("preprocess_threads", "int", 4, "decoding/augmentation threads", check=_positive),
    Option("verify_checksums", "bool", False, "at start, check every record against the shards' .crc checksums "
                                              "(reads all the data; record counts are always checked)"),
    # Model
    Option("model", "str", "xception", "registered model name (see xception_mx.list_models())"),
    Option("filter_list", "ints", None, "7 widths overriding the model's filter list"),
    Option("dropout", "float", 0.5, "dropout before the classifier (0 disables)", check=_fraction),
    Option("bn_momentum", "float", 0.99, "BatchNorm running-statistics momentum (Keras: 0.99)", check=_fraction),
    Option("bn_epsilon", "float", 1e-3, "BatchNorm epsilon", check=_positive),
    # Devices
    Option("gpus", "ints", [], "GPU ids, e.g. 0,1,2,3; empty = CPU", check=_non_negative_ints),
    Option("cpus", "int", 1, "number of CPU contexts when no GPU is given (tests the multi-device path)",
           check=_positive),
    Option("kv_store", "str", "device", "KVStore type: device, local (one process); dist_sync, dist_device_sync "
                                        "(MXNet parameter server, run under python -m xception_mx.launch); "
                                        "horovod (one process per device, run under horovodrun)",
           choices=["device", "local", "dist_sync", "dist_device_sync", "horovod"]),
    Option("batch_size", "int", 32, "global batch of one step, summed over all devices and workers, split evenly "
                                    "across them", check=_positive),
    Option("amp", "str", "off", "mixed precision through mx.contrib.amp: bfloat16 (CPUs with avx512_bf16), "
                                "float16 (GPUs, dynamic loss scaling); weights, optimizer state, checkpoints and "
                                "exports stay float32", choices=["off", "bfloat16", "float16"]),
    Option("loss_scale_window", "int", 2000, "--amp float16: good steps before the loss scale doubles (it halves "
                                             "at once on an overflow, and that step is skipped)", check=_positive),
    # Optimisation
    Option("optimizer", "str", "sgd", "optimizer", choices=["sgd", "nag", "rmsprop", "adam"]),
    Option("lr", "float", 0.045, "base learning rate (after warm-up)", check=_positive),
    Option("lr_mode", "str", "exp", "schedule: exp = x lr_decay every lr_decay_period epochs; step = x lr_decay "
                                    "at lr_step_epochs; cosine; poly", choices=["exp", "step", "cosine", "poly"]),
    Option("lr_decay", "float", 0.94, "decay factor for exp and step", check=_unit_interval),
    Option("lr_decay_period", "int", 2, "exp: epochs between decays", check=_positive),
    Option("lr_step_epochs", "ints", [30, 60, 90], "step: epochs at which lr is multiplied by lr_decay"),
    Option("poly_power", "float", 2.0, "poly: power", check=_positive),
    Option("target_lr", "float", 0.0, "cosine/poly: final learning rate", check=_non_negative),
    Option("warmup_epochs", "int", 0, "linear warm-up epochs from warmup_lr to lr", check=_non_negative),
    Option("warmup_lr", "float", 0.0, "learning rate at the start of warm-up", check=_non_negative),
    Option("momentum", "float", 0.9, "momentum (sgd, nag) or gamma2 (rmsprop)", check=_fraction),
    Option("wd", "float", 1e-5, "weight decay", check=_non_negative),
    Option("no_wd_bn_bias", "bool", False, "no weight decay on BatchNorm gamma/beta and biases"),
    Option("label_smoothing", "float", 0.0, "label smoothing epsilon", check=_fraction),
    Option("mixup", "float", 0.0, "mixup alpha (0 = off)", check=_non_negative),
    Option("accumulate", "int", 1, "sum the gradients of N micro-batches of batch_size / N images into one "
                                   "update of batch_size (the schedule counts updates)", check=_positive),
    Option("clip_grad_norm", "float", 0.0, "scale the gradients down to this global L2 norm when above it "
                                           "(0 = off)", check=_non_negative),
    Option("ema", "float", 0.0, "EMA/Polyak decay of weights used for evaluation and export (0 = off)",
           check=_fraction),
    Option("num_epochs", "int", 100, "epochs to train", check=_positive),
    Option("seed", "int", 0, "seed for initialisation, data order, augmentation and dropout", check=_non_negative),
    # Output, checkpoints, resume
    Option("output_dir", "str", "runs/xception", "where checkpoints, metrics.jsonl, curves.png and config.yaml go"),
    Option("prefix", "str", None, "checkpoint file prefix (default: the model name)"),
    Option("softmax_head", "bool", False, "also write each epoch's export with a SoftmaxOutput head as "
                                          "PREFIX-softmax-symbol.json + PREFIX-softmax-EEEE.params (MXNet's Module "
                                          "tools: softmax_label)"),
    Option("tensorboard", "str", None, "also write TensorBoard event files into this folder (needs the "
                                       "'tensorboard' extra: pip install 'xception_mx[tensorboard]')"),
    Option("keep_last", "int", 0, "keep only the last K epochs' checkpoints, plus the best (0 = keep all)",
           check=_non_negative),
    Option("log_interval", "int", 50, "log a progress line every N batches", check=_positive),
    Option("checkpoint_interval", "float", 30.0, "minutes between recovery checkpoints inside an epoch (what a "
                                                 "SIGKILL or a lost node costs at most; 0 = off)",
           check=_non_negative),
    Option("resume", "optional_int", None, "continue exactly from the latest checkpoint in output_dir "
                                           "(or from the given epoch)"),
    Option("retrain", "bool", False, "with model_load_epoch and lr: start from that epoch's weights and "
                                     "optimizer state with a new schedule beginning at lr"),
    Option("model_load_epoch", "int", None, "epoch to load (alone: same as --resume N)", check=_positive),
    # Fine-tuning
    Option("pretrained", "str", None, "start a fresh run from these weights, all but the classifier: a run's "
                                      "PREFIX-EEEE.state.params, or a python -m xception_mx.convert output prefix"),
    Option("freeze_features_epochs", "int", 0, "train only the classifier for the first N epochs",
           check=_non_negative),
    Option("features_lr_mult", "float", 1.0, "learning-rate multiplier of the features (the classifier gets 1)",
           check=_non_negative),
    Option("deterministic", "str", "auto", "bit-reproducible runs through MXNet's serial NaiveEngine "
                                           "(apache/mxnet#13829): auto = on for single-process CPU runs, off on "
                                           "GPUs and for distributed runs",
           choices=["auto", "on", "off"]),
    Option("max_batches", "int", 0, "stop each epoch after N batches (0 = whole epoch; for smoke tests)",
           check=_non_negative),
]

_BY_NAME = {opt.name: opt for opt in SCHEMA}


def defaults() -> dict:
    """Every key with its default value."""
    return {opt.name: (list(opt.default) if isinstance(opt.default, list) else opt.default) for opt in SCHEMA}


def _coerce(opt: Option, value: Any, source: str) -> Any:
    where = f"{source}: {opt.name}"
    if value is None:
        return None
    try:
        if opt.kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
                return value.lower() in ("true", "yes", "1")
            raise TypeError
        if opt.kind in ("int", "optional_int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if opt.kind == "float":
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if opt.kind == "str":
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise TypeError
            return str(value)
        if opt.kind in ("ints", "floats"):
            cast = int if opt.kind == "ints" else float
            if isinstance(value, str):
                value = [v for v in value.replace(" ", "").split(",") if v != ""]
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                value = [value]
            if not isinstance(value, (list, tuple)):
                raise TypeError
            out = []
            for v in value:
                if isinstance(v, bool) or (cast is int and isinstance(v, float) and not v.is_integer()):
                    raise TypeError
                out.append(cast(v))
            return out
    except (TypeError, ValueError):
        kind = {"ints": "a comma-separated list of integers", "floats": "a comma-separated list of numbers",
                "optional_int": "an integer", "int": "an integer", "float": "a number", "str": "a string",
                "bool": "true or false"}[opt.kind]
        raise UserError(f"{where} must be {kind}, got {value!r}") from None
    raise AssertionError(opt.kind)


def _check(opt: Option, value: Any, source: str) -> None:
    if value is None:
        return
    if opt.choices is not None and value not in opt.choices:
        raise UserError(f"{source}: {opt.name} must be one of {', '.join(opt.choices)}; got {value!r}")
    if opt.check is not None:
        problem = opt.check(value)
        if problem:
            raise UserError(f"{source}: {opt.name} {problem}, got {value!r}")


#: Keys an older version had, and what replaced them.
_REPLACED = {"dtype": "dtype was replaced by amp: use --amp float16 (GPUs) or --amp bfloat16 (CPUs with "
                      "avx512_bf16); float32 training is --amp off (the default)"}


def upgrade_saved(config: dict) -> dict:
    """A configuration saved by an older version, in today's keys (``dtype: float16`` -> ``amp: float16``)."""
    config = dict(config)
    if "dtype" in config:
        config["amp"] = "float16" if config.pop("dtype") == "float16" else "off"
    return config


def _unknown_key(key: str, source: str) -> UserError:
    if key.replace("-", "_") in _REPLACED:
        return UserError(f"{source}: {_REPLACED[key.replace('-', '_')]}")
    close = difflib.get_close_matches(key, list(_BY_NAME), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else " (see train_xception.py --help for the keys)"
    return UserError(f"{source}: unknown key {key!r}{hint}")


def load_yaml(path: str) -> dict:
    """Read a YAML config: a mapping of known keys (hyphens or underscores) to values."""
    if not os.path.isfile(path):
        raise UserError(f"config file {path!r} not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; save the config as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}: not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config must be a mapping of keys to values")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in _BY_NAME:
            raise _unknown_key(str(key), path)
        out[name] = _coerce(_BY_NAME[name], value, path)
    return out


def resolve(yaml_values: dict | None = None, cli_values: dict | None = None) -> dict:
    """Defaults, overridden by the YAML values, overridden by the CLI values; then every value is checked."""
    config = defaults()
    for source, values in (("config", yaml_values or {}), ("command line", cli_values or {})):
        for key, value in values.items():
            if key not in _BY_NAME:
                raise _unknown_key(key, source)
            config[key] = _coerce(_BY_NAME[key], value, source)
    for opt in SCHEMA:
        _check(opt, config[opt.name], "config")
    _check_combinations(config)
    return config


def _check_combinations(config: dict) -> None:
    if config["filter_list"] is not None:
        fl = config["filter_list"]
        if len(fl) != 7 or any(v <= 0 for v in fl) or fl[0] < 2:
            raise UserError(f"config: filter_list must be 7 positive integers (the first >= 2), got {fl}")
    if config["retrain"] and config["model_load_epoch"] is None:
        raise UserError("config: --retrain needs --model-load-epoch N (the epoch to start from) and --lr")
    if config["retrain"] and config["resume"] is not None:
        raise UserError("config: use either --resume or --retrain, not both")
    if config["resume"] is not None and config["resume"] < 0:
        raise UserError(f"config: resume must be an epoch >= 1 (or 0 / no value for the latest), "
                          f"got {config['resume']}")
    if config["warmup_epochs"] >= config["num_epochs"]:
        raise UserError(f"config: warmup_epochs ({config['warmup_epochs']}) must be less than num_epochs "
                          f"({config['num_epochs']})")


def build_parser(prog: str = "train_xception.py") -> argparse.ArgumentParser:
    """CLI flags for every schema key, plus --config. Unset flags are absent from the parsed namespace."""
    parser = OneLineParser(prog=prog, description="Train Xception on RecordIO shards (MXNet Gluon).",
                            argument_default=argparse.SUPPRESS, allow_abbrev=False)
    parser.add_argument("--config", help="YAML file of keys from this list; flags override it")
    for name in _REPLACED:  # refused in resolve() with a line saying what replaced them
        parser.add_argument("--" + name.replace("_", "-"), dest=name, help=argparse.SUPPRESS)
    for opt in SCHEMA:
        flag = "--" + opt.name.replace("_", "-")
        default = "" if opt.default is None else f" (default: {opt.default})"
        if opt.kind == "bool":
            parser.add_argument(flag, dest=opt.name, action="store_const", const=True, help=opt.help + default)
            if opt.default is True:
                parser.add_argument("--no-" + opt.name.replace("_", "-"), dest=opt.name, action="store_const",
                                    const=False, help=f"turn off {opt.name}")
        elif opt.kind == "optional_int":
            parser.add_argument(flag, dest=opt.name, nargs="?", const=0, help=opt.help)
        else:
            parser.add_argument(flag, dest=opt.name, help=opt.help + default, metavar=opt.kind.upper())
    return parser


#: Multi-process KVStore types. ``deterministic: auto`` keeps MXNet's threaded engine for them: the serial engine
#: works with ps-lite and Horovod (tested) but does not make a multi-process run bit-reproducible (two identical
#: 2-worker runs still differed in the last bits now and then), so it would only cost speed.
DISTRIBUTED_KV_STORES = ("dist_sync", "dist_device_sync", "horovod")


def wants_serial_engine(config: dict) -> bool:
    """Whether this run should use MXNet's NaiveEngine (see the ``deterministic`` key)."""
    mode = config["deterministic"]
    return mode == "on" or (mode == "auto" and not config["gpus"] and config["kv_store"] not in DISTRIBUTED_KV_STORES)


def parse_device_list(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; '' -> []."""
    return _coerce(_BY_NAME["gpus"], text, "command line")


def dump_yaml(config: dict, path: str) -> None:
    """Write the resolved config (every key) as YAML."""
    from .fileio import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config, sort_keys=False, default_flow_style=None))
