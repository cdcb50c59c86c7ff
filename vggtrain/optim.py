"""The optimizer: SGD (or AdamW) over parameter groups that carry the recipe's weight-decay and
BN-bias rules; with optim.name muon, the convolution filters get Muon's orthogonalised updates."""

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
        scale = o.whiten_bias_lr_scale  # weight decay / scale: the same decay per step
        held = [{"params": [whitening.bias], "frozen_after_epochs": whiten_bias_epochs, "lr": o.lr * scale,
                 "weight_decay": 0.0 if o.exclude_bn_bias_from_decay else o.weight_decay / scale}]
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
    if o.name == "muon":  # the 3x3 filters: their own group, no weight decay (Muon renormalises them)
        filters = {id(p) for p in live if p.ndim == 4}
        groups = [{**g, "params": [p for p in g["params"] if id(p) not in filters]} for g in groups]
        groups.append({"params": [p for p in live if id(p) in filters], "muon": True, "lr": o.muon_lr,
                       "momentum": o.muon_momentum, "nesterov": True, "weight_decay": 0.0})
    return [g for g in groups + held if g["params"]]


def build_optimizer(model: nn.Module, o: OptimConfig, whiten_bias_epochs: float | None = None
                    ) -> torch.optim.Optimizer:
    if o.name == "adamw":
        return torch.optim.AdamW(param_groups(model, o, whiten_bias_epochs), lr=o.lr,
                                 betas=(o.momentum, o.adam_beta2), weight_decay=o.weight_decay)
    kind = MuonSGD if o.name == "muon" else torch.optim.SGD
    return kind(param_groups(model, o, whiten_bias_epochs), lr=o.lr, momentum=o.momentum,
                nesterov=o.nesterov and o.momentum > 0, weight_decay=o.weight_decay)


def orthogonalize(g: torch.Tensor, steps: int = 3, eps: float = 1e-7) -> torch.Tensor:
    """About U V^T of g = U S V^T, by airbench's quintic Newton-Schulz iteration in bf16 (its
    singular values end in roughly [0.5, 1.5], which trains as well as exactly 1)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16()
    x = x / (x.norm() + eps)
    wide = x.size(0) > x.size(1)
    if wide:
        x = x.T
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return (x.T if wide else x).to(g.dtype)


class MuonSGD(torch.optim.SGD):
    """SGD, except for the groups marked muon: their update is Muon's (Jordan et al., 2024), the
    orthogonalised nesterov momentum of each filter bank reshaped to (out, in x k x k), after the
    bank is rescaled to norm sqrt(out) (airbench94_muon). Written here because torch.optim.Muon
    takes 2-D parameters only and has no such renormalisation; the other groups are torch's SGD."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        groups = self.param_groups
        try:  # SGD.step over the plain groups
            self.param_groups = [g for g in groups if not g.get("muon")]
            loss = super().step(closure)
        finally:
            self.param_groups = groups
        for group in groups:
            if group.get("muon"):
                self._muon_step(group)
        return loss

    def _muon_step(self, group: dict[str, Any]) -> None:
        m = group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            buf = self.state[p].get("momentum_buffer")
            if buf is None:
                buf = self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
            buf.mul_(m).add_(p.grad)
            g = p.grad.add(buf, alpha=m) if group["nesterov"] else buf
            p.mul_(len(p) ** 0.5 / p.norm())
            p.add_(orthogonalize(g.reshape(len(g), -1)).view(g.shape), alpha=-group["lr"])
