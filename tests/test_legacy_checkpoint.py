"""Checkpoints written by vggtrain before the loop was split into modules (commit 82d82d0, StepLR
state in `scheduler`) still resume to the legacy run's weights and evaluate the same (issue 19).

tests/data/legacy_run/ holds a tiny run made by that code (tests/data/make_legacy_run.py):
mid.pt, its last.pt of epoch 2, step 4 (lookahead and warm-up on); last.pt and best.pt after its
3 epochs; report.json, its test report.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from vggtrain.checkpoint import load_checkpoint
from vggtrain.cli import main

LEGACY = Path(__file__).parent / "data" / "legacy_run"


def _same(a: object, b: object) -> bool:
    """The same nested checkpoint content: integers exactly, floats to float32 rounding. The stored
    run was made on another CPU, whose kernels may round the last bit differently (~1e-7 here after
    1.5 epochs); a resume that went wrong moves them far more (one that lost its momentum
    buffers: by up to 0.9)."""
    if isinstance(a, torch.Tensor):
        if not (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape):
            return False
        return torch.allclose(a, b, rtol=1e-5, atol=1e-6) if a.is_floating_point() else torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_a_legacy_mid_epoch_checkpoint_resumes_to_the_legacy_run(cifar_bin, tmp_path, capsys):
    mid = load_checkpoint(LEGACY / "mid.pt")
    assert mid["progress"]["step"] == 4 and mid["epoch"] == 1 and "step_size" in mid["scheduler"]  # StepLR's
    run = tmp_path / "legacy"
    run.mkdir()
    shutil.copy(LEGACY / "mid.pt", run / "last.pt")
    assert main(["fit", "--resume", str(run), "--set", f"data.root={json.dumps(str(cifar_bin))}"]) == 0
    assert "resuming at epoch 2, step 4" in capsys.readouterr().out
    for name in ("last.pt", "best.pt"):
        new, old = load_checkpoint(run / name), load_checkpoint(LEGACY / name)
        assert new["epoch"] == old["epoch"] and new["global_step"] == old["global_step"]
        for key in ("model", "lookahead", "scaler", "best_metric", "best_epoch"):
            assert _same(new[key], old[key]), f"{name}: {key} differs from the legacy run's"
        assert _same(new["optimizer"]["state"], old["optimizer"]["state"])
        assert new["optimizer"]["param_groups"][0]["lr"] == old["optimizer"]["param_groups"][0]["lr"]
    report, legacy = (json.loads(p.read_text()) for p in (run / "report.json", LEGACY / "report.json"))
    assert report["metrics"] == pytest.approx(legacy["metrics"], rel=1e-5)  # the loss: float rounding
    assert report["best_epoch"] == legacy["best_epoch"] == 2


def test_a_legacy_checkpoint_evaluates_as_its_run_reported(cifar_bin, capsys):
    legacy = json.loads((LEGACY / "report.json").read_text())
    assert main(["eval", "--ckpt", str(LEGACY / "best.pt"), "--data-root", str(cifar_bin),
                 "--device", "cpu", "--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tta_mode"] == legacy["tta_mode"] == "flip"
    assert report["metrics"]["top1"] == legacy["metrics"]["top1"]
    assert report["metrics"]["loss"] == pytest.approx(legacy["metrics"]["loss"], rel=1e-6)
    assert report["confusion_matrix"] == legacy["confusion_matrix"]
