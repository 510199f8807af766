"""Plan a training run once, before anything is built: ``plan_run(argv) -> RunPlan``. Imports no MXNet.

The command line is parsed once and the YAML read once. A continued run (``--resume``, ``--model-load-epoch``,
``--retrain``) takes its base configuration from one saved source, the checkpoint's manifest; what the command
says (a ``--config`` file, then flags) overrides it. A resume refuses any change of the optimiser, schedule or
batch size, whether it comes from a flag or an edited ``--config`` file; ``--retrain`` starts a new schedule at the
loaded epoch. The engine is chosen here (``train_main`` exports it before MXNet loads), and the run-level checks
(devices, precision, shards and their record headers, an existing run in a fresh folder) run here too.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from .board import check_available
from .config import RunConfig, build_parser, load_yaml, resolve, upgrade_saved
from .console import command_line, did_you_mean
from .cpuinfo import auto_channel_multiple, cpu_flags
from .errors import UserError
from .manifest import Manifest, ScheduleOrigin
from .records import (
    RecordScan,
    check_checksums,
    check_duplicates,
    check_records,
    count_records,
    find_shards,
    read_classes,
    refuse_image_folder,
)
from .runfolder import CLASSES_FILE, RunFolder, prefixes_in

__all__ = ["RunPlan", "ResumePoint", "Shards", "plan_run", "SCHEDULE_KEYS", "FIXED_ON_RESUME",
           "DISTRIBUTED_KV_STORES", "wants_serial_engine", "channel_multiple"]

log = logging.getLogger("xception_mx.plan")

#: Keys that define the optimiser and schedule: a resume continues the saved ones, --retrain starts new ones.
SCHEDULE_KEYS = ("optimizer", "lr", "lr_mode", "lr_decay", "lr_decay_period", "lr_step_epochs", "poly_power",
                 "target_lr", "warmup_epochs", "warmup_lr")
#: What a resume may not change (the batch size fixes the steps per epoch, and so the schedule's positions; the
#: precision and the accumulation change the arithmetic an exact resume repeats). --retrain may change them.
FIXED_ON_RESUME = SCHEDULE_KEYS + ("batch_size", "accumulate", "amp")
#: How this command continues a run: taken from the command alone, never from a saved configuration.
RUN_CONTROL_KEYS = ("resume", "retrain", "model_load_epoch")


@dataclass(frozen=True)
class ResumePoint:
    epoch: int  # the last complete epoch (0 for a mid-epoch checkpoint taken during epoch 1)
    manifest: Manifest
    partial: bool  # True: the mid-epoch checkpoint written on SIGINT/SIGTERM during epoch + 1


@dataclass(frozen=True)
class Shards:
    train: list[str]
    val: list[str]

    @property
    def classes_file(self) -> str | None:
        """The data's class table: the ``classes.txt`` beside the first training shard (``im2rec-tools`` writes it
        there), None when there is none. Read for ``num_classes`` here and kept in the run folder by the writer."""
        path = os.path.join(os.path.dirname(self.train[0]), CLASSES_FILE) if self.train else ""
        return path if os.path.isfile(path) else None


@dataclass(frozen=True)
class RunPlan:
    """Everything a run needs decided before it is built."""
    config: RunConfig
    folder: RunFolder
    resume: ResumePoint | None  # None: a fresh start
    retrain: bool
    schedule: ScheduleOrigin
    engine: str  # MXNET_ENGINE_TYPE for this run
    shards: Shards = field(repr=False)
    channel_multiple: int = 1  # the widths the network computes with (config.channel_multiple resolved)
    notes: list[str] = field(default_factory=list, repr=False)  # what the CLI set up before MXNet loaded, for the log

    @property
    def start_epoch(self) -> int:
        return self.resume.epoch if self.resume else 0


#: Multi-process KVStore types. ``deterministic: auto`` keeps MXNet's threaded engine for them: the serial engine
#: works with ps-lite and Horovod (tested) but does not make a multi-process run bit-reproducible (two identical
#: 2-worker runs still differed in the last bits now and then), so it would only cost speed.
DISTRIBUTED_KV_STORES = ("dist_sync", "dist_device_sync", "horovod")


def wants_serial_engine(config: RunConfig) -> bool:
    """Whether this run should use MXNet's NaiveEngine (see the ``deterministic`` key)."""
    mode = config.deterministic
    return mode == "on" or (mode == "auto" and not config.gpus and config.kv_store not in DISTRIBUTED_KV_STORES)


