"""A training run's state: what the loop mutates, how it is built from the config, and how it is
saved to and restored from one checkpoint dict (with the checks a resume must pass)."""

from __future__ import annotations

import math
import random
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import vggtrain
from vggtrain import distributed
from vggtrain.averaging import Lookahead, WeightEMA, measured_model
from vggtrain.checkpoint import CheckpointWriter, load_model_state
from vggtrain.config import EarlyStopConfig, TrainConfig
from vggtrain.data import norm_stats, normalize
from vggtrain.device import channels_last_for, select_device
from vggtrain.distill import Teachers
from vggtrain.distributed import Dist
from vggtrain.errors import CheckpointError, UserError, first_line
from vggtrain.finetune import Start, start_model
from vggtrain.optim import use_multi_tensor_kernels
from vggtrain.schedule import build_scheduler
from vggtrain.selection import Selector, build_selector
from vggtrain.tracking import NullTracker, Tracker
from vggtrain.trainable import new_model, optimization, place


@dataclass
class EpochProgress:
    """How far the current epoch got: a mid-epoch checkpoint resumes it exactly."""

    step: int = 0  # batches done in this epoch
    seen: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    time_s: float = 0.0


@dataclass
class EarlyStopState:
    """train.early_stop's counters (in every checkpoint, so a resumed run stops where it would have)."""

    best: float | None = None  # the best validation accuracy of the monitored epochs
    wait: int = 0  # monitored epochs since it last improved by more than min_delta
    stopped_epoch: int = 0  # the epoch training stopped after; 0: it has not
    reason: str = ""

    def update(self, acc: float, epoch: int, rule: EarlyStopConfig) -> bool:
        """Count epoch's validation accuracy; True when training stops after it."""
        if epoch <= rule.start_epoch:
            return False
        if self.best is None or acc > self.best + rule.min_delta:
            self.best, self.wait = acc, 0
            return False
        self.wait += 1
        if self.wait < rule.patience:
            return False
        self.stopped_epoch = epoch
        self.reason = (f"validation accuracy not above {self.best:.2%}"
                       + (f" + {rule.min_delta:g}" if rule.min_delta else "")
                       + f" for {self.wait} epoch(s) (train.early_stop.patience {rule.patience})")
        return True


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
    steps_per_epoch: int  # each rank's, at today's rank count: the schedule's unit
    epoch: int = 0  # completed epochs
    global_step: int = 0
    best_acc: float = -1.0
    best_epoch: int = 0
    train_time_s: float = 0.0
    progress: EpochProgress = field(default_factory=EpochProgress)
    early_stop: EarlyStopState = field(default_factory=EarlyStopState)
    dist: Dist = distributed.SINGLE
    channels_last: bool = False  # train.channels_last resolved for the device
    forward: Any = None  # what the train step calls: the model, its DDP wrapper, or torch.compile'd twin
    lookahead: Lookahead | None = None
    ema: WeightEMA | None = None  # optim.ema_decay's average of the weights and BN buffers
    selector: Selector | None = None  # data.select_keep's proxy
    checkpoints: CheckpointWriter = field(default_factory=CheckpointWriter)  # last.pt, best.pt
    graphed: Any = None  # train.cuda_graphs' captured step (graphs.GraphedStep), False where it cannot
    init: dict[str, Any] | None = None  # init.from's record: where the weights started (finetune.Start)
    teachers: Teachers | None = None  # distill.teachers' models, on the device, frozen (distill.py)
    # log.mlflow's record: {mlflow_run_id, tracking_uri}, so a resume goes on in the same MLflow run
    tracking: dict[str, str] | None = None
    tracker: Tracker | NullTracker = field(default_factory=NullTracker)  # rank 0's, with log.mlflow

    def __post_init__(self) -> None:
        if self.forward is None:
            self.forward = self.model

    @property
    def averagers(self) -> list[Lookahead | WeightEMA]:
        """What the loop steps after each optimizer step, in this order."""
        return [a for a in (self.lookahead, self.ema) if a is not None]

    @property
    def measured(self) -> nn.Module:
        """The weights validation, best.pt's choice, sweeps and probes measure (averaging.measured_model)."""
        return measured_model(self.model, self.ema)

    @property
    def position(self) -> int:
        """Steps done, counted at today's rank count (global_step may hold steps of a job resumed
        from an epoch end with another): the schedule and lookahead are functions of it."""
        return self.epoch * self.steps_per_epoch + self.progress.step

    @property
    def total_steps(self) -> int:
        return math.ceil(self.cfg.train.epochs * self.steps_per_epoch)

    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(), "optimizer": plain_rates(self.optimizer.state_dict()),
            "scheduler": plain_rates(self.scheduler.state_dict()), "scaler": self.scaler.state_dict(),
            "epoch": self.epoch, "global_step": self.global_step, "progress": asdict(self.progress),
            "best_metric": self.best_acc, "best_epoch": self.best_epoch,
            "train_time_s": self.train_time_s, "config": self.cfg.to_dict(),
            "class_names": self.class_names, "rng": _rng_state(self.device), "world_size": self.dist.world,
            "lookahead": self.lookahead.state_dict() if self.lookahead else None,
            "ema": self.ema.state_dict() if self.ema else None,
            "selector": self.selector.state_dict() if self.selector else None,
            "early_stop": asdict(self.early_stop),
            "init": self.init,
            "distill": self.teachers.record() if self.teachers else None,  # re-read and checked on resume
            "tracking": self.tracking,
            "versions": {"vggtrain": vggtrain.__version__, "torch": str(torch.__version__)},
        }

    def restore(self, state: dict[str, Any], source: Path, *, weights_scanned: bool = False) -> None:
        """Continue from a checkpoint's state (one written by any vggtrain version since 0.1.0).
        weights_scanned: state["model"] was checked for NaN and infinity already
        (checkpoint.check_weights_fit, as fit does before building anything): not read through
        again."""
        check_resumable(state, self, source)
        load_model_state(self.model, state["model"], source, scan=not weights_scanned)
        try:
            if not isinstance(state["scheduler"], dict):  # not read (see below), but in every checkpoint
                raise ValueError("its scheduler entry is not a scheduler's state")
            self.optimizer.load_state_dict(state["optimizer"])
            use_multi_tensor_kernels(self.optimizer)  # the saved groups carry their version's choice
            self.scaler.load_state_dict(state["scaler"])
            self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
            self.progress = EpochProgress(**state["progress"])
            self.best_acc, self.best_epoch = float(state["best_metric"]), int(state["best_epoch"])
            self.train_time_s = float(state["train_time_s"])
            # a checkpoint from before train.early_stop has no counters: they start afresh
            self.early_stop = EarlyStopState(**(state.get("early_stop") or {}))
            tracking = state.get("tracking")  # a checkpoint from before log.mlflow has none
            self.tracking = tracking if isinstance(tracking, dict) else None
            _set_rng_state(state["rng"], self.device)
            if self.lookahead is not None:
                self.lookahead.load_state_dict(state.get("lookahead") or None)
            if self.ema is not None:
                if not isinstance(state.get("ema"), dict):
                    raise ValueError("it holds no weight EMA (optim.ema_decay was off when it was written)")
                self.ema.load_state_dict(state["ema"])
            if self.selector is not None:
                if not isinstance(state.get("selector"), dict):
                    raise ValueError("it holds no proxy (data.select_keep was off when it was written)")
                self.selector.load_state_dict(state["selector"], self.cfg, self.steps_per_epoch,
                                              self.total_steps, self.position)
            # The schedule is a function of the position; its saved counter (or an older version's
            # StepLR state) is not needed to continue it.
            self.scheduler = build_scheduler(self.optimizer, self.cfg.schedule, self.steps_per_epoch,
                                             self.total_steps, self.position)
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise CheckpointError(f"{source}: cannot resume from it: {first_line(e)}") from None


