"""Fine-tuning (init.from, finetune.py): weights from a trained run, the head re-initialised on a
new class count, frozen layers, the backbone's rate, the record of the start, and exact resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_config, write_yaml
from vggtrain.checkpoint import load_checkpoint, model_weights
from vggtrain.cli import main
from vggtrain.config import config_from_dict, dump_config, load_config
from vggtrain.data import CIFAR100_MEAN, CIFAR100_STD
from vggtrain.errors import ConfigError
from vggtrain.finetune import open_source
from vggtrain.fit import fit
from vggtrain.run import build_run
from vggtrain.synthetic import write_synthetic_cifar10, write_synthetic_cifar100

FROZEN = ["features.0", "features.1"]  # the first convolution and its BatchNorm


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("finetune")
    write_synthetic_cifar10(root / "c10", "bin", per_batch=100, test_size=200, seed=1)
    write_synthetic_cifar100(root / "c100", "py", train_size=500, test_size=200, seed=1)
    return {"c10": root / "c10", "c100": root / "c100", "root": root}


def _cfg(data_root: Path, out: Path, name: str, **sections) -> dict:
    sections.setdefault("train", {})
    sections["train"] = {"epochs": 1, **sections["train"]}
    sections["data"] = {"val_size": 100, **sections.get("data", {})}
    return tiny_config(data_root, out, name=name, **sections)


def _coarse(raw: dict) -> dict:
    """CIFAR-100's 20 superclasses: another class count and another normalisation than CIFAR-10's."""
    raw["data"].update(dataset="cifar100", labels="coarse")
    raw["model"]["num_classes"] = 20
    return raw


@pytest.fixture(scope="module")
def source(data) -> Path:
    """A trained run with a weight EMA, on CIFAR-100's 20 superclasses."""
    raw = _coarse(_cfg(data["c100"], data["root"] / "runs", "source", optim={"ema_decay": 0.9}))
    assert main(["fit", "--config", str(write_yaml(data["root"] / "source.yaml", raw))]) == 0
    return data["root"] / "runs" / "source"


def test_same_classes_load_every_tensor_from_the_source_ema(data, source, tmp_path):
    raw = _coarse(_cfg(data["c100"], tmp_path, "same", init={"from": str(source)},
                       optim={"lr_scale_backbone": 0.1, "bn_bias_lr_scale": 4.0}))
    cfg = config_from_dict(raw, "test")
    start = open_source(cfg)
    assert start.head == [] and not any("re-initialised" in n for n in start.notes)
    run = build_run(cfg, tmp_path / "same", [str(i) for i in range(20)], 400, start=start)
    ema, which = model_weights(load_checkpoint(source / "best.pt"))
    raw_weights = load_checkpoint(source / "best.pt")["model"]
    assert which == "ema"
    mine = run.model.state_dict()
    assert mine.keys() == ema.keys()
    assert all(torch.equal(mine[k], ema[k]) for k in mine)
    assert not all(torch.equal(ema[k], raw_weights[k]) for k in ema)  # the EMA's, not the raw weights
    # Every parameter was loaded: each group at its own rate x 0.1 (the BN biases' x 4 too).
    groups = run.optimizer.param_groups
    assert all(g.get("backbone") for g in groups)
    assert sorted(g["lr"] for g in groups) == pytest.approx([0.005, 0.02])
    assert sum(len(g["params"]) for g in groups) == len(list(run.model.parameters()))


