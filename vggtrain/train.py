"""The training loop: config -> model + data + optimizer -> epochs -> checkpoints -> test report."""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

import vggtrain
from vggtrain.checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from vggtrain.config import TrainConfig, dump_config
from vggtrain.data import Split, eval_batches, load_cifar10, split_train_val, train_batches
from vggtrain.errors import UserError
from vggtrain.model import build_model, count_parameters

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def select_device(spec: str) -> torch.device:
    """auto picks cuda, then mps, then cpu; an explicit device that is absent is a usage error."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda" and (not torch.cuda.is_available()
                                  or (device.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"device {spec} is not available (CUDA devices: {torch.cuda.device_count()})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("device mps is not available on this machine")
    return device


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int, device: torch.device,
             precision: str = "fp32", channels_last: bool = False) -> dict[str, float]:
    """Loss and top-1 accuracy over a whole split; one host sync at the end."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    for x, y in eval_batches(split, batch_size, channels_last):
        with autocast(device, precision):
            logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    n = max(len(split), 1)
    return {"loss": loss_sum.item() / n, "acc": correct.item() / n, "images": len(split)}


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

    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "epoch": self.epoch, "global_step": self.global_step,
            "best_metric": self.best_acc, "best_epoch": self.best_epoch,
            "train_time_s": self.train_time_s, "config": self.cfg.to_dict(),
            "class_names": self.class_names,
            "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "versions": {"vggtrain": vggtrain.__version__, "torch": str(torch.__version__)},
        }

    def restore(self, state: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
            self.best_acc, self.best_epoch = float(state["best_metric"]), int(state["best_epoch"])
            self.train_time_s = float(state["train_time_s"])
            random.setstate(state["rng"]["python"])
            torch.set_rng_state(state["rng"]["torch"])
            if state["rng"]["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise UserError(f"checkpoint error: cannot resume from it "
                            f"({str(e).strip().splitlines()[0][:200]})") from None


def build_run(cfg: TrainConfig, run_dir: Path, class_names: list[str]) -> Run:
    device = select_device(cfg.train.device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = build_model(cfg.model).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    o = cfg.optim
    optimizer = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum,
                                nesterov=o.nesterov and o.momentum > 0, weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, cfg.schedule.step_size, cfg.schedule.gamma)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
    return Run(cfg, run_dir, device, model, optimizer, scheduler, scaler, class_names)


def check_run_dir(run_dir: Path, resume: bool, force: bool) -> None:
    """Refuse, before any work, to train into a used run directory by accident."""
    if not resume and not force and run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"run directory {run_dir} already exists: pass --resume to continue it "
                        f"or --force to delete it and start over")


def train_one_epoch(run: Run, train: Split, writer: Any, bar: tqdm) -> dict[str, float]:
    cfg, model, device = run.cfg, run.model, run.device
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    # Derived from (seed, epoch) rather than carried along, so a resumed run draws the same batches.
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + run.epoch + 1)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    pending: list[torch.Tensor] = []  # per-step losses, read once per log interval
    seen, t0 = 0, time.perf_counter()
    model.train()
    for x, y in train_batches(train, cfg.train.batch_size, generator, cfg.data.augment,
                              cfg.train.channels_last):
        with autocast(device, cfg.train.precision):
            logits = model(x)
            loss = criterion(logits.float(), y)
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()

        run.global_step += 1
        seen += len(y)
        pending.append(loss.detach())
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        bar.update(1)
        if len(pending) == cfg.train.log_every:
            _flush_step_losses(writer, pending, run.global_step)
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}",
                            lr=f"{run.optimizer.param_groups[0]['lr']:.3g}",
                            img_s=f"{seen / (time.perf_counter() - t0):.0f}", refresh=False)
    _flush_step_losses(writer, pending, run.global_step)
    elapsed = time.perf_counter() - t0
    return {"loss": loss_sum.item() / max(seen, 1), "acc": correct.item() / max(seen, 1),
            "images_per_s": seen / elapsed, "time_s": elapsed}


def _flush_step_losses(writer: Any, pending: list[torch.Tensor], last_step: int) -> None:
    if not pending:
        return
    first = last_step - len(pending) + 1
    for i, value in enumerate(torch.stack(pending).tolist()):
        writer.add_scalar("train/loss_step", value, first + i)
    pending.clear()


