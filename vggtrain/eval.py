"""`vggtrain eval`: a checkpoint measured on the test split, or on the validation images its run
held out, as a report in report.py's schema. Needs nothing but the checkpoint and the data."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from vggtrain.data import Split, load_dataset, split_train_val
from vggtrain.device import select_device
from vggtrain.errors import DataError, UserError, shown
from vggtrain.evaluate import eval_settings, evaluate_split, fit_temperatures
from vggtrain.inference import LoadedModel, load_model, resolve_checkpoint
from vggtrain.report import build_report


def evaluate_checkpoint(ckpt: str | Path, split: str = "test", data_root: str | None = None,
                        batch_size: int | None = None, device: str = "auto",
                        tta: str | None = None, calibrated: bool = False,
                        note: Callable[[str], None] = print) -> dict[str, Any]:
    """The report for a checkpoint on the test split, or on the validation split its run held out
    (rebuilt from the stored data.val_size and seed). Needs nothing but the checkpoint and data.
    tta None means the run's own train.tta, so that a re-test reproduces the run's report.
    calibrated: also measure the probabilities after the checkpoint's temperature for this TTA
    (checkpoint_temperature; note gets the line saying so when one had to be fitted)."""
    dev = select_device(device)
    loaded = load_model(resolve_checkpoint(ckpt), dev)
    cfg = loaded.cfg
    if tta is None:
        tta = cfg.train.tta
    temperature, source = None, None
    if calibrated:
        temperature, source = checkpoint_temperature(loaded, tta, data_root, batch_size, note)
    data, names = checkpoint_split(loaded, split, data_root)
    settings = replace(eval_settings(cfg, dev, tta, batch_size), temperature=temperature)
    ev = evaluate_split(loaded.model, data.to(dev), settings)
    return build_report(ev, split=split, model=loaded.model, cfg=cfg, class_names=names,
                        checkpoint=loaded.path, checkpoint_epoch=loaded.epoch, device=dev,
                        precision=cfg.train.precision, tta=tta, weights=loaded.weights,
                        temperature=temperature, temperature_from=source)


def checkpoint_temperature(loaded: LoadedModel, tta: str, data_root: str | None = None,
                           batch_size: int | None = None, note: Callable[[str], None] = print
                           ) -> tuple[float, str]:
    """(temperature, where it came from) for the loaded model's log-probabilities under tta: the
    one its checkpoint stores for that mode, else one fitted now on the validation split its run
    held out (rebuilt as fit did, from data.val_size and the seed; note says so in one line).
    Without either: UserError (exit 2)."""
    stored = loaded.temperatures.get(tta)
    if stored is not None:
        return stored, "stored in the checkpoint, fitted on the run's validation split"
    if loaded.cfg.data.val_size == 0:
        raise UserError(f"{loaded.path}: no temperature stored for TTA {tta} and its run held out no "
                        "validation images to fit one on (data.val_size 0); run without --calibrated")
    val, _ = checkpoint_split(loaded, "val", data_root)
    device = next(loaded.model.parameters()).device
    settings = eval_settings(loaded.cfg, device, tta, batch_size)
    temperature = fit_temperatures(loaded.model, val.to(device), settings, [tta])[tta]
    source = f"fitted now on the run's {len(val):,} validation images"
    note(shown(f"{loaded.path}: no temperature stored for TTA {tta}; {source}: T = {temperature:.3f}"))
    return temperature, source


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
