"""Measure a model on a split: top-1, top-5, loss, per-class accuracy, confusion matrix; and
`vggtrain eval`, which measures a checkpoint (its report's schema is report.py's)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vggtrain import distributed
from vggtrain.config import TrainConfig
from vggtrain.data import CIFAR10_STATS, Split, Stats, eval_batches, norm_stats
from vggtrain.device import autocast, channels_last_for, select_device, synchronize
from vggtrain.distributed import Dist
from vggtrain.errors import DataError, UserError

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
    """Everything the report needs from one pass; sums stay on the device until the end.

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
        confs.append(logp.gather(1, pred[:, None]).squeeze(1).exp())
    n = total
    predictions = torch.cat(preds).cpu() if preds else torch.zeros(0, dtype=torch.int64)
    confidence = torch.cat(confs).cpu() if confs else torch.zeros(0)
    if dist.enabled:
        counts = distributed.all_sum(torch.stack([top1, topk]), dist)
        top1, topk = counts[0], counts[1]
        distributed.all_sum(loss_sum, dist)
        distributed.all_sum(confusion, dist)
    loss, c1, ck = loss_sum.item(), top1.item(), topk.item()  # the sync that ends the timing
    seconds = time.perf_counter() - t0
    d = max(n, 1)
    return Evaluation(loss=loss / d, top1=c1 / d, top5=ck / d, images=n,
                      confusion=confusion.view(num_classes, num_classes).cpu(),
                      predictions=predictions, confidence=confidence, seconds=seconds)


# --- `vggtrain eval` ---------------------------------------------------------------------------

def evaluate_checkpoint(ckpt: str | Path, split: str = "test", data_root: str | None = None,
                        batch_size: int | None = None, device: str = "auto",
                        tta: str | None = None) -> dict[str, Any]:
    """The report for a checkpoint on the test split, or on the validation split its run held out
    (rebuilt from the stored data.val_size and seed). Needs nothing but the checkpoint and data.
    tta None means the run's own train.tta, so that a re-test reproduces the run's report."""
    from vggtrain.inference import load_model, resolve_checkpoint
    from vggtrain.report import build_report

    dev = select_device(device)
    loaded = load_model(resolve_checkpoint(ckpt), dev)
    cfg = loaded.cfg
    if tta is None:
        tta = cfg.train.tta
    data, names = checkpoint_split(loaded, split, data_root)
    ev = evaluate_split(loaded.model, data.to(dev), eval_settings(cfg, dev, tta, batch_size))
    return build_report(ev, split=split, model=loaded.model, cfg=cfg, class_names=names,
                        checkpoint=loaded.path, checkpoint_epoch=loaded.epoch, device=dev,
                        precision=cfg.train.precision, tta=tta, weights=loaded.weights)


def checkpoint_split(loaded: Any, split: str, data_root: str | None = None) -> tuple[Split, list[str]]:
    """The split a loaded checkpoint (inference.LoadedModel) is measured on, with the data's class
    names: the test set, or the validation images its run held out (rebuilt from the stored
    data.val_size and seed). The data must have the checkpoint's classes."""
    from dataclasses import replace

    from vggtrain.data import load_dataset, split_train_val

    cfg = loaded.cfg
    root = data_root if data_root is not None else cfg.data.root
    train, test, names = load_dataset(replace(cfg.data, root=str(root),
                                              download=cfg.data.download and data_root is None))
    if len(names) != cfg.model.num_classes:
        raise DataError(f"{root}: the data has {len(names)} classes but the checkpoint's model "
                        f"predicts {cfg.model.num_classes}")
    if names != loaded.class_names and loaded.class_names != [str(i) for i in range(len(names))]:
        raise DataError(f"{root}: the data's classes ({', '.join(names)}) are not the checkpoint's "
                        f"({', '.join(loaded.class_names)})")
    if split == "val":
        if cfg.data.val_size == 0:
            raise UserError(f"{loaded.path}: its run held out no validation images (data.val_size 0)")
        _, data = split_train_val(train, cfg.data.val_size, cfg.seed)
    else:
        data = test
    return data, names
