"""`vggtrain lr-find`: the learning-rate range test (Smith, "Cyclical learning rates", 2015; the
LR finder of fastai, Lightning's tuner and pytorch-cifar100's lr_finder.py), cheaper than a sweep
when the one number not known is optim.lr.

The run is built as `fit` builds it (fit.load_data's training split, with data.val_size's images
held out; run.build_run's model, optimizer and augmentation), and trained by the loop's own step
(train.loop_step: batch preparation, the optimizer step, the averagers) for a few hundred steps
while optim.lr rises exponentially from --min-lr to --max-lr. Every parameter group tied to
optim.lr (BN biases at optim.bn_bias_lr_scale, the whitening bias, which the test does not
freeze after model.whiten_bias_epochs) keeps its ratio to it; Muon's group keeps optim.muon_lr,
a key of its own. The loss is smoothed (SMOOTHING) and the test stops
when it diverges. Nothing is written but the picture (and --json): no run directory, no weights.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from vggtrain import distributed
from vggtrain.atomic import atomic_write
from vggtrain.config import TrainConfig
from vggtrain.device import set_deterministic
from vggtrain.distill import open_teachers
from vggtrain.errors import UserError
from vggtrain.fit import load_data
from vggtrain.model import count_parameters
from vggtrain.run import EpochProgress, Run, build_run, steps_per_epoch
from vggtrain.train import epoch_batches, loop_step

DEFAULT_STEPS = 200
DEFAULT_MIN_LR, DEFAULT_MAX_LR = 1e-5, 10.0
SMOOTHING = 0.9  # the loss's exponential average: a lag of ~10 steps, a third of a decade at the defaults
DIVERGED = 4.0  # the test stops once the smoothed loss exceeds this multiple of its lowest value
# The suggestion is the rate at the smoothed loss's minimum, divided by SUGGEST_DIVISOR. That
# minimum sits past the edge of stability (a rising rate needs a few steps to blow the loss up),
# and a good constant rate is below that edge. Plain SGD on least squares (tests/test_lr_find.py)
# diverges above 2/L and does best near 1/L (L: the Hessian's largest eigenvalue); with this
# module's defaults the minimum fell at 6.2/L to 6.7/L on the full batch and at 2.35/L to 2.9/L on
# batches of 64, for condition numbers 10 to 1000. Divided by 4 that is 0.59/L to 1.7/L, centred on
# 1/L and below the edge everywhere; /3 reached 2.2/L (past the edge: the full batch diverges),
# /10 (fastai's lr_min / 10) fell to 0.24/L. (Steepest-descent and "valley" rules came out below
# 0.15/L on the same problems with a 1e-4..1e2 ramp.)
SUGGEST_DIVISOR = 4.0
PLOTS_EXTRA = "the loss-vs-lr picture needs matplotlib: pip install 'vggtrain[plots]'"


@dataclass
class RangeTest:
    """What the range test recorded: at each step the rate optim.lr had, the loss and its
    smoothed value; why it ended; and the suggested optim.lr."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    stopped: str  # "diverged", "non-finite loss" or "max_lr reached"
    suggested_lr: float

    def to_json(self) -> dict[str, Any]:
        return {"schema": "vggtrain.lr_find/1", "suggested_lr": self.suggested_lr,
                "rule": f"the rate at the smoothed loss's minimum / {SUGGEST_DIVISOR:g}", **asdict(self)}


def ramp(min_lr: float, max_lr: float, steps: int) -> list[float]:
    """steps rates rising exponentially from min_lr to max_lr, both included."""
    if steps == 1:
        return [min_lr]
    return [min_lr * (max_lr / min_lr) ** (i / (steps - 1)) for i in range(steps)]


