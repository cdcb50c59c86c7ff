"""Measure a model on a split: top-1, top-5, loss, per-class accuracy, confusion matrix, and
where asked for (EvalSettings.calibration) calibration (calibration.py: ECE, NLL, Brier; before
and after a temperature). The loop validates with it, `fit` and `vggtrain eval` (eval.py) test
with it, and report.py turns its Evaluation into the report."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch
from torch import nn

from vggtrain import calibration, distributed
from vggtrain.calibration import Calibration
from vggtrain.config import TrainConfig
from vggtrain.data import CIFAR10_STATS, Split, Stats, eval_batches, norm_stats
from vggtrain.device import autocast, channels_last_for, synchronize
from vggtrain.distributed import Dist

TOPK = 5


@dataclass(frozen=True)
class EvalSettings:
    """How a split is measured: built once from the run's config and device (eval_settings)."""

    num_classes: int
    batch_size: int
    device: torch.device
    precision: str = "fp32"
    channels_last: bool = False
    tta: str = "none"  # one of TTA_MODES, as train.tta
    stats: Stats = CIFAR10_STATS  # the normalisation the model was trained with
    # Measure calibration (ECE, NLL, Brier: Evaluation.calibration) too. Off by default: only the
    # reports read it (fit's test pass, `vggtrain eval`), and validation, bench, the corruption
    # passes and the probes run often enough for its per-batch sums (and under torchrun its two
    # all-reduces) to be worth skipping.
    calibration: bool = False
    # with calibration, also measure softmax(log-probabilities / T) (Evaluation.calibrated); T > 0
    # changes no prediction, so without calibration it changes nothing measured
    temperature: float | None = None


def eval_settings(cfg: TrainConfig, device: torch.device, tta: str | None = None,
                  batch_size: int | None = None) -> EvalSettings:
    """The settings a run validates and tests with; tta and batch_size override its config's."""
    return EvalSettings(cfg.model.num_classes, batch_size or cfg.train.eval_batch_size, device,
                        cfg.train.precision, channels_last_for(cfg.train.channels_last, device),
                        cfg.train.tta if tta is None else tta, norm_stats(cfg.data))


@dataclass
class Evaluation:
    """One pass over a split. Tensors are on the CPU."""

    loss: float  # mean cross-entropy (of the flip-averaged probabilities with TTA)
    top1: float
    top5: float  # top-min(5, classes)
    images: int
    confusion: torch.Tensor  # int64 (C, C): row = true class, column = predicted class
    predictions: torch.Tensor  # int64 (N,) predicted class per image, in split order
    confidence: torch.Tensor  # float32 (N,) probability of the predicted class
    seconds: float  # wall time of the pass, host syncs included
    calibration: Calibration | None = None  # ECE, NLL, Brier as measured (with settings.calibration)
    calibrated: Calibration | None = None  # the same after settings.temperature, where given too

    @property
    def images_per_s(self) -> float | None:
        return self.images / self.seconds if self.seconds > 0 else None

    def per_class(self) -> list[tuple[int, int]]:
        """(correct, total) per class, from the confusion matrix's diagonal and row sums."""
        return list(zip(self.confusion.diag().tolist(), self.confusion.sum(1).tolist(), strict=True))


