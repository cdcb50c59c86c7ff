"""Data beyond CIFAR-10 (issue 22): CIFAR-100 with fine or coarse labels, both layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import md5, serve_as_download, tiny_config, write_yaml
from vggtrain.cli import main
from vggtrain.config import DataConfig, config_from_dict
from vggtrain.data import load_cifar100, load_dataset
from vggtrain.errors import ConfigError, DataError
from vggtrain.synthetic import write_synthetic_cifar100


@pytest.fixture(scope="module")
def cifar100(tmp_path_factory):
    root = tmp_path_factory.mktemp("c100")
    write_synthetic_cifar100(root / "py", "py", train_size=1000, test_size=400, seed=2)
    write_synthetic_cifar100(root / "bin", "bin", train_size=1000, test_size=400, seed=2)
    return root


def test_cifar100_both_layouts_fine_and_coarse(cifar100):
    for labels, classes in (("fine", 100), ("coarse", 20)):
        py = load_cifar100(cifar100 / "py", labels=labels)
        binary = load_cifar100(cifar100 / "bin", labels=labels)
        for a, b in zip(py[:2], binary[:2], strict=True):
            assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        assert len(py[0]) == 1000 and len(py[1]) == 400 and len(py[2]) == classes == len(binary[2])
        assert py[2][0] == f"{labels}_00" and int(py[0].labels.max()) < classes
    fine, coarse = load_cifar100(cifar100 / "py")[0], load_cifar100(cifar100 / "py", labels="coarse")[0]
    assert torch.equal(coarse.labels, fine.labels // 5)  # the synthetic superclasses
    via_config = load_dataset(DataConfig(dataset="cifar100", root=str(cifar100 / "bin"), labels="coarse"))
    assert torch.equal(via_config[0].labels, coarse.labels)


def test_cifar100_errors_are_one_line(cifar100, tmp_path):
    with pytest.raises(DataError, match="no CIFAR-100 found"):
        load_cifar100(tmp_path)
    with pytest.raises(ConfigError, match="coarse is CIFAR-100's 20 superclasses"):
        config_from_dict({"data": {"labels": "coarse"}}, "t")
    base = tmp_path / "cifar-100-binary"
    base.mkdir()
    (base / "fine_label_names.txt").write_text("a\nb\n")
    (base / "coarse_label_names.txt").write_text("c\n")
    (base / "train.bin").write_bytes((cifar100 / "bin" / "cifar-100-binary" / "train.bin").read_bytes())
    with pytest.raises(DataError, match="train.bin: label .* out of range for 2 classes"):
        load_cifar100(tmp_path)


def test_coarse_labels_never_fall_back_to_the_fine_ones(tmp_path):
    import pickle

    base = write_synthetic_cifar100(tmp_path, "py", train_size=20, test_size=10)
    batch = pickle.loads((base / "train").read_bytes())
    del batch[b"coarse_labels"]
    (base / "train").write_bytes(pickle.dumps(batch, protocol=2))
    assert len(load_cifar100(tmp_path)[0]) == 20  # the fine labels are still there
    with pytest.raises(DataError, match="expected 'coarse_labels'"):
        load_cifar100(tmp_path, labels="coarse")


def test_a_cifar100_run_checks_num_classes_and_evaluates(cifar100, tmp_path, capsys):
    cfg = tiny_config(cifar100 / "py", tmp_path / "runs", train={"epochs": 1})
    cfg["data"].update({"dataset": "cifar100", "labels": "coarse"})
    path = write_yaml(tmp_path / "c100.yaml", cfg)
    assert main(["fit", "--config", str(path)]) == 2
    assert "model.num_classes is 10 but the data" in capsys.readouterr().err
    assert main(["fit", "--config", str(path), "--set", "model.num_classes=20", "--force"]) == 0
    report = json.loads((tmp_path / "runs" / "tiny" / "report.json").read_text())
    assert len(report["per_class"]) == 20 and report["class_names"][0] == "coarse_00"
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(tmp_path / "runs" / "tiny"), "--device", "cpu", "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == report["metrics"]


def test_cifar100_download_fetches_verifies_and_loads(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR100

    base = write_synthetic_cifar100(tmp_path / "src", "py", train_size=50, test_size=10)
    monkeypatch.setattr(CIFAR100, "train_list", [["train", md5(base / "train")]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", md5(base / "test")]])
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": md5(base / "meta")})
    root = tmp_path / "data"
    with serve_as_download(CIFAR100, base, tmp_path, monkeypatch):
        train, test, names = load_cifar100(root, download=True)
    assert len(train) == 50 and len(test) == 10 and len(names) == 100
    assert [p.name for p in root.iterdir()] == ["cifar-100-python"]
    assert torch.equal(load_cifar100(root, download=True)[0].images, train.images)  # found, not fetched
    monkeypatch.setattr(CIFAR100, "test_list", [["test", "0" * 32]])
    with pytest.raises(DataError, match="downloaded CIFAR-100 failed its integrity check: test"), \
            serve_as_download(CIFAR100, base, tmp_path / "again", monkeypatch):
        load_cifar100(tmp_path / "other", download=True)


def test_the_report_stays_readable_at_100_classes(cifar100, tmp_path):
    from PIL import Image

    from vggtrain.fit import fit
    from vggtrain.report import most_confused_classes, most_confused_pairs

    cm = torch.zeros(5, 5, dtype=torch.int64)
    cm[0, 0], cm[1, 2], cm[3, 1], cm[4, 4], cm[2, 1] = 50, 7, 3, 40, 7
    assert most_confused_pairs(cm, 2) == [(1, 2, 7), (2, 1, 7)]
    assert most_confused_pairs(cm, 10) == [(1, 2, 7), (2, 1, 7), (3, 1, 3)]  # no zero cells
    assert most_confused_classes(cm, 2) == [1, 2]

    cfg = tiny_config(cifar100 / "bin", tmp_path / "runs", train={"epochs": 1})
    cfg["data"]["dataset"] = "cifar100"
    cfg["model"]["num_classes"] = 100
    report = fit(config_from_dict(cfg, "t"), tmp_path / "runs" / "tiny")
    run = tmp_path / "runs" / "tiny"
    assert len(report["per_class"]) == 100 and len(report["confusion_matrix"]) == 100  # JSON: all
    md = (run / "report.md").read_text()
    assert "## Most confused pairs" in md and "## Confusion matrix" not in md
    assert sum(line.startswith("| fine_") for line in md.splitlines()) == 100 + min(
        20, len(most_confused_pairs(report["confusion_matrix"], 20)))  # every class, then the pairs
    with Image.open(run / "confusion_matrix.png") as img:
        assert img.width < 1200 and img.height < 1200  # 20 classes drawn, not 100


# --- image folders ----------------------------------------------------------------------------

def _write_folder(root, sizes=((32, 32), (64, 48), (20, 20))):
    """root/{train,test}/<class>/ with PNG and JPEG images of a few sizes; returns the files."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    files = []
    for split, n in (("train", 6), ("test", 3)):
        for name in ["cat", "ant", "bee"]:  # sorted: ant, bee, cat
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                w, h = sizes[i % len(sizes)]
                pixels = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
                path = d / f"{i}.{'png' if i % 2 else 'jpg'}"
                Image.fromarray(pixels).save(path)
                files.append(path)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")  # other extensions: ignored
    (root / "train" / ".hidden").mkdir()
    return files


