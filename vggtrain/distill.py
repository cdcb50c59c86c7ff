"""Knowledge distillation (distill.teachers): trained runs' soft targets in the training loss.

Each teacher is the model its own checkpoint's stored config builds (inference.load_model: the
safe loader, its weight EMA's weights where it kept one), frozen, in eval mode, on the run's
device. In the step, the teachers see the batch the network sees (augmented, mixed), each
normalised as it was trained (the batch arrives normalised with the run's data.mean and
data.std: an affine map per channel takes it to a teacher's own, exactly, MixUp's blends and
cutout's fill included), under the run's autocast and without gradients; their soft targets are
the average of their softmax(logits / T), and the loss is

    (1 - alpha) * the usual loss + alpha * T^2 * KL(soft targets || softmax(network logits / T))

(Hinton et al. 2015; T^2 keeps the soft term's gradients at the usual term's scale). A resumed run
re-reads its teachers from their paths and refuses one whose file changed (its sha256).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vggtrain.config import TrainConfig
from vggtrain.data import Stats, ValidationDraw, held_out_note, norm_stats
from vggtrain.device import autocast
from vggtrain.errors import CheckpointError, shown
from vggtrain.inference import load_model, resolve_checkpoint
from vggtrain.safeio import sha256_of


@dataclass
class Teacher:
    path: Path  # the checkpoint file read
    model: nn.Module
    stats: Stats  # the normalisation it was trained with (its data.mean, data.std)
    config_digest: str  # its stored config's digest, as its report.json gives it
    sha256: str  # the file's: a resumed run refuses a teacher that changed
    weights: str  # "ema" or "raw"
    val_draw: ValidationDraw | None = None  # which images its run held out
    renorm: tuple[torch.Tensor, torch.Tensor] | None = None  # (scale, shift) from the run's normalisation

    def record(self) -> dict[str, str]:
        return {"path": str(self.path), "config_digest": self.config_digest, "sha256": self.sha256,
                "weights": self.weights}


@dataclass
class Teachers:
    """A run's teachers and what the loss does with their predictions."""

    members: list[Teacher]
    alpha: float
    temperature: float
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"
    clock: ForwardClock = field(default_factory=lambda: ForwardClock(torch.device("cpu")))

    def record(self) -> list[dict[str, str]]:
        """The checkpoint's and the report's `distill` entry: each teacher's path and digests."""
        return [t.record() for t in self.members]

    def place(self, device: torch.device, channels_last: bool, stats: Stats, precision: str) -> Teachers:
        """On the run's device and layout, frozen, each with the map from the run's normalisation
        (stats, final once the data is loaded) to its own; under the run's autocast (precision)."""
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        for t in self.members:
            t.model = t.model.to(device, memory_format=fmt).eval().requires_grad_(False)
            t.renorm = None if t.stats == stats else renormalisation(stats, t.stats, device)
        self.device, self.precision, self.clock = device, precision, ForwardClock(device)
        return self

    def soft_targets(self, x: torch.Tensor) -> torch.Tensor:
        """The average over the teachers of softmax(logits / T) on the batch x (normalised as the
        run's), in float32, without gradients; no host sync."""
        with self.clock, torch.no_grad(), autocast(self.device, self.precision):
            probs = [F.softmax(t.model(x if t.renorm is None else torch.addcmul(t.renorm[1], x, t.renorm[0]))
                               .float() / self.temperature, dim=1) for t in self.members]
        return probs[0] if len(probs) == 1 else torch.stack(probs).mean(0)

    def cost_text(self, elapsed_s: float) -> str:
        """The epoch line's part: the teachers' forward time as a share of the epoch's training
        time (elapsed_s), read after the epoch's sums were (the device has caught up)."""
        return f" (teachers {self.clock.take() / max(elapsed_s, 1e-9):.0%})"


class ForwardClock:
    """Time in the teachers' forward, with no host sync in the step: on the CPU the host clock
    (the work is done when the call returns); on an accelerator a pair of timing events per step,
    read when the epoch ends, after its sums were read (which waited for the device)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.events = device.type != "cpu"
        self.seconds = 0.0
        self.pairs: list[tuple[Any, Any]] = []
        self._t0 = 0.0

    def __enter__(self) -> None:
        if self.events:
            self.pairs.append(tuple(torch.Event(self.device, enable_timing=True) for _ in range(2)))
            self.pairs[-1][0].record()
        else:
            self._t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        if self.events:
            self.pairs[-1][1].record()
        else:
            self.seconds += time.perf_counter() - self._t0

    def take(self) -> float:
        """The seconds counted since the last take."""
        if self.pairs:
            self.pairs[-1][1].synchronize()
            self.seconds += sum(start.elapsed_time(end) for start, end in self.pairs) / 1000
            self.pairs.clear()
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def renormalisation(ours: Stats, theirs: Stats, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), (1, 3, 1, 1) each: x normalised with ours -> x * scale + shift normalised
    with theirs (pixel = x * std + mean)."""
    mean, std = (torch.tensor(s, dtype=torch.float32) for s in ours)
    their_mean, their_std = (torch.tensor(s, dtype=torch.float32) for s in theirs)
    scale, shift = std / their_std, (mean - their_mean) / their_std
    return scale.view(1, 3, 1, 1).to(device), shift.view(1, 3, 1, 1).to(device)


