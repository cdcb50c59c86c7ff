"""metrics.csv (issue 43): one row per epoch holding the epoch's TensorBoard scalars, and after a
kill and a resume still exactly one row per epoch, each the one TensorBoard kept."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from conftest import tb_scalars, tiny_config, write_yaml
from vggtrain.cli import main
from vggtrain.tb import METRICS_COLUMNS, METRICS_FILE, EpochMetrics


def _rows(run: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(run / METRICS_FILE, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _assert_rows_are_the_tensorboard_scalars(run: Path, epochs: int) -> None:
    header, rows = _rows(run)
    assert header == list(METRICS_COLUMNS)
    assert [int(r["train/epoch"]) for r in rows] == list(range(1, epochs + 1))
    tb = tb_scalars(run)
    steps = [s for s, _ in tb["train/epoch"]]
    assert [int(r["step"]) for r in rows] == steps
    for tag in METRICS_COLUMNS[1:]:
        logged = dict(tb.get(tag, []))
        for row, step in zip(rows, steps, strict=True):
            if step in logged:  # TensorBoard keeps float32: the CSV the float64 it was given
                assert float(row[tag]) == pytest.approx(logged[step], rel=1e-6), (tag, step)
            else:
                assert row[tag] == "", (tag, step)


def test_a_fit_writes_one_row_per_epoch_of_its_tensorboard_scalars(cifar_bin, tmp_path):
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_bin, tmp_path / "runs"))
    assert main(["fit", "--config", str(cfg)]) == 0
    run = tmp_path / "runs" / "tiny"
    _assert_rows_are_the_tensorboard_scalars(run, 3)
    _, rows = _rows(run)
    assert all(r["val/acc"] and not r["val/raw_acc"] for r in rows)  # no weight EMA: no raw column
    assert [float(r["train/lr"]) for r in rows] == [0.05, 0.05, 0.025]  # tiny_config's StepLR


def test_a_killed_epoch_redone_on_resume_replaces_its_row(cifar_bin, tmp_path, monkeypatch):
    """Epoch 2's checkpoint never lands (killed while saving), but its row was written: the
    resume redoes epoch 2 from epoch 1's last.pt, and the file ends with one row per epoch, the
    rerun's (its images/s is the rerun's own, as in TensorBoard after the purge)."""
    from vggtrain import train as train_module

    real_save = train_module.save_checkpoint

    def killed_at_epoch_2(path, state):
        if state["epoch"] == 2:
            raise KeyboardInterrupt
        real_save(path, state)

    monkeypatch.setattr(train_module, "save_checkpoint", killed_at_epoch_2)
    cfg = write_yaml(tmp_path / "tiny.yaml",
                     tiny_config(cifar_bin, tmp_path / "runs", optim={"ema_decay": 0.9}))
    assert main(["fit", "--config", str(cfg)]) == 130
    run = tmp_path / "runs" / "tiny"
    _, before = _rows(run)
    assert [r["train/epoch"] for r in before] == ["1", "2"]  # epoch 2's row, without its checkpoint
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    assert main(["fit", "--resume", str(run)]) == 0
    _assert_rows_are_the_tensorboard_scalars(run, 3)
    _, after = _rows(run)
    assert after[0] == before[0]  # the epoch the checkpoint holds keeps its row as written
    assert all(r["val/raw_acc"] for r in after)  # with the EMA, the trained weights' own accuracy


def test_a_resume_keeps_the_rows_of_epochs_done_and_drops_the_rest(tmp_path):
    path = tmp_path / METRICS_FILE
    first = EpochMetrics(path, 0)
    for epoch in (1, 2, 3):
        first.add(epoch * 10, {"train/epoch": epoch, "train/loss": 1.0 / epoch, "custom/x": 0.5})
    resumed = EpochMetrics(path, 2)
    assert [r["train/epoch"] for r in resumed.rows] == ["1", "2"]
    resumed.add(30, {"train/epoch": 3, "train/loss": math.pi})
    header, rows = _rows(tmp_path)
    assert header == [*METRICS_COLUMNS, "custom/x"]  # an unknown tag: a column after the known ones
    assert [(r["step"], r["train/epoch"], float(r["train/loss"])) for r in rows] == \
        [("10", "1", 1.0), ("20", "2", 0.5), ("30", "3", math.pi)]
    assert EpochMetrics(tmp_path / "absent.csv", 5).rows == []  # a run from before metrics.csv
