"""The report: its JSON schema (shared by `vggtrain eval` and the report at the end of `fit`;
documented in docs/evaluation.md, "The report"), and its presentations: terminal text, report.md,
the confusion-matrix and mistakes pictures, and TensorBoard (images, and the run's hparams with
its final metrics).

Everything textual is rendered from the report dict alone (what report.json holds), so report.md
can always be rebuilt from report.json. Pictures are drawn with Pillow and torchvision's
make_grid: a confusion matrix needs labelled text, which is all matplotlib would have added.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from torch import nn

import vggtrain
from vggtrain.atomic import atomic_write_text
from vggtrain.calibration_report import (
    calibration_entry,
    calibration_lines,
    calibration_markdown,
    reliability_diagram,
)
from vggtrain.config import TrainConfig, digest_of
from vggtrain.corruptions import corruption_markdown, corruption_text
from vggtrain.data import Split
from vggtrain.draw import BLUES, apply_colormap, font, save_png, text_rotated, text_size, to_pil, to_tensor
from vggtrain.errors import shown
from vggtrain.evaluate import Evaluation
from vggtrain.model import count_parameters
from vggtrain.numfmt import finite, pct

SCHEMA = "vggtrain.report/1"  # bump when a key changes meaning or goes away; adding keys is fine
MISTAKES_SHOWN = 32


def config_digest(cfg: TrainConfig) -> str:
    """sha256 of the resolved config as canonical JSON: equal digests, equal configs."""
    return digest_of(cfg.to_dict())


def build_report(ev: Evaluation, *, split: str, model: nn.Module, cfg: TrainConfig,
                 class_names: list[str], checkpoint: str | Path, checkpoint_epoch: int,
                 device: torch.device | str, precision: str, tta: str = "none",
                 weights: str = "raw", temperature: float | None = None,
                 temperature_from: str | None = None) -> dict[str, Any]:
    """The report as plain data, in the documented schema (docs/evaluation.md, "The report").
    temperature: the one ev was measured with (EvalSettings.temperature), and where it came from."""
    if ev.calibration is None:  # every report has its calibration: a caller's mistake, not the user's
        raise ValueError("build_report needs an Evaluation measured with EvalSettings.calibration")
    per_class = [{"class": name, "correct": c, "total": t, "acc": c / t if t else None}
                 for name, (c, t) in zip(class_names, ev.per_class(), strict=True)]
    return {
        "schema": SCHEMA,
        "split": split,
        "metrics": {"top1": ev.top1, "top5": ev.top5, "loss": finite(ev.loss), "images": ev.images},
        "tta": tta != "none",
        "tta_mode": tta,
        "per_class": per_class,
        "class_names": list(class_names),
        "confusion_matrix": ev.confusion.tolist(),
        "calibration": calibration_entry(ev, temperature, temperature_from),
        "checkpoint": str(checkpoint),
        "checkpoint_epoch": int(checkpoint_epoch),
        "weights": weights,
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



# --- the confusion matrix picture -------------------------------------------------------------

MATRIX_MAX_CLASSES = 20  # beyond this, the report shows the most confused classes and pairs
PAIRS_SHOWN = 20


def most_confused_pairs(confusion: list[list[int]] | torch.Tensor, k: int) -> list[tuple[int, int, int]]:
    """The k largest off-diagonal cells as (true, predicted, count), largest first (ties: in
    matrix order); cells of 0 are left out."""
    cm = torch.as_tensor(confusion, dtype=torch.int64).clone()
    cm.fill_diagonal_(0)
    counts, flat = cm.flatten().sort(descending=True, stable=True)
    c = cm.shape[1]
    return [(int(i) // c, int(i) % c, int(n)) for n, i in zip(counts[:k], flat[:k], strict=True) if n > 0]


def most_confused_classes(confusion: list[list[int]] | torch.Tensor, k: int) -> list[int]:
    """The k classes with the most mistakes, made or received (off-diagonal row + column sums), in
    class order: the part of a large confusion matrix worth drawing."""
    cm = torch.as_tensor(confusion, dtype=torch.int64).clone()
    cm.fill_diagonal_(0)
    errors = cm.sum(0) + cm.sum(1)
    return sorted(errors.argsort(descending=True, stable=True)[:k].tolist())


def confusion_image(confusion: list[list[int]] | torch.Tensor, class_names: list[str],
                    title: str = "", row_totals: torch.Tensor | None = None) -> torch.Tensor:
    """Labelled confusion matrix: rows true class, columns predicted; each cell coloured by its
    share of the true class (row-normalised) with its count written in, recall down the right.
    row_totals: each row's images, for a matrix that is part of a larger one."""
    cm = torch.as_tensor(confusion, dtype=torch.int64)
    c = len(class_names)
    totals = cm.sum(1) if row_totals is None else torch.as_tensor(row_totals, dtype=torch.int64)
    rates = cm.float() / totals.clamp(min=1)[:, None]
    cell = max(14, min(48, 560 // c))
    label_f, _ = font(max(9, min(15, cell // 3 + 1)))
    count_f, _ = font(max(8, min(14, cell // 3 + 1)))
    title_f, _ = font(16)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(text_size(scratch, n, label_f)[0] for n in class_names) + 12
    axis_h = text_size(scratch, "predicted class", label_f)[1] + 10
    pad, title_h = 16, (48 if title else 8)
    right_w = text_size(scratch, "100.0%", label_f)[0] + 16
    x0 = pad + axis_h + label_w  # the grid's top-left corner
    y0 = pad + title_h + axis_h + label_w
    subtitle = "colour: share of the true class (row); numbers: image counts"
    width, height = x0 + c * cell + right_w + pad, y0 + c * cell + pad
    if title:  # a matrix of few classes is narrower than its title
        width = max(width, 2 * pad + max(text_size(scratch, title, title_f)[0],
                                         text_size(scratch, subtitle, label_f)[0]))
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    black, grey = (20, 20, 20), (110, 110, 110)

    if title:
        draw.text((pad, pad), title, font=title_f, fill=black)
        draw.text((pad, pad + 22), subtitle, font=label_f, fill=grey)
    tw, _ = text_size(draw, "predicted class", label_f)
    draw.text((x0 + (c * cell - tw) // 2, pad + title_h), "predicted class", font=label_f, fill=black)
    tw, th = text_size(draw, "true class", label_f)
    text_rotated(img, (pad, y0 + (c * cell - tw) // 2), "true class", label_f, black)

    for i in range(c):
        name_w, name_h = text_size(draw, class_names[i], label_f)
        draw.text((x0 - 6 - name_w, y0 + i * cell + (cell - name_h) // 2 - 2), class_names[i],
                  font=label_f, fill=black)
        text_rotated(img, (x0 + i * cell + (cell - name_h) // 2 - 2, y0 - 6 - name_w), class_names[i],
                     label_f, black)
        recall = f"{rates[i, i].item():.1%}" if totals[i] else "-"
        draw.text((x0 + c * cell + 8, y0 + i * cell + (cell - name_h) // 2 - 2), recall,
                  font=label_f, fill=black)
    draw.text((x0 + c * cell + 8, y0 - axis_h), "acc", font=label_f, fill=black)
    _draw_cells(draw, cm, rates, (x0, y0), cell, count_f)
    return to_tensor(img)


def _draw_cells(draw: ImageDraw.ImageDraw, cm: torch.Tensor, rates: torch.Tensor, origin: tuple[int, int],
                cell: int, count_f: Any) -> None:
    """The matrix's cells from origin (its top-left corner), each coloured by its rate with its
    count written in, and the diagonal framed."""
    x0, y0 = origin
    c = len(cm)
    colours = apply_colormap(rates, BLUES)  # (3, C, C)
    # Counts in every cell or in none: a matrix with only the small ones written in misleads.
    widest = text_size(draw, str(int(cm.max())) if c else "0", count_f)
    show_counts = widest[0] <= cell - 4 and widest[1] <= cell - 4
    for i in range(c):
        for j in range(c):
            box = (x0 + j * cell, y0 + i * cell, x0 + (j + 1) * cell - 1, y0 + (i + 1) * cell - 1)
            draw.rectangle(box, fill=tuple(colours[:, i, j].tolist()), outline=(225, 225, 225))
            count = int(cm[i, j])
            if show_counts and count:
                cw, ch = text_size(draw, str(count), count_f)
                ink = "white" if rates[i, j] > 0.5 else (20, 20, 20)
                draw.text((box[0] + (cell - cw) // 2, box[1] + (cell - ch) // 2 - 2), str(count),
                          font=count_f, fill=ink)
    # The diagonal is the story: frame it so it reads at a glance whatever the colours.
    for i in range(c):
        draw.rectangle((x0 + i * cell, y0 + i * cell, x0 + (i + 1) * cell - 1, y0 + (i + 1) * cell - 1),
                       outline=(230, 120, 0))


# --- the mistakes picture -----------------------------------------------------------------------

def mistakes_image(split: Split, ev: Evaluation, class_names: list[str],
                   count: int = MISTAKES_SHOWN, scale: int = 4) -> torch.Tensor:
    """The most confidently misclassified images, upscaled and captioned true -> predicted
    (probability); a picture saying so when there is none, so a run always has the same files."""
    from torchvision.utils import make_grid

    labels = split.labels.cpu()
    wrong = (ev.predictions != labels).nonzero().flatten()
    title_f, _ = font(16)
    if len(wrong) == 0:
        canvas = Image.new("RGB", (520, 44), "white")
        ImageDraw.Draw(canvas).text((8, 12), f"no misclassified images: all {len(labels):,} are right",
                                    font=title_f, fill=(20, 20, 20))
        return to_tensor(canvas)
    wrong = wrong[ev.confidence[wrong].argsort(descending=True, stable=True)]
    # The most confident mistake of every (true, predicted) pair before any pair's second one, so
    # one dominant confusion does not fill the picture.
    pairs = (labels[wrong] * len(class_names) + ev.predictions[wrong]).tolist()
    seen: dict[int, int] = {}
    rank = []
    for p in pairs:
        seen[p] = seen.get(p, -1) + 1
        rank.append(seen[p])
    wrong = wrong[torch.tensor(rank).argsort(stable=True)][:count]
    images = split.images[wrong.to(split.images.device)].cpu()
    side = images.shape[-1] * scale
    f, arrow = font(13)
    tiles = []
    for img, i in zip(images, wrong.tolist(), strict=True):
        tile = Image.new("RGB", (side, side + 36), "white")
        tile.paste(to_pil(img).resize((side, side), Image.NEAREST), (0, 0))
        draw = ImageDraw.Draw(tile)
        draw.text((2, side + 2), class_names[int(labels[i])], font=f, fill=(0, 110, 0))
        pred = f"{arrow} {class_names[int(ev.predictions[i])]} {ev.confidence[i].item():.0%}"
        draw.text((2, side + 18), pred, font=f, fill=(190, 0, 0))
        tiles.append(to_tensor(tile))
    grid = make_grid(torch.stack(tiles), nrow=8, padding=4, pad_value=255)
    title = (f"{len(wrong)} of {int((ev.predictions != labels).sum())} mistakes, most confident of each "
             f"kind first (true class in green, prediction in red)")
    title_w, _ = text_size(ImageDraw.Draw(Image.new("RGB", (1, 1))), title, title_f)
    canvas = Image.new("RGB", (max(grid.shape[2], title_w + 12), grid.shape[1] + 32), "white")
    canvas.paste(to_pil(grid), (0, 32))
    ImageDraw.Draw(canvas).text((6, 6), title, font=title_f, fill=(20, 20, 20))
    return to_tensor(canvas)


# --- text -------------------------------------------------------------------------------------

def _short_labels(names: list[str], width: int) -> list[str]:
    """Column headers cut to width; indices when cutting makes two of them equal."""
    cut = [n[:width] for n in names]
    return cut if len(set(cut)) == len(cut) else [str(i) for i in range(len(names))]


def headline(report: dict[str, Any]) -> str:
    m = report["metrics"]
    loss = "-" if m["loss"] is None else f"{m['loss']:.4f}"
    return f"top-1 {pct(m['top1'])}   top-5 {pct(m['top5'])}   loss {loss}"


EMA_TEXT = "the weight EMA (optim.ema_decay)"


def format_text(report: dict[str, Any]) -> str:
    """What `vggtrain eval` prints: header, headline, per-class table, confusion matrix."""
    m, names = report["metrics"], report["class_names"]
    ips = report.get("images_per_s")
    lines = [
        f"checkpoint {shown(report['checkpoint'])} (epoch {report['checkpoint_epoch']}"
        f"{', weight EMA' if report.get('weights') == 'ema' else ''}): "
        f"{report['config']['model']['arch']}, {report['parameters']:,} parameters",
        f"{report['split']} split, {m['images']:,} images on {report['device']} ({report['precision']}"
        f"{_tta_text(report, ', ')})" + (f", {ips:,.0f} images/s" if ips else ""),
        "",
        headline(report),
        *calibration_lines(report),
        "",
    ]
    name_w = max(8, *(len(n) for n in names))
    digits = len(str(max((r["total"] for r in report["per_class"]), default=0)))
    cw, tw = max(digits, len("correct")), max(digits, len("total"))
    lines.append(f"{'class':<{name_w}}  {'correct':>{cw}} / {'total':<{tw}}  {'acc':>7}")
    for r in report["per_class"]:
        lines.append(f"{r['class']:<{name_w}}  {r['correct']:>{cw}} / {r['total']:<{tw}}  "
                     f"{pct(r['acc']):>7}")
    lines += ["", "confusion matrix (rows: true class, columns: predicted class)"]
    cm = report["confusion_matrix"]
    cell_w = max(5, len(str(max((max(row) for row in cm), default=0))))
    heads = _short_labels(names, cell_w)
    lines.append(" " * name_w + "".join(f" {h:>{cell_w}}" for h in heads))
    for name, row in zip(names, cm, strict=True):
        lines.append(f"{name:<{name_w}}" + "".join(f" {v:>{cell_w}}" for v in row))
    if heads[0] != names[0][:cell_w]:
        lines.append("columns: " + ", ".join(f"{i} {n}" for i, n in enumerate(names)))
    if report.get("corruptions"):
        lines += corruption_text(report["corruptions"])
    return "\n".join(lines) + "\n"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h {rest // 60:02d}m {rest % 60:02d}s" if h else f"{rest // 60}m {rest % 60:02d}s"


def format_markdown(report: dict[str, Any], images: list[tuple[str, str]] = ()) -> str:
    """report.md: the same facts as report.json, for a person. images: (alt text, file name)."""
    m, names, cfg = report["metrics"], report["class_names"], report["config"]
    ips = report.get("images_per_s")
    out = [f"# {cfg.get('name') or 'vggtrain'}: {report['split']} report", "",
           f"**{headline(report).replace('   ', ' · ')}** on {m['images']:,} {report['split']} images"
           + (f" ({_tta_text(report)})" if report["tta"] else ""), "",
           "| | |", "|---|---|",
           f"| model | {cfg['model']['arch']}, {report['parameters']:,} parameters |",
           f"| checkpoint | `{report['checkpoint']}` (epoch {report['checkpoint_epoch']}) |",
           f"| weights | {EMA_TEXT if report.get('weights') == 'ema' else 'as trained'} |"]
    if "best_epoch" in report:
        val = report.get("val_acc")
        out.append(f"| best epoch | {report['best_epoch']} of {report['epochs']}"
                   + (f" (validation accuracy {pct(val)})" if val is not None else "") + " |")
    if report.get("stopped_early"):
        stop = report["stopped_early"]
        out.append(f"| stopped early | after epoch {stop['epoch']}: {stop['reason']} |")
    if "train_time_s" in report:
        out.append(f"| training time | {_duration(report['train_time_s'])} |")
    out += [f"| evaluation | {report['device']}, {report['precision']}"
            + (f", {ips:,.0f} images/s" if ips else "") + " |",
            f"| config digest | `{report['config_digest'][:19]}` |",
            f"| versions | torch {report['torch_version']}, vggtrain {report['vggtrain_version']} |",
            "", "## Per class", "", "| class | correct | total | accuracy |", "|---|--:|--:|--:|"]
    for r in report["per_class"]:
        out.append(f"| {r['class']} | {r['correct']} | {r['total']} | {pct(r['acc'])} |")
    if len(names) > MATRIX_MAX_CLASSES:  # a 100-column table reads as nothing: the worst pairs
        out += ["", "## Most confused pairs", "",
                f"The {PAIRS_SHOWN} largest off-diagonal counts of the {len(names)}x{len(names)} "
                "confusion matrix (all of it is in report.json).", "",
                "| true class | predicted as | images | share of the class |", "|---|---|--:|--:|"]
        for t, p, n in most_confused_pairs(report["confusion_matrix"], PAIRS_SHOWN):
            total = report["per_class"][t]["total"]
            out.append(f"| {names[t]} | {names[p]} | {n} | {pct(n / total if total else None)} |")
    else:
        out += ["", "## Confusion matrix", "", "Rows: true class; columns: predicted class.", "",
                "| true \\ predicted | " + " | ".join(names) + " |",
                "|---|" + "--:|" * len(names)]
        for name, row in zip(names, report["confusion_matrix"], strict=True):
            out.append(f"| **{name}** | " + " | ".join(str(v) for v in row) + " |")
    out += calibration_markdown(report)
    if report.get("corruptions"):
        out += corruption_markdown(report["corruptions"])
    for alt, file in images:
        out += ["", f"![{alt}]({file})"]
    return "\n".join(out) + "\n"


# --- TensorBoard and the run directory ------------------------------------------------------------

def _hparams(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The config flattened to dotted keys with the scalar types the hparams plugin takes."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_hparams(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float)):
            flat[prefix + key] = value
        elif value is not None:  # text as shown: the event file is UTF-8, a path's odd byte is not
            flat[prefix + key] = shown(value)  # model.layers as its text
    return flat


def log_report(writer: Any, report: dict[str, Any], pictures: dict[str, torch.Tensor], step: int) -> None:
    """Final metrics as scalars, the pictures as images, and the run's hparams with those
    metrics, written into the run's own event files so the hparams view links to its curves."""
    from torch.utils.tensorboard.summary import hparams

    split, m = report["split"], report["metrics"]
    metrics = {f"{split}/acc": m["top1"], f"{split}/top5": m["top5"]}
    if m["loss"] is not None:
        metrics[f"{split}/loss"] = m["loss"]
    c = report.get("calibration") or {}
    if c.get("ece") is not None:
        metrics[f"{split}/ece"] = c["ece"]
    if (c.get("calibrated") or {}).get("ece") is not None:
        metrics[f"{split}/ece_calibrated"] = c["calibrated"]["ece"]
    for tag, value in metrics.items():
        writer.add_scalar(tag, value, step)
    for name, img in pictures.items():  # the learning curves are the whole run's, not the split's
        writer.add_image(name if name == "curves" else f"{split}/{name}", img, step, dataformats="CHW")
    if report.get("val_acc") is not None:
        metrics["val/acc"] = report["val_acc"]  # the latest val/acc scalar is what the view shows
    for summary in hparams(_hparams(report["config"]), metrics):
        writer.file_writer.add_summary(summary, step)
    writer.flush()


def report_pictures(report: dict[str, Any], ev: Evaluation, split: Split) -> dict[str, torch.Tensor]:
    m = report["metrics"]
    title = (f"{report['config'].get('name') or 'model'}: {report['split']} set, {m['images']:,} images, "
             f"top-1 {pct(m['top1'])}")
    cm, names = torch.as_tensor(report["confusion_matrix"]), report["class_names"]
    if len(names) > MATRIX_MAX_CLASSES:  # its most confused classes; recall stays of the whole row
        keep = most_confused_classes(cm, MATRIX_MAX_CLASSES)
        title += f"; the {len(keep)} most confused of {len(names)} classes"
        picture = confusion_image(cm[keep][:, keep], [names[i] for i in keep], title,
                                  row_totals=cm.sum(1)[keep])
    else:
        picture = confusion_image(cm, names, title)
    pictures = {"confusion_matrix": picture, "misclassified": mistakes_image(split, ev, names)}
    if report.get("calibration"):
        pictures["reliability_diagram"] = reliability_diagram(report)
    return pictures


def write_report_files(out_dir: Path, report: dict[str, Any], pictures: dict[str, torch.Tensor],
                       order: Sequence[str] | None = None) -> None:
    """The pictures, then report.md. The caller writes report.json after these: once it exists,
    everything it describes does too. report.md shows the pictures, as given; or, given order
    (eval's: it adds to a directory that may hold a fit report's pictures already), each name in
    order whose PNG is in out_dir, so that the pictures kept there are shown with the new ones."""
    for name, img in pictures.items():
        save_png(out_dir / f"{name}.png", img)
    names = list(pictures) if order is None else [n for n in order if (out_dir / f"{n}.png").is_file()]
    images = [(name.replace("_", " "), f"{name}.png") for name in names]
    atomic_write_text(out_dir / "report.md", format_markdown(report, images))


def _tta_text(report: dict[str, Any], prefix: str = "") -> str:
    """'flip TTA' or 'multicrop TTA' ('' without TTA); reports before tta_mode said only tta."""
    if not report["tta"]:
        return ""
    return f"{prefix}{report.get('tta_mode', 'flip')} TTA"
