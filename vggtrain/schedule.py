"""The learning-rate schedule: one pure function of the step position, applied per step.

`lr_factor(position)` is the multiplier of every parameter group's base rate at the step that
has `position` steps before it. A `torch.optim.lr_scheduler.LambdaLR` applies it after every
optimizer step; its state is a counter, and a resumed run rebuilds it at its position (epochs
done x steps per epoch at today's rank count, plus the steps done inside the epoch), so the
rates resume exactly, also after a change of rank count at an epoch end.

StepLR (the shipped default) is ``gamma ** ((epoch - warmup_epochs) // step_size)``, counting
its epochs from the end of a linear per-step warm-up over ``warmup_epochs``.
"""

from __future__ import annotations

import warnings

import torch

from vggtrain.config import ScheduleConfig

# With fp16, the GradScaler skips the optimizer steps whose gradients overflowed (the first few,
# while it finds its scale); the scheduler then sees its first step() "before optimizer.step()".
# The position still advanced, which is what the schedule means, so the warning is noise here.
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before",
                        category=UserWarning)


def lr_factor(position: int, schedule: ScheduleConfig, steps_per_epoch: int) -> float:
    """The multiplier of the base learning rate for the step with `position` steps before it."""
    warmup = schedule.warmup_epochs * steps_per_epoch
    if position < warmup:
        return (position + 1) / warmup
    epoch = position // max(steps_per_epoch, 1)
    return schedule.gamma ** ((epoch - schedule.warmup_epochs) // schedule.step_size)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: ScheduleConfig, steps_per_epoch: int,
                    position: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR at `position` (0: a new run), which sets the optimizer's rates for the
    next step. At a position > 0 the optimizer's groups must hold their `initial_lr` (as a loaded
    optimizer state does): that is the documented way to start a scheduler part-way."""

    def factor(step: int) -> float:
        return lr_factor(step, schedule, steps_per_epoch)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=position - 1)