def test_a_new_class_count_reinitialises_the_head_freezes_and_records_the_start(data, source, tmp_path,
                                                                                 capsys):
    raw = _cfg(data["c10"], tmp_path, "ft", init={"from": str(source), "freeze": FROZEN},
               optim={"lr_scale_backbone": 0.1})
    assert main(["fit", "--config", str(write_yaml(tmp_path / "ft.yaml", raw))]) == 0
    out = capsys.readouterr().out
    heads = [ln for ln in out.splitlines() if "re-initialised" in ln]
    assert heads == [f"init: the head (classifier.weight, classifier.bias) re-initialised: "
                     f"{source / 'best.pt'} has 20 classes, this run 10"]
    assert sum("normalising with the source's" in ln for ln in out.splitlines()) == 1
    run = tmp_path / "ft"
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["data"]["mean"] == list(CIFAR100_MEAN) and resolved["data"]["std"] == list(CIFAR100_STD)

    digest = json.loads((source / "report.json").read_text())["config_digest"]
    record = {"from": str(source / "best.pt"), "config_digest": digest,
              "head_reinitialised": ["classifier.weight", "classifier.bias"]}
    assert json.loads((run / "report.json").read_text())["init"] == record
    last = load_checkpoint(run / "last.pt")
    assert last["init"] == record

    ema, _ = model_weights(load_checkpoint(source / "best.pt"))
    frozen = [k for k in ema if k.startswith(("features.0.", "features.1."))]
    assert "features.1.running_mean" in frozen and "features.1.num_batches_tracked" in frozen
    for k in frozen:  # weights and BatchNorm statistics: bit-equal after an epoch of training
        assert torch.equal(last["model"][k], ema[k]), k
    moved = [k for k in ema if k.startswith("features.4.") and not torch.equal(last["model"][k], ema[k])]
    assert moved  # the layers not frozen did train
    # The frozen parameters are in no optimizer group; the loaded ones at lr x 0.1, the head at lr.
    # 14 parameters: 3 convolutions, 3 BatchNorms (weight, bias each), the head; 4 frozen.
    groups = last["optimizer"]["param_groups"]
    assert sorted((bool(g.get("backbone")), len(g["params"]), g["initial_lr"]) for g in groups) == \
        [(False, 2, 0.05), (True, 8, pytest.approx(0.005))]


