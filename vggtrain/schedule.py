"""The learning-rate schedule: one pure function of the step position, applied per step.

`lr_factor(position)` is the multiplier of every parameter group's base rate at the step that
has `position` steps before it. A `torch.optim.lr_scheduler.LambdaLR` applies it after every
optimizer step; its state is a counter, and a resumed run rebuilds it at its position (epochs
done x steps per epoch at today's rank count, plus the steps done inside the epoch), so the
rates resume exactly, also after a change of rank count at an epoch end.

schedule.kind:
- step (the shipped default): StepLR, ``gamma ** floor((epoch - warmup_epochs) / step_size)``,
  counting its epochs from the end of a linear per-step warm-up over ``warmup_epochs``.
- multistep: MultiStepLR, ``gamma ** (milestones passed)``, the milestones in epochs from the start,
  after a linear warm-up from ``start_factor``.
- linear: from ``start_factor`` up to 1 over the warm-up, then linearly down to ``end_factor`` at
  the run's last step (airbench's triangle: 0.2 -> 1 over 23% of the steps, then -> 0.07).
- cosine: the same warm-up, then a half cosine down to ``end_factor`` (CosineAnnealingLR to
  ``eta_min = lr x end_factor``).
- onecycle: OneCycleLR (cosine, two phases): a cosine warm-up from ``start_factor`` (its
  ``1 / div_factor``) to 1 over ``warmup_epochs`` (its ``pct_start``), then a half cosine down to
  ``end_factor`` at the last step; step for step the rates torch's OneCycleLR gives.

A parameter group with a ``frozen_after_epochs`` entry (the whitening bias, model.whiten_bias_epochs)
gets rate 0 from that step on: frozen, and the same on every rank and after a resume.
"""

from __future__ import annotations

import math
import warnings

import torch

from vggtrain.config import ScheduleConfig

# With fp16, the GradScaler skips the optimizer steps whose gradients overflowed (the first few,
# while it finds its scale); the scheduler then sees its first step() "before optimizer.step()".
# The position still advanced, which is what the schedule means, so the warning is noise here.
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before",
                        category=UserWarning, module=r"vggtrain\.")


def lr_factor(position: int, schedule: ScheduleConfig, steps_per_epoch: int, total_steps: int) -> float:
    """The multiplier of the base learning rate for the step with `position` steps before it."""
    warmup = round(schedule.warmup_epochs * steps_per_epoch)
    kind = schedule.kind
    if kind == "onecycle":  # OneCycleLR's two phases, step for step (its peak at step warmup - 1)
        peak = warmup - 1
        if position <= peak and peak > 0:
            return _cosine_from_to(schedule.start_factor, 1.0, position / peak)
        done = (position - max(peak, 0)) / max(total_steps - 1 - max(peak, 0), 1)
        return _cosine_from_to(1.0, schedule.end_factor, min(done, 1.0))
    if kind in ("linear", "cosine"):  # warm up from start_factor, then anneal to end_factor
        if position < warmup:
            return schedule.start_factor + (1.0 - schedule.start_factor) * position / warmup
        done = min((position - warmup) / max(total_steps - warmup, 1), 1.0)
        if kind == "cosine":
            return _cosine_from_to(1.0, schedule.end_factor, done)
        return 1.0 + (schedule.end_factor - 1.0) * done
    if kind == "multistep":
        if position < warmup:
            return schedule.start_factor + (1.0 - schedule.start_factor) * position / warmup
        epoch = position // max(steps_per_epoch, 1)
        return schedule.gamma ** sum(epoch >= m for m in schedule.milestones)
    if position < warmup:
        return (position + 1) / warmup
    epoch = position // max(steps_per_epoch, 1)
    return schedule.gamma ** max(0, math.floor((epoch - schedule.warmup_epochs) / schedule.step_size))


def _cosine_from_to(start: float, end: float, done: float) -> float:
    """Half a cosine from start (done 0) to end (done 1), as torch's cosine annealing."""
    return end + (start - end) * (1.0 + math.cos(math.pi * done)) / 2


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: ScheduleConfig, steps_per_epoch: int,
                    total_steps: int, position: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR at `position` (0: a new run), which sets the optimizer's rates for the
    next step. At a position > 0 the optimizer's groups must hold their `initial_lr` (as a loaded
    optimizer state does): that is the documented way to start a scheduler part-way."""

    def factor(step: int) -> float:
        return lr_factor(step, schedule, steps_per_epoch, total_steps)

    def frozen_after(epochs: float) -> object:
        limit = round(epochs * steps_per_epoch)
        return lambda step: factor(step) if step < limit else 0.0

    lambdas = [factor if g.get("frozen_after_epochs") is None else frozen_after(g["frozen_after_epochs"])
               for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas, last_epoch=position - 1)


def rate_at(scheduler: torch.optim.lr_scheduler.LambdaLR, position: int, group: int = 0) -> float:
    """The rate the scheduler gives parameter group `group` at the step with `position` steps
    before it (the epoch's first step for the log, whatever the scheduler's own position)."""
    return float(scheduler.base_lrs[group] * scheduler.lr_lambdas[group](position))
