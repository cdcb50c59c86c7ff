"""The training loop: config -> model + data + optimizer -> epochs -> checkpoints -> test report."""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import vggtrain
from vggtrain import allocator, distributed
from vggtrain.checkpoint import atomic_write_text, load_checkpoint, load_model_state, save_checkpoint
from vggtrain.config import TrainConfig, dump_config
from vggtrain.data import Split, load_cifar10, normalize, split_train_val, train_batches
from vggtrain.device import autocast, channels_last_for, select_device
from vggtrain.distributed import Dist
from vggtrain.errors import CheckpointError, RunStopped, UserError, first_line
from vggtrain.evaluate import Evaluation, build_report, evaluate_split
from vggtrain.model import build_model, count_parameters, init_whitening
from vggtrain.rundir import (
    check_resume_point_unchanged,
    check_run_dir,
    delete_run_dir,
    lock_run_dir,
    remove_stale_temp_files,
)


@dataclass
class EpochProgress:
    """How far the current epoch got: a mid-epoch checkpoint resumes it exactly."""

    step: int = 0  # batches done in this epoch
    seen: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    time_s: float = 0.0


@dataclass
class Run:
    """Everything a training run mutates, in one place so a checkpoint can hold it whole."""

    cfg: TrainConfig
    dir: Path
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    class_names: list[str]
    epoch: int = 0  # completed epochs
    global_step: int = 0
    best_acc: float = -1.0
    best_epoch: int = 0
    train_time_s: float = 0.0
    progress: EpochProgress = field(default_factory=EpochProgress)
    dist: Dist = distributed.SINGLE
    channels_last: bool = False  # train.channels_last resolved for the device
    forward: Any = None  # what the train step calls: the model, or its torch.compile'd twin
    slow: list[torch.Tensor] | None = None  # lookahead's slow weights (optim.lookahead_every)

    def __post_init__(self) -> None:
        if self.forward is None:
            self.forward = self.model
        if self.cfg.optim.lookahead_every and self.slow is None:
            self.slow = [t.detach().clone() for t in _float_tensors(self.model)]

    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "epoch": self.epoch, "global_step": self.global_step, "progress": asdict(self.progress),
            "best_metric": self.best_acc, "best_epoch": self.best_epoch,
            "train_time_s": self.train_time_s, "config": self.cfg.to_dict(),
            "class_names": self.class_names, "rng": _rng_state(self.device), "world_size": self.dist.world,
            "lookahead": self.slow,
            "versions": {"vggtrain": vggtrain.__version__, "torch": str(torch.__version__)},
        }

    def restore(self, state: dict[str, Any], source: Path) -> None:
        saved_world = state.get("world_size", 1)
        progress = state.get("progress")
        if not isinstance(progress, dict):
            raise CheckpointError(f"{source}: cannot resume from it: no epoch progress entry")
        if progress.get("step") and saved_world != self.dist.world:
            raise CheckpointError(f"{source}: saved mid-epoch by {saved_world} process(es); resume it "
                                  f"with the same number (now {self.dist.world}), or from an epoch end")
        saved_names = state.get("class_names")
        if saved_names is not None and list(saved_names) != self.class_names:
            raise CheckpointError(f"{source}: trained on the classes {saved_names}, but the data has "
                                  f"{self.class_names}; resume with the data it was trained on")
        load_model_state(self.model, state["model"], source)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
            self.progress = EpochProgress(**state["progress"])
            self.best_acc, self.best_epoch = float(state["best_metric"]), int(state["best_epoch"])
            self.train_time_s = float(state["train_time_s"])
            _set_rng_state(state["rng"], self.device)
            if self.slow is not None:
                saved = state.get("lookahead") or _float_tensors(self.model)
                if len(saved) != len(self.slow):
                    raise ValueError("lookahead state does not match the model")
                for slow, value in zip(self.slow, saved, strict=True):
                    slow.copy_(value)
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise CheckpointError(f"{source}: cannot resume from it: {first_line(e)}") from None


