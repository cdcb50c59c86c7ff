"""airbench's whole method as config options (issue 20): block order, GELU, BN momentum and eps,
convolutions without bias, the 2x2 whitening layer and its bias horizon, the linear (triangular)
per-step schedule, fractional epochs, alternating flip, reflect padding, lookahead's final sync."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import die_after_mid_epoch_checkpoint, tb_scalars, tiny_config, write_yaml
from vggtrain.averaging import Lookahead
from vggtrain.checkpoint import load_checkpoint
from vggtrain.cli import main
from vggtrain.config import ModelConfig, ScheduleConfig, config_from_dict
from vggtrain.data import Augmentation, Split, alternating_flips, crop_flip, train_batches
from vggtrain.errors import ConfigError
from vggtrain.fit import fit
from vggtrain.model import VGG, blocks, build_model, init_whitening
from vggtrain.schedule import lr_factor

AIRBENCH = {  # airbench94's method on the tiny net (800 training images, batch 50: 16 steps an epoch)
    "data": {"crop_padding": 2, "crop_pad_mode": "reflect", "flip": "alternating"},
    "model": {"layers": [8, "M", 16, "M", 16], "whiten": "2x2", "whiten_bias_epochs": 1,
              "block_order": "conv_pool_bn_act", "activation": "gelu", "conv_bias": False,
              "bn_momentum": 0.4, "bn_eps": 1e-12, "identity_init": True, "bn_weight": False,
              "logit_scale": 1 / 9},
    "optim": {"bn_bias_lr_scale": 64.0, "lookahead_every": 5, "lookahead_final_full_sync": True,
              "nesterov": True, "momentum": 0.85, "label_smoothing": 0.2},
    "schedule": {"kind": "linear", "warmup_epochs": 0.5, "start_factor": 0.2, "end_factor": 0.07},
    "train": {"epochs": 2.5, "tta": "multicrop"},
}


def _airbench(cifar_bin, out, **train):
    cfg = tiny_config(cifar_bin, out, **AIRBENCH)  # its linear schedule: without tiny's StepLR keys
    cfg["train"].update(train)
    return cfg


def test_block_order_pools_before_bn_and_shows_in_summary(capsys):
    kinds = lambda m: [type(x).__name__ for x in m.features]  # noqa: E731
    default = VGG([8, "M", 16])
    assert kinds(default) == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Conv2d", "BatchNorm2d", "ReLU"]
    pooled = VGG([8, "M", 16], block_order="conv_pool_bn_act", activation="gelu", conv_bias=False,
                 bn_momentum=0.4, bn_eps=1e-12)
    assert kinds(pooled) == ["Conv2d", "MaxPool2d", "BatchNorm2d", "GELU", "Conv2d", "BatchNorm2d", "GELU"]
    bn = pooled.features[2]
    assert bn.num_features == 8 and bn.momentum == 0.4 and bn.eps == 1e-12
    assert all(c.bias is None for c in pooled.convs()) and all(c.bias is not None for c in default.convs())
    assert pooled(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert [b.name for b in blocks(pooled)][:2] == ["conv1_1", "pool1"]
    assert main(["summary", "--config", "smoke.yaml", "--set", "model.block_order=conv_pool_bn_act",
                 "--set", "model.activation=gelu"]) == 0
    out = capsys.readouterr().out
    assert "max pool 2x2, BN, GELU" in out


def test_2x2_whitening_is_a_fixed_24_wide_first_layer_with_a_bias():
    cfg = ModelConfig(arch="custom", layers=[8, "M", 16], whiten="2x2", global_pool="max")
    model = build_model(cfg)
    conv = model.whitening()
    assert conv is model.stem[0] and conv.kernel_size == (2, 2) and conv.out_channels == 24
    assert conv.padding == (0, 0) and conv.bias is not None and not conv.weight.requires_grad
    assert model.convs()[0].in_channels == 24
    images = torch.randn(20, 3, 32, 32)
    init_whitening(model, images)
    w = conv.weight.detach()
    assert torch.equal(w[:12], -w[12:])  # each eigenvector and its negation
    patches = images.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)
    white = patches @ w[:12].reshape(12, 12).T  # whitened patches: about unit covariance
    assert torch.allclose(white.T @ white / len(white), torch.eye(12), atol=0.05)
    assert [b.name for b in blocks(model)][0] == "whiten"
    with torch.no_grad():
        assert model.stem(torch.zeros(1, 3, 32, 32)).shape == (1, 24, 31, 31)


def test_whitening_bias_trains_for_its_epochs_then_stays(cifar_bin, tmp_path):
    cfg = config_from_dict(_airbench(cifar_bin, tmp_path / "runs", epochs=3), "t")
    biases = []
    fit(cfg, tmp_path / "runs" / "tiny", on_epoch_end=lambda r: biases.append(
        r.model.whitening().bias.detach().clone()) and False)
    assert len(biases) == 3 and biases[0].abs().sum() > 0  # trained (it starts at zero)
    assert torch.equal(biases[0], biases[1]) and torch.equal(biases[1], biases[2])
    run = load_checkpoint(tmp_path / "runs" / "tiny" / "last.pt")
    assert run["optimizer"]["param_groups"][-1]["frozen_after_epochs"] == 1
    assert run["optimizer"]["param_groups"][-1]["lr"] == 0.0


def test_linear_schedule_is_airbench_triangle():
    s = ScheduleConfig(kind="linear", warmup_epochs=2.277, start_factor=0.2, end_factor=0.07)
    total = math.ceil(48 * 9.9)  # airbench94: 48 steps an epoch, 9.9 epochs, 23% warm-up
    warmup = int(total * 0.23)

    def airbench(step: int) -> float:  # airbench94.py's get_lr
        if step < warmup:
            return 0.2 * (1 - step / warmup) + 1.0 * step / warmup
        frac = (step - warmup) / (total - warmup)
        return 1.0 * (1 - frac) + 0.07 * frac

    assert [lr_factor(i, s, 48, total) for i in range(total + 1)] == pytest.approx(
        [airbench(i) for i in range(total + 1)])
    step = ScheduleConfig(step_size=2, gamma=0.5, warmup_epochs=1)
    assert [lr_factor(i * 10, step, 10, 100) for i in range(6)] == [0.1, 1.0, 1.0, 0.5, 0.5, 0.25]


def test_alternating_flip_mirrors_the_whole_set_every_other_epoch():
    f0, f1, f2 = (alternating_flips(1000, 3, e) for e in range(3))
    assert torch.equal(f1, ~f0) and torch.equal(f2, f0) and 400 < int(f0.sum()) < 600
    assert not torch.equal(alternating_flips(1000, 4, 0), f0)  # a function of the seed
    assert alternating_flips(10, 2**63 - 1, 1).shape == (10,)  # the largest seed a config allows
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    split = Split(images, torch.arange(8))
    seen = {}
    for epoch in (0, 1):
        flips = alternating_flips(8, 3, epoch)
        gen = torch.Generator().manual_seed(epoch)
        for x, y in train_batches(split, 4, gen, Augmentation(padding=0), flips=flips):
            for img, label in zip(x, y.tolist(), strict=True):
                seen.setdefault(label, []).append(img)
    for a, b in seen.values():  # each image once as it is and once mirrored
        assert torch.equal(a, b.flip(2)) and not torch.equal(a, b)


def test_reflect_padding_crops_from_the_reflected_image():
    images = torch.randint(1, 256, (3, 3, 32, 32), dtype=torch.uint8)
    split = Split(images, torch.arange(3))
    shifts, flips = torch.tensor([[0, 0], [4, 1], [2, 2]]), torch.tensor([False, True, False])
    out = crop_flip(split, torch.arange(3), shifts, flips, pad=2, pad_mode="reflect")
    padded = F.pad(images, (2, 2, 2, 2), mode="reflect")
    for i in range(3):
        dy, dx = shifts[i].tolist()
        crop = padded[i, :, dy:dy + 32, dx:dx + 32]
        assert torch.equal(out[i], crop.flip(2) if flips[i] else crop)
    assert not torch.equal(out[0], crop_flip(split, torch.arange(3), shifts, flips, pad=2)[0])


def test_lookahead_final_full_sync_ends_on_the_slow_weights():
    torch.manual_seed(0)
    model = VGG([4, "M"], global_pool="max")
    la = Lookahead(model, 5, final_full_sync=True)
    slow = [t.clone() for t in la.state_dict()]
    with torch.no_grad():
        model.features[0].weight.add_(1.0)
    la.step(98, 100)  # no sync between the every-5 steps
    assert not torch.equal(model.features[0].weight, slow[0])
    la.step(100, 100)
    assert all(torch.equal(a, b) for a, b in zip(la.state_dict(), slow, strict=True))
    assert torch.equal(model.features[0].weight, slow[0])


def test_fractional_epochs_end_at_their_step_and_resume_inside_the_last_one(cifar_bin, tmp_path, monkeypatch):
    # 2.5 epochs of 16 steps: 40 steps, the third epoch stops after 8. A run with every option
    # is killed at step 36 (inside that last partial epoch) and resumed: bit-identical.
    out = tmp_path / "runs"
    straight = write_yaml(tmp_path / "a.yaml", {**_airbench(cifar_bin, out), "name": "straight"})
    assert main(["fit", "--config", str(straight)]) == 0
    killed = write_yaml(tmp_path / "b.yaml", {**_airbench(cifar_bin, out, checkpoint_every_steps=36),
                                              "name": "killed"})
    die_after_mid_epoch_checkpoint(monkeypatch)
    assert main(["fit", "--config", str(killed)]) == 130
    monkeypatch.undo()
    mid = load_checkpoint(out / "killed" / "last.pt")
    assert (mid["epoch"], mid["progress"]["step"], mid["global_step"]) == (2, 4, 36)
    assert main(["fit", "--resume", str(out / "killed")]) == 0
    a, b = load_checkpoint(out / "straight" / "last.pt"), load_checkpoint(out / "killed" / "last.pt")
    assert a["global_step"] == b["global_step"] == 40 and a["epoch"] == b["epoch"] == 3
    for key in ("model", "lookahead"):
        assert all(torch.equal(x, y) for x, y in zip(a[key].values() if key == "model" else a[key],
                                                     b[key].values() if key == "model" else b[key],
                                                     strict=True)), key
    curves, straight_curves = tb_scalars(out / "killed"), tb_scalars(out / "straight")
    assert [s for s, _ in curves["train/loss_step"]] == list(range(1, 41))
    assert curves["train/lr"] == straight_curves["train/lr"]  # the resumed epoch logs its first step's rate
    ra, rb = (json.loads((out / n / "report.json").read_text()) for n in ("straight", "killed"))
    assert ra["metrics"] == rb["metrics"] and ra["epochs"] == 3
    # The lookahead's final full sync: the run ended on the slow weights.
    assert all(torch.equal(w, s) for w, s in zip(
        [t for t in a["model"].values() if t.is_floating_point()], a["lookahead"], strict=True))


@pytest.mark.parametrize("section, values, message", [
    ("model", {"whiten_bias_epochs": 3}, "model.whiten_bias_epochs needs model.whiten"),
    ("model", {"whiten": "4x4"}, "model.whiten must be true, false or one of none, 3x3, 2x2"),
    ("model", {"block_order": "pool_first"}, "model.block_order must be one of"),
    ("schedule", {"kind": "exponential"}, "schedule.kind must be one of step, multistep, linear"),
    ("train", {"epochs": 0}, "train.epochs must be > 0"),
    ("data", {"flip": "sometimes"}, "data.flip must be one of random, alternating"),
])
def test_bad_new_options_are_one_line_errors(tmp_path, section, values, message):
    raw = tiny_config(tmp_path, tmp_path)
    raw[section].update(values)
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw, "t")


def test_muon_orthogonalises_the_filter_updates_and_sgd_does_the_rest():
    from vggtrain.optim import MuonSGD, build_optimizer, orthogonalize

    g = torch.randn(64, 576)
    s = torch.linalg.svdvals(orthogonalize(g).float())
    assert 0.3 < s.min() and s.max() < 1.6  # all directions at about unit size, whatever g's spectrum
    torch.manual_seed(0)
    cfg = config_from_dict(_airbench(".", ".", batch_size=50), "t")
    cfg.optim.name = "muon"
    model = build_model(cfg.model)
    opt = build_optimizer(model, cfg.optim, cfg.model.whiten_bias_epochs)
    assert isinstance(opt, MuonSGD)
    muon = [g for g in opt.param_groups if g.get("muon")]
    assert len(muon) == 1 and all(p.ndim == 4 for p in muon[0]["params"])
    assert len(muon[0]["params"]) == len(model.convs())  # the whitening filters are frozen, not here
    assert all(p.ndim < 4 for g in opt.param_groups if not g.get("muon") for p in g["params"])
    conv, head = model.convs()[1].weight, model.classifier.weight
    x = torch.randn(8, 3, 32, 32)
    torch.nn.functional.cross_entropy(model(x), torch.arange(8)).backward()
    before, grad = conv.detach().clone(), conv.grad.clone()
    head_before, head_grad = head.detach().clone(), head.grad.clone()
    opt.step()
    m, lr = cfg.optim.muon_momentum, cfg.optim.muon_lr
    nesterov = grad + m * grad  # the first step: momentum buffer = grad
    update = orthogonalize(nesterov.reshape(len(grad), -1)).view(grad.shape)
    expected = before * (len(before) ** 0.5 / before.norm()) - lr * update
    assert torch.allclose(conv.detach(), expected, atol=1e-6)
    sgd_lr, wd = cfg.optim.lr, cfg.optim.weight_decay  # plain SGD: lr x (grad + wd w), nesterov
    step = head_grad + wd * head_before
    assert torch.allclose(head.detach(), head_before - sgd_lr * (step + cfg.optim.momentum * step), atol=1e-6)


def test_muon_run_resumes_bit_identically_after_a_mid_epoch_stop(cifar_bin, tmp_path, monkeypatch):
    out = tmp_path / "runs"
    base = _airbench(cifar_bin, out, epochs=2)
    base["optim"].update({"name": "muon", "lookahead_every": 0, "lookahead_final_full_sync": False})
    assert main(["fit", "--config", str(write_yaml(tmp_path / "a.yaml", {**base, "name": "a"}))]) == 0
    base["train"]["checkpoint_every_steps"] = 20
    die_after_mid_epoch_checkpoint(monkeypatch)
    assert main(["fit", "--config", str(write_yaml(tmp_path / "b.yaml", {**base, "name": "b"}))]) == 130
    monkeypatch.undo()
    assert main(["fit", "--resume", str(out / "b")]) == 0
    a, b = load_checkpoint(out / "a" / "last.pt"), load_checkpoint(out / "b" / "last.pt")
    assert all(torch.equal(x, y) for x, y in zip(a["model"].values(), b["model"].values(), strict=True))
    assert any(g.get("muon") for g in a["optimizer"]["param_groups"])


def test_whitening_bias_group_takes_its_lr_scale(tmp_path):
    from vggtrain.optim import param_groups

    raw = _airbench(tmp_path, tmp_path)
    raw["optim"].update({"lr": 0.1, "weight_decay": 0.02, "whiten_bias_lr_scale": 8.0})
    cfg = config_from_dict(raw, "t")
    model = build_model(cfg.model)
    held = param_groups(model, cfg.optim, cfg.model.whiten_bias_epochs)[-1]
    assert held["params"] == [model.whitening().bias] and held["frozen_after_epochs"] == 1
    assert held["lr"] == pytest.approx(0.8) and held["weight_decay"] == pytest.approx(0.0025)
    raw["model"]["whiten_bias_epochs"] = None
    with pytest.raises(ConfigError, match="optim.whiten_bias_lr_scale applies to"):
        config_from_dict(raw, "t")


@pytest.mark.parametrize("name", ["airbench94.yaml", "airbench94_muon.yaml", "airbench94_muon_16ep.yaml"])
def test_shipped_airbench_configs_build_airbench_s_network(name):
    from vggtrain.config import load_config

    cfg = load_config(name)
    model = build_model(cfg.model)
    # airbench's CifarNet: 2x2 whitening (288 fixed weights + 24 biases), three groups of two
    # bias-free 3x3 convolutions (64, 256, 256), BN with fixed weights, a 256 -> 10 head.
    convs = [(c.in_channels, c.out_channels) for c in model.convs()]
    assert convs == [(24, 64), (64, 64), (64, 256), (256, 256), (256, 256), (256, 256)]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    filters = sum(c.weight.numel() for c in model.convs())
    bn_biases = 64 * 2 + 256 * 4
    assert trainable == filters + bn_biases + 24 + 256 * 10 + 10  # + whitening bias, head (+ its bias)
    assert cfg.model.whiten == "2x2" and cfg.data.flip == "alternating" and cfg.train.tta == "multicrop"
