from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tb_scalars, tiny_config, write_yaml
from vggtrain.checkpoint import load_checkpoint
from vggtrain.cli import main

EPOCH_TAGS = {"train/loss", "train/acc", "train/lr", "train/images_per_s", "train/epoch",
              "val/loss", "val/acc"}


def test_fit_learns_and_writes_every_artefact(cifar_bin, tmp_path, capsys):
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_bin, tmp_path / "runs"))
    assert main(["fit", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "tiny"
    assert sorted(p.name for p in run.iterdir()) == \
        ["best.pt", "config.yaml", "confusion_matrix.png", "curves.png", "last.pt", "metrics.csv",
         "misclassified.png", "reliability_diagram.png", "report.json", "report.md", "status.json", "tb"]

    # Plain lines when stdout is not a terminal: one per epoch, no bar redraws.
    assert [line.split(" |")[0] for line in out.splitlines() if line.startswith("epoch ")] == \
        ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert "\r" not in out and "test accuracy" in out

    report = json.loads((run / "report.json").read_text())
    assert report["test"]["images"] == 400 and report["epochs"] == 3
    assert report["test"]["acc"] > 0.5  # chance is 0.1
    assert 1 <= report["best_epoch"] <= 3 and report["class_names"][0] == "airplane"
    status = json.loads((run / "status.json").read_text())  # what a script watching the run reads
    assert status["state"] == "finished" and status["epoch"] == 3

    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["optim"]["nesterov"] is False
    assert resolved["model"]["layers"] == [8, "M", 16, "M", 16, "M"]

    best = load_checkpoint(run / "best.pt")
    assert {"model", "optimizer", "scheduler", "epoch", "config", "class_names", "best_metric",
            "rng"} <= set(best)
    assert best["epoch"] == report["best_epoch"] and best["best_metric"] == report["val_acc"]
    last = load_checkpoint(run / "last.pt")
    assert last["epoch"] == 3 and last["scheduler"]["last_epoch"] == 3 * 16  # per step

    scalars = tb_scalars(run)
    assert EPOCH_TAGS | {"train/loss_step", "test/acc"} <= set(scalars)
    steps = [s for s, _ in scalars["train/loss_step"]]
    assert steps == list(range(1, 3 * 16 + 1))  # 800 train images / batch 50, every step
    assert [v for _, v in scalars["train/epoch"]] == [1, 2, 3]
    assert [v for _, v in scalars["train/lr"]] == pytest.approx([0.05, 0.05, 0.025])
    assert scalars["test/acc"][0][1] == pytest.approx(report["test"]["acc"])


def test_existing_run_is_never_overwritten_by_accident(cifar_bin, tmp_path, capsys):
    cfg = write_yaml(tmp_path / "tiny.yaml",
                     tiny_config(cifar_bin, tmp_path / "runs", train={"epochs": 1}))
    assert main(["fit", "--config", str(cfg)]) == 0
    before = (tmp_path / "runs" / "tiny" / "last.pt").read_bytes()
    capsys.readouterr()
    assert main(["fit", "--config", str(cfg)]) == 2
    assert "already exists: pass --resume" in capsys.readouterr().err
    assert (tmp_path / "runs" / "tiny" / "last.pt").read_bytes() == before
    assert main(["fit", "--config", str(cfg), "--force", "--set", "seed=5"]) == 0
    assert load_checkpoint(tmp_path / "runs" / "tiny" / "last.pt")["config"]["seed"] == 5


def test_resume_continues_exactly(cifar_bin, tmp_path):
    """Stopped after epoch 2 and resumed: the same weights and curves as one straight run."""
    straight = write_yaml(tmp_path / "a.yaml", tiny_config(cifar_bin, tmp_path / "runs",
                                                           name="straight"))
    assert main(["fit", "--config", str(straight)]) == 0
    split = write_yaml(tmp_path / "b.yaml", tiny_config(cifar_bin, tmp_path / "runs", name="split",
                                                        train={"epochs": 2}))
    assert main(["fit", "--config", str(split)]) == 0
    assert main(["fit", "--resume", str(tmp_path / "runs" / "split"), "--set", "train.epochs=3"]) == 0

    a = load_checkpoint(tmp_path / "runs" / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "runs" / "split" / "last.pt")
    assert a["epoch"] == b["epoch"] == 3 and a["global_step"] == b["global_step"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = tb_scalars(tmp_path / "runs" / "straight"), tb_scalars(tmp_path / "runs" / "split")
    for tag in EPOCH_TAGS - {"train/images_per_s"} | {"train/loss_step"}:
        # continued: no duplicated or missing steps
        assert [s for s, _ in sa[tag]] == [s for s, _ in sb[tag]], tag
        assert [v for _, v in sa[tag]] == pytest.approx([v for _, v in sb[tag]]), tag
    report_a = json.loads((tmp_path / "runs" / "straight" / "report.json").read_text())
    report_b = json.loads((tmp_path / "runs" / "split" / "report.json").read_text())
    assert report_a["test"] == report_b["test"]


def test_resume_without_a_run_is_an_error(cifar_bin, tmp_path, capsys):
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_bin, tmp_path / "runs"))
    assert main(["fit", "--config", str(cfg), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main(["fit", "--resume", str(tmp_path / "nope.pt")]) == 2


def test_bad_data_exits_2_and_creates_no_run(tmp_path, capsys):
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(tmp_path / "empty", tmp_path / "runs"))
    assert main(["fit", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CIFAR-10 found" in err
    assert not (tmp_path / "runs").exists()


def test_class_count_mismatch_and_oversized_batch(cifar_bin, tmp_path, capsys):
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_bin, tmp_path / "runs"))
    assert main(["fit", "--config", str(cfg), "--set", "model.num_classes=5"]) == 2
    assert "model.num_classes is 5 but the data" in capsys.readouterr().err
    assert main(["fit", "--config", str(cfg), "--set", "train.batch_size=5000"]) == 2
    assert "larger than the 800 training images" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_absent_device_is_a_usage_error(cifar_bin, tmp_path, capsys):
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_bin, tmp_path / "runs"))
    assert main(["fit", "--config", str(cfg), "--device", "cuda"]) == 2
    assert "device cuda is not available" in capsys.readouterr().err


def test_python_layout_through_python_m(cifar_py, tmp_path):
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_py, tmp_path / "runs",
                                                         train={"epochs": 2, "precision": "bf16"}))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "vggtrain", "fit", "--config", str(cfg),
                           "--name", "py-run"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "runs" / "py-run" / "report.json").read_text())
    assert report["precision"] == "bf16" and report["test"]["acc"] > 0.3


def test_compile_trains_and_saves_the_plain_model(cifar_bin, tmp_path):
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_bin, tmp_path / "runs",
                                                         train={"epochs": 1, "compile": True}))
    assert main(["fit", "--config", str(cfg)]) == 0
    state = load_checkpoint(tmp_path / "runs" / "tiny" / "last.pt")
    assert not any(k.startswith("_orig_mod") for k in state["model"])


def test_compile_without_a_compiler_falls_back_with_a_warning(monkeypatch):
    import shutil

    from vggtrain.run import compile_model

    monkeypatch.setattr(shutil, "which", lambda name: None)
    model = torch.nn.Linear(2, 2)
    with pytest.warns(UserWarning, match="train.compile: no C\\+\\+ compiler on PATH"):
        assert compile_model(model, torch.device("cpu")) is model


def test_the_largest_seeds_train(cifar_bin, tmp_path):
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_bin, tmp_path / "runs", seed=2**63 - 1,
                                                         train={"epochs": 1}))
    assert main(["fit", "--config", str(cfg)]) == 0
