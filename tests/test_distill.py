"""Knowledge distillation (distill.teachers, distill.py): the loss against a hand-computed one, the
teachers' average and normalisation, the checks before a run directory exists, exact resume with
a teacher, a sync-free step, and alpha 0 equal to no distillation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import die_after_mid_epoch_checkpoint, tiny_config, write_yaml
from vggtrain.checkpoint import load_checkpoint, save_checkpoint
from vggtrain.cli import main
from vggtrain.config import config_from_dict, load_config
from vggtrain.data import CIFAR10_STATS, CIFAR100_MEAN, CIFAR100_STD, Split, normalize
from vggtrain.distill import DistillationLoss, Teacher, Teachers, open_teachers
from vggtrain.fit import fit
from vggtrain.run import build_run
from vggtrain.stepcount import count_step
from vggtrain.synthetic import write_synthetic_cifar10
from vggtrain.train import train_one_epoch

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("distill")
    write_synthetic_cifar10(root / "c10", "bin", per_batch=80, test_size=100, seed=2)
    return root


def _cfg(root: Path, out: Path, name: str, **sections) -> dict:
    sections["train"] = {"epochs": 1, "batch_size": 40, **sections.get("train", {})}
    sections["data"] = {"val_size": 80, **sections.get("data", {})}
    return tiny_config(root / "c10", out, name=name, **sections)


@pytest.fixture(scope="module")
def teacher(data) -> Path:
    """A trained run with a weight EMA (the weights a teacher is built with)."""
    raw = _cfg(data, data / "runs", "teacher", optim={"ema_decay": 0.9})
    assert main(["fit", "--config", str(write_yaml(data / "teacher.yaml", raw))]) == 0
    return data / "runs" / "teacher"


def _checkpoint(tmp: Path, name: str, classes: int, class_names: list[str], **model) -> Path:
    """An untrained run's checkpoint: a teacher of another class count or other classes."""
    raw = tiny_config(tmp, tmp, model={"num_classes": classes, **model})
    run = build_run(config_from_dict(raw, "t"), tmp / name, class_names, 100)
    save_checkpoint(tmp / f"{name}.pt", run.state())
    return tmp / f"{name}.pt"


def test_the_loss_equals_a_hand_computed_one():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.3, -2.0]])
    teacher = torch.tensor([[3.0, 0.0, 1.0], [-1.0, 2.0, 0.0]])
    labels = torch.tensor([0, 2])
    alpha, t, smoothing = 0.7, 3.0, 0.1
    usual = nn.CrossEntropyLoss(label_smoothing=smoothing)
    soft = torch.softmax(teacher / t, 1)
    got = DistillationLoss(usual, alpha, t)(logits, (labels, soft))

    d = logits.double()
    target = torch.full((2, 3), smoothing / 3, dtype=torch.float64)
    target[torch.arange(2), labels] += 1 - smoothing
    ce = -(target * d.log_softmax(1)).sum(1).mean()
    p = (teacher.double() / t).exp() / (teacher.double() / t).exp().sum(1, keepdim=True)
    q = (d / t).exp() / (d / t).exp().sum(1, keepdim=True)
    kl = (p * (p / q).log()).sum(1).mean()
    assert got.item() == pytest.approx(((1 - alpha) * ce + alpha * t * t * kl).item(), rel=1e-6)
    # MixUp/CutMix's target probabilities go to the usual term as they are
    mixed = torch.tensor([[0.6, 0.4, 0.0], [0.0, 0.3, 0.7]])
    got = DistillationLoss(nn.CrossEntropyLoss(), alpha, t)(logits, (mixed, soft))
    ce = -(mixed.double() * d.log_softmax(1)).sum(1).mean()
    assert got.item() == pytest.approx(((1 - alpha) * ce + alpha * t * t * kl).item(), rel=1e-6)


class Fixed(nn.Module):
    """A stand-in teacher: the same logits whatever the batch."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits


class ChannelMeans(nn.Module):
    """A stand-in teacher of 3 classes that shows what it was given: each channel's mean."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3))


def _teachers(models: list[nn.Module], stats: list, t: float = 2.0) -> Teachers:
    members = [Teacher(Path(f"t{i}"), m, s, "", "", "raw") for i, (m, s) in enumerate(zip(models, stats,
                                                                                          strict=True))]
    return Teachers(members, 0.5, t).place(torch.device("cpu"), False, CIFAR10_STATS, "fp32")


