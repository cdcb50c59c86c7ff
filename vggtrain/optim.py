"""The optimizer: SGD (or AdamW) over parameter groups that carry the recipe's weight-decay and
BN-bias rules; with optim.name muon, the convolution filters get Muon's orthogonalised updates."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
from torch import nn

from vggtrain.config import OptimConfig


def param_groups(model: nn.Module, o: OptimConfig, whiten_bias_epochs: float | None = None,
                 loaded: Collection[str] = ()) -> list[dict[str, Any]]:
    """SGD parameter groups: one, or conv/linear weights apart from the 1-D parameters (BN weights,
    biases) when those get no weight decay, plus BN biases at lr x bn_bias_lr_scale when that is
    not 1, plus the whitening layer's bias on its own when it trains for whiten_bias_epochs only
    (schedule.py freezes it then); each split in two at lr_scale_backbone's rate for the
    parameters named in loaded (init.from's). Frozen parameters (the whitening filters,
    init.freeze's) are left out."""
    live = [p for p in model.parameters() if p.requires_grad]
    whitening = getattr(model, "whitening", lambda: None)()
    held: list[dict[str, Any]] = []
    if whiten_bias_epochs is not None and whitening is not None and whitening.bias is not None \
            and whitening.bias.requires_grad:
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
    groups = [g for g in groups + held if g["params"]]
    return backbone_groups(model, groups, loaded, o) if loaded else groups


def backbone_groups(model: nn.Module, groups: list[dict[str, Any]], loaded: Collection[str],
                    o: OptimConfig) -> list[dict[str, Any]]:
    """Each group's loaded parameters (init.from's) apart, at its rate x optim.lr_scale_backbone;
    its weight decay as it was (SGD's decay per step falls with the rate)."""
    scale = o.lr_scale_backbone
    if scale == 1.0:
        return groups
    ids = {id(p) for name, p in model.named_parameters() if name in loaded}
    out = []
    for g in groups:
        rest = [p for p in g["params"] if id(p) not in ids]
        backbone = [p for p in g["params"] if id(p) in ids]
        out += [{**g, "params": rest}] if rest else []
        if backbone:
            out.append({**g, "params": backbone, "lr": g.get("lr", o.lr) * scale, "backbone": True})
    return out


def build_optimizer(model: nn.Module, o: OptimConfig, whiten_bias_epochs: float | None = None,
                    loaded: Collection[str] = ()) -> torch.optim.Optimizer:
    """loaded: the parameters init.from gave their weights (see param_groups)."""
    if o.name == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(
            param_groups(model, o, whiten_bias_epochs, loaded), lr=o.lr, betas=(o.momentum, o.adam_beta2),
            weight_decay=o.weight_decay)
    else:
        kind = MuonSGD if o.name == "muon" else torch.optim.SGD
        optimizer = kind(param_groups(model, o, whiten_bias_epochs, loaded), lr=o.lr, momentum=o.momentum,
                         nesterov=o.nesterov and o.momentum > 0, weight_decay=o.weight_decay)
    use_multi_tensor_kernels(optimizer)
    return optimizer


def use_multi_tensor_kernels(optimizer: torch.optim.Optimizer) -> None:
    """Every group updates through torch's fused kernel (one launch per group) where the device
    has one, else its foreach kernels (a few per group), never the per-parameter loop torch picks
    by default on the CPU: so a step's operator count on the CPU is the GPU's. Also called after a
    checkpoint's groups are loaded (they carry the choice of the version that saved them)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    device = params[0].device.type if params else "cpu"
    fused = device in _fused_devices() and all(p.is_floating_point() for p in params)
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = (True, False) if fused else (False, True)
    if fused:
        optimizer._step_supports_amp_scaling = True  # what the constructor sets for fused=True


def _fused_devices() -> list[str]:
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        return list(_get_fused_kernels_supported_devices())
    except ImportError:  # a torch without it: foreach everywhere
        return []


def orthogonalize(g: torch.Tensor, steps: int = 3, eps: float = 1e-7) -> torch.Tensor:
    """About U V^T of each matrix g[i] = U S V^T of a (k, rows, cols) stack, by airbench's quintic
    Newton-Schulz iteration in bf16 (its singular values end in roughly [0.5, 1.5], which trains as
    well as exactly 1); a 2-D g is one matrix. Batched so that a layer shape's filters cost the
    same few launches as one."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16()
    x = x / (torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True) + eps)
    wide = x.size(-2) > x.size(-1)
    if wide:
        x = x.mT
    for _ in range(steps):
        s = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(s, s, s, beta=b, alpha=c), x, beta=a) if x.ndim == 3 \
            else torch.addmm(x, torch.addmm(s, s, s, beta=b, alpha=c), x, beta=a)
    return (x.mT if wide else x).to(g.dtype)


