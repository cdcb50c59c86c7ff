"""Weight averaging that the loop calls once per step: lookahead (optim.lookahead_every).

An averager has ``step(done, total, epoch_end)`` after each optimizer step (done: steps so far,
1-based; total: the run's planned steps), and ``state_dict()`` / ``load_state_dict()`` for the
checkpoint's ``lookahead`` entry.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def float_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every floating-point parameter and buffer (BN statistics too), as views of the model's own
    storage: what lookahead averages and what must stay finite."""
    return [t for t in model.state_dict().values() if t.is_floating_point()]


class Lookahead:
    """Every `every` steps, and at each epoch end (so checkpoints hold synced weights), slow
    weights <- lerp(slow, fast, 1 - decay), then fast <- slow. The decay is airbench's schedule,
    0.95^every x (done / total)^3: ~0 early, 0.95^every at the end (final_full_sync: 1 at the
    last step, so the run ends on the slow weights). Written here because torch has no Lookahead."""

    def __init__(self, model: nn.Module, every: int, final_full_sync: bool = False) -> None:
        self.every, self.final_full_sync = every, final_full_sync
        self.fast = float_tensors(model)  # views: load_state_dict and optimizer steps write in place
        self.slow = [t.detach().clone() for t in self.fast]

    def decay(self, done: int, total: int) -> float:
        if self.final_full_sync and done >= total:
            return 1.0  # the run ends on the slow weights (airbench's final sync)
        return 0.95 ** self.every * (done / max(total, 1)) ** 3

    def step(self, done: int, total: int, epoch_end: bool = False) -> None:
        if done % self.every == 0 or epoch_end or done >= total:
            self.sync(done, total)

    @torch.no_grad()
    def sync(self, done: int, total: int) -> None:
        torch._foreach_lerp_(self.slow, self.fast, 1.0 - self.decay(done, total))
        torch._foreach_copy_(self.fast, self.slow)

    def state_dict(self) -> list[torch.Tensor]:
        """The slow weights, in the model's state_dict order (the checkpoint's `lookahead`)."""
        return self.slow

    def load_state_dict(self, saved: Any) -> None:
        """The slow weights of a checkpoint; None (a checkpoint of a run without lookahead) starts
        them at the current weights."""
        saved = self.fast if saved is None else saved
        if not isinstance(saved, list) or len(saved) != len(self.slow):
            raise ValueError("lookahead state does not match the model")
        for slow, value in zip(self.slow, saved, strict=True):
            slow.copy_(value)