def channel_multiple(config: RunConfig) -> int:
    """The multiple the network's widths are rounded up to: ``auto`` is 16 on CPUs, where MXNet refuses oneDNN's
    blocked kernels for widths that are not multiples of 16 (``padding.py``), and 1 on GPUs (cuDNN needs none)."""
    if config.channel_multiple == "auto":
        return auto_channel_multiple(bool(config.gpus))
    return int(config.channel_multiple)


def choose_engine(config: RunConfig, environ: Mapping[str, str]) -> str:
    """Workaround for apache/mxnet#13829: the threaded engine reorders floating-point work between runs, so two
    identical CPU runs differ in the last bits after a few steps; the serial NaiveEngine makes them bit-identical at
    no measurable cost on CPU. MXNet reads MXNET_ENGINE_TYPE once, at load; a value the user set is kept."""
    if "MXNET_ENGINE_TYPE" in environ:
        return environ["MXNET_ENGINE_TYPE"]
    return "NaiveEngine" if wants_serial_engine(config) else "ThreadedEnginePerDevice"


def plan_run(argv: list[str] | None = None, environ: Mapping[str, str] | None = None,
             check_data: bool = True) -> RunPlan:
    """Parse ``argv`` (``--config`` YAML, then flags), apply the resume/retrain rules and run the run-level checks."""
    environ = os.environ if environ is None else environ
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config", None)
    given = {**(load_yaml(config_file) if config_file else {}), **args}
    named = _named_load_epoch(given.get("model_load_epoch"))
    if named:
        given["model_load_epoch"] = 1  # a stand-in until the folder that says which epoch is known
    draft = resolve(given)
    folder = RunFolder(draft.output_dir, _prefix(draft, given))
    if named:
        given["model_load_epoch"] = folder.named_epoch(named, "--model-load-epoch")
        draft = resolve(given)
    point = _resume_point(folder, draft)
    if point is None:
        config = draft
        folder.refuse_fresh_run()
        schedule = ScheduleOrigin(0, config.lr, config.warmup_epochs)
    else:
        saved = {k: v for k, v in upgrade_saved(point.manifest.config).items() if k not in RUN_CONTROL_KEYS}
        config = resolve(saved, given)
        if config.retrain:
            schedule = ScheduleOrigin(point.epoch, config.lr, 0)
        else:
            _refuse_schedule_change(resolve(saved), config, given, args, config_file)
            schedule = point.manifest.schedule
        if point.epoch >= config.num_epochs:
            raise UserError(f"the checkpoint is at epoch {point.epoch} and num_epochs is {config.num_epochs}: "
                            f"raise --num-epochs to train further")
    _check_devices(config)
    if config.tensorboard:
        check_available()
    notes = []
    shards = Shards([], [])
    if check_data:
        infer = point is None and "num_classes" not in given
        shards, scan = _find_shards(config)
        config, note = _classes(config, shards, scan, infer, resumed=point is not None)
        notes += [note] if note else []
    multiple = channel_multiple(config)
    notes.append(f"channel_multiple {config.channel_multiple}: widths computed at multiples of {multiple}")
    return RunPlan(config, folder, point, bool(config.retrain), schedule, choose_engine(config, environ), shards,
                   multiple, notes)