class DistillationLoss(nn.Module):
    """The usual loss (cross-entropy with its label smoothing, against labels or MixUp/CutMix's
    target probabilities) and the KL divergence from the teachers' soft targets, weighted by
    alpha; it takes the target as the pair (the usual target, the soft targets)."""

    def __init__(self, usual: nn.Module, alpha: float, temperature: float) -> None:
        super().__init__()
        self.usual, self.alpha, self.temperature = usual, alpha, temperature

    def forward(self, logits: torch.Tensor, target: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        usual_target, soft = target
        t = self.temperature
        # batchmean: KL's sum over the classes, averaged over the batch (its mathematical definition)
        kl = F.kl_div(F.log_softmax(logits / t, dim=1), soft, reduction="batchmean")
        return (1 - self.alpha) * self.usual(logits, usual_target) + (self.alpha * t * t) * kl


def loss_function(cfg: TrainConfig, teachers: Teachers | None) -> nn.Module:
    """The run's training loss: cross-entropy with optim.label_smoothing, and the teachers' term
    where there are teachers."""
    usual = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    return usual if teachers is None else DistillationLoss(usual, teachers.alpha, teachers.temperature)


Prepare = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, Any, torch.Tensor]]


def with_soft_targets(prepare: Prepare, teachers: Teachers) -> Prepare:
    """A batch preparation whose target is (its usual target, the teachers' soft targets on the
    prepared images): what DistillationLoss takes."""

    def prepared(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Any, torch.Tensor]:
        x, target, y = prepare(x, y)
        return x, (target, teachers.soft_targets(x)), y

    return prepared


def file_sha256(path: Path) -> str:
    try:
        return "sha256:" + sha256_of(path)
    except OSError as e:
        raise CheckpointError(f"distill.teachers {path}: cannot read it ({e.strerror or e})") from None


def open_teachers(cfg: TrainConfig, class_names: list[str] | None = None,
                  recorded: Any = None) -> Teachers | None:
    """cfg's teachers read and checked (None without any), on the CPU until Teachers.place: each
    must have cfg's class count and, where both are known, class_names (its checkpoint's, in
    order). recorded: a resumed run's checkpoint entry, which every teacher's file must still
    match. Any problem is one line (CheckpointError), before the run directory is made."""
    if not cfg.distill.teachers:
        return None
    n = len(cfg.distill.teachers)
    if recorded is not None and (not isinstance(recorded, list) or len(recorded) != n):
        raise CheckpointError("cannot resume: its checkpoint's distill entry does not list its teachers")
    members = []
    for i, given in enumerate(cfg.distill.teachers):
        path = resolve_checkpoint(given)
        then = recorded[i] if recorded is not None else None
        if then is not None and not path.exists():  # said as missing, not as changed
            where = "" if path.is_absolute() else " (a relative path is read from the current directory)"
            raise CheckpointError(f"distill.teachers {path}: no such file{where}")
        sha = file_sha256(path) if path.is_file() else ""
        if then is not None and (not isinstance(then, dict) or then.get("sha256") != sha):
            was = then.get("sha256") if isinstance(then, dict) else None
            raise CheckpointError(f"distill.teachers {path}: the file changed since this run started "
                                  f"({was} then, {sha or 'absent'} now): a resumed run distils from the "
                                  f"same teachers")
        loaded = load_model(path)
        check_classes(loaded.cfg.model.num_classes, loaded.class_names if loaded.names_recorded else None,
                      cfg.model.num_classes, class_names, path)
        members.append(Teacher(path, loaded.model, norm_stats(loaded.cfg.data), loaded.config_digest,
                               sha, loaded.weights, ValidationDraw.of(loaded.cfg.data, loaded.cfg.seed)))
    return Teachers(members, cfg.distill.alpha, cfg.distill.temperature)


def check_classes(theirs: int, their_names: list[str] | None, ours: int, our_names: list[str] | None,
                  path: Path) -> None:
    if theirs != ours:
        raise CheckpointError(f"distill.teachers {path}: it has {theirs} classes, this run {ours} "
                              f"(a teacher predicts the network's own classes)")
    if their_names is not None and our_names is not None and their_names != [shown(n) for n in our_names]:
        raise CheckpointError(f"distill.teachers {path}: its classes are {their_names[:5]}"
                              f"{'...' if theirs > 5 else ''}, this run's {our_names[:5]}"
                              f"{'...' if ours > 5 else ''} (the same classes, in the same order)")


def notes(teachers: Teachers, val_draw: ValidationDraw | None = None) -> list[str]:
    """What the terminal is told at the start, one line per teacher. val_draw: the run's, where it
    validates: a teacher that did not hold out all its validation images may have trained on them,
    and the run's validation accuracy then reads high (said, not refused: a teacher trained on
    everything is a fair choice where only the test set decides)."""
    lines = []
    for t in teachers.members:
        which = "its weight EMA's" if t.weights == "ema" else "its weights"
        norm = "; the batch re-normalised for its data.mean and data.std" if t.renorm is not None else ""
        lines.append(f"distill: teacher {t.path} ({which}){norm}")
        if val_draw is not None and val_draw.size > 0 and (t.val_draw is None
                                                           or t.val_draw.may_have_trained_on(val_draw)):
            lines.append(held_out_note(f"distill: teacher {t.path}"))
    lines.append(f"distill: loss = {1 - teachers.alpha:g} x the usual + {teachers.alpha:g} x T^2 x KL, "
                 f"T = {teachers.temperature:g}")
    return lines
