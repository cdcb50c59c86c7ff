"""Calibration in the report: report.json's "calibration" entry, its lines in the terminal text
and report.md, and the reliability diagram (drawn with Pillow, as the report's other pictures).
The measurements themselves are calibration.py's, summed by evaluate.evaluate_split."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image, ImageDraw

from vggtrain.calibration import N_BINS
from vggtrain.draw import font, text_size, to_tensor
from vggtrain.evaluate import Evaluation
from vggtrain.numfmt import pct


def calibration_entry(ev: Evaluation, temperature: float | None, temperature_from: str | None
                      ) -> dict[str, Any] | None:
    """report.json's "calibration": ece, nll, brier and the bins of the probabilities as
    measured; temperature (null: none applied), where it came from, and calibrated
    {ece, nll, brier} after it."""
    if ev.calibration is None:
        return None
    after = ev.calibrated.as_dict() if ev.calibrated is not None else None
    return {**ev.calibration.as_dict(), "n_bins": N_BINS, "temperature": temperature,
            "temperature_from": temperature_from if temperature is not None else None,
            "calibrated": {k: after[k] for k in ("ece", "nll", "brier")} if after else None}


def _nll(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def calibration_lines(report: dict[str, Any]) -> list[str]:
    """The terminal's lines: ECE, NLL, Brier; after the temperature where one was applied."""
    c = report.get("calibration")
    if not c:
        return []
    lines = [f"calibration: ECE {pct(c['ece'])}   NLL {_nll(c['nll'])}   Brier {_nll(c['brier'])}"
             f"   ({c.get('n_bins', N_BINS)} bins)"]
    if c.get("calibrated"):
        a = c["calibrated"]
        lines.append(f"after temperature {c['temperature']:.3f} ({c['temperature_from']}): ECE "
                     f"{pct(a['ece'])}   NLL {_nll(a['nll'])}   Brier {_nll(a['brier'])}")
    return lines


def calibration_markdown(report: dict[str, Any]) -> list[str]:
    """report.md's "Calibration" section (none for a report from before it)."""
    c = report.get("calibration")
    if not c:
        return []
    out = ["", "## Calibration", "",
           f"Expected calibration error over {c.get('n_bins', N_BINS)} equal-width bins of the top-1 "
           "confidence, negative log-likelihood and Brier score (docs/evaluation.md, \"Calibration\").",
           "", "| | ECE | NLL | Brier |", "|---|--:|--:|--:|",
           f"| as measured | {pct(c['ece'])} | {_nll(c['nll'])} | {_nll(c['brier'])} |"]
    if c.get("calibrated"):
        a = c["calibrated"]
        out.append(f"| after temperature {c['temperature']:.3f} | {pct(a['ece'])} | {_nll(a['nll'])} | "
                   f"{_nll(a['brier'])} |")
        out += ["", f"The temperature was {c['temperature_from']}."]
    else:
        out += ["", "No temperature applied (fit fits one when its run has a validation split; "
                "`vggtrain eval --calibrated` applies it)."]
    return out


def drawn_bins(c: dict[str, Any]) -> list[tuple[int, float | None, float | None]]:
    """(images, accuracy, mean confidence) of the 15 bars: the slot of confidences of exactly 1.0
    drawn as part of the top bin."""
    bins = [(b["images"], b["correct"], (b["mean_confidence"] or 0.0) * b["images"]) for b in c["bins"]]
    if len(bins) > N_BINS:
        n, k, s = bins[N_BINS - 1]
        for extra in bins[N_BINS:]:
            n, k, s = n + extra[0], k + extra[1], s + extra[2]
        bins = [*bins[:N_BINS - 1], (n, k, s)]
    return [(n, k / n if n else None, s / n if n else None) for n, k, s in bins]


def reliability_diagram(report: dict[str, Any]) -> torch.Tensor:
    """Accuracy per confidence bin as bars against the diagonal of perfect calibration, each bar's
    gap to its mean confidence in red, the share of images per bin below; ECE in the title."""
    c = report["calibration"]
    bins = drawn_bins(c)
    title_f, _ = font(16)
    f, _ = font(12)
    side, strip, pad, left, top = 400, 60, 16, 58, 86
    width, height = left + side + pad + 30, top + side + 34 + strip + 30
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    black, grey = (20, 20, 20), (150, 150, 150)
    name = report["config"].get("name") or "model"
    draw.text((pad, pad), f"{name}: reliability, {report['split']} set, ECE {pct(c['ece'])}",
              font=title_f, fill=black)
    draw.text((pad, pad + 22), "bars: accuracy per confidence bin; red: gap to the bin's mean confidence",
              font=f, fill=(110, 110, 110))
    x0, y1 = left, top + side  # the plot's left edge and bottom
    w = side / len(bins)
    for i, (n, acc, conf) in enumerate(bins):
        if not n:
            continue
        xa, xb = round(x0 + i * w) + 1, round(x0 + (i + 1) * w) - 1
        ya, yc = y1 - acc * side, y1 - conf * side
        draw.rectangle((xa, ya, xb, y1), fill=(33, 113, 181), outline=(8, 48, 107))
        if abs(yc - ya) >= 1:
            draw.rectangle((xa, min(ya, yc), xb, max(ya, yc)), fill=(240, 150, 150), outline=(200, 40, 40))
    draw.line((x0, y1, x0 + side, top), fill=grey, width=2)  # perfect calibration
    draw.rectangle((x0, top, x0 + side, y1), outline=black)
    for t in range(6):
        v, x, y = t / 5, x0 + t * side / 5, y1 - t * side / 5
        label = f"{v:.1f}"
        tw, th = text_size(draw, label, f)
        draw.line((x, y1, x, y1 + 4), fill=black)
        draw.text((x - tw / 2, y1 + 6), label, font=f, fill=black)
        draw.line((x0 - 4, y, x0, y), fill=black)
        draw.text((x0 - 8 - tw, y - th / 2 - 2), label, font=f, fill=black)
    draw.text((x0 + side / 2 - 40, y1 + 20), "confidence", font=f, fill=black)
    draw.text((4, top - 20), "accuracy", font=f, fill=black)
    _share_strip(draw, bins, (x0, y1 + 40 + strip), side, strip, f)
    return to_tensor(img)


def _share_strip(draw: ImageDraw.ImageDraw, bins: list[tuple[int, Any, Any]], origin: tuple[float, float],
                 side: int, strip: int, f: Any) -> None:
    """The share of the images in each bin, as bars under the diagram (bottom at origin)."""
    x0, y1 = origin
    total = max(sum(n for n, _, _ in bins), 1)
    w = side / len(bins)
    for i, (n, _, _) in enumerate(bins):
        if n:
            h = max(1.0, n / total * strip)
            box = (round(x0 + i * w) + 1, y1 - h, round(x0 + (i + 1) * w) - 1, y1)
            draw.rectangle(box, fill=(120, 120, 120))
    draw.line((x0, y1, x0 + side, y1), fill=(20, 20, 20))
    draw.text((x0, y1 + 4), "share of the images per bin (bar height: share; full height = all)", font=f,
              fill=(110, 110, 110))