def _named_load_epoch(value) -> str | None:
    """``best`` or ``last`` given as ``--model-load-epoch`` (resolved once the run folder is known), else None; a
    word that is neither is one line with the closest."""
    if not isinstance(value, str) or value.strip().isdigit():
        return None
    if value in ("best", "last"):
        return value
    raise UserError(f"--model-load-epoch must be a number, best or last, got {value!r}"
                    f"{did_you_mean([value], ['best', 'last'])}")


def _prefix(draft: RunConfig, given: dict) -> str:
    """The checkpoint prefix: given, else the model's name; a continued run with neither finds it in its folder."""
    if draft.prefix or "model" in given:
        return draft.prefix or draft.model
    if draft.resume is None and draft.model_load_epoch is None:
        return draft.model
    found = prefixes_in(draft.output_dir)
    if len(found) > 1:
        raise UserError(f"{draft.output_dir} holds checkpoints of {len(found)} prefixes ({', '.join(found)}): "
                        f"pass --prefix to choose one")
    return found[0] if found else draft.model


def _resume_point(folder: RunFolder, draft: RunConfig) -> ResumePoint | None:
    """``--resume`` (no epoch): the latest complete epoch, or the mid-epoch checkpoint that follows it;
    ``--resume N`` / ``--model-load-epoch N`` (with or without ``--retrain``): epoch N."""
    epoch: int | None
    if draft.model_load_epoch is not None:
        epoch = draft.model_load_epoch
    elif draft.resume is not None:
        epoch = draft.resume or folder.latest()
        if draft.resume == 0:
            partial = folder.partial_manifest()
            if partial is not None and partial.epoch == (epoch or 0):
                return ResumePoint(partial.epoch, partial, True)
        if epoch is None:
            others = [p for p in prefixes_in(folder.folder) if p != folder.prefix]
            if others:
                command = command_line("train_xception.py", "--output-dir", folder.folder, "--resume", "--prefix",
                                       others[0])
                raise UserError(f"--resume: {folder.folder} holds checkpoints of prefix {others[0]!r}, not "
                                f"{folder.prefix!r} (the model or --prefix given): resume them with: {command}")
            raise UserError(f"--resume: {folder.folder} holds no complete checkpoint (prefix {folder.prefix!r}): "
                            f"nothing to resume; start without --resume")
    else:
        return None
    return ResumePoint(epoch, folder.manifest(epoch), False)


def _refuse_schedule_change(saved: RunConfig, config: RunConfig, given: dict, flags: dict,
                            config_file: str | None) -> None:
    """A resume continues the saved optimiser and schedule exactly: a different one, from a flag or from an edited
    --config file, would be silently ignored, so it is refused."""
    changed = [k for k in FIXED_ON_RESUME if k in given and getattr(config, k) != getattr(saved, k)]
    if not changed:
        return
    key = changed[0]
    flag = "--" + key.replace("_", "-")
    where = flag if key in flags else f"{key}: {given[key]!r} in {config_file}"
    raise UserError(f"{where} with --resume: a resume continues the saved optimiser, schedule, batch size, "
                    f"accumulation and precision exactly (the run has {key} {saved.to_dict()[key]!r}); to change "
                    f"it from epoch N use --retrain --model-load-epoch N --lr LR {flag} ...")


def _check_devices(config: RunConfig) -> None:
    devices = len(config.gpus) or config.cpus
    if config.batch_size % devices and config.kv_store in ("device", "local"):
        raise UserError(f"--batch-size {config.batch_size} is not divisible by the {devices} devices: "
                        f"use a multiple of {devices}")
    parts = devices * config.accumulate
    if config.batch_size % parts and config.kv_store in ("device", "local"):
        raise UserError(f"--batch-size {config.batch_size} does not split into --accumulate "
                        f"{config.accumulate} micro-batches over {devices} device(s): use a multiple of {parts}")
    _check_precision(config)