def fit(cfg: TrainConfig, run_dir: Path, resume_state: dict | None = None, force: bool = False) -> dict:
    """Train, checkpoint every epoch, then test the best checkpoint. Returns the report."""
    from torch.utils.tensorboard import SummaryWriter  # slow import, only needed here

    check_run_dir(run_dir, resume_state is not None, force)
    train_full, test, class_names = load_cifar10(cfg.data.root, cfg.data.download)
    if len(class_names) != cfg.model.num_classes:
        raise UserError(f"config error: model.num_classes is {cfg.model.num_classes} but the data "
                        f"in {cfg.data.root} has {len(class_names)} classes")
    train, val = split_train_val(train_full, cfg.data.val_size, cfg.seed)
    if len(train) < cfg.train.batch_size:
        raise UserError(f"config error: train.batch_size {cfg.train.batch_size} is larger than the "
                        f"{len(train)} training images")
    run = build_run(cfg, run_dir, class_names)
    if resume_state is not None:
        run.restore(resume_state)
    if run.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    train, val, test = train.to(run.device), val.to(run.device), test.to(run.device)
    if force and resume_state is None and run_dir.exists():
        shutil.rmtree(run_dir)  # only now that data, config and device have all checked out
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", dump_config(cfg))

    print(f"run {run_dir}: {cfg.model.arch} ({count_parameters(run.model):,} parameters) on "
          f"{run.device}, {cfg.train.precision}; {len(train)} train / {len(val)} val / "
          f"{len(test)} test images" + (f"; resuming after epoch {run.epoch}" if run.epoch else ""),
          flush=True)
    steps = len(train) // cfg.train.batch_size
    # purge_step drops events a killed run wrote after its last checkpoint: no duplicated steps.
    writer = SummaryWriter(str(run_dir / "tb"), purge_step=run.global_step + 1 if run.epoch else None)
    evaluate_kw = dict(batch_size=cfg.train.eval_batch_size, device=run.device,
                       precision=cfg.train.precision, channels_last=cfg.train.channels_last)
    try:
        while run.epoch < cfg.train.epochs:
            lr = run.optimizer.param_groups[0]["lr"]
            with tqdm(total=steps, desc=f"epoch {run.epoch + 1}/{cfg.train.epochs}", leave=False,
                      file=sys.stdout, disable=not sys.stdout.isatty(), dynamic_ncols=True) as bar:
                tr = train_one_epoch(run, train, writer, bar)
            run.scheduler.step()
            run.epoch += 1
            run.train_time_s += tr["time_s"]
            va = evaluate(run.model, val, **evaluate_kw) if len(val) else None
            improved = va is None or va["acc"] > run.best_acc
            if improved:
                run.best_acc, run.best_epoch = (va["acc"] if va else -1.0), run.epoch
            step = run.global_step
            for tag, value in [("train/loss", tr["loss"]), ("train/acc", tr["acc"]), ("train/lr", lr),
                               ("train/images_per_s", tr["images_per_s"]), ("train/epoch", run.epoch)]:
                writer.add_scalar(tag, value, step)
            if va:
                writer.add_scalar("val/loss", va["loss"], step)
                writer.add_scalar("val/acc", va["acc"], step)
            writer.flush()  # before the checkpoint: a resume purges whatever came after it
            state = run.state()
            save_checkpoint(run_dir / "last.pt", state)
            if improved:
                save_checkpoint(run_dir / "best.pt", state)
            val_text = f" | val loss {va['loss']:.4f} acc {va['acc']:.2%}" if va else ""
            print(f"epoch {run.epoch}/{cfg.train.epochs} | train loss {tr['loss']:.4f} "
                  f"acc {tr['acc']:.2%}{val_text} | lr {lr:.4g} | {tr['images_per_s']:.0f} img/s | "
                  f"{tr['time_s']:.1f}s{' | best' if improved and va else ''}", flush=True)

        report = test_report(run, test)
        writer.add_scalar("test/acc", report["test"]["acc"], run.global_step)
        writer.add_scalar("test/loss", report["test"]["loss"], run.global_step)
    finally:
        writer.close()
    atomic_write_text(run_dir / "report.json", json.dumps(report, indent=2) + "\n")
    print(f"test accuracy {report['test']['acc']:.2%} (loss {report['test']['loss']:.4f}, "
          f"{report['test']['images']} images) with best.pt from epoch {report['best_epoch']}; "
          f"report in {run_dir / 'report.json'}", flush=True)
    return report


def test_report(run: Run, test: Split) -> dict[str, Any]:
    """Load best.pt into the model and measure it on the test set, which nothing else touches."""
    best = load_checkpoint(run.dir / "best.pt", map_location=run.device)
    run.model.load_state_dict(best["model"])
    cfg = run.cfg
    t0 = time.perf_counter()
    metrics = evaluate(run.model, test, cfg.train.eval_batch_size, run.device, cfg.train.precision,
                       cfg.train.channels_last)
    eval_s = time.perf_counter() - t0
    return {
        "test": metrics,
        "best_epoch": int(best["epoch"]),
        "val_acc": best["best_metric"] if cfg.data.val_size else None,
        "epochs": run.epoch,
        "checkpoint": str(run.dir / "best.pt"),
        "train_time_s": run.train_time_s,
        "eval_images_per_s": len(test) / eval_s if eval_s > 0 else None,
        "parameters": count_parameters(run.model),
        "device": str(run.device),
        "precision": cfg.train.precision,
        "torch_version": str(torch.__version__),
        "vggtrain_version": vggtrain.__version__,
        "class_names": run.class_names,
        "config": cfg.to_dict(),
    }