def test_an_image_folder_decodes_once_into_a_cache(tmp_path, monkeypatch):
    from vggtrain import folder
    from vggtrain.images import read_image, to_model_size

    _write_folder(tmp_path)
    data = DataConfig(dataset="folder", root=str(tmp_path))
    train, test, names = load_dataset(data)
    assert names == ["ant", "bee", "cat"] and len(train) == 18 and len(test) == 9
    assert train.images.dtype == torch.uint8 and train.images.shape == (18, 3, 32, 32)
    assert train.labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    big = tmp_path / "train" / "ant" / "1.png"  # 64x48: resized as a whole, as predict does
    assert torch.equal(train.images[1], to_model_size(read_image(big)))
    assert (tmp_path / folder.CACHE_NAME).is_file()

    def never(files):
        raise AssertionError("decoded again although nothing changed")

    monkeypatch.setattr(folder, "_decode", never)
    again = load_dataset(data)[0]
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)
    monkeypatch.undo()

    # A changed file is decoded again (the cache is keyed by path, size and mtime).
    from PIL import Image

    Image.new("RGB", (32, 32), (255, 0, 0)).save(big)  # train image 1
    changed = load_dataset(data)[0]
    assert (changed.images[1] == torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1)).all()
    assert torch.equal(changed.images[2:], train.images[2:])
    assert torch.equal(changed.images[0], train.images[0])


def test_image_folder_errors_name_the_file(tmp_path):
    files = _write_folder(tmp_path)
    data = DataConfig(dataset="folder", root=str(tmp_path))
    files[4].write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match=rf"{files[4]}: .*"):
        load_dataset(data)
    files[4].unlink()
    (tmp_path / "test" / "dog").mkdir()
    with pytest.raises(DataError, match="class 'dog' is not one of train/'s 3 classes"):
        load_dataset(data)
    with pytest.raises(DataError, match="no train/ directory"):
        load_dataset(DataConfig(dataset="folder", root=str(tmp_path / "test")))


SHARED_ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg75.tar.gz"


