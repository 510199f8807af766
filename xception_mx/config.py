"""Training configuration: one typed, frozen :class:`RunConfig`, filled from defaults, a YAML file, then flags.

Every key is declared once, as a field of :class:`RunConfig` (type, default, help, check); :data:`SCHEMA` and the
CLI's flags are generated from those fields, so a YAML key and its flag always agree (``batch_size`` <->
``--batch-size``) and the code reads ``config.batch_size`` (a typo is a type-checker error, not a KeyError).
Unknown keys, wrong types and impossible values raise :class:`UserError` with one line naming the key and what to do.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from .console import OneLineParser, closest, did_you_mean
from .errors import UserError
from .fileio import atomic_write_text
from .variants import model_names

__all__ = ["RunConfig", "Option", "SCHEMA", "load_yaml", "resolve", "build_parser", "dump_yaml",
           "parse_device_list", "upgrade_saved"]


@dataclass(frozen=True)
class Option:
    name: str
    kind: str  # int, float, str, bool, ints, floats (tuples), optional_int
    default: Any
    help: str
    choices: Sequence[str] | None = None
    check: Callable[[Any], str | None] | None = None  # returns an error text or None
    group: str = ""  # the --help group the flag is listed in
    metavar: str | None = None  # the flag's value in --help, when not its choices or its kind


def _rule(test: Callable[[Any], bool], problem: str) -> Callable[[Any], str | None]:
    return lambda v: None if test(v) else problem


_positive = _rule(lambda v: v > 0, "must be > 0")
_non_negative = _rule(lambda v: v >= 0, "must be >= 0")
_fraction = _rule(lambda v: 0 <= v < 1, "must be in [0, 1)")
_unit_interval = _rule(lambda v: 0 < v <= 1, "must be in (0, 1]")
_three = _rule(lambda v: len(v) == 3, "needs 3 values (one per channel)")
_positive_all = _rule(lambda v: all(x > 0 for x in v), "must all be > 0")
_non_negative_ints = _rule(lambda v: all(x >= 0 for x in v), "device ids must be >= 0")
_multiple = _rule(lambda v: v == "auto" or (v.isdigit() and int(v) > 0), "must be auto or a positive integer")


def option(default: Any, help: str, *, choices: Sequence[str] | None = None,
           check: Callable[[Any], str | None] | None = None, kind: str | None = None, group: str | None = None,
           metavar: str | None = None) -> Any:
    """A :class:`RunConfig` field: its default, the flag's help, allowed values, a check (``kind`` overrides the kind
    read from the field's type: ``optional_int`` is ``--resume [N]``); ``group`` opens that ``--help`` group (this
    key and the ones after it, up to the next group); ``metavar``: the value in ``--help``."""
    return field(default=default, metadata={"help": help, "choices": choices, "check": check, "kind": kind,
                                            "group": group, "metavar": metavar})


@dataclass(frozen=True)
class RunConfig:
    """A run's resolved configuration (every key, checked). Built by :func:`resolve`, never changed afterwards:
    :meth:`replace` gives a changed copy. Lists are tuples; :meth:`to_dict` is the form saved in YAML and manifests."""
    data_dir: str | None = option(None, "folder with train*.rec and val*.rec shards and their .idx "
                                        "(im2rec_tools layout)", group="data")
    train_rec: str | None = option(None, "training shards: a prefix, a glob or a ';'-separated list "
                                         "(overrides data_dir)")
    val_rec: str | None = option(None, "validation shards: a prefix, a glob or a ';'-separated list "
                                       "(overrides data_dir)")
    num_classes: int = option(1000, "classes (default: the train shards' classes.txt, else labels)", check=_positive)
    input_size: int = option(299, "training and validation crop size in pixels (>= 71)",
        check=lambda v: None if v >= 71 else "must be >= 71 (Xception's smallest input)")
    crop_pct: float = option(0.8975, "validation: resize shorter side to input_size / crop_pct, centre crop",
        check=_unit_interval)
    interpolation: str = option("bilinear", "validation resize (and the export's protocol): bilinear or bicubic",
        choices=["bilinear", "bicubic"])
    mean: tuple[float, ...] = option((127.5, 127.5, 127.5), "per-channel mean (RGB, 0-255 scale)", check=_three)
    std: tuple[float, ...] = option((127.5, 127.5, 127.5), "per-channel std (RGB, 0-255 scale)",
        check=lambda v: _three(v) or _positive_all(v))
    preprocess_threads: int = option(4, "decoding/augmentation threads", check=_positive)
    verify_checksums: bool = option(False, "at start, check every record against the shards' .crc checksums "
                                              "(reads all the data; record counts are always checked)")
    min_area: float = option(0.08, "random resized crop: smallest area fraction", check=_unit_interval,
        group="augmentation and regularisation")
    mirror: bool = option(True, "random horizontal flips")
    color_jitter: float = option(0.0, "brightness/contrast/saturation jitter (0 = off)", check=_non_negative)
    pca_noise: float = option(0.0, "PCA lighting noise (0 = off)", check=_non_negative)
    label_smoothing: float = option(0.0, "label smoothing epsilon", check=_fraction)
    mixup: float = option(0.0, "mixup alpha (0 = off)", check=_non_negative)
    dropout: float = option(0.5, "dropout before the classifier (0 disables)", check=_fraction)
    model: str = option("xception", "registered model (xception_mx.list_models())", choices=model_names(),
        group="model")
    filter_list: tuple[int, ...] | None = option(None, "7 widths overriding the model's filter list")
    bn_momentum: float = option(0.99, "BatchNorm running-statistics momentum (Keras: 0.99)", check=_fraction)
    bn_epsilon: float = option(1e-3, "BatchNorm epsilon", check=_positive)
    channel_multiple: str = option("auto", "compute with every width rounded up to a multiple of N, the added "
                                           "channels exactly zero; files keep the paper's shapes. auto = 16 on CPUs "
                                           "(oneDNN's fast kernels), 1 with --gpus", check=_multiple,
        metavar="{auto,N}")
    gpus: tuple[int, ...] = option((), "GPU ids, e.g. 0,1,2,3; empty = CPU", check=_non_negative_ints,
        group="devices and precision")
    cpus: int = option(1, "number of CPU contexts when no GPU is given (tests the multi-device path)",
        check=_positive)
    kv_store: str = option("device", "KVStore type: device, local (one process); dist_sync, dist_device_sync "
                                        "(MXNet parameter server, run under python -m xception_mx.launch); "
                                        "horovod (one process per device, run under horovodrun)",
        choices=["device", "local", "dist_sync", "dist_device_sync", "horovod"])
    amp: str = option("off", "mixed precision through mx.contrib.amp: bfloat16 (CPUs with avx512_bf16), "
                                "float16 (GPUs, dynamic loss scaling); weights, optimizer state, checkpoints and "
                                "exports stay float32", choices=["off", "bfloat16", "float16"])
    loss_scale_window: int = option(2000, "--amp float16: good steps before the loss scale doubles (it halves "
                                             "at once on an overflow, and that step is skipped)", check=_positive)
    optimizer: str = option("sgd", "optimizer", choices=["sgd", "nag", "rmsprop", "adam"], group="optimizer")
    batch_size: int = option(32, "global batch of one step, summed over all devices and workers, split evenly "
                                    "across them", check=_positive)
    accumulate: int = option(1, "sum the gradients of N micro-batches of batch_size / N images into one "
                                   "update of batch_size (the schedule counts updates)", check=_positive)
    lr: float = option(0.045, "base learning rate (after warm-up)", check=_positive)
    momentum: float = option(0.9, "momentum (sgd, nag) or gamma2 (rmsprop)", check=_fraction)
    wd: float = option(1e-5, "weight decay", check=_non_negative)
    no_wd_bn_bias: bool = option(False, "no weight decay on BatchNorm gamma/beta and biases")
    clip_grad_norm: float = option(0.0, "scale the gradients down to this global L2 norm when above it "
                                           "(0 = off)", check=_non_negative)
    ema: float = option(0.0, "EMA/Polyak decay of weights used for evaluation and export (0 = off)",
        check=_fraction)
    num_epochs: int = option(100, "epochs to train", check=_positive, group="schedule")
    lr_mode: str = option("exp", "schedule: exp = x lr_decay every lr_decay_period epochs; step = x lr_decay "
                                    "at lr_step_epochs; cosine; poly", choices=["exp", "step", "cosine", "poly"])
    lr_decay: float = option(0.94, "decay factor for exp and step", check=_unit_interval)
    lr_decay_period: int = option(2, "exp: epochs between decays", check=_positive)
    lr_step_epochs: tuple[int, ...] = option((30, 60, 90), "step: epochs at which lr is multiplied by lr_decay")
    poly_power: float = option(2.0, "poly: power", check=_positive)
    target_lr: float = option(0.0, "cosine/poly: final learning rate", check=_non_negative)
    warmup_epochs: int = option(0, "linear warm-up epochs from warmup_lr to lr", check=_non_negative)
    warmup_lr: float = option(0.0, "learning rate at the start of warm-up", check=_non_negative)
    output_dir: str = option("runs/xception", "where checkpoints, metrics.jsonl, curves.png and config.yaml go",
        group="run folder and checkpoints")
    prefix: str | None = option(None, "checkpoint file prefix (default: the model name)")
    keep_last: int = option(0, "keep only the last K epochs' checkpoints, plus the best (0 = keep all)",
        check=_non_negative)
    checkpoint_interval: float = option(30.0, "minutes between recovery checkpoints inside an epoch (what a "
                                                 "SIGKILL or a lost node costs at most; 0 = off)",
        check=_non_negative)
    softmax_head: bool = option(False, "also write each epoch's export with a SoftmaxOutput head as "
                                          "PREFIX-softmax-symbol.json + PREFIX-softmax-EEEE.params (MXNet's Module "
                                          "tools: softmax_label)")
    tensorboard: str | None = option(None, "also write TensorBoard event files into this folder (needs the "
                                       "'tensorboard' extra: pip install 'xception_mx[tensorboard]')")
    log_interval: int = option(50, "log a progress line every N batches", check=_positive)
    resume: int | None = option(None, "continue exactly from the latest checkpoint in output_dir "
                                           "(or from the given epoch)", kind="optional_int", metavar="EPOCH",
        group="resume, retrain and fine-tuning")
    retrain: bool = option(False, "with model_load_epoch and lr: start from that epoch's weights and "
                                     "optimizer state with a new schedule beginning at lr")
    model_load_epoch: int | None = option(None, "epoch to load: N, best or last (alone: same as --resume N)",
                                          check=_positive, metavar="{N,best,last}")
    pretrained: str | None = option(None, "start a fresh run from these weights, all but the classifier: a run's "
                                      "PREFIX-EEEE.state.params, or a python -m xception_mx.convert output prefix")
    freeze_features_epochs: int = option(0, "train only the classifier for the first N epochs",
        check=_non_negative)
    features_lr_mult: float = option(1.0, "learning-rate multiplier of the features (the classifier gets 1)",
        check=_non_negative)
    seed: int = option(0, "seed for initialisation, data order, augmentation and dropout", check=_non_negative,
        group="reproducibility and debugging")
    deterministic: str = option("auto", "bit-reproducible runs through MXNet's serial NaiveEngine "
                                           "(apache/mxnet#13829): auto = on for single-process CPU runs, off on "
                                           "GPUs and for distributed runs",
        choices=["auto", "on", "off"])
    max_batches: int = option(0, "stop each epoch after N batches (0 = whole epoch; for smoke tests)",
        check=_non_negative)

    def to_dict(self) -> dict[str, Any]:
        """Every key, lists as lists: what ``config.yaml`` and a checkpoint's manifest hold."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