def _rng_state(device: torch.device) -> dict[str, Any]:
    """Every generator a run may draw from. The data order and augmentation need none of these:
    they come from a generator seeded by (seed, epoch), see train_one_epoch."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            # The run's own GPU only (rank 0's, which every rank's matches: they are seeded alike
            # and draw alike); all GPUs' states would be other ranks' untouched generators.
            "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else [],
            # as plain data: weights_only loading refuses numpy arrays
            "numpy": [kind, keys.tolist(), pos, has_gauss, gauss]}


def _set_rng_state(rng: dict[str, Any], device: torch.device) -> None:
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"][0], device)
    kind, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


def _float_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every floating-point parameter and buffer (BN statistics too): what lookahead averages and
    what must stay finite."""
    return [t for t in model.state_dict().values() if t.is_floating_point()]


def _lookahead_decay(cfg: TrainConfig, step: int, total: int) -> float:
    return 0.95 ** cfg.optim.lookahead_every * (step / max(total, 1)) ** 3


@torch.no_grad()
def lookahead_sync(run: Run, step: int, total_steps: int) -> None:
    """Slow weights <- lerp(slow, fast, 1 - decay); fast <- slow, at step (1-based) of total_steps.
    Written here because torch has no Lookahead; this is airbench's schedule, whose decay is ~0
    early and 0.95^N at the end."""
    if run.slow is None:
        return
    decay = _lookahead_decay(run.cfg, step, total_steps)
    fast = _float_tensors(run.model)
    torch._foreach_lerp_(run.slow, fast, 1.0 - decay)
    torch._foreach_copy_(fast, run.slow)


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """SGD parameter groups: one, or conv/linear weights apart from the 1-D parameters (BN weights,
    biases) when those get no weight decay, plus BN biases at lr x bn_bias_lr_scale when that is
    not 1. Frozen parameters (a whitening layer) are left out."""
    o = cfg.optim
    live = [p for p in model.parameters() if p.requires_grad]
    fast: list[nn.Parameter] = []
    if o.bn_bias_lr_scale != 1.0:
        ids = {id(m.bias) for m in model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.bias is not None}
        fast = [p for p in live if id(p) in ids]
        live = [p for p in live if id(p) not in ids]
    groups: list[dict[str, Any]] = [{"params": live}]
    if o.exclude_bn_bias_from_decay:
        groups = [{"params": [p for p in live if p.ndim > 1]},
                  {"params": [p for p in live if p.ndim <= 1], "weight_decay": 0.0}]
    if fast:
        decay = 0.0 if o.exclude_bn_bias_from_decay else o.weight_decay / o.bn_bias_lr_scale
        groups.append({"params": fast, "lr": o.lr * o.bn_bias_lr_scale, "weight_decay": decay})
    return [g for g in groups if g["params"]]


