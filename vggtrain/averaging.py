"""Weight averaging that the loop calls once per step: lookahead (optim.lookahead_every) and the
weight EMA (optim.ema_decay).

An averager has ``step(done, total, epoch_end)`` after each optimizer step (done: steps so far,
1-based; total: the run's planned steps), and ``state_dict()`` / ``load_state_dict()`` for its
checkpoint entry (``lookahead``, ``ema``). Neither reads the device inside a step.
"""

from __future__ import annotations

import copy
import itertools
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


class WeightEMA:
    """optim.ema_decay's average of the weights and BN buffers: after each optimizer step,
    ema <- lerp(ema, weights, 1 - decay) (the first step copies), as torch's
    AveragedModel(multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True) computes it, and
    with its state_dict (``n_averaged``, ``module.*``), so checkpoints of either resume in the other.

    Written here because AveragedModel detaches every tensor in Python at each step (~270 ops for
    VGG16) and reads its device-side counter twice (two host syncs per step); this one gathers the
    tensor lists once, keeps the counter a Python int, and updates with one foreach lerp (plus a
    few ops for the integer buffers, which AveragedModel averages and truncates too)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).requires_grad_(False)  # what validation measures
        self.n_averaged = 0
        self.in_graph = False  # a captured CUDA graph does the averaging (graphs.GraphedStep)
        pairs = list(zip(_params_then_buffers(self.module), _params_then_buffers(model), strict=True))
        self._floats = ([a for a, _ in pairs if a.is_floating_point()],
                        [m for a, m in pairs if a.is_floating_point()])
        self._ints = ([a for a, _ in pairs if not a.is_floating_point()],
                      [m for a, m in pairs if not a.is_floating_point()])

    def step(self, done: int = 0, total: int = 0, epoch_end: bool = False) -> None:
        self.update()

    @torch.no_grad()
    def update(self) -> None:
        if self.n_averaged == 0:
            torch._foreach_copy_(self._floats[0] + self._ints[0], self._floats[1] + self._ints[1])
        elif not self.in_graph:
            self.lerp_()
        self.n_averaged += 1

    @torch.no_grad()
    def lerp_(self) -> None:
        """One averaging step on the device (what a CUDA graph captures)."""
        (ema_f, model_f), (ema_i, model_i) = self._floats, self._ints
        torch._foreach_lerp_(ema_f, model_f, 1.0 - self.decay)
        if ema_i:  # AveragedModel's own arithmetic for them: ema * d + x * (1 - d), truncated
            mixed = torch._foreach_mul(ema_i, self.decay)
            torch._foreach_add_(mixed, torch._foreach_mul(model_i, 1.0 - self.decay))
            torch._foreach_copy_(ema_i, mixed)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """AveragedModel's layout: the counter, then the averaged module's state under module.*."""
        state = {"n_averaged": torch.tensor(self.n_averaged, dtype=torch.long)}
        state.update({f"module.{k}": v for k, v in self.module.state_dict().items()})
        return state

    def load_state_dict(self, saved: Any) -> None:
        if not isinstance(saved, dict) or "n_averaged" not in saved:
            raise ValueError("its weight EMA entry is not a weight average's state")
        weights = {k.removeprefix("module."): v for k, v in saved.items() if k.startswith("module.")}
        self.module.load_state_dict(weights)
        self.n_averaged = int(saved["n_averaged"])


def _params_then_buffers(model: nn.Module) -> list[torch.Tensor]:
    """AveragedModel's order (parameters, then buffers), detached once: views of the storage the
    optimizer and load_state_dict update in place."""
    return [t.detach() for t in itertools.chain(model.parameters(), model.buffers())]


def measured_model(model: nn.Module, ema: WeightEMA | None) -> nn.Module:
    """The weights a run is measured by (validation, best.pt's choice, sweeps, time-to-accuracy
    probes) and tested with: the weight EMA's where the run keeps one, else the trained weights."""
    return ema.module if ema is not None else model