#: The kind of each field's type (annotations are strings here: ``from __future__ import annotations``).
_KINDS = {"str": "str", "str | None": "str", "int": "int", "int | None": "int", "float": "float", "bool": "bool",
          "tuple[int, ...]": "ints", "tuple[int, ...] | None": "ints", "tuple[float, ...]": "floats"}


def _schema() -> list[Option]:
    options, group = [], ""
    for f in fields(RunConfig):
        group = f.metadata["group"] or group
        options.append(Option(f.name, f.metadata["kind"] or _KINDS[str(f.type)], f.default, f.metadata["help"],
                              f.metadata["choices"], f.metadata["check"], group, f.metadata["metavar"]))
    return options


SCHEMA: list[Option] = _schema()
_BY_NAME = {opt.name: opt for opt in SCHEMA}


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
            return tuple(out)
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
        hint = did_you_mean([str(value)], opt.choices)
        raise UserError(f"{source}: {opt.name} must be one of {', '.join(opt.choices)}; got {value!r}{hint}")
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
    config.setdefault("channel_multiple", "1")  # runs saved before padded widths computed at the paper's
    return config


def _unknown_key(key: str, source: str) -> UserError:
    if key.replace("-", "_") in _REPLACED:
        return UserError(f"{source}: {_REPLACED[key.replace('-', '_')]}")
    close = closest(key, _BY_NAME)
    hint = f" (did you mean {close!r}?)" if close else " (see train_xception.py --help for the keys)"
    return UserError(f"{source}: unknown key {key!r}{hint}")


