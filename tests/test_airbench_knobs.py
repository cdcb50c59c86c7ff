"""The airbench options behind fast_cpu.yaml: whitening, identity init, BN-bias learning rate,
fixed BN weights, logit scale, lookahead, crop padding, multi-crop TTA, and the time-to-accuracy
script that measures them."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config, wait_for_line, write_yaml
from vggtrain.checkpoint import load_checkpoint
from vggtrain.cli import main
from vggtrain.config import ModelConfig, config_from_dict, load_config
from vggtrain.data import Split, crop_flip, normalize
from vggtrain.errors import ConfigError
from vggtrain.evaluate import log_probs
from vggtrain.model import VGG, build_model, init_whitening
from vggtrain.run import build_run
from vggtrain.train import train_step

ROOT = Path(__file__).resolve().parents[1]
AIRBENCH = {  # every option at once, on the tiny net
    "data": {"crop_padding": 2},
    "model": {"whiten": True, "identity_init": True, "bn_weight": False, "logit_scale": 0.111},
    "optim": {"bn_bias_lr_scale": 64.0, "lookahead_every": 3, "nesterov": True, "momentum": 0.85},
    "train": {"tta": "multicrop"},
}


def _cfg(tmp_path: Path, root: Path | None = None, **sections):
    raw = tiny_config(root or tmp_path, tmp_path / "runs")
    for section, values in sections.items():
        raw[section].update(values)
    return config_from_dict(raw, "t")


def test_fast_cpu_config_is_valid_and_vgg_style():
    cfg = load_config("fast_cpu.yaml")
    assert cfg.model.arch == "custom" and cfg.model.batch_norm and cfg.data.val_size == 0
    assert set(cfg.model.layers) <= {"M"} | set(range(1, 8193))
    model = build_model(cfg.model)
    convs = model.convs()
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert all(isinstance(m, torch.nn.MaxPool2d) and m.kernel_size == 2
               for m in model.features if "Pool" in type(m).__name__)


@pytest.mark.parametrize("key, value, message", [
    ("train.tta", "maybe", "must be true, false or one of none, flip, multicrop"),
    ("data.crop_padding", 17, "must be <= 16"),
    ("model.whiten", True, "needs an even first convolution width of at most 54 (got 64)"),
    ("optim.bn_bias_lr_scale", 0, "must be > 0"),
    ("model.logit_scale", -1, "must be > 0"),
])
def test_bad_knob_values_are_one_line_config_errors(tmp_path, key, value, message):
    raw = tiny_config(tmp_path, tmp_path)
    section, name = key.split(".")
    raw[section][name] = value
    if key == "model.whiten":
        raw["model"]["layers"] = [64, "M"]
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict(raw, "t")


def test_odd_whitening_width_is_refused(tmp_path):
    raw = tiny_config(tmp_path, tmp_path, model={"whiten": True, "layers": [9, "M"]})
    with pytest.raises(ConfigError, match=r"got 9\)"):
        config_from_dict(raw, "t")


@pytest.mark.parametrize("value, mode", [(True, "flip"), (False, "none"), ("multicrop", "multicrop")])
def test_tta_accepts_booleans_and_modes(tmp_path, value, mode):
    assert _cfg(tmp_path, train={"tta": value}).train.tta == mode  # held as the mode's name


def test_whitening_decorrelates_patches_and_is_frozen(tmp_path):
    g = torch.Generator().manual_seed(0)
    # Strongly correlated channels and neighbouring pixels: far from white.
    base = torch.randn(300, 1, 34, 34, generator=g)
    smooth = F.avg_pool2d(base, 3, 1)  # (300, 1, 32, 32)
    images = torch.cat([smooth, smooth * 0.5 + 0.1 * torch.randn(300, 1, 32, 32, generator=g),
                        torch.randn(300, 1, 32, 32, generator=g)], 1)
    model = VGG([54, "M"], global_pool="max")
    init_whitening(model, images, eps=0.0)
    conv = model.convs()[0]
    out = F.conv2d(images, conv.weight)  # valid patches, as the covariance was taken
    half = out[:, :27].permute(1, 0, 2, 3).reshape(27, -1)
    cov = torch.cov(half)
    assert torch.allclose(cov, torch.eye(27), atol=0.05)  # white: unit variance, no correlation
    assert torch.allclose(out[:, 27:], -out[:, :27])  # each filter paired with its negation

    cfg = _cfg(tmp_path, model={"whiten": True, "layers": [8, "M", 16, "M"]})
    images_u8 = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8, generator=g)
    run = build_run(cfg, tmp_path, ["x"] * 10, 1000, whiten_images=images_u8)
    first = run.model.convs()[0].weight
    assert not first.requires_grad
    assert all(p is not first for group in run.optimizer.param_groups for p in group["params"])
    expected = VGG([8, "M", 16, "M"], global_pool="max")
    init_whitening(expected, normalize(images_u8))
    assert torch.allclose(first, expected.convs()[0].weight)
    before = first.clone()
    x, y = normalize(images_u8[:10]), torch.arange(10)
    train_step(run, x, y, torch.nn.CrossEntropyLoss())
    assert torch.equal(first, before)


def test_identity_init_passes_each_input_channel_through():
    model = VGG([4, 6, "M", 3], identity_init=True, batch_norm=False)
    first, second, third = model.convs()
    dirac = torch.zeros(4, 4, 3, 3)
    torch.nn.init.dirac_(dirac)
    assert torch.equal(second.weight[:4], dirac)  # 4 in-channels: the first 4 of 6 filters
    assert not torch.equal(second.weight[4:], torch.zeros_like(second.weight[4:]))  # the rest random
    eye = torch.zeros(3, 6, 3, 3)
    torch.nn.init.dirac_(eye)
    assert torch.equal(third.weight, eye)  # fewer filters than in-channels: the first 3 pass
    plain = VGG([4, 6, "M", 3], batch_norm=False)
    assert not torch.equal(plain.convs()[1].weight[:4], dirac)
    configured = build_model(ModelConfig(arch="custom", layers=[4, 6, "M", 3], batch_norm=False,
                                         identity_init=True))  # as model.identity_init reaches it
    assert torch.equal(configured.convs()[1].weight[:4], dirac)
    assert not torch.equal(first.weight[:3], torch.zeros(3, 3, 3, 3)) and first.in_channels == 3


def test_bn_bias_groups_fixed_bn_weights_and_logit_scale(tmp_path):
    cfg = _cfg(tmp_path, model={"bn_weight": False, "logit_scale": 0.25},
               optim={"bn_bias_lr_scale": 8.0, "weight_decay": 1e-3})
    run = build_run(cfg, tmp_path, ["x"] * 10, 1000)
    bns = [m for m in run.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    rest, fast = run.optimizer.param_groups
    assert {id(p) for p in fast["params"]} == {id(m.bias) for m in bns}
    assert fast["lr"] == pytest.approx(0.05 * 8) and fast["weight_decay"] == pytest.approx(1e-3 / 8)
    assert rest["lr"] == pytest.approx(0.05) and rest["weight_decay"] == pytest.approx(1e-3)
    assert all(not m.weight.requires_grad for m in bns)
    x = normalize(torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8))
    for _ in range(3):
        train_step(run, x, torch.arange(20) % 10, torch.nn.CrossEntropyLoss())
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in bns)
    assert not all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in bns)
    run.model.eval()
    with torch.no_grad():
        raw = run.model.classifier(torch.flatten(run.model.pool(run.model.features(x)), 1))
        assert torch.allclose(run.model(x), raw * 0.25)
    # The schedule keeps the ratio between the groups.
    run.scheduler.step()
    assert fast["lr"] / rest["lr"] == pytest.approx(8.0)


def test_lookahead_sync_pulls_fast_weights_to_the_slow_ones(tmp_path):
    cfg = _cfg(tmp_path, optim={"lookahead_every": 5})
    run = build_run(cfg, tmp_path, ["x"] * 10, 1000)
    start = [t.clone() for t in run.lookahead.state_dict()]
    x = normalize(torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8))
    for _ in range(2):
        train_step(run, x, torch.arange(20) % 10, torch.nn.CrossEntropyLoss())
    fast = [t.clone() for t in run.model.state_dict().values() if t.is_floating_point()]
    decay = 0.95 ** 5 * 0.125  # at step 50 of 100: 0.95^5 * (50/100)^3
    run.lookahead.sync(50, 100)
    now = [t for t in run.model.state_dict().values() if t.is_floating_point()]
    for s0, f, s, n in zip(start, fast, run.lookahead.state_dict(), now, strict=True):
        assert torch.allclose(s, decay * s0 + (1 - decay) * f, atol=1e-6)
        assert torch.equal(n, s)
    assert math.isclose(decay, 0.0967, rel_tol=1e-3)


def test_crop_padding_translates_by_at_most_the_padding():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g)
    split = Split(images, torch.arange(6))
    idx = torch.arange(6)
    shifts = torch.tensor([[0, 0], [4, 4], [2, 2], [0, 4], [1, 3], [3, 0]])
    flips = torch.tensor([False, True, False, True, False, True])
    out = crop_flip(split, idx, shifts, flips, pad=2)
    padded = F.pad(images, (2, 2, 2, 2))
    for i in range(6):
        dy, dx = shifts[i].tolist()
        crop = padded[i, :, dy:dy + 32, dx:dx + 32]
        assert torch.equal(out[i], crop.flip(2) if flips[i] else crop)
    assert torch.equal(crop_flip(split, idx, shifts, flips, channels_last=True, pad=2), out)


def test_multicrop_tta_is_the_weighted_mixture_of_six_views():
    torch.manual_seed(0)
    model = VGG([8, "M", 8, "M"], global_pool="max").eval()
    x = torch.randn(5, 3, 32, 32)
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    views = [x, padded[..., :32, :32], padded[..., 2:, 2:]]
    with torch.no_grad():
        probs = [(model(v).softmax(1) + model(v.flip(3)).softmax(1)) / 2 for v in views]
        mixture = 0.5 * probs[0] + 0.25 * probs[1] + 0.25 * probs[2]
        got = log_probs(model, x, "multicrop").exp()
    assert torch.allclose(got, mixture, atol=1e-6)
    assert torch.allclose(got.sum(1), torch.ones(5), atol=1e-6)
    assert not torch.allclose(got, log_probs(model, x, "flip").exp(), atol=1e-4)


def test_airbench_knobs_train_and_resume_exactly_after_a_kill(cifar_bin, tmp_path):
    """Lookahead's slow weights and the whitening layer survive a SIGKILL mid-epoch, at a
    checkpoint where the slow weights differ from the model's."""
    cfg = tiny_config(cifar_bin, tmp_path / "runs", train={"epochs": 12, "batch_size": 25,
                                                          "checkpoint_every_steps": 5})
    for section, values in AIRBENCH.items():
        cfg[section].update(values)
    cfg["optim"]["lookahead_every"] = 7  # syncs and checkpoints (every 5) rarely coincide
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    killed = write_yaml(tmp_path / "killed.yaml", {**cfg, "name": "killed"})
    proc = subprocess.Popen([sys.executable, "-m", "vggtrain", "fit", "--config", str(killed)],
                            env=env, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = tmp_path / "runs" / "killed" / "last.pt"
    deadline = time.monotonic() + 120
    while True:  # freeze the child, look at last.pt, kill it once it is the checkpoint we want
        assert time.monotonic() < deadline and proc.poll() is None, "no mid-epoch checkpoint seen"
        time.sleep(0.05)
        if not last.is_file():
            continue
        proc.send_signal(signal.SIGSTOP)
        saved = load_checkpoint(last)
        if saved["epoch"] >= 1 and saved["progress"]["step"] > 0 and saved["global_step"] % 7:
            proc.kill()
            break
        proc.send_signal(signal.SIGCONT)
    proc.wait(timeout=30)
    differs = [not torch.equal(slow, fast) for slow, fast in
               zip(saved["lookahead"], [t for t in saved["model"].values() if t.is_floating_point()],
                   strict=True)]
    assert any(differs), "the slow weights should differ from the model's between syncs"
    run = last.parent
    assert main(["fit", "--resume", str(run)]) == 0

    straight = write_yaml(tmp_path / "straight.yaml", {**cfg, "name": "straight"})
    assert main(["fit", "--config", str(straight)]) == 0
    a = load_checkpoint(tmp_path / "runs" / "straight" / "last.pt")
    b = load_checkpoint(last)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # The loop syncs at epoch ends too: the final slow weights are the model's (without the
    # syncs they would still be the initial weights).
    floats = [t for t in a["model"].values() if t.is_floating_point()]
    assert all(torch.equal(slow, w) for slow, w in zip(a["lookahead"], floats, strict=True))
    report = json.loads((run / "report.json").read_text())
    assert report["tta"] is True and report["tta_mode"] == "multicrop"
    assert report["test"] == json.loads((tmp_path / "runs" / "straight" / "report.json").read_text())["test"]
    # eval reproduces fit's multicrop report from the checkpoint alone: the run's train.tta is its default.
    out = tmp_path / "eval.json"
    assert main(["eval", "--ckpt", str(run), "--device", "cpu", "--json", str(out)]) == 0
    ev = json.loads(out.read_text())
    assert ev["tta_mode"] == "multicrop" and ev["metrics"]["top1"] == report["metrics"]["top1"]


def _tta_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "time_to_accuracy.py"), *args],
                          env=env, text=True, capture_output=True, timeout=300)


