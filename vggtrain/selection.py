"""Data selection by a proxy network (airbench96_faster's data filtering, data.select_keep).

A small network of the same kind as the model (data.select_layers) trains beside it. Each step it
scores the batch, and the model trains only on the fraction of it the proxy finds hardest (the
highest label-smoothed losses); every data.select_every steps the proxy itself learns from those
same examples. The model's work per step shrinks to that fraction for the price of the proxy's
forward pass (about 14% of airbench's network at its default widths) and an occasional backward.

airbench96_faster trains the proxy through the whole schedule first and keeps its choices; the
proxy's choice at a step depends only on the batches before it, so choosing in lockstep picks the
same examples and needs nothing stored but the proxy's state (checkpointed with the run).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vggtrain.config import TrainConfig
from vggtrain.device import autocast
from vggtrain.optim import use_multi_tensor_kernels
from vggtrain.schedule import build_scheduler
from vggtrain.trainable import new_model, optimization, optimizer_step, place


@dataclass
class Selector:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    keep: float
    every: int
    label_smoothing: float
    precision: str

    def select(self, x: torch.Tensor, y: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's hardest examples by the proxy's loss, in their batch order; at every
        `every`-th position the proxy also takes an optimizer step on them. No host sync."""
        learn = position % self.every == 0
        with torch.set_grad_enabled(learn), autocast(x.device, self.precision):
            losses = F.cross_entropy(self.model(x).float(), y, reduction="none",
                                     label_smoothing=self.label_smoothing)
        kept = losses.detach().topk(max(1, round(self.keep * len(y)))).indices.sort().values
        if learn:
            optimizer_step(self.model, self.optimizer, self.scaler, losses[kept].mean())
        self.scheduler.step()
        return x[kept], y[kept]

    def state_dict(self) -> dict[str, Any]:
        # The schedule is a function of the position: rebuilt on resume, as the model's is.
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any], cfg: TrainConfig, steps_per_epoch: int,
                        total_steps: int, position: int) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        use_multi_tensor_kernels(self.optimizer)  # the saved groups carry their version's choice
        self.scaler.load_state_dict(state["scaler"])
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, steps_per_epoch, total_steps, position)


def proxy_config(cfg: TrainConfig) -> TrainConfig:
    """The run's config with the proxy's network in place of the model's."""
    proxy = copy.deepcopy(cfg)
    proxy.model.arch, proxy.model.layers, proxy.model.width = "custom", list(cfg.data.select_layers), 1.0
    return proxy


def build_selector(cfg: TrainConfig, device: torch.device, channels_last: bool, steps_per_epoch: int,
                   whitening: torch.Tensor | None = None) -> Selector | None:
    """The proxy for data.select_keep (None when it is off), built from the same parts as the
    run's model (trainable.py) and initialised as it is: from the torch generator's state at the
    call, and its whitening layer (model.whiten) from `whitening`, the normalised images the
    model's was computed from."""
    if cfg.data.select_keep is None:
        return None
    pc = proxy_config(cfg)
    model = place(new_model(pc.model, whitening), device, channels_last)
    model.train()
    return Selector(model, *optimization(model, pc, device, steps_per_epoch), cfg.data.select_keep,
                    cfg.data.select_every, cfg.optim.label_smoothing, cfg.train.precision)