def plain_rates(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer's or scheduler's state with its rates as floats, as every checkpoint holds them
    (train.cuda_graphs keeps them as device tensors): one host read, at a checkpoint only."""
    groups = state.get("param_groups")
    if groups is not None:
        state = {**state, "param_groups": [
            {**g, "lr": float(g["lr"])} if isinstance(g.get("lr"), torch.Tensor) else g for g in groups]}
    if any(isinstance(v, torch.Tensor) for v in state.get("_last_lr") or []):
        state = {**state, "_last_lr": [float(v) for v in state["_last_lr"]]}
    return state


def check_resumable(state: dict[str, Any], run: Run, source: Path) -> None:
    """Refuse a checkpoint this run cannot continue exactly."""
    saved_world = state.get("world_size", 1)
    progress = state.get("progress")
    if not isinstance(progress, dict):
        raise CheckpointError(f"{source}: cannot resume from it: no epoch progress entry")
    if progress.get("step") and saved_world != run.dist.world:
        raise CheckpointError(f"{source}: saved mid-epoch by {saved_world} process(es); resume it "
                              f"with the same number (now {run.dist.world}), or from an epoch end")
    saved_names = state.get("class_names")
    if saved_names is not None and list(saved_names) != run.class_names:
        raise CheckpointError(f"{source}: trained on the classes {saved_names}, but the data has "
                              f"{run.class_names}; resume with the data it was trained on")


def refuse_finished_run(run: Run) -> None:
    """A resumed run that has done its epochs and written its report: training again would only
    repeat the test and log it twice at the same step."""
    if run.early_stop.stopped_epoch and (run.dir / "report.json").is_file():
        raise UserError(f"{run.dir} stopped early after epoch {run.early_stop.stopped_epoch} "
                        f"(train.early_stop) and has its report: to test it again, vggtrain eval "
                        f"--ckpt {run.dir}")
    if run.epoch >= run.cfg.train.epochs and (run.dir / "report.json").is_file():
        raise UserError(f"{run.dir} has finished its {run.cfg.train.epochs} epochs and has its "
                        f"report: to train longer, add --set train.epochs=N; to test it "
                        f"again, vggtrain eval --ckpt {run.dir}")


def steps_per_epoch(images: int, d: Dist, batch_size: int) -> int:
    """Each rank's share of the split, in whole batches (train_batches drops the rest)."""
    return (images // d.world) // batch_size


def build_run(cfg: TrainConfig, run_dir: Path, class_names: list[str], train_size: int,
              d: Dist = distributed.SINGLE, device_spec: str | None = None,
              whiten_images: torch.Tensor | None = None, start: Start | None = None,
              teachers: Teachers | None = None) -> Run:
    """A new run for a training split of train_size images. whiten_images: uint8 training images
    for model.whiten's first-layer init (a resumed run overwrites those weights; without images
    the fixed layer stays random, for benchmarks). start: init.from's weights (finetune.py);
    teachers: distill.teachers' (distill.open_teachers), placed here on the run's device."""
    device = select_device(device_spec or cfg.train.device)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    if d.enabled and cfg.data.select_keep is not None:
        raise UserError("config error: data.select_keep trains in one process only (under torchrun "
                        "each rank's proxy would choose from its own shard); set it to null")
    whitening = None  # the model's (and the proxy's) first-layer init images
    if cfg.model.whiten != "none" and whiten_images is not None:  # the first 5,000 suffice, as in airbench
        whitening = normalize(whiten_images[:5000].cpu(), stats=norm_stats(cfg.data))
    model = new_model(cfg.model, whitening)
    if d.enabled and cfg.train.sync_bn:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif d.is_main:
            warnings.warn("train.sync_bn: SyncBatchNorm needs CUDA; each rank keeps its own BN "
                          "statistics", stacklevel=2)
    loaded = start_model(model, start, cfg.init.freeze) if start is not None else set()  # after SyncBN's swap
    channels_last = channels_last_for(cfg.train.channels_last, device)
    model = place(model, device, channels_last)
    steps = steps_per_epoch(train_size, d, cfg.train.batch_size)
    optimizer, scheduler, scaler = optimization(model, cfg, device, steps, loaded)
    # Checkpoints keep saving `model` itself: unwrapped, loadable by a single process.
    forward: Any = model
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.compile:
        forward = compile_model(forward, device)
    lookahead = Lookahead(model, cfg.optim.lookahead_every, cfg.optim.lookahead_final_full_sync) \
        if cfg.optim.lookahead_every else None
    ema = None
    if cfg.optim.ema_decay is not None:
        ema = WeightEMA(model, cfg.optim.ema_decay)
    selector = build_selector(cfg, device, channels_last, steps, whitening)
    if teachers is not None:  # after init.from's choice of data.mean and data.std
        teachers.place(device, channels_last, norm_stats(cfg.data), cfg.train.precision)
    return Run(cfg, run_dir, device, model, optimizer, scheduler, scaler, class_names, steps, dist=d,
               channels_last=channels_last, forward=forward, lookahead=lookahead, ema=ema,
               selector=selector, init=start.record() if start is not None else None, teachers=teachers)


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


def _rng_state(device: torch.device) -> dict[str, Any]:
    """Every generator a run may draw from. The data order and augmentation need none of these:
    they come from a generator seeded by (seed, epoch), see data.TrainLoader."""
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
