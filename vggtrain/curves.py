"""The run's learning curves as one picture (curves.png in the report, `curves` in TensorBoard),
drawn from what the run itself logged to TensorBoard, read back the way TensorBoard reads it, so
a resumed run's picture is continuous and a killed run's purged steps are not in it.

Drawn with matplotlib (the optional `plots` extra): axes, ticks and legends are what it is for,
and TensorBoard shows the same figure. Without it the report says how to get the picture.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

PLOTS_EXTRA = "curves.png needs matplotlib: pip install 'vggtrain[plots]'"
PANELS = (("loss", ("train/loss", "val/loss", "val/raw_loss")),
          ("accuracy", ("train/acc", "val/acc", "val/raw_acc")),
          ("learning rate", ("train/lr",)))


def epoch_curves(tb_dir: Path) -> dict[str, list[tuple[float, float]]]:
    """tag -> [(epoch, value)] of the per-epoch scalars, in order, from the run's event files
    (TensorBoard's own reader: files in order, purged steps dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})  # 0: every event, not a sample
    # Dropping a killed run's steps past its last checkpoint is what resume asks for (tb.py's
    # purge_step), but TensorBoard's reader warns about each purge as if a job had crashed: quiet it.
    tb_logger = logging.getLogger("tensorboard")
    level = tb_logger.level
    tb_logger.setLevel(logging.ERROR)
    try:
        acc.Reload()
    finally:
        tb_logger.setLevel(level)
    tags = set(acc.Tags().get("scalars", []))
    if "train/epoch" not in tags:
        return {}
    epoch_at = {e.step: e.value for e in acc.Scalars("train/epoch")}
    curves = {}
    for _, names in PANELS:
        for tag in names:
            if tag in tags:
                curves[tag] = [(epoch_at[e.step], e.value) for e in acc.Scalars(tag) if e.step in epoch_at]
    return curves


def curves_image(curves: dict[str, list[tuple[float, float]]], title: str) -> torch.Tensor | None:
    """The curves as a uint8 (3, H, W) picture; None when there is nothing to draw. Raises
    ImportError without matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no display needed, none wanted
    from matplotlib.figure import Figure

    if not curves:
        return None
    fig = Figure(figsize=(12, 3.6), dpi=100, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    for i, (label, tags) in enumerate(PANELS):
        ax = fig.add_subplot(1, len(PANELS), i + 1)
        for tag in tags:
            points = curves.get(tag)
            if not points:
                continue
            x, y = zip(*points, strict=True)
            style = {"marker": "o" if len(points) < 30 else None, "markersize": 3}
            if tag == "train/lr":  # the rate an epoch started with: drawn over that epoch
                ax.plot([e - 1 for e in x], y, drawstyle="steps-post", **style)
            else:
                ax.plot(x, y, label=_label(tag, ema="val/raw_acc" in curves), **style)
        ax.set_xlabel("epoch")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        if label == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        else:
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    canvas.draw()
    rgba = torch.frombuffer(bytearray(canvas.buffer_rgba()), dtype=torch.uint8)
    w, h = canvas.get_width_height()
    return rgba.view(h, w, 4)[..., :3].permute(2, 0, 1).contiguous()


def _label(tag: str, ema: bool) -> str:
    split, what = tag.split("/")
    if what.startswith("raw_"):
        return f"{split} {what[4:]} (raw weights)"
    return f"{split} {what}" + (" (EMA weights)" if ema and split == "val" else "")


def learning_curves(tb_dir: Path, title: str) -> dict[str, torch.Tensor]:
    """{"curves": picture} for the report, or {} (and a one-line note) without matplotlib."""
    try:
        image = curves_image(epoch_curves(tb_dir), title)
    except ImportError:
        print(f"note: {PLOTS_EXTRA}", flush=True)
        return {}
    return {} if image is None else {"curves": image}