def ramp_scheduler(optimizer: torch.optim.Optimizer, rates: list[float], lr: float
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler giving the groups tied to optim.lr (`lr`) rates[i] x their ratio to it at step
    i (the last rate after the end); a Muon group (optim.muon_lr) keeps its own rate."""

    def factor(step: int) -> float:
        return rates[min(step, len(rates) - 1)] / lr

    def same(step: int) -> float:
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [same if g.get("muon") else factor for g in optimizer.param_groups])


def record(rates: list[float], next_loss: Callable[[], float]) -> RangeTest:
    """Take one step per rate (next_loss: a step at the rate the scheduler set, returning its loss)
    until the smoothed loss passes DIVERGED x its lowest value or a loss is not finite."""
    losses: list[float] = []
    smoothed: list[float] = []
    average, best, stopped = 0.0, math.inf, "max_lr reached"
    for i in range(len(rates)):
        loss = next_loss()
        if not math.isfinite(loss):
            stopped = "non-finite loss"
            break
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        value = average / (1 - SMOOTHING ** (i + 1))  # bias-corrected: the first steps are not pulled to 0
        losses.append(loss)
        smoothed.append(value)
        if value > DIVERGED * best:
            stopped = "diverged"
            break
        best = min(best, value)
    if not losses:
        raise UserError(f"lr-find: the loss was not finite at the first step (optim.lr {rates[0]:.3g}); "
                        f"lower --min-lr")
    return RangeTest(rates[:len(losses)], losses, smoothed, stopped, suggest(rates[:len(losses)], smoothed))


def suggest(lrs: list[float], smoothed: list[float]) -> float:
    """The suggested optim.lr: the rate at the smoothed loss's minimum / SUGGEST_DIVISOR (why this
    rule: see SUGGEST_DIVISOR), as two significant digits."""
    return float(f"{lrs[lowest_index(smoothed)] / SUGGEST_DIVISOR:.2g}")


def lowest_index(smoothed: list[float]) -> int:
    """Where the smoothed loss is lowest (the first such step)."""
    return min(range(len(smoothed)), key=smoothed.__getitem__)


def lr_find(cfg: TrainConfig, steps: int = DEFAULT_STEPS, min_lr: float = DEFAULT_MIN_LR,
            max_lr: float = DEFAULT_MAX_LR, device: str | None = None,
            talk: Callable[[str], None] = print) -> RangeTest:
    """The range test of cfg's run (see the module's docstring), in this process; talk: where
    its one line about the run goes."""
    check_range(steps, min_lr, max_lr)
    set_deterministic(cfg.train.deterministic)
    train, _, _, class_names = load_data(cfg, distributed.SINGLE)
    per_epoch = steps_per_epoch(len(train), distributed.SINGLE, cfg.train.batch_size)
    # Enough epochs for the steps (the run's last step bounds its batches); the schedule is replaced.
    cfg = replace(cfg, train=replace(cfg.train, epochs=max(cfg.train.epochs, math.ceil(steps / per_epoch))))
    # A path nothing can be written under: the loop's step writes nothing, and this keeps it so.
    run = build_run(cfg, Path(os.devnull), class_names, len(train), device_spec=device,
                    whiten_images=train.images, teachers=open_teachers(cfg, class_names))
    train = train.to(run.device)
    talk(f"lr-find: {cfg.model.arch} ({count_parameters(run.model):,} parameters) on {run.device}, "
         f"{len(train)} training images, batch {cfg.train.batch_size}: optim.lr from {min_lr:g} to "
         f"{max_lr:g} over {steps} steps")
    rates = ramp(min_lr, max_lr, steps)
    run.scheduler = ramp_scheduler(run.optimizer, rates, cfg.optim.lr)
    step = loop_step(run, per_epoch)
    batches = _batches(run, train)
    run.model.train()

    def next_loss() -> float:
        x, y = next(batches)
        return float(step(x, y)[0])  # one host read per step: the test stops at a divergence

    return record(rates, next_loss)


def _batches(run: Run, train: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The run's batches, epoch after epoch, as fit's loop makes them."""
    while True:
        yield from epoch_batches(run, train)
        run.epoch, run.progress = run.epoch + 1, EpochProgress()


def check_range(steps: int, min_lr: float, max_lr: float) -> None:
    if not (math.isfinite(min_lr) and min_lr > 0 and math.isfinite(max_lr) and max_lr > min_lr):
        raise UserError(f"usage error: lr-find needs 0 < --min-lr < --max-lr, finite (got {min_lr:g} "
                        f"and {max_lr:g})")
    if steps < 10:
        raise UserError(f"usage error: lr-find needs --steps of at least 10 (got {steps})")


def notes(test: RangeTest) -> list[str]:
    """What a person should know about the curve: where it stopped, and a minimum at either end."""
    lowest = lowest_index(test.smoothed)
    lines = [f"stopped at optim.lr {test.lrs[-1]:.3g} after {len(test.lrs)} steps: {test.stopped}; "
             f"lowest smoothed loss {test.smoothed[lowest]:.4g} at {test.lrs[lowest]:.3g}"]
    if lowest == len(test.lrs) - 1:
        lines.append("note: the loss was still falling at the last rate: try a larger --max-lr or "
                     "more --steps")
    elif lowest == 0:
        lines.append("note: the loss rose from the first rate on: try a smaller --min-lr")
    return lines


def draw(test: RangeTest, path: Path, title: str) -> bool:
    """The loss (raw and smoothed) against optim.lr on a log axis, the suggestion marked, as a PNG
    written atomically. False (nothing written) without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(7, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(test.lrs, test.losses, color="0.75", linewidth=0.8, label="loss")
    ax.plot(test.lrs, test.smoothed, color="C0", label=f"smoothed (EMA {SMOOTHING:g})")
    ax.axvline(test.suggested_lr, color="C3", linestyle="--",
               label=f"suggested optim.lr {test.suggested_lr:g}")
    ax.set_xscale("log")
    top = max(test.smoothed[0], min(test.smoothed)) * 1.5  # a diverging tail would flatten the rest
    ax.set_ylim(min(min(test.losses), min(test.smoothed)) * 0.95, top)
    ax.set_xlabel("optim.lr")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    return True