@pytest.mark.skipif(not SHARED_ARCHIVE.is_file(), reason=f"{SHARED_ARCHIVE} is not here")
def test_the_shared_jpeg_archive_as_folders_is_the_binary_conversion(tmp_path):
    # The real check: the 60,000 JPEGs read as folders give exactly the tensors of the shared
    # tool's binary conversion (which orders images as sorted file names, then permutes them).
    import subprocess
    import sys
    import tarfile

    import numpy as np

    from vggtrain.data import load_cifar10

    with tarfile.open(SHARED_ARCHIVE) as tar:
        tar.extractall(tmp_path / "folders", filter="data")
    tool = SHARED_ARCHIVE.parents[1] / "tools" / "cifar10_from_jpeg.py"
    subprocess.run([sys.executable, str(tool), str(tmp_path / "bin")], check=True, capture_output=True)
    train, test, names = load_dataset(DataConfig(dataset="folder", root=str(tmp_path / "folders")))
    ref_train, ref_test, ref_names = load_cifar10(tmp_path / "bin")
    rng = np.random.default_rng(20091)  # the tool's own permutation
    for ours, ref in ((train, ref_train), (test, ref_test)):
        p = torch.from_numpy(rng.permutation(len(ours)))
        assert torch.equal(ours.images[p], ref.images) and torch.equal(ours.labels[p], ref.labels)
    assert names == ref_names


# --- normalisation per dataset --------------------------------------------------------------------

def test_measured_stats_match_torch():
    from vggtrain.data import measure_stats

    images = torch.randint(0, 256, (12_000, 3, 4, 4), dtype=torch.uint8)  # more than one chunk
    std, mean = torch.std_mean(images.double().div(255).transpose(0, 1).reshape(3, -1), dim=1, correction=0)
    got = measure_stats(images)
    assert got[0] == pytest.approx(mean.tolist(), abs=2e-6)
    assert got[1] == pytest.approx(std.tolist(), abs=2e-6)


def test_each_dataset_is_normalised_with_its_own_stats_everywhere(tmp_path, capsys):
    from vggtrain.checkpoint import load_checkpoint
    from vggtrain.data import (
        CIFAR100_MEAN,
        CIFAR100_STD,
        measure_stats,
        norm_stats,
        normalize,
        split_train_val,
    )
    from vggtrain.evaluate import eval_settings
    from vggtrain.images import read_image, to_model_size
    from vggtrain.inference import load_model

    c100 = config_from_dict({"data": {"dataset": "cifar100"}}, "t")
    assert eval_settings(c100, torch.device("cpu")).stats == (CIFAR100_MEAN, CIFAR100_STD)
    with pytest.raises(ConfigError, match="data.mean and data.std are set together"):
        config_from_dict({"data": {"mean": [0.5, 0.5, 0.5]}}, "t")

    # A folder run measures its training split's stats and stores them with the run.
    _write_folder(tmp_path / "imgs")
    cfg = tiny_config(tmp_path / "imgs", tmp_path / "runs", train={"epochs": 1, "batch_size": 5})
    cfg["data"].update({"dataset": "folder", "val_size": 3})
    cfg["model"]["num_classes"] = 3
    assert main(["fit", "--config", str(write_yaml(tmp_path / "f.yaml", cfg))]) == 0
    run = tmp_path / "runs" / "tiny"
    train, _, _ = load_dataset(DataConfig(dataset="folder", root=str(tmp_path / "imgs")))
    measured = measure_stats(split_train_val(train, 3, 0)[0].images)
    stored = load_checkpoint(run / "best.pt")["config"]["data"]
    assert (tuple(stored["mean"]), tuple(stored["std"])) == measured != norm_stats(DataConfig())
    assert "mean:" in (run / "config.yaml").read_text()
    # predict feeds the model what it was trained on
    image = tmp_path / "imgs" / "test" / "bee" / "1.png"
    capsys.readouterr()
    assert main(["predict", "--ckpt", str(run), str(image), "--device", "cpu", "--topk", "3",
                 "--json", "-"]) == 0
    top = json.loads(capsys.readouterr().out)["predictions"][0]["top"]
    model = load_model(run / "best.pt").model
    with torch.no_grad():
        want = torch.softmax(model(normalize(to_model_size(read_image(image))[None], stats=measured)), 1)[0]
    probs = [t["prob"] for t in sorted(top, key=lambda t: t["index"])]
    assert probs == pytest.approx(want.tolist(), abs=1e-5)
    # and a resume with the same config file keeps the measured stats (null there means the run's)
    assert main(["fit", "--config", str(tmp_path / "f.yaml"), "--resume", "--set", "train.epochs=2"]) == 0
    assert load_checkpoint(run / "last.pt")["config"]["data"]["mean"] == list(measured[0])