def _check_precision(config: RunConfig) -> None:
    """float16 AMP needs GPUs (MXNet's CPU kernels have no float16 convolution); bfloat16 AMP runs on oneDNN, so on
    CPUs, and only where the CPU has bfloat16 instructions (elsewhere oneDNN emulates it, slower than float32)."""
    if config.amp == "float16" and not config.gpus:
        raise UserError("--amp float16 needs GPUs (--gpus): MXNet's CPU kernels have no float16 convolution; "
                        "on a CPU with avx512_bf16 use --amp bfloat16")
    if config.amp == "bfloat16":
        if config.gpus:
            raise UserError("--amp bfloat16 runs on CPUs (MXNet's bfloat16 kernels are oneDNN's): on GPUs use "
                            "--amp float16")
        if "avx512_bf16" not in cpu_flags():
            raise UserError("--amp bfloat16: this CPU lacks bfloat16 instructions (no avx512_bf16 in "
                            "/proc/cpuinfo), where it would be slower than float32: train with --amp off")


def _classes(config: RunConfig, shards: Shards, scan: RecordScan, infer: bool,
             resumed: bool = False) -> tuple[RunConfig, str | None]:
    """``num_classes`` from the data when it was not given: the ``classes.txt`` beside the training shards, else
    the labels the start-up check saw; a given value above what the labels use is said in the log, one below them
    refused in one line."""
    seen = scan.max_label + 1
    if not infer and seen > config.num_classes:
        fix = (f"train it on data of its {config.num_classes} classes" if resumed else
               f"give --num-classes {seen} or more, or leave it out (the data sets it)")
        raise UserError(f"num_classes is {config.num_classes}{' (the run being continued)' if resumed else ''}, "
                        f"but {scan.max_label_at} has label {seen - 1}: {fix}")
    if not infer:
        return config, (f"num_classes {config.num_classes} as given, but the labels seen are 0..{seen - 1}: "
                        f"{config.num_classes - seen} classes no image trains" if seen < config.num_classes else None)
    classes_file = shards.classes_file
    if classes_file:
        count, source = len(read_classes(classes_file)), classes_file
        if seen > count:
            raise UserError(f"{classes_file} names {count} classes but the shards hold label {seen - 1}: give the "
                            f"classes.txt of these shards, or --num-classes")
    else:
        count, source = seen, f"the labels seen at start, 0..{seen - 1}"
    return dataclasses.replace(config, num_classes=count), f"num_classes {count}, from {source} (--num-classes sets it)"


def _find_shards(config: RunConfig) -> tuple[Shards, RecordScan]:
    def spec(kind: str) -> str:
        rec = config.train_rec if kind == "train" else config.val_rec
        if rec:
            return rec
        if not config.data_dir:
            raise UserError(f"no {kind} data: give --data-dir DIR (with {kind}*.rec shards) or --{kind}-rec")
        if not os.path.isdir(config.data_dir):
            raise UserError(f"--data-dir {config.data_dir!r} is not a folder")
        refuse_image_folder(config.data_dir, "--data-dir")
        return os.path.join(config.data_dir, kind)

    shards = Shards(find_shards(spec("train")), find_shards(spec("val")))
    if count_records(shards.val) == 0:
        raise UserError(f"the validation shards hold no records: {', '.join(shards.val)}; pack some images into "
                        f"them or give other --val-rec shards")
    start, every = time.time(), shards.train + shards.val
    scan = check_records(every)  # labels against num_classes: _classes
    unverifiable = check_checksums(every, verify=config.verify_checksums)
    check_duplicates(every)
    log.info("checked the headers, labels and image headers of %d records in %d shards%s (%.1fs)", scan.records,
             len(every), " and their checksums" if config.verify_checksums else "", time.time() - start)
    if unverifiable:
        log.info("%d of %d shards have no .crc checksum file (packed by MXNet's im2rec.py?): their records cannot "
                 "be checksum-verified", len(unverifiable), len(every))
    return shards, scan
