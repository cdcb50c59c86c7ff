"""Work done once where it was done twice (a code review's findings): a checkpoint's weights
scanned for NaN once as load_model reads them and once as a resume restores them, best.pt read
once less by fit's calibration, metrics.csv read once at a resume with log.mlflow; and the step
scalars still reaching MLflow as they are written while the epoch's wait for their checkpoint.
Each count is taken in process by a wrapper around the real function, on tiny synthetic data."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch

from conftest import die_after_mid_epoch_checkpoint, tiny_config, write_yaml
from vggtrain import fit as fit_module
from vggtrain import tb
from vggtrain.checkpoint import save_checkpoint
from vggtrain.cli import main
from vggtrain.config import config_from_dict
from vggtrain.errors import CheckpointError
from vggtrain.inference import load_model
from vggtrain.model import build_model
from vggtrain.synthetic import write_synthetic_cifar10
from vggtrain.tracking import NullTracker

STEPS = 4  # per epoch: 160 training images in batches of 40


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_synthetic_cifar10(root, "bin", per_batch=40, test_size=80, seed=1)
    return root


def tiny_checkpoint(tmp_path: Path, ema: bool = False) -> tuple[Path, dict]:
    """An untrained checkpoint as load_model reads one (no training), with a weight EMA or not."""
    cfg = config_from_dict(tiny_config(tmp_path / "no-data", tmp_path / "runs"), "t")
    torch.manual_seed(0)
    state = {"model": build_model(cfg.model).state_dict(), "config": cfg.to_dict(), "epoch": 1}
    if ema:
        state["ema"] = {f"module.{k}": v.clone() for k, v in state["model"].items()}
        state["ema"]["n_averaged"] = torch.tensor(3)
    save_checkpoint(tmp_path / "m.pt", state)
    return tmp_path / "m.pt", state


def count_finite_scans(monkeypatch) -> list[tuple]:
    """torch.isfinite wrapped: the (shape, first value) of each tensor it is asked about."""
    seen: list[tuple] = []
    real = torch.isfinite

    def counted(x):
        seen.append((tuple(x.shape), float(x.flatten()[0]) if x.numel() else None))
        return real(x)

    monkeypatch.setattr(torch, "isfinite", counted)
    return seen


def test_load_model_scans_each_raw_weight_for_nan_once(tmp_path, monkeypatch):
    path, state = tiny_checkpoint(tmp_path)
    floats = [v for v in state["model"].values() if v.is_floating_point()]
    seen = count_finite_scans(monkeypatch)
    load_model(path)
    assert len(seen) == len(floats)  # twice as many before: check_weights_fit, then load_model_state


def test_with_an_ema_both_the_raw_and_the_ema_weights_are_scanned_once(tmp_path, monkeypatch):
    path, state = tiny_checkpoint(tmp_path, ema=True)
    floats = [v for v in state["model"].values() if v.is_floating_point()]
    seen = count_finite_scans(monkeypatch)
    assert load_model(path).weights == "ema"
    assert len(seen) == 2 * len(floats)


@pytest.mark.parametrize("where", ["model", "ema"])
def test_nan_in_either_set_of_weights_is_still_refused(where, tmp_path):
    path, state = tiny_checkpoint(tmp_path, ema=True)
    key = next(k for k, v in state[where].items() if isinstance(v, torch.Tensor) and v.is_floating_point())
    state[where][key] = torch.full_like(state[where][key], float("nan"))
    save_checkpoint(path, state)
    with pytest.raises(CheckpointError, match=f"{key.removeprefix('module.')} holds NaN or infinite values"):
        load_model(path)


class RecordingTracker(NullTracker):
    """What the loop sends MLflow: points at once (log_metric), epochs held for their checkpoint."""

    def __init__(self) -> None:
        self.logged: dict[str, list[int]] = {}
        self.held: list[tuple[int, set[str]]] = []

    def log_metric(self, key: str, value: float, step: int) -> None:
        self.logged.setdefault(key, []).append(step)

    def hold(self, scalars: dict[str, float], step: int) -> None:
        self.held.append((step, set(scalars)))


class FakeConnection:
    """log.mlflow's connection without a store: the rows it is started with, and its tracker."""

    def __init__(self) -> None:
        self.tracker, self.rows = RecordingTracker(), None

    def start(self, run, rows):
        self.rows = rows
        return self.tracker


def tracked_fit(monkeypatch, args: list[str]) -> tuple[int, FakeConnection]:
    connection = FakeConnection()
    monkeypatch.setattr(fit_module, "connect_tracking", lambda cfg, d: connection)
    with contextlib.redirect_stdout(io.StringIO()):
        return main(args), connection


