"""`vggtrain eval`: a checkpoint measured on the test split, or on the validation images its run
held out, as a report in report.py's schema. Needs nothing but the checkpoint and the data."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from vggtrain.data import Split, load_dataset, split_train_val
from vggtrain.device import select_device
from vggtrain.errors import DataError, UserError
from vggtrain.evaluate import eval_settings, evaluate_split
from vggtrain.inference import LoadedModel, load_model, resolve_checkpoint
from vggtrain.report import build_report


def evaluate_checkpoint(ckpt: str | Path, split: str = "test", data_root: str | None = None,
                        batch_size: int | None = None, device: str = "auto",
                        tta: str | None = None) -> dict[str, Any]:
    """The report for a checkpoint on the test split, or on the validation split its run held out
    (rebuilt from the stored data.val_size and seed). Needs nothing but the checkpoint and data.
    tta None means the run's own train.tta, so that a re-test reproduces the run's report."""
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


def checkpoint_split(loaded: LoadedModel, split: str, data_root: str | None = None
                     ) -> tuple[Split, list[str]]:
    """The split a loaded checkpoint is measured on, with the data's class names: the test set,
    or the validation images its run held out (rebuilt from the stored data.val_size and seed).
    The data must have the checkpoint's classes."""
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
