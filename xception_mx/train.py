"""The training loop: devices and KVStore, epochs, metrics, checkpoints, exact resume, retrain, signals.

Exactness: epoch k's randomness (data order, augmentation, dropout, mixup) is seeded from (seed, k) alone, and a
checkpoint holds the weights, BN statistics, optimizer states and update counters, and EMA weights bit for bit, so a
run resumed at an epoch boundary reproduces an uninterrupted one exactly (on CPU; cuDNN may pick non-deterministic
kernels on GPUs). A SIGINT/SIGTERM checkpoint taken mid-epoch resumes with the same data order but is not bit-exact.
"""
from __future__ import annotations

import logging
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

from . import checkpoint as ckpt
from . import data
from . import finetune
from .config import ConfigError, dump_yaml, load_yaml, resolve, wants_serial_engine
from .distributed import Cluster, create_cluster
from .metrics import Accumulator, append_jsonl, plot_curves, read_jsonl, truncate_jsonl
from .model import Xception, get_model
from .schedule import build_lr_scheduler

__all__ = ["TrainingError", "Interrupted", "train", "train_step", "evaluate", "make_contexts", "build_config",
           "resume_point"]

log = logging.getLogger("xception_mx.train")


class TrainingError(RuntimeError):
    """A run that cannot go on; the message is one line for the user."""


class Interrupted(TrainingError):
    """SIGINT/SIGTERM: a checkpoint was written and the run stopped."""


def make_contexts(gpus: list[int], cpus: int) -> list[mx.Context]:
    """GPU contexts for ``gpus``, else ``cpus`` CPU contexts."""
    if gpus:
        available = mx.context.num_gpus()
        if available == 0:
            raise ConfigError(f"--gpus {','.join(map(str, gpus))} asked for GPUs, but this MXNet build sees none "
                              f"(CPU-only wheel or no driver): install mxnet-cu112 (see README) or drop --gpus")
        bad = [g for g in gpus if g >= available]
        if bad:
            raise ConfigError(f"--gpus names GPU {bad[0]}, but only {available} GPU(s) are visible "
                              f"(ids 0..{available - 1})")
        if len(set(gpus)) != len(gpus):
            raise ConfigError(f"--gpus lists a GPU twice: {','.join(map(str, gpus))}")
        return [mx.gpu(g) for g in gpus]
    return [mx.cpu(i) for i in range(cpus)]


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + 17) % (2**31 - 1)


def _seed_everything(value: int) -> None:
    random.seed(value)
    np.random.seed(value % (2**32))
    mx.random.seed(value)


@dataclass
class _Shards:
    train: list[str]
    val: list[str]


def _find_shards(config: dict) -> _Shards:
    def spec(kind):
        explicit = config[f"{kind}_rec"]
        if explicit:
            return explicit
        if not config["data_dir"]:
            raise ConfigError(f"no {kind} data: give --data-dir DIR (with {kind}*.rec shards) or --{kind}-rec")
        if not os.path.isdir(config["data_dir"]):
            raise ConfigError(f"--data-dir {config['data_dir']!r} is not a folder")
        return os.path.join(config["data_dir"], kind)

    try:
        shards = _Shards(data.find_shards(spec("train")), data.find_shards(spec("val")))
    except data.DataError as exc:
        raise ConfigError(str(exc)) from None
    checked = data.check_records(shards.train + shards.val)
    log.info("checked the headers of %d records in %d shards", checked, len(shards.train) + len(shards.val))
    return shards


def build_config(argv: list[str] | None = None) -> dict:
    """Parse the CLI (``--config`` YAML, then flags); on --resume, the saved config is the base."""
    from .config import build_parser

    parser = build_parser()
    namespace = vars(parser.parse_args(argv))
    config_path = namespace.pop("config", None)
    yaml_values = load_yaml(config_path) if config_path else {}
    config = resolve(yaml_values, namespace)
    point = resume_point(config)
    if point is not None and not config["retrain"]:
        saved = dict(point.manifest["config"])
        # The run continues as it was configured; only what this command names explicitly changes.
        saved.update({"resume": config["resume"], "model_load_epoch": config["model_load_epoch"]})
        config = resolve(saved, {**yaml_values, **namespace})
    return config


