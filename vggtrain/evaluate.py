"""Measure a model on a split: top-1, top-5, loss, per-class accuracy, confusion matrix.

Also the one place that turns a checkpoint back into a ready model (``load_model``) for `eval`,
`predict` and `gradcam`, and the JSON report schema shared by `vggtrain eval` and the report at
the end of `fit` (``build_report``; documented in README.md, "Evaluating a model").
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import vggtrain
from vggtrain import distributed
from vggtrain.checkpoint import load_checkpoint, load_model_state
from vggtrain.config import TrainConfig, config_from_dict, tta_mode
from vggtrain.data import Split, eval_batches
from vggtrain.device import autocast, channels_last_for, select_device, synchronize
from vggtrain.distributed import Dist
from vggtrain.errors import CheckpointError, DataError, UserError
from vggtrain.model import build_model, count_parameters

SCHEMA = "vggtrain.report/1"  # bump when a key changes meaning or goes away; adding keys is fine
TOPK = 5


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


def log_probs(model: nn.Module, x: torch.Tensor, tta: bool | str = False) -> torch.Tensor:
    """Log-probabilities (B, C) in float32 of the probabilities averaged over the TTA views (an
    ensemble averages probabilities, not logits).

    flip: the image and its mirror. multicrop (airbench's level 2): weight 1/2 on that pair, 1/4
    each on the pairs of the image shifted one pixel up-left and down-right (reflect-padded).
    """
    mode = tta_mode(tta)
    if mode == "none":
        return torch.log_softmax(model(x).float(), dim=1)
    if mode == "multicrop":
        h, w = x.shape[-2:]
        padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
        views = [log_probs(model, v, "flip") for v in (x, padded[..., :h, :w], padded[..., 2:, 2:])]
        weights = torch.tensor([0.5, 0.25, 0.25], device=x.device).log()[:, None, None]
        return torch.logsumexp(torch.stack(views) + weights, dim=0)
    out = torch.log_softmax(model(x).float(), dim=1)
    flipped = torch.log_softmax(model(x.flip(3)).float(), dim=1)
    return torch.logsumexp(torch.stack([out, flipped]), dim=0) - math.log(2.0)


@torch.no_grad()
def evaluate_split(model: nn.Module, split: Split, num_classes: int, batch_size: int,
                   device: torch.device, precision: str = "fp32", channels_last: bool = False,
                   tta: bool | str = False, dist: Dist = distributed.SINGLE) -> Evaluation:
    """Everything the report needs from one pass; sums stay on the device until the end.

    Under torchrun (dist), each rank measures every world-th image and the sums are all-reduced:
    the metrics are those of the whole split; predictions and confidence cover this rank's share.
    """
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
    for x, y in eval_batches(split, batch_size, channels_last):
        with autocast(device, precision):
            logp = log_probs(model, x, tta)
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


# --- a model from a checkpoint --------------------------------------------------------------

@dataclass
class LoadedModel:
    model: nn.Module  # in eval mode, on the requested device
    cfg: TrainConfig
    class_names: list[str]
    path: Path
    epoch: int


def load_model(path: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Rebuild the model a checkpoint's own config describes and load its weights into it.

    Raises CheckpointError (or ConfigError for a stored config that no longer validates) on a
    file that is missing, not a checkpoint, truncated, or whose weights do not fit that model.
    """
    path = Path(path)
    state = load_checkpoint(path)
    cfg = config_from_dict(state["config"], f"{path} (its stored config)")
    model = build_model(cfg.model)
    load_model_state(model, state["model"], path)
    names = state.get("class_names")
    if names is None:
        names = [str(i) for i in range(cfg.model.num_classes)]
    if not isinstance(names, list) or len(names) != cfg.model.num_classes \
            or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{path}: class_names does not list {cfg.model.num_classes} names")
    try:
        epoch = int(state.get("epoch", 0))
    except (TypeError, ValueError):
        raise CheckpointError(f"{path}: epoch is not a number") from None
    model = model.to(device)
    if channels_last_for(cfg.train.channels_last, torch.device(device)):
        model = model.to(memory_format=torch.channels_last)
    model.eval()
    return LoadedModel(model, cfg, list(names), path, epoch)


# --- the JSON report ----------------------------------------------------------------------

def config_digest(cfg: TrainConfig) -> str:
    """sha256 of the resolved config as canonical JSON: equal digests, equal configs."""
    text = json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def _finite(x: float | None) -> float | None:
    # JSON has no NaN or Infinity; a diverged model's loss is reported as null.
    return x if x is not None and math.isfinite(x) else None


def build_report(ev: Evaluation, *, split: str, model: nn.Module, cfg: TrainConfig,
                 class_names: list[str], checkpoint: str | Path, checkpoint_epoch: int,
                 device: torch.device | str, precision: str, tta: bool | str = False) -> dict[str, Any]:
    """The report as plain data, in the documented schema (README.md, "Evaluating a model")."""
    per_class = [{"class": name, "correct": c, "total": t, "acc": c / t if t else None}
                 for name, (c, t) in zip(class_names, ev.per_class(), strict=True)]
    return {
        "schema": SCHEMA,
        "split": split,
        "metrics": {"top1": ev.top1, "top5": ev.top5, "loss": _finite(ev.loss), "images": ev.images},
        "tta": tta_mode(tta) != "none",
        "tta_mode": tta_mode(tta),
        "per_class": per_class,
        "class_names": list(class_names),
        "confusion_matrix": ev.confusion.tolist(),
        "checkpoint": str(checkpoint),
        "checkpoint_epoch": int(checkpoint_epoch),
        "parameters": count_parameters(model),
        "device": str(device),
        "precision": precision,
        "images_per_s": ev.images_per_s,
        "eval_time_s": ev.seconds,
        "torch_version": str(torch.__version__),
        "vggtrain_version": vggtrain.__version__,
        "config_digest": config_digest(cfg),
        "config": cfg.to_dict(),
    }


def report_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, allow_nan=False) + "\n"


# --- `vggtrain eval` ---------------------------------------------------------------------------

def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as given, or a run directory's best.pt."""
    path = Path(path)
    return path / "best.pt" if path.is_dir() else path


def evaluate_checkpoint(ckpt: str | Path, split: str = "test", data_root: str | None = None,
                        batch_size: int | None = None, device: str = "auto",
                        tta: bool | str | None = None) -> dict[str, Any]:
    """The report for a checkpoint on the test split, or on the validation split its run held out
    (rebuilt from the stored data.val_size and seed). Needs nothing but the checkpoint and data.
    tta None means the run's own train.tta, so that a re-test reproduces the run's report."""
    from vggtrain.data import load_cifar10, split_train_val

    dev = select_device(device)
    loaded = load_model(resolve_checkpoint(ckpt), dev)
    cfg = loaded.cfg
    if tta is None:
        tta = cfg.train.tta
    root = data_root if data_root is not None else cfg.data.root
    train, test, names = load_cifar10(root, cfg.data.download and data_root is None)
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
    ev = evaluate_split(loaded.model, data.to(dev), len(names), batch_size or cfg.train.eval_batch_size,
                        dev, cfg.train.precision, channels_last_for(cfg.train.channels_last, dev), tta)
    return build_report(ev, split=split, model=loaded.model, cfg=cfg, class_names=names,
                        checkpoint=loaded.path, checkpoint_epoch=loaded.epoch, device=dev,
                        precision=cfg.train.precision, tta=tta)
