"""A subset of the dataset's classes (data.classes) and a per-class cap on the training images
(data.train_per_class): relabelled in the given order everywhere, the cap exact and seeded, the
validation split drawn before it and disjoint from it, bad input refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_config, write_yaml
from vggtrain import distributed
from vggtrain.cli import main
from vggtrain.config import config_from_dict
from vggtrain.data import load_cifar10, load_dataset, split_train_val
from vggtrain.fit import load_data
from vggtrain.synthetic import write_synthetic_cifar10

VEHICLES = ["airplane", "automobile", "ship", "truck"]  # CIFAR-10's 0, 1, 8, 9


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("subset")
    write_synthetic_cifar10(root, "bin", per_batch=200, test_size=400, seed=3)
    return root


def _cfg(root: Path, out: Path, data: dict, classes: int = 4, **sections):
    raw = tiny_config(root, out, data={"val_size": 200, **data}, model={"num_classes": classes}, **sections)
    raw["model"].update(arch="custom", layers=[8, "M", 16, "M", 16, "M"], global_pool="max")
    return raw


def _rows(split) -> set[bytes]:
    return {bytes(x.flatten().tolist()) for x in split.images}


def test_classes_by_name_or_index_are_relabelled_in_their_order(root):
    full_train, full_test, names = load_cifar10(root)
    cfg = config_from_dict(_cfg(root, root / "runs", {"classes": ["ship", "airplane"]}, 2), "t")
    train, test, subset = load_dataset(cfg.data)
    assert subset == ["ship", "airplane"]
    for full, part in ((full_train, train), (full_test, test)):
        kept = (full.labels == 8) | (full.labels == 0)
        assert torch.equal(part.images, full.images[kept])  # the images' own order
        assert torch.equal(part.labels, (full.labels[kept] == 0).long())  # ship 0, airplane 1
    by_index = config_from_dict(_cfg(root, root / "runs", {"classes": [8, "airplane"]}, 2), "t")
    train2, test2, subset2 = load_dataset(by_index.data)
    assert subset2 == subset and torch.equal(train2.labels, train.labels)
    assert torch.equal(test2.images, test.images)


def test_the_cap_is_exact_seeded_and_drawn_after_a_disjoint_validation_split(root):
    def split(seed: int, cap: int | None):
        cfg = config_from_dict(_cfg(root, root / "runs", {"classes": VEHICLES, "train_per_class": cap},
                                    seed=seed), "t")
        return load_data(cfg, distributed.SINGLE)

    train, val, test, names = split(0, 20)
    assert names == VEHICLES
    assert torch.bincount(train.labels, minlength=4).tolist() == [20] * 4
    assert not _rows(train) & _rows(val)  # no validation image trains
    _, uncapped_val, _, _ = split(0, None)
    assert torch.equal(val.images, uncapped_val.images)  # the cap never moves the validation split
    every = config_from_dict(_cfg(root, root / "runs", {"classes": VEHICLES}), "t")
    all_train, _, _ = load_dataset(every.data)
    assert torch.equal(val.images, split_train_val(all_train, 200, 0)[1].images)  # as eval rebuilds it
    again, _, _, _ = split(0, 20)
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)
    other, other_val, _, _ = split(1, 20)
    assert not torch.equal(other.images, train.images)
    assert not _rows(other) & _rows(other_val)
    assert torch.unique(test.labels).tolist() == [0, 1, 2, 3] and len(test) < 400


def test_a_run_on_a_subset_reports_the_subset(root, tmp_path):
    raw = _cfg(root, tmp_path, {"classes": VEHICLES, "train_per_class": 20}, name="vehicles",
               train={"epochs": 1, "batch_size": 20})
    assert main(["fit", "--config", str(write_yaml(tmp_path / "v.yaml", raw))]) == 0
    report = json.loads((tmp_path / "vehicles" / "report.json").read_text())
    _, full_test, _ = load_cifar10(root)
    vehicles = sum(int((full_test.labels == i).sum()) for i in (0, 1, 8, 9))
    assert report["class_names"] == VEHICLES and report["metrics"]["images"] == vehicles
    assert main(["eval", "--ckpt", str(tmp_path / "vehicles" / "best.pt"), "--split", "val"]) == 0


@pytest.mark.parametrize("data, classes, message", [
    ({"classes": ["airplane", "lorry"]}, 2,
     "config error: data.classes: 'lorry' is not a class of the data (its classes: airplane, automobile"),
    ({"classes": [0, 12]}, 2, "data.classes: index 12 is out of range for the data's 10 classes"),
    ({"classes": [0, "airplane"]}, 2, "data.classes: names a class twice"),
    ({"classes": ["ship", "ship"]}, 2, "data.classes must be two or more distinct class names or indices"),
    ({"classes": ["ship"]}, 2, "data.classes must be two or more distinct class names or indices"),
    ({"classes": VEHICLES}, 10, "model.num_classes is 10 but data.classes names 4 classes"),
    ({"classes": VEHICLES, "train_per_class": 500}, 4,
     "data.train_per_class 500: class 'airplane' has "),
])
def test_bad_classes_or_cap_stop_in_one_line(root, tmp_path, capsys, data, classes, message):
    raw = _cfg(root, tmp_path, data, classes)
    assert main(["fit", "--config", str(write_yaml(tmp_path / "bad.yaml", raw))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "tiny").exists()  # nothing half-made
