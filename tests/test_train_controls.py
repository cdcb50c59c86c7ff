"""Issue 43's training controls: train.early_stop (stops at the epoch its rule says, and a run
killed before then and resumed stops at the same one) and train.accum_steps (N batches of b train
as one of N x b, and a run killed mid-epoch resumes bit for bit)."""

from __future__ import annotations

import json
import signal
import types

import pytest
import torch

from conftest import die_after_mid_epoch_checkpoint, tiny_config
from vggtrain import distributed, graphs
from vggtrain import train as train_module
from vggtrain.checkpoint import load_checkpoint
from vggtrain.config import EarlyStopConfig, config_from_dict
from vggtrain.errors import ConfigError, RunStopped, UserError
from vggtrain.fit import fit
from vggtrain.run import EarlyStopState

# The validation accuracy each epoch reports (validate is replaced): it can be predicted exactly.
ACCS = {1: 0.5, 2: 0.5, 3: 0.5, 4: 0.6, 5: 0.6, 6: 0.6, 7: 0.605, 8: 0.7}


@pytest.fixture
def scripted_validation(monkeypatch):
    def validate(run, val):
        return {"loss": 1.0, "acc": ACCS[run.epoch]}

    monkeypatch.setattr(train_module, "validate", validate)


def _cfg(cifar_bin, tmp_path, name: str, early_stop: dict, **train):
    raw = tiny_config(cifar_bin, tmp_path / "runs", name=name,
                      train={"epochs": 8, "batch_size": 200, "early_stop": early_stop, **train})
    return config_from_dict(raw, "test")


@pytest.mark.parametrize("rule, stop", [
    ({"patience": 2}, 3),  # 0.5 at 1, not above it at 2 and 3
    ({"patience": 2, "start_epoch": 2}, 6),  # watched from 3 (0.5): 0.6 at 4, not above it at 5 and 6
    ({"patience": 3, "start_epoch": 3, "min_delta": 0.01}, 7),  # 0.6 at 4; 0.605 at 7 is not 0.01 more
    ({"patience": 3, "start_epoch": 3}, None),  # without min_delta, 0.605 at 7 is an improvement
])
def test_early_stop_fires_at_the_epoch_its_rule_says(rule, stop):
    state, cfg = EarlyStopState(), EarlyStopConfig(**rule)
    stopped = next((epoch for epoch, acc in ACCS.items() if state.update(acc, epoch, cfg)), None)
    assert stopped == stop and state.stopped_epoch == (stop or 0)
    assert bool(state.reason) == (stop is not None)

def test_a_run_killed_before_its_stop_resumes_to_the_same_stop(cifar_bin, tmp_path, monkeypatch, capsys,
                                                               scripted_validation):
    rule = {"patience": 2}  # stops after epoch 3 (above)
    straight = fit(_cfg(cifar_bin, tmp_path, "straight", rule), test=False)
    assert straight["epochs"] == 3
    assert "early stop after epoch 3: validation accuracy not above 50.00% for 2 epoch(s)" in \
        capsys.readouterr().out
    # killed mid-epoch 3 (4 steps an epoch): the counters of epoch 2 come back from that checkpoint
    die_after_mid_epoch_checkpoint(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        fit(_cfg(cifar_bin, tmp_path, "killed", rule, checkpoint_every_steps=2 * 4 + 1), test=False)
    mid = load_checkpoint(tmp_path / "runs" / "killed" / "last.pt")
    assert (mid["epoch"], mid["progress"]["step"]) == (2, 1)
    assert mid["early_stop"] == {"best": 0.5, "wait": 1, "stopped_epoch": 0, "reason": ""}
    monkeypatch.undo()
    monkeypatch.setattr(train_module, "validate", lambda run, val: {"loss": 1.0, "acc": ACCS[run.epoch]})
    assert fit(resume=tmp_path / "runs" / "killed", test=False)["epochs"] == 3
    a, b = (load_checkpoint(tmp_path / "runs" / n / "last.pt") for n in ("straight", "killed"))
    assert a["early_stop"] == b["early_stop"] and a["early_stop"]["stopped_epoch"] == 3
    assert a["global_step"] == b["global_step"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # stopped, without its test report: a resume trains no more and writes the report
    report = fit(resume=tmp_path / "runs" / "straight")
    assert report["epochs"] == 3 and report["stopped_early"]["epoch"] == 3
    assert load_checkpoint(tmp_path / "runs" / "straight" / "last.pt")["global_step"] == a["global_step"]
    on_disk = json.loads((tmp_path / "runs" / "straight" / "report.json").read_text())
    assert on_disk["stopped_early"] == report["stopped_early"]
    assert "| stopped early | after epoch 3: " in (tmp_path / "runs" / "straight" / "report.md").read_text()
    with pytest.raises(UserError, match="stopped early after epoch 3"):  # now it has its report
        fit(resume=tmp_path / "runs" / "straight")

def test_early_stop_needs_a_validation_split(cifar_bin, tmp_path):
    raw = tiny_config(cifar_bin, tmp_path, data={"val_size": 0}, train={"early_stop": {}})
    with pytest.raises(ConfigError, match="train.early_stop needs a validation split"):
        config_from_dict(raw, "run.yaml")
    with pytest.raises(ConfigError, match="train.early_stop.patience must be >= 1"):
        config_from_dict(tiny_config(cifar_bin, tmp_path, train={"early_stop": {"patience": 0}}), "r")
    assert config_from_dict(tiny_config(cifar_bin, tmp_path), "r").train.early_stop is None  # off


def _no_bn(cifar_bin, tmp_path, name: str, batch: int, accum: int, **train):
    """No BatchNorm, dropout or augmentation: a batch's gradient is its images' mean, whatever the split.
    Lookahead, the weight EMA and clipping on: each must go per optimizer step."""
    raw = tiny_config(cifar_bin, tmp_path / "runs", name=name, data={"val_size": 200, "augment": False},
                      model={"batch_norm": False},
                      optim={"lookahead_every": 2, "ema_decay": 0.9, "clip_grad_norm": 1.0},
                      train={"epochs": 2, "batch_size": batch, "accum_steps": accum, **train})
    return config_from_dict(raw, "test")


def test_accumulating_n_batches_of_b_equals_one_batch_of_n_b(cifar_bin, tmp_path):
    fit(_no_bn(cifar_bin, tmp_path, "big", 100, 1), test=False)  # 8 steps an epoch
    fit(_no_bn(cifar_bin, tmp_path, "accum", 25, 4), test=False)  # 32 batches, 8 optimizer steps
    big, accum = (load_checkpoint(tmp_path / "runs" / n / "last.pt") for n in ("big", "accum"))
    assert accum["global_step"] == 4 * big["global_step"] == 64  # the counters count batches
    for key in ("model", "ema"):
        for k, a in big[key].items():
            if a.is_floating_point():
                assert torch.allclose(a, accum[key][k], rtol=1e-4, atol=1e-5), (key, k)
    assert int(big["ema"]["n_averaged"]) == int(accum["ema"]["n_averaged"]) == 16  # per optimizer step
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5)
               for a, b in zip(big["lookahead"], accum["lookahead"], strict=True))
    assert big["optimizer"]["param_groups"][0]["lr"] == accum["optimizer"]["param_groups"][0]["lr"]