def load_yaml(path: str) -> dict:
    """Read a YAML config: a mapping of known keys (hyphens or underscores) to values."""
    if os.path.isdir(path):
        raise UserError(f"--config {path!r} is a folder: give a YAML file in it (e.g. {os.path.join(path, 'x.yaml')})")
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
    if data is not None and not isinstance(data, dict):
        raise UserError(f"{path}: a config must be a mapping of keys to values")
    out = {}
    for key, value in (data or {}).items():
        name = str(key).replace("-", "_")
        if name not in _BY_NAME:
            raise _unknown_key(str(key), path)
        out[name] = _coerce(_BY_NAME[name], value, path)
    return out


def resolve(yaml_values: dict | None = None, cli_values: dict | None = None) -> RunConfig:
    """Defaults, overridden by the YAML values, overridden by the CLI values; then every value is checked."""
    values: dict[str, Any] = {}
    for source, given in (("config", yaml_values or {}), ("command line", cli_values or {})):
        for key, value in given.items():
            if key not in _BY_NAME:
                raise _unknown_key(key, source)
            values[key] = _coerce(_BY_NAME[key], value, source)
    config = RunConfig(**values)
    for opt in SCHEMA:
        _check(opt, getattr(config, opt.name), "config")
    _check_combinations(config)
    return config


