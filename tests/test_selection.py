"""Data selection by a proxy network (data.select_keep, airbench96_faster's data filtering)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import die_after_mid_epoch_checkpoint, tiny_config, write_yaml
from vggtrain import train as train_module
from vggtrain.checkpoint import load_checkpoint
from vggtrain.cli import main
from vggtrain.config import config_from_dict
from vggtrain.errors import ConfigError
from vggtrain.selection import build_selector

SELECT = {"select_keep": 0.5, "select_layers": [8, "M", 8, "M"], "select_every": 3}


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_the_model_gets_the_batchs_hardest_examples_and_the_proxy_learns_every_nth_step(tmp_path):
    cfg = config_from_dict(tiny_config(tmp_path, tmp_path, data=SELECT, optim={"label_smoothing": 0.1}), "t")
    torch.manual_seed(0)
    sel = build_selector(cfg, torch.device("cpu"), False, steps_per_epoch=10)
    x, y = torch.randn(20, 3, 32, 32), torch.randint(0, 10, (20,))
    for position in range(7):
        before = _weights(sel.model)
        with torch.no_grad():  # in train mode the proxy's BN uses the batch's statistics: as select does
            losses = F.cross_entropy(sel.model(x), y, reduction="none", label_smoothing=0.1)
        xs, ys = sel.select(x, y, position)
        hardest = losses.topk(10).indices.sort().values
        assert torch.equal(xs, x[hardest]) and torch.equal(ys, y[hardest]), position
        dropped = torch.ones(20, dtype=torch.bool)
        dropped[hardest] = False
        assert losses[hardest].min() >= losses[dropped].max()
        changed = any(not torch.equal(a, b) for a, b in zip(before, _weights(sel.model), strict=True))
        assert changed == (position % 3 == 0), position  # it learns at steps 0, 3, 6 only
    assert sel.scheduler.last_epoch == 7  # its rate follows the run's schedule, step by step


def test_without_selection_there_is_no_proxy(tmp_path):
    cfg = config_from_dict(tiny_config(tmp_path, tmp_path), "t")
    assert cfg.data.select_keep is None
    assert build_selector(cfg, torch.device("cpu"), False, steps_per_epoch=10) is None


def test_a_selecting_run_trains_on_the_kept_fraction_and_resumes_exactly(cifar_bin, tmp_path, monkeypatch):
    out = tmp_path / "runs"
    base = tiny_config(cifar_bin, out, data=SELECT, train={"epochs": 2, "batch_size": 40})
    sizes = []
    real_step = train_module.train_step

    def recording_step(run, x, y, criterion):
        sizes.append(len(x))
        return real_step(run, x, y, criterion)

    monkeypatch.setattr(train_module, "train_step", recording_step)
    assert main(["fit", "--config", str(write_yaml(tmp_path / "a.yaml", {**base, "name": "a"}))]) == 0
    monkeypatch.undo()
    assert sizes == [20] * 40  # 800 training images, batch 40: 20 steps an epoch, 20 images each
    base["train"]["checkpoint_every_steps"] = 13  # a proxy step (every 3rd) is not due at 13
    die_after_mid_epoch_checkpoint(monkeypatch)
    assert main(["fit", "--config", str(write_yaml(tmp_path / "b.yaml", {**base, "name": "b"}))]) == 130
    monkeypatch.undo()
    mid = load_checkpoint(out / "b" / "last.pt")
    assert mid["global_step"] == 13 and mid["selector"] is not None
    assert main(["fit", "--resume", str(out / "b")]) == 0
    a, b = load_checkpoint(out / "a" / "last.pt"), load_checkpoint(out / "b" / "last.pt")
    assert all(torch.equal(u, v) for u, v in zip(a["model"].values(), b["model"].values(), strict=True))
    assert all(torch.equal(u, v) for u, v in zip(a["selector"]["model"].values(),
                                                 b["selector"]["model"].values(), strict=True))
    plain = tiny_config(cifar_bin, out, train={"epochs": 2, "batch_size": 40})
    assert main(["fit", "--config", str(write_yaml(tmp_path / "c.yaml", {**plain, "name": "c"}))]) == 0
    c = load_checkpoint(out / "c" / "last.pt")
    assert c["selector"] is None
    assert not all(torch.equal(u, v) for u, v in zip(a["model"].values(), c["model"].values(), strict=True))


@pytest.mark.parametrize("values, message", [
    ({"select_keep": 0}, r"data.select_keep must be in \(0, 1\] or null"),
    ({"select_keep": 1.5}, r"data.select_keep must be in \(0, 1\] or null"),
    ({"select_every": 0}, "data.select_every must be >= 1"),
    ({"select_layers": ["M"]}, "data.select_layers must contain at least one convolution width"),
])
def test_bad_selection_settings_are_one_line_errors(tmp_path, values, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(tiny_config(tmp_path, tmp_path, data=values), "t")


def test_an_odd_proxy_under_3x3_whitening_is_refused(tmp_path):
    raw = tiny_config(tmp_path, tmp_path, data={"select_keep": 0.5, "select_layers": [7, "M", 8]},
                      model={"layers": [8, "M", 16], "whiten": True})
    with pytest.raises(ConfigError, match="proxy's first convolution to be even"):
        config_from_dict(raw, "t")