def _prefix(config: dict) -> str:
    return config["prefix"] or config["model"]


@dataclass
class ResumePoint:
    epoch: int  # the last complete epoch (0 for a mid-epoch checkpoint taken during epoch 1)
    manifest: dict
    partial: bool  # True: the mid-epoch checkpoint written on SIGINT/SIGTERM during epoch + 1


def resume_point(config: dict) -> ResumePoint | None:
    """Where to continue from, or None for a fresh start.

    ``--resume`` (no epoch) takes the latest complete epoch, or the mid-epoch checkpoint that follows it;
    ``--resume N`` / ``--model-load-epoch N`` take epoch N.
    """
    prefix, out = _prefix(config), config["output_dir"]
    if config["model_load_epoch"] is not None:
        epoch = config["model_load_epoch"]
    elif config["resume"] is not None:
        epoch = config["resume"] or ckpt.latest_epoch(out, prefix)
        if config["resume"] == 0:
            partial = ckpt.load_partial_manifest(out, prefix)
            if partial is not None and partial["epoch"] == (epoch or 0):
                return ResumePoint(partial["epoch"], partial, True)
        if epoch is None:
            raise ckpt.CheckpointError(f"--resume: no complete checkpoint in {out} (prefix {prefix!r}); "
                                       f"start without --resume")
    else:
        return None
    return ResumePoint(epoch, ckpt.load_manifest(out, prefix, epoch), False)


def _build_net(config: dict) -> Xception:
    overrides = dict(num_classes=config["num_classes"], dropout=config["dropout"],
                     bn_momentum=config["bn_momentum"], bn_epsilon=config["bn_epsilon"])
    if config["pretrained"]:  # converted Keras weights need Keras's pooling and BN epsilon
        overrides.update(finetune.model_overrides(config["pretrained"]))
    if config["filter_list"] is not None:
        overrides["filter_list"] = tuple(config["filter_list"])
    try:
        return get_model(config["model"], **overrides)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _optimizer_params(config: dict, lr_scheduler, multi_precision: bool) -> dict:
    params = {"wd": config["wd"], "lr_scheduler": lr_scheduler,
              "multi_precision": multi_precision}
    if config["optimizer"] in ("sgd", "nag"):
        params["momentum"] = config["momentum"]
    elif config["optimizer"] == "rmsprop":
        params["gamma1"] = config["momentum"]
    return params