def log_probs(model: nn.Module, x: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """Log-probabilities (B, C) in float32 of the probabilities averaged over the TTA views (an
    ensemble averages probabilities, not logits).

    flip: the image and its mirror. multicrop (airbench's level 2): weight 1/2 on that pair, 1/4
    each on the pairs of the image shifted one pixel up-left and down-right (reflect-padded).
    """
    if tta == "none":
        return torch.log_softmax(model(x).float(), dim=1)
    if tta == "multicrop":
        h, w = x.shape[-2:]
        padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
        views = [log_probs(model, v, "flip") for v in (x, padded[..., :h, :w], padded[..., 2:, 2:])]
        weights = torch.tensor([0.5, 0.25, 0.25], device=x.device).log()[:, None, None]
        return torch.logsumexp(torch.stack(views) + weights, dim=0)
    out = torch.log_softmax(model(x).float(), dim=1)
    flipped = torch.log_softmax(model(x.flip(3)).float(), dim=1)
    return torch.logsumexp(torch.stack([out, flipped]), dim=0) - math.log(2.0)


@torch.no_grad()
def evaluate_split(model: nn.Module, split: Split, settings: EvalSettings,
                   dist: Dist = distributed.SINGLE) -> Evaluation:
    """Everything the report needs from one pass (its calibration only with
    settings.calibration); sums stay on the device until the end.

    Under torchrun (dist), each rank measures every world-th image and the sums are all-reduced:
    the metrics are those of the whole split; predictions and confidence cover this rank's share.
    """
    s, device, num_classes = settings, settings.device, settings.num_classes
    model.eval()
    total = len(split)
    if dist.enabled:
        split = Split(split.images[dist.rank::dist.world], split.labels[dist.rank::dist.world])
    k = min(TOPK, num_classes)
    loss_sum = torch.zeros((), device=device)  # float32: MPS has no float64
    top1 = torch.zeros((), device=device, dtype=torch.int64)
    topk = torch.zeros((), device=device, dtype=torch.int64)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.int64)
    preds, confs = [], []
    # calibration's sums, where asked for: of the probabilities as measured, then after the
    # temperature (if any)
    cal = [calibration.new_sums(device) for _ in range(_calibration_sets(s))]
    synchronize(device)
    t0 = time.perf_counter()
    for x, y in eval_batches(split, s.batch_size, s.channels_last, s.stats):
        with autocast(device, s.precision):
            logp = log_probs(model, x, s.tta)
        loss_sum += nn.functional.nll_loss(logp, y, reduction="sum")
        best = logp.topk(k, dim=1).indices
        pred = best[:, 0]
        top1 += (pred == y).sum()
        topk += (best == y[:, None]).any(1).sum()
        confusion += torch.bincount(y * num_classes + pred, minlength=num_classes * num_classes)
        preds.append(pred)
        confs.append(calibration.top1_confidence(logp, pred))
        if cal:
            _add_calibration(cal, logp, y, pred, confs[-1], s.temperature)
    if dist.enabled:
        counts = distributed.all_sum(torch.stack([top1, topk]), dist)
        top1, topk = counts[0], counts[1]
        for t in (loss_sum, confusion, *(t for sums in cal for t in sums)):
            distributed.all_sum(t, dist)
    # Two host reads in all (one per dtype), not one per number: on a GPU each read waits for
    # the device, and validation runs every epoch. The second read ends the timing. The
    # calibration sums, of known sizes, come before the per-image predictions.
    no_preds = torch.zeros(0, device=device, dtype=torch.int64)
    ints = torch.cat([top1[None], topk[None], confusion, *(c[0] for c in cal),
                      torch.cat(preds) if preds else no_preds]).cpu()
    floats = torch.cat([loss_sum[None], *(c[1] for c in cal),
                        torch.cat(confs) if confs else loss_sum.new_zeros(0)]).cpu()
    seconds = time.perf_counter() - t0
    c1, ck, cells = int(ints[0]), int(ints[1]), num_classes * num_classes
    i, f = 2 + cells + len(cal) * calibration.INTS, 1 + len(cal) * calibration.FLOATS
    measured, calibrated = _summaries(ints[2 + cells:i], floats[1:f], len(cal))
    d = max(total, 1)
    return Evaluation(loss=float(floats[0]) / d, top1=c1 / d, top5=ck / d, images=total,
                      confusion=ints[2:2 + cells].view(num_classes, num_classes),
                      predictions=ints[i:], confidence=floats[f:], seconds=seconds,
                      calibration=measured, calibrated=calibrated)


def _calibration_sets(s: EvalSettings) -> int:
    """How many sets of calibration sums a pass keeps: none unless asked for, then one, and one
    more after a temperature."""
    if not s.calibration:
        return 0
    return 1 if s.temperature is None else 2


def _add_calibration(cal: list[tuple[torch.Tensor, torch.Tensor]], logp: torch.Tensor, y: torch.Tensor,
                     pred: torch.Tensor, conf: torch.Tensor, temperature: float | None) -> None:
    """Add a batch to the pass's calibration sums: as measured (conf: the confidences the pass
    already computed), then after the temperature, whose confidences differ (T > 0 leaves every
    prediction as it is, not its probability)."""
    calibration.add_batch(cal[0], logp, y, pred, conf)
    if len(cal) > 1 and temperature is not None:
        calibration.add_batch(cal[1], calibration.rescaled(logp, temperature), y, pred)


def _summaries(ints: torch.Tensor, floats: torch.Tensor, n: int
               ) -> tuple[Calibration | None, Calibration | None]:
    """(as measured, after the temperature) from the n (0 to 2) sets of calibration sums read
    back in the pass's packed reads (ints and floats: their slices of them); None where not
    measured."""
    sets = [calibration.summarize(a, b)
            for a, b in zip(ints.view(n, calibration.INTS), floats.view(n, calibration.FLOATS), strict=True)]
    padded: list[Calibration | None] = [*sets, None, None]
    return padded[0], padded[1]


@torch.no_grad()
def split_log_probs(model: nn.Module, split: Split, settings: EvalSettings
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probabilities (N, C) float32, labels (N,)) of every image of split, on the device, as
    evaluate_split measures them (the same TTA): what a temperature is fitted on."""
    model.eval()
    s, out, labels = settings, [], []
    for x, y in eval_batches(split, s.batch_size, s.channels_last, s.stats):
        with autocast(s.device, s.precision):
            out.append(log_probs(model, x, s.tta).float())
        labels.append(y)
    return torch.cat(out), torch.cat(labels)


def fit_temperatures(model: nn.Module, split: Split, settings: EvalSettings, modes: list[str]
                     ) -> dict[str, float]:
    """A temperature per TTA mode, each fitted on split's log-probabilities under that mode
    (calibration.fit_temperature): a temperature applies to the kind of log-probabilities it
    was fitted on, and predict and export run one forward pass (mode "none")."""
    return {mode: calibration.fit_temperature(*split_log_probs(model, split, replace(settings, tta=mode)))
            for mode in dict.fromkeys(modes)}