def test_a_tensor_that_does_not_fit_is_refused_in_one_line_with_no_run_directory(data, source, tmp_path,
                                                                                  capsys):
    raw = _cfg(data["c10"], tmp_path / "runs", "wide", init={"from": str(source)},
               model={"layers": [16, "M", 16, "M", 16, "M"]})
    assert main(["fit", "--config", str(write_yaml(tmp_path / "wide.yaml", raw))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"vggtrain: checkpoint error: init.from {source / 'best.pt'}: features.0.weight is "
                   f"(8, 3, 3, 3) there and (16, 3, 3, 3) here (only the head may differ, when the class "
                   f"count does)"]
    deeper = _cfg(data["c10"], tmp_path / "runs", "deep", init={"from": str(source)},
                  model={"layers": [8, "M", 16, "M", 16, "M", 16]})
    assert main(["fit", "--config", str(write_yaml(tmp_path / "deep.yaml", deeper))]) == 2
    assert "features.12.weight is absent there and (16, 16, 3, 3) here" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_freeze_name_that_names_no_layer_is_refused(data, source, tmp_path, capsys):
    raw = _cfg(data["c10"], tmp_path / "runs", "f", init={"from": str(source), "freeze": ["feature"]})
    assert main(["fit", "--config", str(write_yaml(tmp_path / "f.yaml", raw))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vggtrain: config error: init.freeze: 'feature' names no layer of this model "
                          "(its layers: classifier, features.0, ")
    raw["init"]["freeze"] = ["classifier"]  # the re-initialised head would stay random
    assert main(["fit", "--config", str(write_yaml(tmp_path / "f.yaml", raw))]) == 2
    assert "takes in the re-initialised head" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_source_that_is_not_plain_data_is_refused_by_the_safe_loader(data, tmp_path, capsys):
    torch.save({"model": {}, "config": {}, "code": Path("x")}, tmp_path / "evil.pt")
    raw = _cfg(data["c10"], tmp_path / "runs", "e", init={"from": str(tmp_path / "evil.pt")})
    assert main(["fit", "--config", str(write_yaml(tmp_path / "e.yaml", raw))]) == 2
    assert "refused to load, it is not plain tensors and data" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_resuming_a_fine_tuning_run_is_exact_and_does_not_read_the_source_again(data, source, tmp_path):
    moved = tmp_path / "source"
    shutil.copytree(source, moved)
    init = {"from": str(moved), "freeze": ["features.0"]}
    whole = _cfg(data["c10"], tmp_path, "whole", init=init, train={"epochs": 2},
                 optim={"lr_scale_backbone": 0.5, "ema_decay": 0.9})
    fit(config_from_dict(whole, "test"), test=False)
    half = {**whole, "name": "half", "train": {**whole["train"], "epochs": 1}}
    fit(config_from_dict(half, "test"), test=False)
    shutil.rmtree(moved)  # the resumed run has its weights in last.pt
    fit(resume=tmp_path / "half", overrides=["train.epochs=2"], test=False)
    a, b = load_checkpoint(tmp_path / "whole" / "last.pt"), load_checkpoint(tmp_path / "half" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2 and a["init"] == b["init"]
    assert a["init"]["from"] == str(moved / "best.pt")
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]
                   if isinstance(a[part][k], torch.Tensor))


def test_init_from_is_the_yaml_key_of_a_field_held_as_from_(tmp_path):
    cfg = load_config(str(write_yaml(tmp_path / "c.yaml", {"init": {"from": "runs/a"}})),
                      ["init.freeze=[features.0]"])
    assert cfg.init.from_ == "runs/a" and cfg.init.freeze == ["features.0"]
    assert cfg.to_dict()["init"] == {"from": "runs/a", "freeze": ["features.0"]}
    assert yaml.safe_load(dump_config(cfg))["init"]["from"] == "runs/a"
    assert config_from_dict(cfg.to_dict(), "back").init.from_ == "runs/a"
    with pytest.raises(ConfigError, match=r"unknown key init.from_ \(expected one of: from, freeze\)"):
        load_config(str(tmp_path / "c.yaml"), ["init.from_=runs/b"])


def test_a_source_that_did_not_hold_out_this_runs_validation_images_is_said(data, source, tmp_path):
    """The source ran with its seed and 100 validation images of all 20 classes: a run of another
    seed validates on images the source trained on (said), one with data.val_seed the source's
    seed on the same images (nothing said), and so does one without a validation split."""
    seed = load_checkpoint(source / "best.pt")["config"]["seed"]

    def said(classes: list[int] | None = None, **sections) -> list[str]:
        raw = _coarse(_cfg(data["c100"], tmp_path, "s", init={"from": str(source)}, **sections))
        if classes is not None:
            raw["data"]["classes"], raw["model"]["num_classes"] = classes, len(classes)
        return [n for n in open_source(config_from_dict(raw, "s")).notes
                if "did not hold out all this run's validation images" in n]

    assert said(seed=seed) == [] and said(seed=seed + 1, data={"val_seed": seed}) == []
    assert len(said(seed=seed + 1)) == 1 and str(source / "best.pt") in said(seed=seed + 1)[0]
    assert said(seed=seed + 1, data={"val_size": 0}) == []
    # a run of some of the source's classes validates on images of them the source trained on
    assert said([0, 1], seed=seed) != []


def test_a_fine_tuning_run_resumed_through_its_config_keeps_the_sources_stats(data, source, tmp_path):
    """The run normalises with its source's data.mean/std (CIFAR-100's here, on CIFAR-10): its
    config, resumed with data.mean left null, goes on with them, not CIFAR-10's."""
    raw = _cfg(data["c10"], tmp_path, "ft", init={"from": str(source)})
    config = write_yaml(tmp_path / "ft.yaml", raw)
    assert raw["data"].get("mean") is None and main(["fit", "--config", str(config)]) == 0
    assert main(["fit", "--config", str(config), "--resume", "--set", "train.epochs=2"]) == 0
    last = load_checkpoint(tmp_path / "ft" / "last.pt")
    assert last["epoch"] == 2 and last["config"]["data"]["mean"] == pytest.approx(list(CIFAR100_MEAN))