class _StopFlag:
    """Remembers SIGINT/SIGTERM so the loop can finish its step and write a checkpoint."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received %s: finishing the current step, then writing a checkpoint",
                    signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _Progress:
    """A tqdm bar on a terminal, else a log line every ``interval`` batches; both with img/s and ETA."""

    def __init__(self, epoch: int, total: int, batch_size: int, interval: int, start: int = 0):
        self.epoch, self.total, self.batch_size, self.interval = epoch, total, batch_size, interval
        self.start_time = time.time()
        self.done = start
        self.first = start
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=f"epoch {epoch}", unit="batch", leave=False)

    def update(self, acc: Accumulator, lr: float) -> None:
        self.done += 1
        elapsed = max(time.time() - self.start_time, 1e-9)
        rate = (self.done - self.first) * self.batch_size / elapsed
        eta = (self.total - self.done) * self.batch_size / max(rate, 1e-9)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{acc.loss:.4f}", top1=f"{acc.top(1):.3f}", img_s=f"{rate:.1f}",
                                 lr=f"{lr:.3g}", refresh=False)
            self.bar.update(1)
        elif self.done % self.interval == 0 or self.done == self.total:
            log.info("epoch %d [%d/%d] loss %.4f top-1 %.4f lr %.4g %.1f img/s ETA %ds", self.epoch, self.done,
                     self.total, acc.loss, acc.top(1), lr, rate, eta)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class _EMA:
    """Exponential moving average of every parameter (BN statistics included), kept on the first device."""

    def __init__(self, named: dict, decay: float, ctx: mx.Context):
        self.decay = decay
        self.ctx = ctx
        self.shadow = {name: p.data(ctx).copy() for name, p in named.items()}

    def update(self, named: dict) -> None:
        for name, p in named.items():
            shadow = self.shadow[name]
            shadow[:] = self.decay * shadow + (1.0 - self.decay) * p.data(self.ctx)

    def swap(self, named: dict) -> None:
        """Exchange the live weights and the averages (call twice to undo)."""
        for name, p in named.items():
            live = p.data(self.ctx).copy()
            p.set_data(self.shadow[name])
            self.shadow[name] = live


def _mix_batch(x: mx.nd.NDArray, y: np.ndarray, num_classes: int, alpha: float, smoothing: float,
               rng: np.random.RandomState):
    """Dense targets with label smoothing and, when alpha > 0, mixup with the batch reversed."""
    onehot = np.eye(num_classes, dtype=np.float32)[y]
    if smoothing:
        onehot = onehot * (1.0 - smoothing) + smoothing / num_classes
    if alpha > 0:
        lam = float(rng.beta(alpha, alpha))
        x = lam * x + (1.0 - lam) * x[::-1]
        onehot = lam * onehot + (1.0 - lam) * onehot[::-1]
    return x, mx.nd.array(onehot)


def train(config: dict) -> dict:
    """Run (or resume) training as configured. Returns the last epoch's metrics record."""
    gpus = config["gpus"]
    if config["kv_store"] == "horovod" and len(gpus) > 1:  # one process per GPU: take ours by local rank
        local_rank = int(os.environ.get("HOROVOD_LOCAL_RANK", os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")))
        gpus = [gpus[local_rank % len(gpus)]]
    ctx = make_contexts(gpus, config["cpus"])
    if config["batch_size"] % len(ctx) and config["kv_store"] in ("device", "local"):
        raise ConfigError(f"--batch-size {config['batch_size']} is not divisible by the {len(ctx)} devices: "
                          f"use a multiple of {len(ctx)}")
    if config["dtype"] == "float16" and not config["gpus"]:
        raise ConfigError("--dtype float16 needs GPUs (--gpus): MXNet's CPU kernels train in float32")
    shards = _find_shards(config)
    prefix, output_dir = _prefix(config), config["output_dir"]
    point = resume_point(config)
    if point is None:
        existing = ckpt.list_epochs(output_dir, prefix)
        if existing or ckpt.load_partial_manifest(output_dir, prefix) is not None:
            have = f"epochs {existing[0]}..{existing[-1]}" if existing else "a mid-epoch checkpoint"
            raise ConfigError(f"{output_dir} already holds checkpoints ({have}): pass --resume to continue, "
                              f"or choose another --output-dir")
    engine = os.environ.get("MXNET_ENGINE_TYPE", "ThreadedEnginePerDevice")
    cluster = create_cluster(config["kv_store"], len(ctx))
    rank, num_workers = cluster.rank, cluster.size
    is_writer = rank == 0  # rank 0 alone writes checkpoints, metrics, curves and config.yaml
    local_batch = cluster.local_batch(config["batch_size"], len(ctx))  # this worker's share of the global batch
    os.makedirs(output_dir, exist_ok=True)
    _log_to_file(os.path.join(output_dir, "train.log" if is_writer else f"train.rank{rank}.log"))

    if wants_serial_engine(config) and engine != "NaiveEngine":
        log.warning("deterministic=%s but MXNet runs %s: results will differ in the last bits from run to run "
                    "(apache/mxnet#13829); set MXNET_ENGINE_TYPE=NaiveEngine before importing mxnet, as "
                    "train_xception.py does", config["deterministic"], engine)

    _seed_everything(config["seed"])
    net = _build_net(config)
    net.initialize(ctx=ctx)
    net.hybridize(static_alloc=True, static_shape=True)
    named = dict(ckpt.iter_named_params(net))
    names = {p: n for n, p in named.items()}
    if config["no_wd_bn_bias"]:
        for name, p in named.items():
            if name.endswith((".gamma", ".beta", ".bias")):
                p.wd_mult = 0.0
    if config["pretrained"] and point is None:  # a resume takes every weight from its checkpoint instead
        loaded = finetune.load_backbone(named, finetune.read_weights(config["pretrained"]))
        log.info("fine-tuning: %d feature parameters from %s, a new %d-way classifier", loaded,
                 config["pretrained"], config["num_classes"])

    batches_per_epoch = data.num_train_batches(shards.train, local_batch, num_parts=num_workers)
    if batches_per_epoch < 1:
        raise ConfigError(f"the training shards hold {data.count_records(shards.train)} images, fewer than one "
                          f"batch of {local_batch} per worker ({num_workers} worker(s)): lower --batch-size")
    if config["max_batches"]:
        batches_per_epoch = min(batches_per_epoch, config["max_batches"])

    arrays, start_epoch, progress = None, 0, None
    schedule_origin = {"start_epoch": 0, "lr": config["lr"], "warmup_epochs": config["warmup_epochs"]}
    if point is not None:
        arrays = ckpt.load_state_arrays(output_dir, prefix, None if point.partial else point.epoch)
        _load_params(named, arrays, "param/")
        start_epoch = point.epoch
        if config["retrain"]:
            schedule_origin = {"start_epoch": point.epoch, "lr": config["lr"], "warmup_epochs": 0}
            log.info("retraining from epoch %d with a new schedule starting at lr %g", point.epoch, config["lr"])
        else:
            schedule_origin = point.manifest["schedule"]
            progress = point.manifest.get("in_progress") if point.partial else None
            log.info("resuming from %s of %s", f"epoch {point.epoch + 1}, batch {progress['batches_done']}"
                     if progress else f"the end of epoch {point.epoch}", output_dir)
    if start_epoch >= config["num_epochs"]:
        raise ConfigError(f"the checkpoint is at epoch {start_epoch} and num_epochs is {config['num_epochs']}: "
                          f"raise --num-epochs to train further")

    lr_scheduler = build_lr_scheduler(
        config["lr_mode"], schedule_origin["lr"], config["num_epochs"], batches_per_epoch,
        start_epoch=schedule_origin["start_epoch"], warmup_epochs=schedule_origin["warmup_epochs"],
        warmup_lr=config["warmup_lr"], decay=config["lr_decay"], decay_period=config["lr_decay_period"],
        step_epochs=config["lr_step_epochs"], power=config["poly_power"], target_lr=config["target_lr"])
    trainer = cluster.make_trainer(net.collect_params(), config["optimizer"],
                                   _optimizer_params(config, lr_scheduler, config["dtype"] == "float16"))
    if point is not None:
        ckpt.restore_optimizer_state(trainer, names, point.manifest["optimizer"], arrays)
    if cluster.distributed:  # every worker starts from rank 0's (initial or loaded) weights
        cluster.sync_initial(trainer, net.collect_params())
    ema = None
    if config["ema"] > 0:
        ema = _EMA(named, config["ema"], ctx[0])
        if arrays is not None and any(k.startswith("ema/") for k in arrays):
            for name in named:
                ema.shadow[name] = arrays["ema/" + name].as_in_context(ctx[0]).copy()

    best = point.manifest.get("best") if point is not None else None
    best = best or {"epoch": None, "val_top1": None}
    metrics_path = os.path.join(output_dir, "metrics.jsonl")
    if is_writer:
        dump_yaml(config, os.path.join(output_dir, "config.yaml"))
        truncate_jsonl(metrics_path, start_epoch)
    log.info("training %s (%s) on %s, global batch %d (%d per device), %d batches/epoch, epochs %d..%d",
             config["model"], "x".join(map(str, net.filter_list)), ",".join(map(str, ctx)), config["batch_size"],
             local_batch // len(ctx), batches_per_epoch, start_epoch + 1, config["num_epochs"])
    if cluster.distributed:
        log.info("%s: worker %d of %d, %d images per step on this worker", cluster.engine, rank, num_workers,
                 local_batch)

    def state_arrays(live_in_shadow: bool) -> tuple[dict, dict]:
        """Raw weights, optimizer states and EMA weights, keyed by structured name."""
        if ema is None:
            state = {f"param/{n}": p.data(ctx[0]) for n, p in named.items()}
        elif live_in_shadow:  # while swapped for evaluation, the live weights sit in the shadow
            state = {f"param/{n}": ema.shadow[n] for n in named}
            state.update({f"ema/{n}": p.data(ctx[0]) for n, p in named.items()})
        else:
            state = {f"param/{n}": p.data(ctx[0]) for n, p in named.items()}
            state.update({f"ema/{n}": ema.shadow[n] for n in named})
        opt_arrays, opt_info = ckpt.optimizer_state_arrays(trainer, names)
        state.update(opt_arrays)
        return state, opt_info

    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss(sparse_label=not (config["label_smoothing"] or config["mixup"]))
    record = None
    with _StopFlag() as stop:
        for epoch in range(start_epoch + 1, config["num_epochs"] + 1):
            frozen = epoch <= config["freeze_features_epochs"]
            finetune.set_features_lr_mult(named, 0.0 if frozen else config["features_lr_mult"])
            record, in_progress = _train_epoch(config, epoch, net, named, trainer, ema, loss_fn, ctx, shards,
                                               batches_per_epoch, stop, cluster, local_batch, progress)
            progress = None
            if cluster.distributed:
                _sync_workers(named, ema, ctx, cluster, trainer)
            if in_progress is not None:  # stopped by a signal mid-epoch
                if is_writer:
                    state, opt_info = state_arrays(live_in_shadow=False)
                    manifest = _manifest(config, epoch - 1, schedule_origin, best, None, opt_info)
                    manifest["in_progress"] = in_progress
                    ckpt.save_checkpoint(output_dir, prefix, None, None, state, manifest)
                raise Interrupted(_interrupt_message(config, epoch, stop.signum, in_progress["batches_done"]))
            if ema is not None:
                ema.swap(named)
            record.update(_validate(config, net, ctx, shards.val, cluster, local_batch))
            if best["val_top1"] is None or record["val_top1"] > best["val_top1"]:
                best = dict(record)
            if is_writer:
                append_jsonl(metrics_path, record)
                state, opt_info = state_arrays(live_in_shadow=ema is not None)
                manifest = _manifest(config, epoch, schedule_origin, best, record, opt_info)
                ckpt.save_checkpoint(output_dir, prefix, epoch, net, state, manifest)
                ckpt.remove_epoch(output_dir, prefix, None)  # a mid-epoch checkpoint is now stale
                _prune(config, epoch, best)
                ckpt.atomic_write_text(os.path.join(output_dir, "best.json"), _json(best))
                plot_curves(metrics_path, os.path.join(output_dir, "curves.png"))
            if ema is not None:
                ema.swap(named)
            log.info("epoch %d: train loss %.4f top-1 %.4f | val loss %.4f top-1 %.4f top-5 %.4f | %.1f img/s, "
                     "%.1fs, lr %.4g", epoch, record["train_loss"], record["train_top1"], record["val_loss"],
                     record["val_top1"], record["val_top5"], record["samples_per_sec"], record["time_s"],
                     record["lr"])
            if _stop_voted(stop, cluster):
                raise Interrupted(_interrupt_message(config, epoch, stop.signum, None))
    if cluster.distributed:
        cluster.barrier()
    log.info("done: best val top-1 %.4f at epoch %s; checkpoints in %s", best["val_top1"], best["epoch"],
             output_dir)
    return record


def _interrupt_message(config, epoch, signum, batches_done) -> str:
    name = signal.Signals(signum).name
    where = f"in epoch {epoch} after batch {batches_done}" if batches_done is not None else f"after epoch {epoch}"
    return (f"stopped by {name} {where}; checkpoint saved. Resume with: train_xception.py --output-dir "
            f"{config['output_dir']} --resume")


def _json(obj) -> str:
    import json

    return json.dumps(obj, indent=1, sort_keys=True)


def _manifest(config, epoch, schedule_origin, best, record, optimizer_info) -> dict:
    return {"format": 1, "epoch": epoch, "config": config, "schedule": schedule_origin, "best": best,
            "metrics": record, "optimizer": optimizer_info, "mxnet": mx.__version__, "prefix": _prefix(config),
            "engine": os.environ.get("MXNET_ENGINE_TYPE", "ThreadedEnginePerDevice")}


def _prune(config: dict, epoch: int, best: dict) -> None:
    keep = config["keep_last"]
    if not keep:
        return
    for old in ckpt.list_epochs(config["output_dir"], _prefix(config)):
        if old <= epoch - keep and old != best["epoch"]:
            ckpt.remove_epoch(config["output_dir"], _prefix(config), old)


def _load_params(named: dict, arrays: dict, key_prefix: str) -> None:
    saved = {k[len(key_prefix):]: v for k, v in arrays.items() if k.startswith(key_prefix)}
    missing = sorted(set(named) - set(saved))
    extra = sorted(set(saved) - set(named))
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise ckpt.CheckpointError(f"the checkpoint does not fit this model ({what}): use the same --model, "
                                   f"--filter-list and --num-classes as the run that wrote it")
    for name, p in named.items():
        if saved[name].shape != p.shape:
            raise ckpt.CheckpointError(f"the checkpoint does not fit this model ({name} is {saved[name].shape}, "
                                       f"the model has {p.shape}): use the same --model, --filter-list and "
                                       f"--num-classes as the run that wrote it")
        p.set_data(saved[name])


def _sync_workers(named: dict, ema, ctx, cluster: Cluster, trainer: gluon.Trainer) -> None:
    """End of an epoch (or a stop): average the BatchNorm running statistics (and their EMA shadows) over the
    workers, which accumulate them from their own batches (no gradient reduces them), and give every worker rank
    0's trainable weights."""
    aux = [name for name, p in named.items() if p.grad_req == "null"]
    cluster.average_params(trainer, {named[n].name: named[n].data(ctx[0]) for n in aux})
    for name in aux:  # every device of this worker gets the averaged statistics
        named[name].set_data(named[name].data(ctx[0]))
    if ema is not None:
        cluster.average_params(trainer, {named[n].name: ema.shadow[n] for n in aux})
    # Rank 0's trainable weights to every worker: keeps tiny cross-worker drift (see xception_mx.distributed)
    # from accumulating, and the checkpoint rank 0 writes is then what every worker holds.
    trainable = [name for name, p in named.items() if p.grad_req != "null"]
    cluster.broadcast_params(trainer, {named[n].name: named[n].data(ctx[0]) for n in trainable})
    for name in trainable:
        named[name].set_data(named[name].data(ctx[0]))


def _stop_voted(stop: "_StopFlag", cluster: Cluster) -> bool:
    """Whether any worker saw SIGINT/SIGTERM (every worker gets the same answer, so all stop at the same step)."""
    if not cluster.distributed:
        return stop.signum is not None
    if cluster.any(stop.signum is not None):
        stop.signum = stop.signum or signal.SIGTERM  # another worker got the signal
        return True
    return False


def _train_epoch(config, epoch, net, named, trainer, ema, loss_fn, ctx, shards, batches_per_epoch, stop,
                 cluster: Cluster, local_batch: int,
                 resume_from: dict | None = None) -> tuple[dict | None, dict | None]:
    """One epoch of this worker's part. Returns (record, None), or (None, in_progress) when a signal stopped it.

    ``resume_from`` (a mid-epoch checkpoint's ``in_progress``) skips the batches already trained on.
    """
    rank, num_workers = cluster.rank, cluster.size
    _seed_everything(_epoch_seed(config["seed"], epoch))
    mix_rng = np.random.RandomState(_epoch_seed(config["seed"], epoch) + 1)
    size = config["input_size"]
    train_data = data.train_iter(
        shards.train, local_batch, (3, size, size), epoch=epoch, seed=config["seed"],
        num_parts=num_workers, part_index=rank, mean=tuple(config["mean"]), std=tuple(config["std"]),
        min_area=config["min_area"], mirror=config["mirror"], color_jitter=config["color_jitter"],
        pca_noise=config["pca_noise"], preprocess_threads=config["preprocess_threads"])
    dense = bool(config["label_smoothing"] or config["mixup"])
    skip = resume_from["batches_done"] if resume_from else 0
    # A mid-epoch checkpoint holds the figures summed over the workers: rank 0 carries them on.
    acc = Accumulator.from_dict(resume_from["acc"]) if resume_from and rank == 0 else Accumulator()
    elapsed_before = resume_from["elapsed"] if resume_from else 0.0
    first_lr = resume_from["first_lr"] if resume_from else None
    progress = _Progress(epoch, batches_per_epoch, config["batch_size"], config["log_interval"], skip)
    start = time.time()
    dtype = config["dtype"]
    done = skip
    for i, batch in enumerate(train_data):
        if i >= batches_per_epoch:
            break
        if i < skip:  # already trained on before the interruption: keep the data order and mixup draws
            if config["mixup"] > 0:
                mix_rng.beta(config["mixup"], config["mixup"])
            continue
        x = batch.data[0]
        labels = batch.label[0].asnumpy()
        data.check_labels(labels, config["num_classes"])
        y = labels.astype(np.int64)
        target = mx.nd.array(y)
        if dense:
            x, target = _mix_batch(x, y, config["num_classes"], config["mixup"], config["label_smoothing"], mix_rng)
        if dtype != "float32":
            x = x.astype(dtype)
        outputs, losses = train_step(net, trainer, loss_fn, x, target, ctx, cluster.step_size(config["batch_size"]))
        if first_lr is None:
            first_lr = trainer.learning_rate
        if ema is not None:
            ema.update(named)
        logits = np.concatenate([o.astype("float32").asnumpy() for o in outputs])
        loss_values = np.concatenate([l.asnumpy() for l in losses])
        if not np.all(np.isfinite(loss_values)):
            latest = ckpt.latest_epoch(config["output_dir"], _prefix(config))
            where = (f"the last good checkpoint is epoch {latest} in {config['output_dir']} (resume with --resume "
                     f"{latest} and a lower --lr, or --retrain)" if latest else "no checkpoint was written yet")
            raise TrainingError(f"loss is not finite at epoch {epoch}, batch {i + 1}: {where}")
        acc.update(logits, y, loss_values)
        done = i + 1
        progress.update(acc, trainer.learning_rate)
        if done < batches_per_epoch and _stop_voted(stop, cluster):
            progress.close()
            if cluster.distributed:
                acc = _allreduce_accumulator(acc, cluster)
            return None, {"epoch": epoch, "batches_done": done, "acc": acc.to_dict(), "first_lr": first_lr,
                          "elapsed": elapsed_before + time.time() - start}
    progress.close()
    if cluster.distributed:  # the epoch's training figures over every worker's part
        acc = _allreduce_accumulator(acc, cluster)
    if done < batches_per_epoch:
        raise data.DataError(f"the training iterator gave {done} batches, {batches_per_epoch} were expected: "
                             f"check the shards with `im2rec-tools verify`")
    elapsed = elapsed_before + time.time() - start
    return {"epoch": epoch, "lr": first_lr, "train_loss": acc.loss, "train_top1": acc.top(1),
            "val_loss": None, "val_top1": None, "val_top5": None,
            "samples_per_sec": acc.count / max(elapsed, 1e-9), "time_s": elapsed}, None


def train_step(net, trainer: gluon.Trainer, loss_fn, x: mx.nd.NDArray, target: mx.nd.NDArray,
               ctx: list[mx.Context], global_batch: int) -> tuple[list, list]:
    """Split the batch evenly over ``ctx``, forward and backward on each device, then one optimizer step.

    The trainer sums gradients over devices (and workers) and scales them by ``1 / global_batch``.
    """
    xs = gluon.utils.split_and_load(x, ctx, even_split=True)
    ts = gluon.utils.split_and_load(target, ctx, even_split=True)
    with autograd.record():
        outputs = [net(xi) for xi in xs]
        losses = [loss_fn(o, t) for o, t in zip(outputs, ts)]
    autograd.backward(losses)
    trainer.step(global_batch)
    return outputs, losses


def _validate(config, net, ctx, val_shards, cluster: Cluster, local_batch: int) -> dict:
    """Each worker scores its part of the validation shards; the counts are summed over the workers."""
    size = config["input_size"]
    val_data = data.val_iter(val_shards, local_batch, (3, size, size), crop_pct=config["crop_pct"],
                             mean=tuple(config["mean"]), std=tuple(config["std"]), num_parts=cluster.size,
                             part_index=cluster.rank, preprocess_threads=config["preprocess_threads"])
    acc = evaluate(net, val_data, ctx, config["num_classes"], config["dtype"])
    if cluster.distributed:
        acc = _allreduce_accumulator(acc, cluster)
    return {"val_loss": acc.loss, "val_top1": acc.top(1), "val_top5": acc.top(5)}


def evaluate(net, val_data, ctx, num_classes: int, dtype: str = "float32", on_batch=None) -> Accumulator:
    """Top-1/top-5 and mean cross-entropy over every image of ``val_data`` once (last batch's padding dropped).

    ``on_batch(logits, labels)`` sees each batch's valid rows (for confusion matrices, progress bars).
    """
    acc = Accumulator()
    for batch in val_data:
        x = batch.data[0]
        labels = batch.label[0].asnumpy()
        valid = x.shape[0] - (batch.pad or 0)
        data.check_labels(labels[:valid], num_classes)
        y = labels.astype(np.int64)
        if dtype != "float32":
            x = x.astype(dtype)
        xs = gluon.utils.split_and_load(x, ctx, even_split=False)
        logits = np.concatenate([net(xi).astype("float32").asnumpy() for xi in xs])[:valid]
        y = y[:valid]
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        acc.update(logits, y, -log_probs[np.arange(valid), y])
        if on_batch is not None:
            on_batch(logits, y)
    return acc


def _allreduce_accumulator(acc: Accumulator, cluster: Cluster) -> Accumulator:
    """Sum validation counts over workers (each saw a disjoint part of the validation set)."""
    count, loss_sum, c1, c5 = cluster.allreduce_sum([acc.count, acc.loss_sum, acc.correct[1], acc.correct[5]])
    return Accumulator(int(round(count)), loss_sum, {1: int(round(c1)), 5: int(round(c5))})


_file_handler = None


def _log_to_file(path: str) -> None:
    global _file_handler
    root = logging.getLogger("xception_mx")
    if _file_handler is not None:
        root.removeHandler(_file_handler)
    _file_handler = logging.FileHandler(path)
    _file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root.addHandler(_file_handler)
