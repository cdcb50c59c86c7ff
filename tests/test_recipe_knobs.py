"""The recipe options: warm-up, no weight decay on BN and biases, flip TTA in fit's evaluations."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_config, write_yaml
from vggtrain.checkpoint import load_checkpoint
from vggtrain.cli import main
from vggtrain.config import config_from_dict
from vggtrain.run import build_run


def test_bn_and_biases_can_be_excluded_from_weight_decay(tmp_path):
    cfg = config_from_dict(tiny_config(tmp_path, tmp_path, optim={"exclude_bn_bias_from_decay": True}),
                           "t")
    run = build_run(cfg, tmp_path, ["x"] * 10, 100)
    decayed, plain = run.optimizer.param_groups
    assert decayed["weight_decay"] == pytest.approx(5e-4) and plain["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(run.model.parameters()))
    default = build_run(config_from_dict(tiny_config(tmp_path, tmp_path), "t"), tmp_path, ["x"] * 10, 100)
    assert len(default.optimizer.param_groups) == 1


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_optimizer_and_precision_settings_reach_the_step(tmp_path, monkeypatch, precision):
    import vggtrain.train as train_module
    from vggtrain.data import Split
    from vggtrain.run import EpochProgress
    from vggtrain.train import train_one_epoch

    cfg = config_from_dict(tiny_config(tmp_path, tmp_path, optim={"nesterov": True, "momentum": 0.85,
                                                                  "label_smoothing": 0.2},
                                       train={"precision": precision}), "t")
    run = build_run(cfg, tmp_path, ["x"] * 10, 100)
    group = run.optimizer.param_groups[0]
    assert group["nesterov"] is True and group["momentum"] == 0.85 and group["lr"] == pytest.approx(0.05)
    seen = {}
    conv = next(m for m in run.model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda module, inputs, out: seen.update(dtype=out.dtype))
    real_step = train_module.train_step

    def step(r, x, y, criterion):
        seen["smoothing"] = criterion.label_smoothing
        return real_step(r, x, y, criterion)

    monkeypatch.setattr(train_module, "train_step", step)
    split = Split(torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8), torch.arange(100) % 10)
    run.progress = EpochProgress()
    train_one_epoch(run, split)
    assert seen == {"dtype": getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[precision]),
                    "smoothing": 0.2}
    # fp16 needs loss scaling (its gradients underflow); bf16 has fp32's range and must not pay for it.
    assert run.scaler.is_enabled() == (precision == "fp16")
    if precision == "fp16":
        # The scaler's state resumes with the run: 100 images in batches of 50 are 2 steps, which
        # grow its tracker to 2 (or an overflow halves the scale), so a fresh scaler differs.
        fresh = build_run(cfg, tmp_path, ["x"] * 10, 100)
        assert fresh.scaler.state_dict() != run.scaler.state_dict()
        fresh.restore(run.state(), tmp_path / "last.pt")
        assert fresh.scaler.state_dict() == run.scaler.state_dict()


def test_warmup_ramps_per_step_then_steplr_counts_from_its_end(cifar_bin, tmp_path):
    # 800 training images, batch 50: 16 steps an epoch; two warm-up epochs are 32 steps.
    mid = write_yaml(tmp_path / "mid.yaml", tiny_config(
        cifar_bin, tmp_path / "runs", name="mid", schedule={"warmup_epochs": 2, "step_size": 1},
        train={"epochs": 1}))
    assert main(["fit", "--config", str(mid)]) == 0
    state = load_checkpoint(tmp_path / "runs" / "mid" / "last.pt")
    # After 16 of the 32 warm-up steps the optimizer holds the rate of step 17.
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.05 * 17 / 32)
    assert state["scheduler"]["last_epoch"] == 16  # the schedule's position: steps done

    after = write_yaml(tmp_path / "after.yaml", tiny_config(
        cifar_bin, tmp_path / "runs", name="after", schedule={"warmup_epochs": 1, "step_size": 1,
                                                               "gamma": 0.5}, train={"epochs": 3}))
    assert main(["fit", "--config", str(after)]) == 0
    state = load_checkpoint(tmp_path / "runs" / "after" / "last.pt")
    assert state["scheduler"]["last_epoch"] == 48  # 3 epochs of 16 steps
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.05 * 0.25)


def test_tta_in_fit_matches_eval_with_tta(cifar_bin, tmp_path, capsys):
    cfg = write_yaml(tmp_path / "tta.yaml", tiny_config(cifar_bin, tmp_path / "runs",
                                                        train={"epochs": 1, "tta": True}))
    assert main(["fit", "--config", str(cfg)]) == 0
    report = json.loads((tmp_path / "runs" / "tiny" / "report.json").read_text())
    assert report["tta"] is True
    capsys.readouterr()
    ckpt = str(tmp_path / "runs" / "tiny" / "best.pt")
    assert main(["eval", "--ckpt", ckpt, "--device", "cpu", "--json", "-"]) == 0  # the run's tta by default
    ev = json.loads(capsys.readouterr().out)
    assert ev["tta"] is True and ev["metrics"]["top1"] == report["metrics"]["top1"]
    assert ev["metrics"]["loss"] == pytest.approx(report["metrics"]["loss"], rel=1e-5)
    assert main(["eval", "--ckpt", ckpt, "--device", "cpu", "--tta", "none", "--json", "-"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["tta"] is False
    assert plain["metrics"]["loss"] != pytest.approx(ev["metrics"]["loss"], rel=1e-5)
    assert main(["eval", "--ckpt", ckpt, "--device", "cpu", "--split", "val", "--tta", "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["top1"] == report["val_acc"]
    assert torch.is_tensor(load_checkpoint(ckpt)["model"]["classifier.weight"])