def build_run(cfg: TrainConfig, run_dir: Path, class_names: list[str], d: Dist = distributed.SINGLE,
              device_spec: str | None = None, whiten_images: torch.Tensor | None = None) -> Run:
    """whiten_images: uint8 training images for model.whiten's first-layer init (a resumed run
    overwrites those weights; without images the fixed layer stays random, for benchmarks)."""
    device = select_device(device_spec or cfg.train.device)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    model = build_model(cfg.model)
    if cfg.model.whiten and whiten_images is not None:  # the first 5,000 suffice, as in airbench
        init_whitening(model, normalize(whiten_images[:5000].cpu()))
    if d.enabled and cfg.train.sync_bn:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif d.is_main:
            warnings.warn("train.sync_bn: SyncBatchNorm needs CUDA; each rank keeps its own BN "
                          "statistics", stacklevel=2)
    model = model.to(device)
    channels_last = channels_last_for(cfg.train.channels_last, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    o = cfg.optim
    optimizer = torch.optim.SGD(param_groups(model, cfg), lr=o.lr, momentum=o.momentum,
                                nesterov=o.nesterov and o.momentum > 0, weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, cfg.schedule.step_size, cfg.schedule.gamma)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
    # Checkpoints keep saving `model` itself: unwrapped, loadable by a single process.
    forward: Any = model
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.compile:
        forward = compile_model(forward, device)
    return Run(cfg, run_dir, device, model, optimizer, scheduler, scaler, class_names, dist=d,
               channels_last=channels_last, forward=forward)


def compile_model(model: nn.Module, device: torch.device) -> Any:
    """torch.compile for the train step, or the model itself (with a warning) where the compiler
    cannot work. Checkpoints keep saving the plain model's state_dict either way."""
    missing = None
    if device.type == "cpu" and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        missing = "no C++ compiler on PATH"
    elif device.type == "cuda":
        from torch.utils._triton import has_triton

        missing = None if has_triton() else "triton is not installed"
    elif device.type not in ("cpu", "cuda"):
        missing = f"not supported on {device.type}"
    if missing:
        warnings.warn(f"train.compile: {missing}; training uncompiled", stacklevel=2)
        return model
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True  # a graph that fails to compile runs eagerly
    return torch.compile(model)


class StopSignals:
    """The first SIGINT or SIGTERM asks the loop to stop after the current step and checkpoint;
    a second one aborts at once (atomic writes still leave every file whole)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum = signum
            print(f"\n{signal.Signals(signum).name}: stopping after this step (under torchrun: at "
                  f"the next log interval); send it again to abort at once", file=sys.stderr, flush=True)
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise RunStopped(f"aborted by a second {signal.Signals(signum).name}", 128 + signum)


def steps_per_epoch(images: int, d: Dist, batch_size: int) -> int:
    """Each rank's share of the split, in whole batches (train_batches drops the rest)."""
    return (images // d.world) // batch_size


def train_step(run: Run, x: torch.Tensor, y: torch.Tensor, criterion: nn.Module
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, backward, optimizer step. Returns the detached loss and logits; no host sync."""
    with autocast(run.device, run.cfg.train.precision):
        logits = run.forward(x)
        loss = criterion(logits.float(), y)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return loss.detach(), logits.detach()


def train_one_epoch(run: Run, train: Split, writer: Any, bar: tqdm, stop: StopSignals) -> dict[str, float]:
    cfg, device, p, d = run.cfg, run.device, run.progress, run.dist
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    # Derived from (seed, epoch) rather than carried along, so a resumed run draws the same batches.
    generator = torch.Generator().manual_seed((cfg.seed * 1_000_003 + run.epoch + 1) % 2**63)
    # Running sums stay on the device: the host reads them once per log interval, not per step.
    # A checkpoint holds the sums over all ranks, so on resume rank 0 alone starts from them.
    carried = (p.loss_sum, p.correct, p.seen) if d.is_main else (0.0, 0, 0)
    loss_sum = torch.tensor(carried[0], device=device, dtype=torch.float32)
    correct = torch.tensor(carried[1], device=device, dtype=torch.int64)
    seen = carried[2]
    pending: list[torch.Tensor] = []  # per-step losses not yet written to TensorBoard
    every = cfg.train.checkpoint_every_steps
    t0 = time.perf_counter() - p.time_s
    bar.update(p.step)
    run.model.train()
    steps = steps_per_epoch(len(train), d, cfg.train.batch_size)
    warmup_steps, total_steps = cfg.schedule.warmup_epochs * steps, cfg.train.epochs * steps
    lookahead = cfg.optim.lookahead_every
    for x, y in train_batches(train, cfg.train.batch_size, generator, cfg.data.augment,
                              run.channels_last, start=p.step, rank=d.rank, world=d.world,
                              pad=cfg.data.crop_padding):
        # The schedule's position counts steps at today's rank count (global_step may hold steps
        # of a job resumed from an epoch end with another); a function of it resumes exactly.
        position = run.epoch * steps + p.step
        if position < warmup_steps:
            for group, lr in zip(run.optimizer.param_groups, run.scheduler.get_last_lr(), strict=True):
                group["lr"] = _warmup_lr(lr, position, warmup_steps)
        loss, logits = train_step(run, x, y, criterion)
        run.global_step += 1
        p.step += 1
        if lookahead and ((position + 1) % lookahead == 0 or p.step == steps):
            lookahead_sync(run, position + 1, total_steps)  # epoch ends too: checkpoints hold synced weights
        seen += len(y)
        pending.append(loss)
        loss_sum += loss * len(y)
        correct += (logits.argmax(1) == y).sum()
        bar.update(1)
        periodic = bool(every) and run.global_step % every == 0
        # One process stops at once; ranks of a job decide together at the next log interval.
        signalled = stop.signum is not None and not d.enabled
        if len(pending) == cfg.train.log_every or periodic or signalled:
            _flush_step_losses(run, writer, pending)
            stopping = _agreed_signal(run, stop)
            if not bar.disable:  # two more host reads, only for a person watching
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}",
                                lr=f"{run.optimizer.param_groups[0]['lr']:.3g}",
                                img_s=f"{seen / (time.perf_counter() - t0):.0f}", refresh=False)
            if periodic or stopping:
                check_weights_finite(run, f"epoch {run.epoch + 1}, step {p.step}")
                totals = _epoch_totals(run, loss_sum, correct, seen)
                p.loss_sum, p.correct, p.seen = totals
                p.time_s = time.perf_counter() - t0
                if d.is_main:
                    writer.flush()
                    save_checkpoint(run.dir / "last.pt", run.state())
            if stopping:
                distributed.barrier(d)  # no rank leaves (and gets killed) before rank 0 has saved
                name = signal.Signals(stopping).name
                raise RunStopped(f"stopped by {name} at epoch {run.epoch + 1}, step {p.step}; saved "
                                 f"{run.dir / 'last.pt'}. Resume with: vggtrain fit --resume {run.dir}",
                                 128 + stopping)
    _flush_step_losses(run, writer, pending)
    elapsed = time.perf_counter() - t0
    total_loss, total_correct, total_seen = _epoch_totals(run, loss_sum, correct, seen)
    n = max(total_seen, 1)
    return {"loss": total_loss / n, "acc": total_correct / n, "images_per_s": total_seen / elapsed,
            "time_s": elapsed}


def _epoch_totals(run: Run, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int
                  ) -> tuple[float, int, int]:
    """(loss sum, correct, images) over all ranks so far this epoch: one host read."""
    dtype = torch.float32 if run.device.type == "mps" else torch.float64  # MPS has no float64
    packed = torch.stack([loss_sum.to(dtype), correct.to(dtype),
                          torch.tensor(seen, device=run.device, dtype=dtype)])
    loss, n_correct, n_seen = distributed.all_sum(packed, run.dist).tolist()
    return loss, int(n_correct), int(n_seen)


def _flush_step_losses(run: Run, writer: Any, pending: list[torch.Tensor]) -> None:
    """Write the interval's per-step losses, averaged over ranks (one host read), and stop on a
    non-finite one."""
    if not pending:
        return
    values = distributed.all_sum(torch.stack(pending).float(), run.dist).div_(run.dist.world).tolist()
    first = run.global_step - len(pending) + 1
    pending.clear()
    for i, value in enumerate(values):
        if not math.isfinite(value):
            raise RunStopped(f"non-finite loss ({value}) at epoch {run.epoch + 1}, step {first + i}; "
                             f"{_kept(run)} (try a lower optim.lr)", 1)
        writer.add_scalar("train/loss_step", value, first + i)


def _kept(run: Run) -> str:
    last = run.dir / "last.pt"
    return f"the last good checkpoint {last} is kept" if last.is_file() else "no checkpoint yet"


def check_weights_finite(run: Run, where: str) -> None:
    """Stop before a checkpoint is written if the last update left a NaN or inf in the weights
    (the losses so far were finite, so they cannot tell): a checkpoint on disk is always one a run
    can go on from. One host read; ranks agree, as their weights are the same."""
    bad = ~torch.stack([t.isfinite().all() for t in _float_tensors(run.model)]).all()
    if int(distributed.all_max(bad.to(torch.int64), run.dist)):
        raise RunStopped(f"non-finite weights after {where}: training diverged; {_kept(run)} "
                         f"(try a lower optim.lr)", 1)


def _agreed_signal(run: Run, stop: StopSignals) -> int:
    """The signal any rank was sent (the largest number), or 0: every rank stops at the same step."""
    if not run.dist.enabled:
        return stop.signum or 0
    flag = torch.tensor(stop.signum or 0, device=run.device)
    return int(distributed.all_max(flag, run.dist))


def _warmup_lr(lr: float, position: int, warmup_steps: int) -> float:
    """The scheduler's rate lr at the schedule's step position (0-based): linear warm-up to it."""
    return lr * (position + 1) / warmup_steps if position < warmup_steps else lr


def _epoch_start_lr(run: Run, steps: int) -> float:
    """The first parameter group's rate at the epoch's first step (inside warm-up too, and after a
    mid-epoch resume), for the log and TensorBoard's train/lr."""
    return _warmup_lr(run.scheduler.get_last_lr()[0], run.epoch * steps,
                      run.cfg.schedule.warmup_epochs * steps)


EpochHook = Callable[["Run"], bool]


def train_epochs(run: Run, train: Split, val: Split, writer: Any, on_epoch_end: EpochHook | None = None
                 ) -> None:
    """Epochs until cfg.train.epochs: train, validate, log, checkpoint (last.pt, best.pt).
    Under torchrun every rank runs this; rank 0 alone prints and writes.

    on_epoch_end(run), called after each epoch's checkpoints, may end training early by returning
    True (scripts/time_to_accuracy.py measures the test accuracy there)."""
    cfg, d = run.cfg, run.dist
    steps = steps_per_epoch(len(train), d, cfg.train.batch_size)
    with StopSignals() as stop:
        while run.epoch < cfg.train.epochs:
            lr = _epoch_start_lr(run, steps)
            with tqdm(total=steps, desc=f"epoch {run.epoch + 1}/{cfg.train.epochs}", leave=False,
                      file=sys.stdout, disable=not (sys.stdout.isatty() and d.is_main),
                      dynamic_ncols=True) as bar:
                tr = train_one_epoch(run, train, writer, bar, stop)
            if run.epoch >= cfg.schedule.warmup_epochs:
                run.scheduler.step()
            run.epoch += 1
            run.progress = EpochProgress()
            run.train_time_s += tr["time_s"]
            va = None
            distributed.sync_buffers(run.model, d)  # all ranks validate what last.pt will hold
            if len(val):  # each rank measures its shard; the sums are all-reduced
                ev = evaluate_split(run.model, val, cfg.model.num_classes, cfg.train.eval_batch_size,
                                    run.device, cfg.train.precision, run.channels_last,
                                    tta=cfg.train.tta, dist=d)
                va = {"loss": ev.loss, "acc": ev.top1}
                if not math.isfinite(ev.loss):  # the epoch's last update broke the weights
                    raise RunStopped(f"non-finite validation loss after epoch {run.epoch}; the last good "
                                     f"checkpoint in {run.dir} is kept (try a lower optim.lr)", 1)
            check_weights_finite(run, f"epoch {run.epoch}")  # without validation, nothing else would
            improved = va is None or va["acc"] > run.best_acc
            if improved:
                run.best_acc, run.best_epoch = (va["acc"] if va else -1.0), run.epoch

            if d.is_main:
                step = run.global_step
                for tag, value in [("train/loss", tr["loss"]), ("train/acc", tr["acc"]),
                                   ("train/lr", lr), ("train/images_per_s", tr["images_per_s"]),
                                   ("train/epoch", run.epoch)]:
                    writer.add_scalar(tag, value, step)
                if va:
                    writer.add_scalar("val/loss", va["loss"], step)
                    writer.add_scalar("val/acc", va["acc"], step)
                writer.flush()  # before the checkpoint: a resume purges whatever came after it
                state = run.state()
                # best.pt first: a run killed between the two writes resumes from the previous
                # last.pt and redoes this epoch, instead of keeping a last.pt whose best_epoch
                # points at weights that best.pt never received.
                if improved:
                    save_checkpoint(run.dir / "best.pt", state)
                save_checkpoint(run.dir / "last.pt", state)
                val_text = f" | val loss {va['loss']:.4f} acc {va['acc']:.2%}" if va else ""
                print(f"epoch {run.epoch}/{cfg.train.epochs} | train loss {tr['loss']:.4f} "
                      f"acc {tr['acc']:.2%}{val_text} | lr {lr:.4g} | {tr['images_per_s']:.0f} img/s | "
                      f"{tr['time_s']:.1f}s{' | best' if improved and va else ''}", flush=True)
            # A signal that came during validation or checkpointing (all ranks decide together).
            signum = _agreed_signal(run, stop)
            if signum:
                distributed.barrier(d)
                raise RunStopped(f"stopped by {signal.Signals(signum).name} after epoch {run.epoch}; "
                                 f"resume with: vggtrain fit --resume {run.dir}", 128 + signum)
            if on_epoch_end is not None:  # any rank's True ends training on every rank
                done = torch.tensor(int(bool(on_epoch_end(run))), device=run.device)
                if int(distributed.all_max(done, d)):
                    break


class _NoWriter:
    """The TensorBoard writer of ranks other than 0: every call does nothing."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def _open_summary_writer(tb_dir: Path, purge_step: int | None) -> Any:
    """A SummaryWriter whose event file TensorBoard reads after every file already in tb_dir.

    TensorBoard reads a run's event files in name order, and a name starts with the second the
    writer opened, then the pid. A resumed writer opened within the same second as the killed
    run's (or on a machine whose clock is a little behind) can sort first: its purge is then read
    before the events it was meant to purge, and the killed run's steps land after the resumed
    ones. Waiting out that second is the only ordering the file name offers."""
    from torch.utils.tensorboard import SummaryWriter  # slow import, only needed here

    seconds = []
    for path in tb_dir.glob("events.out.tfevents.*"):
        try:
            seconds.append(int(path.name.split(".")[3]))
        except (IndexError, ValueError):
            pass  # not a name TensorBoard's writers make: it does not take part in the order
    wait = max(seconds, default=0) + 1 - time.time()
    if wait > 5:
        print(f"warning: {tb_dir} has event files dated {wait:.0f} s ahead of this machine's "
              f"clock; TensorBoard will read this run's new curves before them", file=sys.stderr)
    elif wait > 0:
        time.sleep(wait)
    # purge_step drops events a killed run wrote after its last checkpoint: no duplicated steps.
    return SummaryWriter(str(tb_dir), purge_step=purge_step)


def fit(cfg: TrainConfig, run_dir: Path, resume: tuple[Path, dict] | None = None,
        force: bool = False, on_epoch_end: EpochHook | None = None) -> dict | None:
    """Train, checkpoint every epoch, then test the best checkpoint. Returns the report (None on
    ranks other than 0 of a torchrun job).

    resume: (path, state) of the checkpoint to continue from, as load_checkpoint read it.
    on_epoch_end: see train_epochs.
    """
    d = distributed.from_env()
    device_spec = distributed.init(d, cfg.train.device)
    try:
        with ExitStack() as held:  # what rank 0 holds for the run's lifetime: its directory's lock
            report = _fit(cfg, run_dir, resume, force, d, device_spec, held, on_epoch_end)
        distributed.barrier(d)  # the other ranks wait for rank 0's report before the group ends
        return report
    finally:
        distributed.shutdown()


def _rank0_verdict(d: Dist, check: Callable[[], None]) -> None:
    """Run check on rank 0 alone (it owns the run directory and the report); the UserError it
    raises, if any, stops every rank of the job with the same message."""
    problem = None
    if d.is_main:
        try:
            check()
        except UserError as e:
            problem = str(e)
    problem = distributed.agree(problem, d)
    if problem:
        raise UserError(problem)


def _fit(cfg: TrainConfig, run_dir: Path, resume: tuple[Path, dict] | None, force: bool, d: Dist,
         device_spec: str, held: ExitStack, on_epoch_end: EpochHook | None = None) -> dict | None:
    locked = False  # rank 0 holds the run directory's lock (see lock_run_dir)

    def claim_run_dir() -> None:
        nonlocal locked
        check_run_dir(run_dir, resume is not None, force)
        if run_dir.is_dir():
            locked = lock_run_dir(run_dir, held)
            if locked and resume is not None:
                check_resume_point_unchanged(*resume)

    _rank0_verdict(d, claim_run_dir)
    if d.enabled and d.local_rank != 0:
        distributed.barrier(d)  # let this node's local rank 0 download the data first
    train_full, test, class_names = load_cifar10(cfg.data.root, cfg.data.download)
    if d.enabled and d.local_rank == 0:
        distributed.barrier(d)
    if len(class_names) != cfg.model.num_classes:
        raise UserError(f"config error: model.num_classes is {cfg.model.num_classes} but the data "
                        f"in {cfg.data.root} has {len(class_names)} classes")
    train, val = split_train_val(train_full, cfg.data.val_size, cfg.seed)
    if steps_per_epoch(len(train), d, cfg.train.batch_size) == 0:
        raise UserError(f"config error: train.batch_size {cfg.train.batch_size} is larger than the "
                        f"{len(train) // d.world} training images of each of {d.world} rank(s)")
    run = build_run(cfg, run_dir, class_names, d, device_spec, whiten_images=train.images)
    if resume is not None:
        run.restore(resume[1], resume[0])

        def not_finished() -> None:
            if run.epoch >= cfg.train.epochs and (run_dir / "report.json").is_file():
                # Training again would only repeat the test and log it twice at the same step.
                raise UserError(f"{run_dir} has finished its {cfg.train.epochs} epochs and has its "
                                f"report: to train longer, add --set train.epochs=N; to test it "
                                f"again, vggtrain eval --ckpt {run_dir}")

        _rank0_verdict(d, not_finished)
    if run.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    train, val, test = train.to(run.device), val.to(run.device), test.to(run.device)

    def prepare_run_dir() -> None:
        nonlocal locked
        try:
            if not locked and run_dir.exists():
                claim_run_dir()  # it appeared while the data loaded (the same name started twice)
            if force and resume is None and run_dir.exists():
                delete_run_dir(run_dir)  # only now that data, config and device have all checked out
                locked = False  # the lock went with the old directory
            run_dir.mkdir(parents=True, exist_ok=True)
            if not locked:
                locked = lock_run_dir(run_dir, held)
            if locked:
                remove_stale_temp_files(run_dir)
            atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
        except OSError as e:
            raise UserError(f"run directory {run_dir}: cannot write it ({e.strerror or e})") from None

    _rank0_verdict(d, prepare_run_dir)  # every rank stops, not only the one that knows
    writer: Any = _NoWriter()
    if d.is_main:
        where = f"; resuming at epoch {run.epoch + 1}, step {run.progress.step}" if resume else ""
        ranks = f" x {d.world} ranks (batch {cfg.train.batch_size} each)" if d.enabled else ""
        print(f"run {run_dir}: {cfg.model.arch} ({count_parameters(run.model):,} parameters) on "
              f"{run.device}{ranks}, {cfg.train.precision}; {len(train)} train / {len(val)} val / "
              f"{len(test)} test images{where}", flush=True)
        print(f"allocator: {allocator.in_effect()}", flush=True)
        writer = _open_summary_writer(run_dir / "tb", run.global_step + 1 if resume else None)
    try:
        train_epochs(run, train, val, writer, on_epoch_end)
        if not d.is_main:
            return None
        from vggtrain.report import log_report, report_pictures, write_report_files  # imports evaluate

        report, evaluation = test_report(run, test)
        pictures = report_pictures(report, evaluation, test)
        log_report(writer, report, pictures, run.global_step)
    finally:
        writer.close()
    write_report_files(run_dir, report, pictures)
    # Last: a report.json means the pictures and report.md beside it are complete.
    atomic_write_text(run_dir / "report.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    m = report["metrics"]
    loss = "n/a" if m["loss"] is None else f"{m['loss']:.4f}"
    print(f"test accuracy {m['top1']:.2%} (top-5 {m['top5']:.2%}, loss {loss}, {m['images']} images) "
          f"with best.pt from epoch {report['best_epoch']}; report in {run_dir / 'report.md'}", flush=True)
    return report


def test_report(run: Run, test: Split) -> tuple[dict[str, Any], Evaluation]:
    """Load best.pt into the model and measure it on the test set, which nothing else touches.

    Returns the report (the schema `vggtrain eval` writes, plus the run's training facts) and the
    evaluation itself, whose per-image predictions the report's pictures need.
    """
    best = load_checkpoint(run.dir / "best.pt", map_location=run.device)
    run.model.load_state_dict(best["model"])
    cfg = run.cfg
    ev = evaluate_split(run.model, test, len(run.class_names), cfg.train.eval_batch_size, run.device,
                        cfg.train.precision, run.channels_last, tta=cfg.train.tta)
    report = build_report(ev, split="test", model=run.model, cfg=cfg, class_names=run.class_names,
                          checkpoint=run.dir / "best.pt", checkpoint_epoch=int(best["epoch"]),
                          device=run.device, precision=cfg.train.precision, tta=cfg.train.tta)
    m = report["metrics"]
    report.update({
        "test": {"loss": m["loss"], "acc": m["top1"], "images": m["images"]},  # fit's first keys
        "best_epoch": int(best["epoch"]),
        "val_acc": best["best_metric"] if cfg.data.val_size else None,
        "epochs": run.epoch,
        "train_time_s": run.train_time_s,
        "allocator": allocator.in_effect(),  # the CPU memory allocator the run trained with
    })
    return report, ev
