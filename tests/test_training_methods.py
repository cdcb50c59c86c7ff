"""Training methods users of timm, torchvision's references and Lightning expect (issue 21):
schedule kinds, ..."""

from __future__ import annotations

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, MultiStepLR, OneCycleLR

from conftest import tiny_config
from vggtrain.checkpoint import load_checkpoint
from vggtrain.config import ScheduleConfig, config_from_dict
from vggtrain.errors import CheckpointError, ConfigError
from vggtrain.fit import fit
from vggtrain.schedule import lr_factor


def _torch_rates(make, steps: int) -> list[float]:
    """The rate each step of a torch scheduler's run trains with (base rate 1)."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = make(opt)
    rates = []
    for _ in range(steps):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return rates


@pytest.mark.parametrize("kind", ["cosine", "multistep", "onecycle"])
def test_schedule_kinds_give_torchs_rates_step_for_step(kind):
    spe, total = 10, 100
    schedule, reference = {
        "cosine": (ScheduleConfig(kind="cosine", end_factor=0.01),
                   lambda o: CosineAnnealingLR(o, T_max=total, eta_min=0.01)),
        "multistep": (ScheduleConfig(kind="multistep", milestones=[3, 7], gamma=0.2),
                      lambda o: MultiStepLR(o, milestones=[30, 70], gamma=0.2)),
        "onecycle": (ScheduleConfig(kind="onecycle", warmup_epochs=3, start_factor=1 / 25,
                                    end_factor=1 / 25 / 1e4),
                     lambda o: OneCycleLR(o, max_lr=1.0, total_steps=total, pct_start=0.3)),
    }[kind]
    ours = [lr_factor(i, schedule, spe, total) for i in range(total)]
    assert ours == pytest.approx(_torch_rates(reference, total), rel=1e-9, abs=1e-12)


def test_warmup_composes_with_every_kind():
    spe, total = 10, 100
    for kind in ("step", "multistep", "linear", "cosine", "onecycle"):
        s = ScheduleConfig(kind=kind, warmup_epochs=2, start_factor=0.1, milestones=[5], step_size=5)
        ramp = [lr_factor(i, s, spe, total) for i in range(21)]
        assert all(a < b for a, b in zip(ramp[:19], ramp[1:20], strict=True)), kind  # rising ...
        assert ramp[0] <= 0.1 and max(ramp) == pytest.approx(1.0), kind  # ... from low to the peak
        assert lr_factor(total - 1, s, spe, total) < 0.5, kind  # and down again by the end


def test_milestones_are_checked():
    for bad in ([5, 3], [0, 4], [2, 2], ["x"]):
        with pytest.raises(ConfigError, match="milestones"):
            config_from_dict({"schedule": {"kind": "multistep", "milestones": bad}}, "t")


def test_a_cosine_run_trains_at_the_schedules_rate(cifar_bin, tmp_path):
    cfg = config_from_dict(tiny_config(cifar_bin, tmp_path, schedule={"kind": "cosine", "warmup_epochs": 0.5,
                                                                      "end_factor": 0.1},
                                       train={"epochs": 2}), "t")
    fit(cfg, tmp_path / "tiny")
    state = load_checkpoint(tmp_path / "tiny" / "last.pt")
    position = state["global_step"]  # the next step's rate is the one the optimizer holds
    want = cfg.optim.lr * lr_factor(position, cfg.schedule, position // 2, position)
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(want)
    assert want == pytest.approx(cfg.optim.lr * 0.1)


def test_clipping_bounds_the_step_and_logs_the_norm(cifar_bin, tmp_path):
    from conftest import tb_scalars
    from vggtrain.data import normalize
    from vggtrain.run import build_run
    from vggtrain.train import train_step

    def one_step(clip):
        cfg = config_from_dict(tiny_config(cifar_bin, tmp_path, optim={"lr": 1.0, "momentum": 0.0,
                                                                       "weight_decay": 0.0,
                                                                       "clip_grad_norm": clip}), "t")
        run = build_run(cfg, tmp_path, ["x"] * 10, 1000)
        before = [p.detach().clone() for p in run.model.parameters()]
        x = normalize(torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8,
                                    generator=torch.Generator().manual_seed(0)))
        _, _, norm = train_step(run, x, torch.arange(20) % 10, torch.nn.CrossEntropyLoss())
        moved = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, run.model.parameters(),
                                                                       strict=True)])
        return norm, moved

    free_norm, free = one_step(None)
    norm, clipped = one_step(1e-3)
    assert free_norm is None  # lr 1, no momentum: the step is the gradient
    assert float(norm) == pytest.approx(float(free.norm()), rel=1e-4)
    assert float(clipped.norm()) == pytest.approx(1e-3, rel=1e-3)  # the step clipped to the bound
    torch.testing.assert_close(clipped, free * (1e-3 / float(free.norm())))  # same direction

    cfg = config_from_dict(tiny_config(cifar_bin, tmp_path, optim={"clip_grad_norm": 5.0},
                                       train={"epochs": 1}), "t")
    fit(cfg, tmp_path / "clipped")
    logged = tb_scalars(tmp_path / "clipped")["train/grad_norm"]
    steps = load_checkpoint(tmp_path / "clipped" / "last.pt")["global_step"]
    assert [s for s, _ in logged] == list(range(1, steps + 1)) and all(v > 0 for _, v in logged)


def test_adamw_with_the_recipes_parameter_groups(cifar_bin, tmp_path):
    from vggtrain.run import build_run

    cfg = config_from_dict(tiny_config(cifar_bin, tmp_path, optim={
        "name": "adamw", "lr": 1e-3, "momentum": 0.8, "adam_beta2": 0.99, "weight_decay": 0.05,
        "exclude_bn_bias_from_decay": True, "bn_bias_lr_scale": 4.0}), "t")
    opt = build_run(cfg, tmp_path, ["x"] * 10, 1000).optimizer
    assert isinstance(opt, torch.optim.AdamW)
    decayed, plain, fast = opt.param_groups
    assert decayed["betas"] == (0.8, 0.99) and decayed["weight_decay"] == 0.05
    assert plain["weight_decay"] == 0.0 and fast["weight_decay"] == 0.0 and fast["lr"] == pytest.approx(4e-3)
    report = fit(config_from_dict(tiny_config(cifar_bin, tmp_path, optim={"name": "adamw", "lr": 3e-3},
                                              train={"epochs": 2}), "t"), tmp_path / "adamw")
    assert report["test"]["acc"] > 0.3  # ten classes: it learned


def test_weight_ema_averages_each_step_and_is_what_runs_are_tested_with(cifar_bin, tmp_path, capsys):
    import json

    from conftest import tb_scalars
    from vggtrain.checkpoint import model_weights
    from vggtrain.cli import main
    from vggtrain.data import normalize
    from vggtrain.run import build_run
    from vggtrain.train import train_step

    # The average: after each step, ema = d * ema + (1 - d) * weights, BN statistics included.
    cfg = config_from_dict(tiny_config(cifar_bin, tmp_path, optim={"ema_decay": 0.9}), "t")
    run = build_run(cfg, tmp_path, ["x"] * 10, 1000)
    x = normalize(torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8,
                                generator=torch.Generator().manual_seed(0)))
    expected = None
    for _ in range(3):
        train_step(run, x, torch.arange(20) % 10, torch.nn.CrossEntropyLoss())
        run.ema.step()  # what train_one_epoch does after every step
        now = {k: v.detach().clone().float() for k, v in run.model.state_dict().items()
               if v.is_floating_point()}
        expected = now if expected is None else {k: 0.9 * expected[k] + 0.1 * now[k] for k in now}
    ema = model_weights(run.state())[0]
    for k, v in expected.items():
        torch.testing.assert_close(ema[k].float(), v, rtol=1e-5, atol=1e-6)

    # A run: validated both ways, best.pt chosen by the EMA, the report and eval use the EMA.
    cfg = tiny_config(cifar_bin, tmp_path / "runs", optim={"ema_decay": 0.8}, train={"epochs": 2})
    from conftest import write_yaml

    path = write_yaml(tmp_path / "ema.yaml", cfg)
    assert main(["fit", "--config", str(path)]) == 0
    run_dir = tmp_path / "runs" / "tiny"
    tags = tb_scalars(run_dir)
    assert {"val/acc", "val/loss", "val/raw_acc", "val/raw_loss"} <= set(tags)
    best = load_checkpoint(run_dir / "best.pt")
    assert best["best_metric"] == pytest.approx(dict(tags["val/acc"])[best["global_step"]])
    report = json.loads((run_dir / "report.json").read_text())
    assert report["weights"] == "ema"
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(run_dir), "--device", "cpu", "--json", "-"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["weights"] == "ema" and again["metrics"] == report["metrics"]
    # the raw weights give another answer: the EMA is really what was tested
    raw = {**best, "ema": None}
    torch.save(raw, tmp_path / "raw.pt")
    assert main(["eval", "--ckpt", str(tmp_path / "raw.pt"), "--device", "cpu", "--json", "-"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["weights"] == "raw" and plain["metrics"]["loss"] != report["metrics"]["loss"]


def test_weight_ema_resumes_exactly(cifar_bin, tmp_path):
    def cfg(epochs):
        return config_from_dict(tiny_config(cifar_bin, tmp_path, optim={"ema_decay": 0.9},
                                            train={"epochs": epochs}), "t")

    fit(cfg(2), tmp_path / "straight")
    fit(cfg(2), tmp_path / "stopped", on_epoch_end=lambda run: True)  # stops after epoch 1
    first = load_checkpoint(tmp_path / "stopped" / "last.pt")
    assert first["epoch"] == 1 and first["ema"] is not None
    fit(cfg(2), tmp_path / "stopped", resume=(tmp_path / "stopped" / "last.pt", first))
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "stopped" / "last.pt")
    assert b["epoch"] == 2
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    (tmp_path / "no_ema").mkdir()
    without = {**first, "ema": None}  # written with the EMA off
    torch.save(without, tmp_path / "no_ema" / "last.pt")
    with pytest.raises(CheckpointError, match="holds no weight EMA"):
        fit(cfg(2), tmp_path / "no_ema", resume=(tmp_path / "no_ema" / "last.pt", without))


def test_mixup_and_cutmix_mix_images_and_targets_alike():
    from vggtrain.config import DataConfig
    from vggtrain.data import batch_mixer

    assert batch_mixer(DataConfig(), 10) is None
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 32, 32, generator=gen)
    y = torch.arange(16) % 10
    torch.manual_seed(1)
    mixed, target = batch_mixer(DataConfig(mixup_alpha=1.0), 10)(x, y)
    assert target.shape == (16, 10) and torch.allclose(target.sum(1), torch.ones(16))
    lam = float(target[0, y[0]])  # image 0 is mixed with the last one (the batch rolled by one)
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.roll(1, 0))
    mixed, target = batch_mixer(DataConfig(cutmix_alpha=1.0), 10)(x, y)
    own = (mixed == x).all(1).float().mean((1, 2))  # the share of each image's pixels kept
    other = (mixed == x.roll(1, 0)).all(1).float().mean((1, 2))
    assert torch.allclose(own + other, torch.ones(16))
    torch.testing.assert_close(target[torch.arange(16), y], own)
    torch.manual_seed(2)
    either = batch_mixer(DataConfig(mixup_alpha=1.0, cutmix_alpha=1.0, mix_prob=0.5), 10)
    kinds = set()
    for _ in range(40):
        out, t = either(x, y)
        pasted = ((out == x).all(1) | (out == x.roll(1, 0)).all(1)).all()  # every pixel from one image
        kinds.add("none" if t.ndim == 1 else "cutmix" if pasted else "mixup")
    assert kinds == {"none", "mixup", "cutmix"}


def test_a_mixed_run_trains_on_mixed_targets_and_resumes_exactly(cifar_bin, tmp_path, monkeypatch):
    from vggtrain import train as train_module

    seen = []
    real_step = train_module.train_step

    def spy(run, x, target, criterion):
        seen.append(target.ndim)
        return real_step(run, x, target, criterion)

    monkeypatch.setattr(train_module, "train_step", spy)

    def cfg():
        mixing = {"mixup_alpha": 0.4, "cutmix_alpha": 1.0}
        return config_from_dict(tiny_config(cifar_bin, tmp_path, data=mixing, train={"epochs": 2}), "t")

    fit(cfg(), tmp_path / "straight")
    assert set(seen) == {2}  # every step's loss is taken against (B, classes) mixed targets
    fit(cfg(), tmp_path / "stopped", on_epoch_end=lambda run: True)
    first = load_checkpoint(tmp_path / "stopped" / "last.pt")
    fit(cfg(), tmp_path / "stopped", resume=(tmp_path / "stopped" / "last.pt", first))
    a = load_checkpoint(tmp_path / "straight" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "stopped" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
