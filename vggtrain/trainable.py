"""The parts a trained network is made of, shared by the run (run.py, train.py) and the data-
selection proxy (selection.py), so the two are built and stepped alike: the network from its
config (its whitening layer initialised from images), placed on the device in the run's memory
format, its optimizer, learning-rate schedule and loss scaler, and one optimizer step."""

from __future__ import annotations

import math
from collections.abc import Collection

import torch
from torch import nn

from vggtrain.config import ModelConfig, TrainConfig
from vggtrain.model import build_model, init_whitening
from vggtrain.optim import build_optimizer
from vggtrain.schedule import build_scheduler

Optimization = tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, torch.amp.GradScaler]


def new_model(model_cfg: ModelConfig, whitening: torch.Tensor | None = None) -> nn.Module:
    """The config's network, initialised from the torch generator's state at the call; its
    whitening layer (model.whiten) from `whitening`, normalised images, when given (without them
    the fixed layer stays random, for benchmarks)."""
    model = build_model(model_cfg)
    if model_cfg.whiten != "none" and whitening is not None:
        init_whitening(model, whitening)
    return model


def place(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """The model on device, in channels_last memory where asked (train.channels_last)."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def optimization(model: nn.Module, cfg: TrainConfig, device: torch.device, steps_per_epoch: int,
                 loaded: Collection[str] = ()) -> Optimization:
    """(optimizer, schedule, loss scaler) for a new run of cfg's epochs: the schedule at step 0,
    the scaler enabled for fp16 only. loaded: the parameters init.from gave their weights."""
    optimizer = build_optimizer(model, cfg.optim, cfg.model.whiten_bias_epochs, loaded)
    total = math.ceil(cfg.train.epochs * steps_per_epoch)
    scheduler = build_scheduler(optimizer, cfg.schedule, steps_per_epoch, total)
    return optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   loss: torch.Tensor, clip_norm: float | None = None) -> torch.Tensor | None:
    """Backward and one optimizer step through the loss scaler, the gradients' norm clipped to
    clip_norm first where given. Returns that norm before clipping (None without clip_norm); no
    host sync, so a CUDA graph can capture it (graphs.py)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    return apply_gradients(model, optimizer, scaler, clip_norm)


def apply_gradients(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    clip_norm: float | None = None) -> torch.Tensor | None:
    """The optimizer step on the gradients backward left (one batch's, or train.accum_steps'
    batches' summed): clipped to clip_norm first where given, through the loss scaler. Returns the
    norm before clipping (None without clip_norm)."""
    norm = None
    if clip_norm is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not fp16's scaled ones
        norm = nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    scaler.step(optimizer)
    scaler.update()
    return norm