def test_two_teachers_soft_targets_are_their_probabilities_averaged():
    a, b = torch.tensor([[4.0, 0.0, -1.0]]), torch.tensor([[0.0, 2.0, 1.0]])
    soft = _teachers([Fixed(a), Fixed(b)], [CIFAR10_STATS] * 2).soft_targets(torch.zeros(1, 3, 4, 4))
    torch.testing.assert_close(soft, (torch.softmax(a / 2, 1) + torch.softmax(b / 2, 1)) / 2)
    assert soft.sum().item() == pytest.approx(1.0)


def test_teachers_run_under_the_runs_autocast_and_give_float32_targets():
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5))
    x = torch.randn(2, 3, 6, 6)
    conv(x)
    fp32 = _teachers([conv], [CIFAR10_STATS]).soft_targets(x)
    bf16 = Teachers(_teachers([conv], [CIFAR10_STATS]).members, 0.5, 2.0).place(
        torch.device("cpu"), False, CIFAR10_STATS, "bf16").soft_targets(x)
    assert fp32.dtype == bf16.dtype == torch.float32 and not torch.equal(fp32, bf16)
    torch.testing.assert_close(bf16, fp32, atol=0.02, rtol=0)
    assert not any(p.requires_grad for p in conv.parameters()) and not conv.training


def test_a_teacher_trained_with_other_normalisation_sees_the_batch_normalised_its_way():
    pixels = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    x = normalize(pixels, stats=CIFAR10_STATS)  # the run's batch
    theirs = (CIFAR100_MEAN, CIFAR100_STD)
    soft = _teachers([ChannelMeans()], [theirs], t=1.0).soft_targets(x)
    expected = torch.softmax(normalize(pixels, stats=theirs).mean((2, 3)), 1)
    torch.testing.assert_close(soft, expected)
    same = _teachers([ChannelMeans()], [CIFAR10_STATS], t=1.0)
    assert same.members[0].renorm is None  # the same normalisation: the batch as it is