def _check_combinations(config: RunConfig) -> None:
    fl = config.filter_list
    if fl is not None and (len(fl) != 7 or any(v <= 0 for v in fl) or fl[0] < 2):
        raise UserError(f"config: filter_list must be 7 positive integers (the first >= 2), got {list(fl)}")
    if config.retrain and config.model_load_epoch is None:
        raise UserError("config: --retrain needs --model-load-epoch N (the epoch to start from) and --lr")
    if config.retrain and config.resume is not None:
        raise UserError("config: use either --resume or --retrain, not both")
    if config.resume is not None and config.resume < 0:
        raise UserError(f"config: resume must be an epoch >= 1 (or 0 / no value for the latest), got {config.resume}")
    if config.prefix is not None and (not config.prefix or os.sep in config.prefix or config.prefix in (".", "..")
                                      or (os.altsep and os.altsep in config.prefix)):
        raise UserError(f"config: prefix must be a plain file name (no folder: checkpoints go in --output-dir), "
                        f"got {config.prefix!r}")
    if not config.output_dir:
        raise UserError("config: output_dir is empty: give --output-dir FOLDER (the run's folder)")
    if os.path.exists(config.output_dir) and not os.path.isdir(config.output_dir):
        raise UserError(f"config: --output-dir {config.output_dir} is a file, not a folder: choose a folder")
    if config.warmup_epochs >= config.num_epochs:
        raise UserError(f"config: warmup_epochs ({config.warmup_epochs}) must be less than num_epochs "
                        f"({config.num_epochs})")


def build_parser(prog: str = "train_xception.py") -> argparse.ArgumentParser:
    """CLI flags for every schema key (in its ``--help`` group) and --config; unset flags are absent from the result."""
    parser = OneLineParser(prog=prog, usage="%(prog)s [--config FILE] [--FLAG VALUE ...]", allow_abbrev=False,
                            description="Train Xception on RecordIO shards (MXNet Gluon).",
                            argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", metavar="FILE", help="YAML file of keys from this list; flags override it")
    for name in _REPLACED:  # refused in resolve() with a line saying what replaced them
        parser.add_argument("--" + name.replace("_", "-"), dest=name, help=argparse.SUPPRESS)
    groups = {title: parser.add_argument_group(title) for title in dict.fromkeys(opt.group for opt in SCHEMA)}
    for opt in SCHEMA:
        group = groups[opt.group]
        flag = "--" + opt.name.replace("_", "-")
        shown = ",".join(map(str, opt.default)) if isinstance(opt.default, tuple) else opt.default
        default = "" if opt.default is None or "default:" in opt.help else f" (default: {shown})"
        if opt.kind == "bool":
            group.add_argument(flag, dest=opt.name, action="store_const", const=True, help=opt.help + default)
            if opt.default is True:
                group.add_argument("--no-" + opt.name.replace("_", "-"), dest=opt.name, action="store_const",
                                   const=False, help=f"turn off {opt.name}")
        else:
            choices = "{" + ",".join(opt.choices) + "}" if opt.choices else None
            optional = opt.kind == "optional_int"  # --resume [EPOCH]
            group.add_argument(flag, dest=opt.name, help=opt.help + default, nargs="?" if optional else None,
                               const=0 if optional else None, metavar=opt.metavar or choices or opt.kind.upper())
    return parser


def parse_device_list(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; '' -> []."""
    return list(_coerce(_BY_NAME["gpus"], text, "command line"))


def config_text(config: RunConfig) -> str:
    """The resolved config (every key) as YAML: ``config.yaml`` and TensorBoard's text panel."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=None)


def dump_yaml(config: RunConfig, path: str) -> None:
    """Write the resolved config (every key) as YAML."""
    atomic_write_text(path, config_text(config))

