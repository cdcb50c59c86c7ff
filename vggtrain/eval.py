"""`vggtrain eval`: a checkpoint measured on the test split, or on the validation images its run
held out, as a report in report.py's schema. Needs nothing but the checkpoint and the data."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vggtrain.data import Split, load_dataset, run_split
from vggtrain.device import select_device
from vggtrain.errors import DataError, UserError, shown
from vggtrain.evaluate import EvalSettings, Evaluation, eval_settings, evaluate_split, fit_temperatures
from vggtrain.inference import LoadedModel, load_model, resolve_checkpoint
from vggtrain.report import build_report

if TYPE_CHECKING:
    from vggtrain.corruptions import CorruptionRequest


def evaluate_checkpoint(ckpt: str | Path, split: str = "test", data_root: str | None = None,
                        batch_size: int | None = None, device: str = "auto",
                        tta: str | None = None, calibrated: bool = False,
                        note: Callable[[str], None] = print, corruptions: CorruptionRequest | None = None,
                        out: str | Path | None = None) -> dict[str, Any]:
    """The report for a checkpoint on the test split, or on the validation split its run held out
    (rebuilt by data.run_split from the stored config). Needs nothing but the checkpoint and data.
    tta None means the run's own train.tta, so that a re-test reproduces the run's report.
    calibrated: also measure the probabilities after the checkpoint's temperature for this TTA
    (the stored one, else one fitted now on the run's validation split, as checkpoint_temperature
    gives it; note gets the line saying so when one had to be fitted).
    corruptions: also measure it on CIFAR-10-C corruptions of the split (the report's
    `corruptions`); out: write report.json, report.md and the pictures into that directory."""
    dev = select_device(device)
    loaded = load_model(resolve_checkpoint(ckpt), dev)
    baseline = None
    if corruptions is not None and corruptions.baseline is not None:
        baseline = load_model(resolve_checkpoint(corruptions.baseline), dev)  # refused before the work
        if baseline.class_names != loaded.class_names:
            raise DataError(f"--baseline {baseline.path}: its classes ({', '.join(baseline.class_names)}) "
                            f"are not the checkpoint's ({', '.join(loaded.class_names)})")
    cfg = loaded.cfg
    previous = _report_in(Path(out), loaded, split) if out is not None else None
    if previous is not None:  # fit's report stays as fit wrote it; say what --out does there
        added = "only the corruptions section is added to it" if corruptions is not None else \
            "nothing is written there"
        note(shown(f"--out {out}: holds this checkpoint's report; {added}"))
    if tta is None:
        tta = cfg.train.tta
    data, names, temperature, source = _split_and_temperature(loaded, split, tta, calibrated, data_root,
                                                       batch_size, note)
    data = data.to(dev)
    # the report's calibration entry needs the calibration sums (evaluate.EvalSettings.calibration)
    settings = replace(eval_settings(cfg, dev, tta, batch_size), calibration=True, temperature=temperature)
    ev = evaluate_split(loaded.model, data, settings)
    report = build_report(ev, split=split, model=loaded.model, cfg=cfg, class_names=names,
                          checkpoint=loaded.path, checkpoint_epoch=loaded.epoch, device=dev,
                          precision=cfg.train.precision, tta=tta, weights=loaded.weights,
                          temperature=temperature, temperature_from=source)
    if corruptions is not None:
        report["corruptions"] = _corruptions(loaded, baseline, data, settings, ev.top1, corruptions, names)
    if out is not None:
        write_eval_files(Path(out), report, ev, data, previous)
    return report


def checkpoint_temperature(loaded: LoadedModel, tta: str, data_root: str | None = None,
                           batch_size: int | None = None, note: Callable[[str], None] = print
                           ) -> tuple[float, str]:
    """(temperature, where it came from) for the loaded model's log-probabilities under tta: the
    one its checkpoint stores for that mode, else one fitted now on the validation split its run
    held out (rebuilt as fit did, data.run_split; note says so in one line).
    Without either: UserError (exit 2), before any data is read."""
    stored = _stored_temperature(loaded, tta)
    if stored is not None:
        return stored
    val, _ = checkpoint_split(loaded, "val", data_root)
    return _fitted_temperature(loaded, tta, val, batch_size, note)


def _split_and_temperature(loaded: LoadedModel, split: str, tta: str, calibrated: bool, data_root: str | None,
                    batch_size: int | None, note: Callable[[str], None]
                    ) -> tuple[Split, list[str], float | None, str | None]:
    """(the split eval measures, the data's class names, the temperature and where it came from:
    None without calibrated), as checkpoint_split and checkpoint_temperature give them but from one
    read of the dataset: a temperature fitted now needs the validation split too, which is the
    same data's. Refusals come before the read, in checkpoint_temperature's order."""
    found = _stored_temperature(loaded, tta) if calibrated else None
    _refuse_missing_val(loaded, split)
    train, test, names, _ = checkpoint_dataset(loaded, data_root)
    fit_now = calibrated and found is None
    val = _held_out(loaded, train) if split == "val" or fit_now else None
    if fit_now and val is not None:  # val is there exactly then
        found = _fitted_temperature(loaded, tta, val, batch_size, note)
    temperature, source = found or (None, None)
    return (val if split == "val" and val is not None else test), names, temperature, source


def _stored_temperature(loaded: LoadedModel, tta: str) -> tuple[float, str] | None:
    """(temperature, where it came from) as the checkpoint stores it for tta; None where it stores
    none but its run held out validation images to fit one on; UserError (exit 2) otherwise."""
    stored = loaded.temperatures.get(tta)
    if stored is not None:
        return stored, "stored in the checkpoint, fitted on the run's validation split"
    if loaded.cfg.data.val_size == 0:
        raise UserError(f"{loaded.path}: no temperature stored for TTA {tta} and its run held out no "
                        "validation images to fit one on (data.val_size 0); run without --calibrated")
    return None


def _fitted_temperature(loaded: LoadedModel, tta: str, val: Split, batch_size: int | None,
                        note: Callable[[str], None]) -> tuple[float, str]:
    """(temperature, where it came from), fitted now on val, the run's validation split; note
    gets the line saying so."""
    device = next(loaded.model.parameters()).device
    settings = eval_settings(loaded.cfg, device, tta, batch_size)
    temperature = fit_temperatures(loaded.model, val.to(device), settings, [tta])[tta]
    source = f"fitted now on the run's {len(val):,} validation images"
    note(shown(f"{loaded.path}: no temperature stored for TTA {tta}; {source}: T = {temperature:.3f}"))
    return temperature, source


def _corruptions(loaded: LoadedModel, baseline: LoadedModel | None, data: Split, settings: EvalSettings,
                 clean_top1: float, request: CorruptionRequest, names: list[str]) -> dict[str, Any]:
    """The report's `corruptions`: the model and, with --baseline, the reference checkpoint on the
    same corrupted images (same seed), measured the same way (settings: this eval's TTA)."""
    from vggtrain.corruptions import corruption_section, measure_corruptions

    # only top-1 is read from these passes: no calibration sums, and no temperature for them
    settings = replace(settings, calibration=False, temperature=None)
    measured = measure_corruptions(loaded.model, data, settings, request)
    reference = None
    if baseline is not None:
        base_settings = eval_settings(baseline.cfg, settings.device, settings.tta, settings.batch_size)
        clean = evaluate_split(baseline.model, data, base_settings).top1
        accuracy = measure_corruptions(baseline.model, data, base_settings, request)["accuracy"]
        reference = {"checkpoint": str(baseline.path), "clean_top1": clean, "accuracy": accuracy}
    measured["images"] = len(data)
    return corruption_section(request, settings.tta, clean_top1, measured, reference)


def checkpoint_dataset(loaded: LoadedModel, data_root: str | None = None, download: bool = True,
                       check_classes: bool = True) -> tuple[Split, Split, list[str], str]:
    """(training images, test images, class names, the root read) of a loaded checkpoint's dataset:
    at data_root when given, else at the stored data.root, downloaded there only when download and
    the run's config allow it and no data_root was given. The data must have the checkpoint's
    classes (unless check_classes is False: images only, no labels read). The one place eval,
    calibration and export find a checkpoint's data."""
    cfg = loaded.cfg
    root = str(data_root if data_root is not None else cfg.data.root)
    fetch = download and cfg.data.download and data_root is None
    train, test, names = load_dataset(replace(cfg.data, root=root, download=fetch))
    if not check_classes:
        return train, test, names, root
    if len(names) != cfg.model.num_classes:
        raise DataError(f"{root}: the data has {len(names)} classes but the checkpoint's model "
                        f"predicts {cfg.model.num_classes}")
    if names != loaded.class_names and loaded.class_names != [str(i) for i in range(len(names))]:
        raise DataError(f"{root}: the data's classes ({', '.join(names)}) are not the checkpoint's "
                        f"({', '.join(loaded.class_names)})")
    return train, test, names, root


def checkpoint_split(loaded: LoadedModel, split: str, data_root: str | None = None
                     ) -> tuple[Split, list[str]]:
    """The split a loaded checkpoint is measured on, with the data's class names: the test set,
    or the validation images its run held out (rebuilt by data.run_split from the stored config)."""
    _refuse_missing_val(loaded, split)
    train, test, names, _ = checkpoint_dataset(loaded, data_root)
    return (_held_out(loaded, train) if split == "val" else test), names


def _refuse_missing_val(loaded: LoadedModel, split: str) -> None:
    """UserError (exit 2), before any data is read, for the val split of a run that held none out."""
    if split == "val" and loaded.cfg.data.val_size == 0:
        raise UserError(f"{loaded.path}: its run held out no validation images (data.val_size 0)")


def _held_out(loaded: LoadedModel, train: Split) -> Split:
    """The validation images the checkpoint's run held out of train (its data.val_size and seed)."""
    return run_split(train, loaded.cfg.data, loaded.cfg.seed)[1]


# report.md's order
PICTURES = ("curves", "confusion_matrix", "misclassified", "reliability_diagram", "corruptions")


def _report_in(out: Path, loaded: LoadedModel, split: str) -> dict[str, Any] | None:
    """The report.json already in --out DIR, which must be this checkpoint's on this split (fit's,
    in its run directory): refused before the work otherwise, never overwritten."""
    from vggtrain.safeio import REPORT_LIMIT, read_json

    if not os.path.lexists(out / "report.json"):
        return None
    previous = read_json(out / "report.json", REPORT_LIMIT)
    # the stored config's digest, as fit's report.json gives it (not today's defaults' reading of it)
    this = {"config_digest": loaded.config_digest, "checkpoint_epoch": loaded.epoch,
            "weights": loaded.weights, "split": split}
    if not isinstance(previous, dict) or any(previous.get(k) != v for k, v in this.items()):
        raise UserError(f"--out {out}: holds the report of another checkpoint or split; choose another "
                        f"directory")
    return previous


def write_eval_files(out: Path, report: dict[str, Any], ev: Evaluation, data: Split,
                     previous: dict[str, Any] | None = None) -> None:
    """report.json, report.md and the pictures in out, as fit writes a run's (report.json last).
    previous: the report already there (_report_in: this checkpoint's, fit's in its run
    directory), to which only the corruptions section is added, so that `runs` and `seeds` read it
    with the rest of the run; without one, nothing there changes."""
    from vggtrain.atomic import atomic_write_text
    from vggtrain.corruptions import corruption_heatmap
    from vggtrain.report import report_json, report_pictures, write_report_files

    if previous is not None and not report.get("corruptions"):
        return
    out.mkdir(parents=True, exist_ok=True)
    if previous is not None:
        report, pictures = {**previous, "corruptions": report["corruptions"]}, {}
    else:
        pictures = report_pictures(report, ev, data)
    if report.get("corruptions"):
        pictures["corruptions"] = corruption_heatmap(report["corruptions"])
    write_report_files(out, report, pictures, order=PICTURES)
    atomic_write_text(out / "report.json", report_json(report))