def test_a_teacher_with_other_classes_is_refused_in_one_line_with_no_run_directory(data, teacher, tmp_path,
                                                                                   capsys):
    twenty = _checkpoint(tmp_path, "twenty", 20, [str(i) for i in range(20)])
    raw = _cfg(data, tmp_path / "runs", "s", distill={"teachers": [str(teacher), str(twenty)]})
    assert main(["fit", "--config", str(write_yaml(tmp_path / "s.yaml", raw))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"vggtrain: checkpoint error: distill.teachers {twenty}: it has 20 classes, this run 10 "
                   f"(a teacher predicts the network's own classes)"]
    renamed = _checkpoint(tmp_path, "renamed", 10, NAMES[::-1])  # ten classes, in another order
    raw["distill"]["teachers"] = [str(renamed)]
    assert main(["fit", "--config", str(write_yaml(tmp_path / "s.yaml", raw))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "its classes are ['truck', 'ship'" in err[0]
    raw["distill"]["teachers"] = [str(tmp_path / "nowhere")]
    assert main(["fit", "--config", str(write_yaml(tmp_path / "s.yaml", raw))]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_resume_with_a_teacher_is_exact_and_refuses_a_changed_teacher(data, teacher, tmp_path, monkeypatch,
                                                                      capsys):
    mine = tmp_path / "teacher"
    shutil.copytree(teacher, mine)
    out = tmp_path / "runs"
    base = _cfg(data, out, "whole", train={"checkpoint_every_steps": 3},
                distill={"teachers": [str(mine)], "alpha": 0.6, "temperature": 2.0},
                data={"mixup_alpha": 0.4})
    fit(config_from_dict(base, "t"), test=False)  # the uninterrupted run (no test report: not needed)
    out_text = capsys.readouterr().out
    assert f"distill: teacher {mine / 'best.pt'} (its weight EMA's)" in out_text
    assert "s (teachers " in out_text  # the epoch line's share of the time
    die_after_mid_epoch_checkpoint(monkeypatch)
    assert main(["fit", "--config", str(write_yaml(tmp_path / "b.yaml", {**base, "name": "half"}))]) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert load_checkpoint(out / "half" / "last.pt")["global_step"] == 3

    kept = (mine / "best.pt").read_bytes()
    (mine / "best.pt").write_bytes(kept + b"\0")  # the teacher's file changed since the run started
    assert main(["fit", "--resume", str(out / "half")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"distill.teachers {mine / 'best.pt'}: the file changed since this run " \
        "started" in err[0]
    (mine / "best.pt").write_bytes(kept)
    checkpoint = load_checkpoint(out / "half" / "last.pt")
    (mine / "best.pt").rename(mine / "moved.pt")
    assert main(["fit", "--resume", str(out / "half")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"distill.teachers {mine / 'best.pt'}: no such file" in err[0]
    (mine / "moved.pt").rename(mine / "best.pt")
    assert load_checkpoint(out / "half" / "last.pt")["global_step"] == checkpoint["global_step"]
    assert main(["fit", "--resume", str(out / "half")]) == 0

    a, b = load_checkpoint(out / "whole" / "last.pt"), load_checkpoint(out / "half" / "last.pt")
    assert a["epoch"] == b["epoch"] == 1 and a["distill"] == b["distill"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    report = json.loads((out / "half" / "report.json").read_text())
    source = json.loads((teacher / "report.json").read_text())
    assert report["distill"] == a["distill"] == [{
        "path": str(mine / "best.pt"), "config_digest": source["config_digest"],
        "sha256": report["distill"][0]["sha256"], "weights": "ema"}]
    assert report["distill"][0]["sha256"].startswith("sha256:")


def test_a_relative_teacher_missing_on_resume_is_said_missing_not_changed(data, teacher, tmp_path,
                                                                           monkeypatch):
    monkeypatch.chdir(teacher.parent)
    cfg = config_from_dict(_cfg(data, tmp_path, "s", distill={"teachers": ["teacher"]}), "t")
    recorded = open_teachers(cfg, NAMES).record()  # as the run's checkpoint keeps it
    monkeypatch.chdir(tmp_path)  # resumed from another directory
    with pytest.raises(Exception, match=r"distill.teachers teacher: no such file \(a relative "
                       r"path is read from the current directory\)$"):
        open_teachers(cfg, NAMES, recorded)


def test_the_step_with_a_teacher_never_syncs_the_host(teacher, tmp_path):
    cfg = load_config(str(write_yaml(tmp_path / "c.yaml", tiny_config(tmp_path, tmp_path))),
                      ["train.batch_size=16"])
    plain = count_step(cfg)
    cfg.distill.teachers = [str(teacher), str(teacher / "last.pt")]
    distilling = count_step(cfg)
    assert distilling.syncs == plain.syncs == 0, distilling.by_op
    assert distilling.ops > plain.ops + 20  # it counted the teachers' forward


def test_alpha_zero_trains_exactly_as_no_distillation(data, teacher, tmp_path):
    raw = _cfg(data, tmp_path, "a")
    models = []
    for distill in ({}, {"teachers": [str(teacher)], "alpha": 0.0}, {"teachers": [str(teacher)]}):
        cfg = config_from_dict({**raw, "distill": distill}, "t")
        run = build_run(cfg, tmp_path / "a", NAMES, 160, teachers=open_teachers(cfg, NAMES))
        images = torch.randint(0, 256, (160, 3, 32, 32), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(1))
        train_one_epoch(run, Split(images, torch.arange(160) % 10))
        models.append(run.model.state_dict())
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])
    assert not all(torch.equal(models[0][k], models[2][k]) for k in models[0])  # alpha 0.5: it counts


def test_cuda_graphs_fall_back_to_the_eager_step_with_teachers(tmp_path):
    from types import SimpleNamespace

    from vggtrain import distributed, graphs

    cfg = config_from_dict(tiny_config(tmp_path, tmp_path, train={"cuda_graphs": True}), "t")
    on_cuda = SimpleNamespace(cfg=cfg, device=torch.device("cuda"), dist=distributed.SINGLE)
    assert graphs.why_not(on_cuda) is None
    cfg.distill.teachers = ["runs/t"]
    assert graphs.why_not(on_cuda).startswith("not with distill.teachers")


def test_a_teacher_that_did_not_hold_out_the_students_validation_images_is_said(data, teacher, tmp_path):
    """The teacher ran with seed 0 and 80 validation images: a student of seed 1 validates on
    others (said), one with data.val_seed 0 on the same (nothing said), and so does one of fewer
    (the first 40 of the same draw); one of more is told; one without a validation split is not."""
    from vggtrain.data import ValidationDraw
    from vggtrain.distill import notes

    def said(**sections) -> list[str]:
        raw = _cfg(data, tmp_path, "s", distill={"teachers": [str(teacher)]}, **sections)
        cfg = config_from_dict(raw, "s")
        lines = notes(open_teachers(cfg, NAMES), ValidationDraw.of(cfg.data, cfg.seed))
        return [line for line in lines if "did not hold out all this run's validation images" in line]

    assert len(said(seed=1)) == 1 and str(teacher / "best.pt") in said(seed=1)[0]
    assert said(seed=1, data={"val_seed": 0}) == [] and said() == []
    assert said(data={"val_size": 40}) == [] and said(seed=1, data={"val_seed": 0, "val_size": 40}) == []
    assert said(data={"val_size": 120}) != [] and said(data={"val_size": 0}) == []