def test_time_to_accuracy_stops_at_the_target_and_writes_the_curve(cifar_bin, tmp_path):
    cfg = write_yaml(tmp_path / "t.yaml", tiny_config(cifar_bin, tmp_path / "runs",
                                                      data={"val_size": 0}, train={"epochs": 6}))
    out = tmp_path / "tta.json"
    # A target of 5% is met at once (10 classes): training stops after the first epoch.
    proc = _tta_script("--config", str(cfg), "--target", "0.05", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["reached"] is True and result["epochs_to_target"] == 1 and result["epochs"] == 1
    assert len(result["curve"]) == 1 and result["curve"][0]["test_acc"] >= 0.05
    assert result["time_to_target_s"] == result["curve"][0]["wall_s"] > 0
    assert result["machine"]["cores"] >= 1 and result["machine"]["torch"] == str(torch.__version__)
    report = json.loads((tmp_path / "runs" / "tiny" / "report.json").read_text())
    assert report["epochs"] == 1 and report["test"]["acc"] == result["final_test_acc"]
    assert "reached 5.0% at" in proc.stdout

    # A target out of reach (a learning rate too small to learn): every epoch runs; probes every
    # 2nd epoch, and all from the 5th.
    proc = _tta_script("--config", str(cfg), "--set", "name=full", "--set", "optim.lr=1e-7",
                       "--target", "0.9", "--full",
                       "--probe-every", "2", "--probe-from", "5", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["reached"] is False and result["time_to_target_s"] is None
    assert [c["epoch"] for c in result["curve"]] == [2, 4, 5, 6]
    walls = [c["wall_s"] for c in result["curve"]]
    assert walls == sorted(walls) and result["total_wall_s"] >= walls[-1]
    assert "did not reach 90.0%" in proc.stdout


def test_time_to_accuracy_bad_input_is_one_line_and_exit_2(tmp_path):
    proc = _tta_script("--config", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "no such config file" in proc.stderr
    proc = _tta_script("--config", "fast_cpu.yaml", "--target", "1.5")
    assert proc.returncode == 2 and "--target must be in (0, 1]" in proc.stderr
    proc = _tta_script("--config", "fast_cpu.yaml", "--budget-min", "nan")
    assert proc.returncode == 2 and "--budget-min a positive number" in proc.stderr
    # Refused before any training: here the data root is empty, so a late check would fail on it.
    proc = _tta_script("--config", "fast_cpu.yaml", "--set", f"train.out_dir={tmp_path / 'runs'}",
                       "--set", f"data.root={tmp_path / 'nodata'}", "--set", "data.download=false",
                       "--json", str(tmp_path))
    assert proc.returncode == 2 and f"--json {tmp_path}: cannot write it" in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists()


def test_time_to_accuracy_stopped_keeps_the_curve_it_measured(cifar_bin, tmp_path):
    cfg = write_yaml(tmp_path / "t.yaml", tiny_config(cifar_bin, tmp_path / "runs",
                                                      data={"val_size": 0}, train={"epochs": 50}))
    out = tmp_path / "tta.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "time_to_accuracy.py"), "--config",
                             str(cfg), "--full", "--json", str(out)],
                            env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_line(proc, "time_to_accuracy: epoch 1 ")
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode == 130
    result = json.loads(out.read_text())
    assert result["stopped"].startswith("stopped by SIGINT") and result["curve"][0]["epoch"] == 1
    assert result["final_test_acc"] is None and result["epochs"] < 50


def test_tta_views_script_scores_view_sets_as_eval_does(cifar_bin, tmp_path):
    cfg = write_yaml(tmp_path / "t.yaml", tiny_config(cifar_bin, tmp_path / "runs", train={"epochs": 2}))
    assert main(["fit", "--config", str(cfg)]) == 0
    run = tmp_path / "runs" / "tiny"
    script = [sys.executable, str(ROOT / "scripts" / "tta_views.py")]
    out = tmp_path / "views.json"
    proc = subprocess.run([*script, str(run), "--json", str(out)], text=True, capture_output=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = {r["views"]: r for r in json.loads(out.read_text())["rows"]}
    assert [rows[k]["count"] for k in ("none", "flip", "multicrop", "all 5x5 positions")] == [1, 2, 6, 50]
    # Its views and weights are eval's: the same accuracy as `eval --tta ...` on the same split.
    for mode in ("none", "flip", "multicrop"):
        ev_json = tmp_path / f"eval-{mode}.json"
        assert main(["eval", "--ckpt", str(run), "--split", "val", "--tta", mode, "--device", "cpu",
                     "--json", str(ev_json)]) == 0
        top1 = json.loads(ev_json.read_text())["metrics"]["top1"]
        assert rows[mode]["top1"] == pytest.approx(top1, abs=1e-9)
    # A run without a validation split: one line, exit 2.
    cfg = write_yaml(tmp_path / "n.yaml", tiny_config(cifar_bin, tmp_path / "runs", name="noval",
                                                      data={"val_size": 0}, train={"epochs": 1}))
    assert main(["fit", "--config", str(cfg)]) == 0
    proc = subprocess.run([*script, str(tmp_path / "runs" / "noval")], text=True, capture_output=True,
                          timeout=300)
    assert proc.returncode == 2 and "held out no validation images" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