class MuonSGD(torch.optim.SGD):
    """SGD, except for the groups marked muon: their update is Muon's (Jordan et al., 2024), the
    orthogonalised nesterov momentum of each filter bank reshaped to (out, in x k x k), after the
    bank is rescaled to norm sqrt(out) (airbench94_muon). Written here because torch.optim.Muon
    takes 2-D parameters only and has no such renormalisation; the other groups are torch's SGD.
    The momentum and the rescaling are foreach ops over the group, the orthogonalisation one
    batched iteration per filter shape: a handful of launches per step, whatever the depth."""

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
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        m, grads = group["momentum"], [p.grad for p in params]
        bufs = [self.state[p].get("momentum_buffer") for p in params]
        if any(b is None for b in bufs):  # the first step: zero momentum, so buf = grad
            bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in params]
        torch._foreach_mul_(bufs, m)
        torch._foreach_add_(bufs, grads)
        stacks, views = self._stacks(params)
        if group["nesterov"]:
            torch._foreach_copy_(views, grads)
            torch._foreach_add_(views, bufs, alpha=m)
        else:
            torch._foreach_copy_(views, bufs)
        for stack in stacks:
            stack.copy_(orthogonalize(stack))
        # Each filter bank back to norm sqrt(out), then its orthogonalised update.
        scale = torch._foreach_reciprocal(torch._foreach_norm(params))
        torch._foreach_mul_(scale, [len(p) ** 0.5 for p in params])
        torch._foreach_mul_(params, scale)
        # lr x update, then subtracted: the same arithmetic whether the rate is a float or (under
        # train.cuda_graphs) a device tensor, which alpha= could not take without a host read.
        torch._foreach_mul_(views, group["lr"])
        torch._foreach_sub_(params, views)

    def _stacks(self, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Zero-padded (k, rows, cols) stacks that hold every filter bank's update as a matrix with
        no more rows than columns (a bank with more is held transposed), and each bank's view into
        them in its parameter's shape. Zero padding does not change a matrix's Newton-Schulz
        iterates (its norm and its products keep the zeros), so all banks, whatever their shapes,
        orthogonalise in one batched iteration per orientation. Made once per set of parameters."""
        key = tuple(id(p) for p in params)
        plans = self.__dict__.setdefault("_muon_plans", {})
        if key not in plans:
            shapes = [(len(p), p[0].numel()) for p in params]
            stacks, views = [], [None] * len(params)
            for wide in (False, True):
                members = [i for i, (r, c) in enumerate(shapes) if (r > c) == wide]
                if not members:
                    continue
                oriented = [shapes[i][::-1] if wide else shapes[i] for i in members]
                stack = params[members[0]].new_zeros(len(members), max(r for r, _ in oriented),
                                                     max(c for _, c in oriented))
                for j, i in enumerate(members):
                    r, c = oriented[j]
                    block = stack[j, :r, :c]
                    views[i] = (block.mT if wide else block).view(params[i].shape)
                stacks.append(stack)
            plans[key] = (stacks, views)
        return plans[key]
