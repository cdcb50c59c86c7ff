"""The optimizer: SGD over parameter groups that carry the recipe's weight-decay and BN-bias rules."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vggtrain.config import OptimConfig


def param_groups(model: nn.Module, o: OptimConfig, whiten_bias_epochs: float | None = None
                 ) -> list[dict[str, Any]]:
    """SGD parameter groups: one, or conv/linear weights apart from the 1-D parameters (BN weights,
    biases) when those get no weight decay, plus BN biases at lr x bn_bias_lr_scale when that is
    not 1, plus the whitening layer's bias on its own when it trains for whiten_bias_epochs only
    (schedule.py freezes it then). Frozen parameters (the whitening filters) are left out."""
    live = [p for p in model.parameters() if p.requires_grad]
    whitening = getattr(model, "whitening", lambda: None)()
    held: list[dict[str, Any]] = []
    if whiten_bias_epochs is not None and whitening is not None and whitening.bias is not None:
        live = [p for p in live if p is not whitening.bias]
        held = [{"params": [whitening.bias], "frozen_after_epochs": whiten_bias_epochs,
                 **({"weight_decay": 0.0} if o.exclude_bn_bias_from_decay else {})}]
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
    return [g for g in groups + held if g["params"]]


def build_optimizer(model: nn.Module, o: OptimConfig, whiten_bias_epochs: float | None = None
                    ) -> torch.optim.Optimizer:
    return torch.optim.SGD(param_groups(model, o, whiten_bias_epochs), lr=o.lr, momentum=o.momentum,
                           nesterov=o.nesterov and o.momentum > 0, weight_decay=o.weight_decay)
