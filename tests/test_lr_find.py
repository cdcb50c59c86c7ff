"""`vggtrain lr-find` (issue 43): the range test's suggestion on a problem whose good rate is
known, and the command: its picture, its one-line errors, and no run directory."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch
from PIL import Image

from conftest import block_import, tiny_config, write_yaml
from vggtrain import cli, lr_find
from vggtrain.cli import main
from vggtrain.trainable import optimizer_step


def least_squares(kappa: float, top: float, n: int = 1024, d: int = 32, seed: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(X, y) whose loss ||Xw - y||^2 / 2n has the Hessian X^T X / n with eigenvalues from `top`
    (L) down to top / kappa, spread evenly on a log scale, and a noise floor."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    u, _, _ = torch.linalg.svd(torch.randn(n, d, generator=g), full_matrices=False)  # u^T u = I
    eigenvalues = top * torch.logspace(0, -math.log10(kappa), d)
    x = math.sqrt(n) * u @ torch.diag(eigenvalues.sqrt()) @ q.T
    w = torch.randn(d, generator=g)
    return x, x @ w + 0.1 * torch.randn(n, generator=g)


def range_test_on(x: torch.Tensor, y: torch.Tensor, batch: int) -> lr_find.RangeTest:
    """The command's ramp, scheduler, smoothing and rule, around plain SGD (no momentum) on the
    least-squares loss, each step the one the training loop takes (trainable.optimizer_step)."""
    model = torch.nn.Linear(x.shape[1], 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.0)
    rates = lr_find.ramp(lr_find.DEFAULT_MIN_LR, lr_find.DEFAULT_MAX_LR, lr_find.DEFAULT_STEPS)
    scheduler = lr_find.ramp_scheduler(optimizer, rates, 0.1)
    g = torch.Generator().manual_seed(1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def next_loss() -> float:
        idx = torch.randint(0, len(x), (batch,), generator=g) if batch < len(x) else slice(None)
        loss = 0.5 * ((model(x[idx]).squeeze(1) - y[idx]) ** 2).mean()
        optimizer_step(model, optimizer, scaler, loss)
        scheduler.step()
        return loss.item()

    return lr_find.record(rates, next_loss)


@pytest.mark.parametrize("kappa", [10, 1000])
@pytest.mark.parametrize("batch", [1024, 64])
def test_the_suggestion_is_within_3x_of_the_known_rate_of_least_squares(kappa, batch):
    """SGD on least squares diverges above 2/L and does best near 1/L (L: the Hessian's largest
    eigenvalue); the suggestion lands within a factor of 3 of 1/L, full batch or not."""
    top = 10.0  # 1/L = 0.1, in the middle of the default range
    test = range_test_on(*least_squares(kappa, top), batch)
    assert test.stopped == "diverged" and test.lrs[-1] < lr_find.DEFAULT_MAX_LR
    assert test.lrs == sorted(test.lrs) and len(test.losses) == len(test.smoothed) == len(test.lrs)
    assert 1 / (3 * top) <= test.suggested_lr <= 3 / top, test.suggested_lr
    assert test.suggested_lr < 2 / top  # below the edge: training at it converges


def _lr_find(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["lr-find", *args])
    return code, out.getvalue(), err.getvalue()


def test_the_command_draws_suggests_and_writes_no_run(cifar_bin, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="the [plots] extra is not installed")
    monkeypatch.chdir(tmp_path)
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_bin, tmp_path / "runs"))
    code, out, err = _lr_find("--config", str(cfg), "--steps", "60", "--min-lr", "1e-3", "--max-lr", "3",
                              "--json", "found.json")
    assert code == 0, err
    assert "on cpu, 800 training images" in out  # data.val_size's 200 held out, as fit holds them out
    suggested = json.loads((tmp_path / "found.json").read_text())
    lr = suggested["suggested_lr"]
    assert out.splitlines()[-1] == f"suggested optim.lr: {lr:g} (--set optim.lr={lr:g})"
    assert 1e-3 < lr < 3 and suggested["lrs"] == sorted(suggested["lrs"])
    assert len(suggested["losses"]) == len(suggested["smoothed"]) == len(suggested["lrs"]) <= 60
    # the smoothed loss fell over the ramp: the steps trained the model
    assert min(suggested["smoothed"]) < 0.8 * suggested["smoothed"][0]
    picture = Image.open(tmp_path / "lr_find.png")  # --out's default, in the current directory
    assert picture.format == "PNG" and picture.width > 400
    assert sorted(p.name for p in tmp_path.iterdir()) == ["found.json", "lr_find.png", "tiny.yaml"]
    assert not (tmp_path / "runs").exists()  # no run directory, no weights


def test_json_to_stdout_is_the_json_alone(cifar_bin, tmp_path):
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_bin, tmp_path / "runs"))
    code, out, err = _lr_find("--config", str(cfg), "--steps", "10", "--min-lr", "1e-3", "--max-lr", "0.01",
                              "--out", str(tmp_path / "x.png"), "--json")
    assert code == 0, err
    assert json.loads(out)["schema"] == "vggtrain.lr_find/1" and "suggested optim.lr" in err


@pytest.mark.parametrize("args, message", [
    (["--min-lr", "0"], "0 < --min-lr < --max-lr"),
    (["--min-lr", "1", "--max-lr", "0.1"], "0 < --min-lr < --max-lr"),
    (["--max-lr", "nan"], "0 < --min-lr < --max-lr"),
    (["--steps", "5"], "--steps of at least 10"),
    (["--steps", "0"], "expected a positive integer"),
    (["--out", "."], "--out .: cannot write it"),
    (["--set", "optim.lr=-1"], "optim.lr"),
])
def test_bad_arguments_are_one_line_and_exit_2(cifar_bin, tmp_path, args, message):
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_bin, tmp_path / "runs"))
    with pytest.raises(SystemExit) if args[:2] == ["--steps", "0"] else contextlib.nullcontext() as stopped:
        code, _, err = _lr_find("--config", str(cfg), *args)
    if stopped is not None:  # argparse's own refusal
        assert stopped.value.code == 2
        return
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]


def test_without_matplotlib_nothing_is_drawn(tmp_path, monkeypatch):
    block_import(monkeypatch, "matplotlib")
    test = lr_find.RangeTest([0.1, 0.2], [2.0, 1.0], [2.0, 1.5], "max_lr reached", 0.05)
    assert lr_find.draw(test, tmp_path / "lr.png", "t") is False
    assert not (tmp_path / "lr.png").exists()


def test_the_command_line_defaults_are_the_modules():
    assert (cli.LR_FIND_STEPS, cli.LR_FIND_MIN_LR, cli.LR_FIND_MAX_LR) == \
        (lr_find.DEFAULT_STEPS, lr_find.DEFAULT_MIN_LR, lr_find.DEFAULT_MAX_LR)
