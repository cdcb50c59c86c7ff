"""train.cuda_graphs: the whole training step (forward, backward, gradient clipping, optimizer,
weight EMA) captured once as a CUDA graph and replayed at every step after, so a step costs the
host one launch instead of hundreds (PyTorch's "whole network capture", torch.cuda.graphs).

What capture needs, and how it is met:
- static shapes: train_batches yields full batches only; the batch is copied into the graph's
  own input tensors before each replay;
- no host syncs in the step (vggtrain's step has none) and no Python state that changes from
  step to step inside it: the learning rates become device tensors that the scheduler fills in
  place; the weight EMA's counter stays a Python int, counted outside the graph;
- a warm-up on a side stream before capture: the first steps run eagerly there (they are real
  training steps, nothing is redone), then the step is captured and replayed from then on.

Where capture cannot work (not CUDA, fp16's GradScaler reads the device, torchrun's DDP, a
compiled model, batch mixing or data selection, AdamW, gradient accumulation, distillation) or
fails, one
warning and the eager step.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vggtrain.errors import shown
from vggtrain.run import Run

WARMUP_STEPS = 3  # eager steps on a side stream before capture (cuBLAS/cuDNN workspaces, autotuning)


def why_not(run: Run) -> str | None:
    """Why the run's step cannot be captured, or None."""
    cfg = run.cfg
    reasons = [(run.device.type != "cuda", f"needs CUDA (the run is on {run.device.type})"),
               (cfg.train.precision == "fp16", "fp16's loss scaler reads the device at every step"),
               (run.dist.enabled, "not under torchrun (DDP's gradient buckets)"),
               (cfg.train.compile, "not together with train.compile"),
               (bool(cfg.data.mixup_alpha or cfg.data.cutmix_alpha),
                "not with MixUp/CutMix (ragged targets)"),
               (cfg.data.select_keep is not None, "not with data.select_keep (its proxy's own steps)"),
               (cfg.optim.name == "adamw", "SGD and Muon only (not AdamW)"),
               (cfg.train.accum_steps > 1, "not with train.accum_steps > 1 (micro-batch steps differ)"),
               (bool(cfg.distill.teachers), "not with distill.teachers (their soft targets are a second "
                "target, which the captured step does not take)")]
    return next((why for bad, why in reasons if bad), None)


class GraphedStep:
    """A callable like train.train_step(run, x, y, criterion): (loss, logits, grad norm or None).

    The returned logits are the graph's own output tensor: read them before the next call."""

    def __init__(self, run: Run, criterion: nn.Module, eager: Callable[..., Any]) -> None:
        self.run, self.criterion, self.eager = run, criterion, eager
        self.warmed = 0
        self.failed = False
        self.graph: torch.cuda.CUDAGraph | None = None
        self.side = torch.cuda.Stream(run.device)
        self.inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if self.graph is None and self.warmed < WARMUP_STEPS:
            self.warmed += 1
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                out = self.eager(self.run, x, y, self.criterion)
            torch.cuda.current_stream().wait_stream(self.side)
            return out
        if self.graph is None and not self.failed:
            try:
                self._capture(x, y)
            except RuntimeError as e:  # an operator capture does not support: eager from now on
                self.failed = True
                self.run.optimizer.zero_grad(set_to_none=True)
                torch.cuda.synchronize(self.run.device)
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                warn_line(f"capture failed ({first[:200]}); training with the eager step")
        if self.failed:
            return self.eager(self.run, x, y, self.criterion)
        assert self.inputs is not None and self.outputs is not None and self.graph is not None
        self.inputs[0].copy_(x, non_blocking=True)
        self.inputs[1].copy_(y, non_blocking=True)
        self.graph.replay()
        loss, logits, norm = self.outputs
        # The per-step loss (and norm) are kept for the interval's log: copies, not the graph's tensors.
        return loss.clone(), logits, None if norm is None else norm.clone()

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        run = self.run
        lr_on_device(run.optimizer, run.device)
        # The EMA follows lookahead's sync in the loop: with lookahead it stays outside the graph.
        ema = run.ema if run.ema is not None and run.lookahead is None else None
        self.inputs = (x.clone(memory_format=torch.preserve_format), y.clone())
        run.optimizer.zero_grad(set_to_none=True)  # the graph's backward allocates the gradients
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.side):
            self.outputs = self.eager(run, *self.inputs, self.criterion, cast_cache=False)
            if ema is not None:
                ema.lerp_()
        if ema is not None:
            ema.in_graph = True  # its step() now only counts
        self.graph = graph


def in_use(run: Run) -> bool:
    """Whether the run's steps replay a captured graph (for its report)."""
    return isinstance(run.graphed, GraphedStep) and run.graphed.graph is not None


def warn_line(what: str) -> None:
    """One line on stderr, not a Python warning's two."""
    print(shown(f"vggtrain: warning: train.cuda_graphs: {what}"), file=sys.stderr, flush=True)


def lr_on_device(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Every group's rate as a 0-dim device tensor, which LRScheduler fills in place: a captured
    step reads the current rate instead of the one it was captured with."""
    for group in optimizer.param_groups:
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), device=device)


def graphed_step(run: Run, criterion: nn.Module, eager: Callable[..., Any]) -> GraphedStep | None:
    """The run's captured step, or None after one warning line saying why not."""
    why = why_not(run)
    if why is not None:
        if run.dist.is_main:
            warn_line(f"{why}; training with the eager step")
        return None
    return GraphedStep(run, criterion, eager)