def test_an_accumulating_run_killed_mid_epoch_resumes_bit_for_bit(cifar_bin, tmp_path, monkeypatch):
    fit(_no_bn(cifar_bin, tmp_path, "straight", 25, 4), test=False)
    die_after_mid_epoch_checkpoint(monkeypatch)
    with pytest.raises(KeyboardInterrupt):  # at batch 12 of epoch 2: after 3 optimizer steps
        fit(_no_bn(cifar_bin, tmp_path, "killed", 25, 4, checkpoint_every_steps=44), test=False)
    mid = load_checkpoint(tmp_path / "runs" / "killed" / "last.pt")
    assert (mid["epoch"], mid["progress"]["step"]) == (1, 12)
    monkeypatch.undo()
    fit(resume=tmp_path / "runs" / "killed", test=False)
    a, b = (load_checkpoint(tmp_path / "runs" / n / "last.pt") for n in ("straight", "killed"))
    assert a["global_step"] == b["global_step"]
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert all(torch.equal(x, y) for x, y in zip(a["lookahead"], b["lookahead"], strict=True))


def test_accumulation_refuses_what_cannot_work(cifar_bin, tmp_path):
    with pytest.raises(ConfigError, match=r"checkpoint_every_steps \(6\) must be a multiple of "):
        config_from_dict(tiny_config(cifar_bin, tmp_path, train={"accum_steps": 4,
                                                                 "checkpoint_every_steps": 6}), "r")
    with pytest.raises(UserError, match="train.accum_steps 3 must divide the 16 batches of each epoch"):
        fit(config_from_dict(tiny_config(cifar_bin, tmp_path, train={"accum_steps": 3}), "r"))
    assert not (tmp_path / "tiny").exists()
    cfg = config_from_dict(tiny_config(cifar_bin, tmp_path, train={"accum_steps": 2}), "r")
    cuda_run = types.SimpleNamespace(cfg=cfg, device=torch.device("cuda"), dist=distributed.SINGLE)
    assert graphs.why_not(cuda_run) == "not with train.accum_steps > 1 (micro-batch steps differ)"


def test_a_stop_signal_waits_for_the_accumulation_to_end(cifar_bin, tmp_path, monkeypatch):
    real_enter = train_module.StopSignals.__enter__

    def signalled_at_once(self):
        real_enter(self)
        self.signum = signal.SIGINT  # as if Ctrl-C came during the first batch
        return self

    monkeypatch.setattr(train_module.StopSignals, "__enter__", signalled_at_once)
    with pytest.raises(RunStopped, match="stopped by SIGINT at epoch 1, step 4"):
        fit(_no_bn(cifar_bin, tmp_path, "sig", 25, 4), test=False)
    assert load_checkpoint(tmp_path / "runs" / "sig" / "last.pt")["progress"]["step"] == 4