def test_steps_go_to_the_tracker_as_written_epochs_held_and_best_pt_read_twice(data, tmp_path, monkeypatch):
    cfg = write_yaml(tmp_path / "t.yaml", tiny_config(
        data, tmp_path / "runs", data={"val_size": 40}, optim={"clip_grad_norm": 10.0},  # train/grad_norm
        train={"epochs": 2, "batch_size": 40, "log_every": 2}))
    loads: list[str] = []
    real_load = torch.load

    def counted(f, *args, **kwargs):
        loads.append(Path(f).name)
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counted)
    code, connection = tracked_fit(monkeypatch, ["fit", "--config", str(cfg)])
    assert code == 0
    tracker = connection.tracker
    steps = list(range(1, 2 * STEPS + 1))
    assert tracker.logged["train/loss_step"] == steps and tracker.logged["train/grad_norm"] == steps
    assert [s for s, _ in tracker.held] == [STEPS, 2 * STEPS]  # the epochs': held, never logged at once
    assert all("train/loss" in keys and "val/acc" in keys for _, keys in tracker.held)
    assert not {"train/loss", "train/epoch", "val/acc"} & set(tracker.logged)
    # best.pt: read for the test pass and to store its temperatures; no third read to compare it
    # with last.pt (three before)
    assert loads.count("best.pt") == 2


def test_a_resume_reads_metrics_csv_once_and_gives_its_rows_to_mlflow(data, tmp_path, monkeypatch):
    cfg = write_yaml(tmp_path / "t.yaml", tiny_config(
        data, tmp_path / "runs", data={"val_size": 40},
        train={"epochs": 2, "batch_size": 40, "log_every": 2, "checkpoint_every_steps": 6}))
    die_after_mid_epoch_checkpoint(monkeypatch)  # at step 6, in epoch 2: epoch 1's row on disk
    assert tracked_fit(monkeypatch, ["fit", "--config", str(cfg)])[0] == 130
    monkeypatch.undo()
    reads: list[int] = []
    real = tb._read_rows

    def counted(path, epochs_done):
        reads.append(epochs_done)
        return real(path, epochs_done)

    monkeypatch.setattr(tb, "_read_rows", counted)
    code, connection = tracked_fit(monkeypatch, ["fit", "--resume", str(tmp_path / "runs" / "tiny")])
    assert code == 0
    assert reads == [1]  # twice before: for MLflow in fit, and again for the epochs in train
    assert [r["train/epoch"] for r in connection.rows] == ["1"] and connection.rows[0]["step"] == str(STEPS)


def test_eval_and_fit_write_their_pictures_and_report_md_through_one_function(tmp_path, monkeypatch):
    """eval's order: the PNGs in the directory in PICTURES order, a kept one (curves) with the new
    one; fit's: its pictures as given."""
    from vggtrain import report
    from vggtrain.eval import PICTURES

    shown: list[list[tuple[str, str]]] = []
    monkeypatch.setattr(report, "format_markdown", lambda r, images: shown.append(images) or "md\n")
    (tmp_path / "curves.png").write_bytes(b"fit's, kept")
    picture = torch.zeros(3, 4, 4, dtype=torch.uint8)
    report.write_report_files(tmp_path, {}, {"corruptions": picture}, order=PICTURES)
    report.write_report_files(tmp_path, {}, {"misclassified": picture, "confusion_matrix": picture})
    assert shown == [[("curves", "curves.png"), ("corruptions", "corruptions.png")],
                     [("misclassified", "misclassified.png"), ("confusion matrix", "confusion_matrix.png")]]
    assert (tmp_path / "curves.png").read_bytes() == b"fit's, kept"
    assert (tmp_path / "report.md").read_text() == "md\n"


def killed_mid_epoch(data: Path, tmp_path: Path, monkeypatch) -> Path:
    """The directory of a tiny run stopped (exit 130) right after its mid-epoch checkpoint."""
    cfg = write_yaml(tmp_path / "t.yaml", tiny_config(
        data, tmp_path / "runs", data={"val_size": 40},
        train={"epochs": 2, "batch_size": 40, "checkpoint_every_steps": 6}))
    die_after_mid_epoch_checkpoint(monkeypatch)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["fit", "--config", str(cfg)]) == 130
    monkeypatch.undo()
    return tmp_path / "runs" / "tiny"


def test_a_resume_scans_the_stored_weights_for_nan_once(data, tmp_path, monkeypatch):
    from vggtrain import checkpoint

    run_dir = killed_mid_epoch(data, tmp_path, monkeypatch)
    scans: list[bool] = []
    real = checkpoint.check_weight_values

    def counted(model, weights, path, **kwargs):
        scans.append(kwargs.get("scan", True))
        return real(model, weights, path, **kwargs)

    monkeypatch.setattr(checkpoint, "check_weight_values", counted)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["fit", "--resume", str(run_dir)]) == 0
    # checked twice (the shapes on the meta device, then the real load), scanned the first time only
    assert scans == [True, False]


def test_a_resume_still_refuses_a_checkpoint_whose_weights_hold_nan(data, tmp_path, monkeypatch, capsys):
    """The one scan a resume keeps (check_weights_fit's, before anything is built) still refuses."""
    run_dir = killed_mid_epoch(data, tmp_path, monkeypatch)
    last = run_dir / "last.pt"
    state = torch.load(last, weights_only=True)
    key = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][key] = torch.full_like(state["model"][key], float("nan"))
    save_checkpoint(last, state)
    capsys.readouterr()
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["fit", "--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert f"{key} holds NaN or infinite values" in err and len(err.strip().splitlines()) == 1
