"""Learning curves in the report (issue 24): drawn from the run's own TensorBoard scalars, one
point per epoch across a resume, and a run without matplotlib still ends with its report."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import pytest
from PIL import Image

from conftest import block_import, tiny_config, write_yaml
from vggtrain.cli import main
from vggtrain.curves import PLOTS_EXTRA, curves_image, epoch_curves


def _fit(*args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["fit", *args]) == 0
    return out.getvalue()


def test_curves_of_a_resumed_run_are_continuous(cifar_bin, tmp_path):
    pytest.importorskip("matplotlib", reason="the [plots] extra is not installed")
    cfg = write_yaml(tmp_path / "tiny.yaml",
                     tiny_config(cifar_bin, tmp_path / "runs", train={"epochs": 2}, optim={"ema_decay": 0.9}))
    _fit("--config", str(cfg))
    run = tmp_path / "runs" / "tiny"
    _fit("--resume", str(run), "--set", "train.epochs=4")  # two more epochs, a second event file

    curves = epoch_curves(run / "tb")
    for tag in ("train/loss", "train/acc", "train/lr", "val/loss", "val/acc", "val/raw_acc"):
        assert [e for e, _ in curves[tag]] == [1, 2, 3, 4], tag
    # The lr halves every 2 epochs (tiny_config's StepLR): the picture's lr is the logged one.
    assert [v for _, v in curves["train/lr"]] == pytest.approx([0.05, 0.05, 0.025, 0.025])

    picture = Image.open(run / "curves.png")
    assert picture.mode == "RGB" and picture.width > 600 and picture.height > 200
    assert "![curves](curves.png)" in (run / "report.md").read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert "curves" in acc.Tags()["images"] and "test/confusion_matrix" in acc.Tags()["images"]


def test_the_picture_draws_what_it_is_given():
    pytest.importorskip("matplotlib", reason="the [plots] extra is not installed")
    assert curves_image({}, "nothing") is None
    flat = curves_image({"train/loss": [(1, 1.0), (2, 1.0)]}, "one")
    rising = curves_image({"train/loss": [(1, 1.0), (2, 2.0)]}, "one")
    assert flat.shape[0] == 3 and flat.shape == rising.shape
    assert not (flat == rising).all()  # the data, not only the frame, reaches the picture


def test_without_matplotlib_the_report_is_whole(cifar_bin, tmp_path, monkeypatch):
    block_import(monkeypatch, "matplotlib")
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_bin, tmp_path / "runs", train={"epochs": 1}))
    printed = _fit("--config", str(cfg))
    assert f"note: {PLOTS_EXTRA}" in printed
    run: Path = tmp_path / "runs" / "tiny"
    assert (run / "report.json").is_file() and (run / "confusion_matrix.png").is_file()
    assert not (run / "curves.png").exists()
    assert "curves.png" not in (run / "report.md").read_text()


def test_a_killed_runs_purged_steps_are_dropped_without_a_warning(tmp_path, caplog):
    from torch.utils.tensorboard import SummaryWriter

    from vggtrain.tb import open_summary_writer

    tb = tmp_path / "tb"
    killed = SummaryWriter(str(tb))  # epochs 1-3 logged; the last checkpoint was after epoch 2
    for epoch in (1, 2, 3):
        killed.add_scalar("train/epoch", epoch, epoch * 10)
        killed.add_scalar("train/loss", 1.0 / epoch, epoch * 10)
    killed.close()
    resumed = open_summary_writer(tb, purge_step=21)
    for epoch in (3, 4):
        resumed.add_scalar("train/epoch", epoch, epoch * 10)
        resumed.add_scalar("train/loss", 2.0 / epoch, epoch * 10)
    resumed.close()

    with caplog.at_level(logging.WARNING):
        curves = epoch_curves(tb)
    assert curves["train/loss"] == [(1, 1.0), (2, 0.5), (3, pytest.approx(2 / 3)), (4, 0.5)]
    assert not [r for r in caplog.records if r.name.startswith("tensorboard")]
