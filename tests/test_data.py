from __future__ import annotations

import os
import pickle
import shutil

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from conftest import tiny_config, write_yaml
from vggtrain.config import DataConfig
from vggtrain.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    Augmentation,
    Split,
    ValidationDraw,
    crop_flip,
    eval_batches,
    load_cifar10,
    normalize,
    run_split,
    split_train_val,
    train_batches,
)
from vggtrain.errors import DataError
from vggtrain.synthetic import CLASS_NAMES


def test_both_layouts_hold_the_same_images(cifar_bin, cifar_py):
    tr_b, te_b, names_b = load_cifar10(cifar_bin)
    tr_p, te_p, names_p = load_cifar10(cifar_py)
    assert names_b == names_p == CLASS_NAMES
    assert tr_b.images.shape == (1000, 3, 32, 32) and tr_b.images.dtype == torch.uint8
    assert te_b.images.shape == (400, 3, 32, 32) and tr_b.labels.dtype == torch.int64
    assert torch.equal(tr_b.images, tr_p.images) and torch.equal(tr_b.labels, tr_p.labels)
    assert torch.equal(te_b.images, te_p.images) and torch.equal(te_b.labels, te_p.labels)


def test_root_may_be_the_layout_directory_itself(cifar_bin):
    train, _, _ = load_cifar10(cifar_bin / "cifar-10-batches-bin")
    assert len(train) == 1000


def _copy(src, tmp_path, layout):
    dst = tmp_path / "root"
    shutil.copytree(src, dst)
    return dst, dst / layout


def test_missing_data_names_the_path(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path}: no CIFAR-10 found .*cifar-10-batches-py"):
        load_cifar10(tmp_path)


def test_missing_batch_file(cifar_bin, tmp_path):
    root, base = _copy(cifar_bin, tmp_path, "cifar-10-batches-bin")
    (base / "data_batch_3.bin").unlink()
    with pytest.raises(DataError, match="data_batch_3.bin: missing"):
        load_cifar10(root)


def test_truncated_binary_batch(cifar_bin, tmp_path):
    root, base = _copy(cifar_bin, tmp_path, "cifar-10-batches-bin")
    path = base / "test_batch.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="test_batch.bin: .* not a whole number of 3073-byte"):
        load_cifar10(root)


def test_oversized_batches_are_refused(cifar_bin, cifar_py, tmp_path):
    root, base = _copy(cifar_bin, tmp_path / "b", "cifar-10-batches-bin")
    with (base / "data_batch_5.bin").open("r+b") as f:
        f.truncate(10_001 * 3073)  # a sparse file: one record more than CIFAR's 10,000
    with pytest.raises(DataError, match="data_batch_5.bin: .* more than a CIFAR-10 binary batch"):
        load_cifar10(root)
    root, base = _copy(cifar_py, tmp_path / "p", "cifar-10-batches-py")
    with (base / "test_batch").open("r+b") as f:
        f.truncate(200_000_000)
    with pytest.raises(DataError, match="test_batch: .* larger than a CIFAR python batch"):
        load_cifar10(root)


@pytest.mark.parametrize("protocol,fill", [(2, 0xFF), (0, ord("\\"))])
def test_full_python_batches_load_in_every_protocol(cifar_py, tmp_path, protocol, fill):
    # Python 3 writes bytes in protocols 0-2 through _codecs.encode: 10,000 images take up to 2x
    # their 30.7 MB in protocol 2 (bytes >= 0x80) and 6x in protocol 0 (backslashes).
    root, base = _copy(cifar_py, tmp_path, "cifar-10-batches-py")
    import numpy as np

    data = np.full((10_000, 3072), fill, dtype=np.uint8)
    batch = {"batch_label": "testing batch 1 of 1", "labels": [i % 10 for i in range(10_000)],
             "data": data, "filenames": [f"image_{i:05d}.png" for i in range(10_000)]}
    (base / "test_batch").write_bytes(pickle.dumps(batch, protocol=protocol))
    assert (base / "test_batch").stat().st_size > 2 * data.nbytes  # beyond the old 32 MB bound
    _, test, _ = load_cifar10(root)
    assert len(test) == 10_000 and int(test.images.min()) == int(test.images.max()) == fill
    assert test.labels[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_label_out_of_range(cifar_bin, tmp_path):
    root, base = _copy(cifar_bin, tmp_path, "cifar-10-batches-bin")
    raw = bytearray((base / "data_batch_1.bin").read_bytes())
    raw[0] = 12
    (base / "data_batch_1.bin").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="label 12 out of range for 10 classes"):
        load_cifar10(root)


def test_truncated_python_batch(cifar_py, tmp_path):
    root, base = _copy(cifar_py, tmp_path, "cifar-10-batches-py")
    path = base / "data_batch_2"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match="data_batch_2: not a CIFAR python batch"):
        load_cifar10(root)


def test_python_batch_with_wrong_dtype(cifar_py, tmp_path):
    import numpy as np

    root, base = _copy(cifar_py, tmp_path, "cifar-10-batches-py")
    bad = {b"data": np.zeros((4, 3072), dtype=np.float32), b"labels": [0, 1, 2, 3]}
    (base / "data_batch_1").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DataError, match="expected 'data' as a uint8 array"):
        load_cifar10(root)


@pytest.mark.parametrize("labels", [[0, 1, 2, 2**70], [0, 1, -1, 3], [0, 1, 2, "3"]])
def test_python_batch_with_labels_that_are_not_class_indices(cifar_py, tmp_path, labels):
    import numpy as np

    root, base = _copy(cifar_py, tmp_path, "cifar-10-batches-py")
    bad = {b"data": np.zeros((4, 3072), dtype=np.uint8), b"labels": labels}
    (base / "data_batch_1").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DataError, match="expected 'labels' as a list of 4 class indices"):
        load_cifar10(root)


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_hostile_pickle_is_refused_without_running(cifar_py, tmp_path):
    root, base = _copy(cifar_py, tmp_path, "cifar-10-batches-py")
    marker = tmp_path / "pwned"
    (base / "data_batch_4").write_bytes(pickle.dumps({b"data": _Payload(marker), b"labels": []}))
    with pytest.raises(DataError, match=r"data_batch_4: .*refusing to load global (posix|os)\.system"):
        load_cifar10(root)
    assert not marker.exists()


def test_download_is_atomic_and_verified(tmp_path, monkeypatch):
    """A download whose files fail the md5 check leaves nothing behind under root."""
    from torchvision.datasets import utils

    def fake_download(url, download_root, filename=None, md5=None, **kw):
        from vggtrain.synthetic import write_synthetic_cifar10

        write_synthetic_cifar10(download_root, "py", per_batch=10, test_size=10)

    monkeypatch.setattr(utils, "download_and_extract_archive", fake_download)
    with pytest.raises(DataError, match="failed its integrity check: data_batch_1"):
        load_cifar10(tmp_path / "data", download=True)
    assert list((tmp_path / "data").iterdir()) == []


def test_download_fetches_verifies_and_loads(tmp_path, monkeypatch):
    """The whole download path, torchvision's fetch, md5 checks and extraction included, against
    a CIFAR-shaped archive served over HTTP from this machine (it has no internet)."""
    from torchvision.datasets import CIFAR10

    from conftest import md5, serve_as_download
    from vggtrain.synthetic import write_synthetic_cifar10

    src = tmp_path / "src"
    base = write_synthetic_cifar10(src, "py", per_batch=10, test_size=10)
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", md5(base / f"data_batch_{i}")]
                                                for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5(base / "test_batch")]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5(base / "batches.meta")})
    root = tmp_path / "data"
    with serve_as_download(CIFAR10, base, tmp_path, monkeypatch):
        train, test, names = load_cifar10(root, download=True)
    assert len(train) == 50 and len(test) == 10 and names == list(CLASS_NAMES)
    assert [p.name for p in root.iterdir()] == [base.name]  # no archive or temp dir left behind
    expected_train, _, _ = load_cifar10(src)
    assert torch.equal(train.images, expected_train.images)
    # the server is gone: a second load must find the data instead of fetching it again
    assert torch.equal(load_cifar10(root, download=True)[0].images, train.images)


def test_a_download_that_loses_the_race_to_another_process_loads_its_data(tmp_path, monkeypatch):
    """Two processes download at once: the second one's rename fails because the first one's
    dataset is in place, and it loads that one instead of failing."""
    from torchvision.datasets import utils

    from vggtrain.synthetic import write_synthetic_cifar10

    root = tmp_path / "data"

    def racing_download(url, download_root, filename=None, md5=None, **kw):
        write_synthetic_cifar10(download_root, "py", per_batch=10, test_size=10)
        write_synthetic_cifar10(root, "py", per_batch=10, test_size=10)  # the other process's

    monkeypatch.setattr(utils, "download_and_extract_archive", racing_download)
    monkeypatch.setattr(utils, "check_integrity", lambda path, md5=None: True)
    train, test, names = load_cifar10(root, download=True)
    assert len(train) == 50 and len(test) == 10 and names == list(CLASS_NAMES)


def test_download_failure_is_a_data_error(tmp_path, monkeypatch):
    from torchvision.datasets import utils

    def offline(*a, **kw):
        raise OSError("Name or service not known")

    monkeypatch.setattr(utils, "download_and_extract_archive", offline)
    with pytest.raises(DataError, match="could not download CIFAR-10 .*Name or service not known"):
        load_cifar10(tmp_path, download=True)


def test_split_is_seeded_and_disjoint(cifar_bin):
    train, _, _ = load_cifar10(cifar_bin)
    tagged = Split(train.images, torch.arange(len(train)))  # labels as ids, to trace images
    a_train, a_val = split_train_val(tagged, 100, seed=3)
    b_train, b_val = split_train_val(tagged, 100, seed=3)
    _, c_val = split_train_val(tagged, 100, seed=4)
    assert torch.equal(a_val.labels, b_val.labels) and not torch.equal(a_val.labels, c_val.labels)
    ids = torch.cat([a_train.labels, a_val.labels]).sort().values
    assert torch.equal(ids, torch.arange(len(train))) and len(a_val) == 100
    assert len(split_train_val(train, 0, seed=0)[1]) == 0
    with pytest.raises(DataError, match="leaves no training images"):
        split_train_val(train, len(train), seed=0)


def test_val_seed_draws_one_validation_split_for_runs_of_every_seed(cifar_bin, tmp_path):
    from vggtrain import distributed
    from vggtrain.cli import main
    from vggtrain.config import config_from_dict
    from vggtrain.eval import checkpoint_split
    from vggtrain.fit import load_data
    from vggtrain.inference import load_model

    train, _, _ = load_cifar10(cifar_bin)
    tagged = Split(train.images, torch.arange(len(train)))
    shared = DataConfig(val_size=100, val_seed=7)
    vals = [run_split(tagged, shared, seed)[1].labels for seed in (0, 5)]
    assert torch.equal(vals[0], vals[1]) and torch.equal(vals[0], split_train_val(tagged, 100, 7)[1].labels)
    own = [run_split(tagged, DataConfig(val_size=100), seed)[1].labels for seed in (0, 5)]
    assert not torch.equal(own[0], own[1])  # without it, each run's seed draws its own
    assert torch.equal(own[1], split_train_val(tagged, 100, 5)[1].labels)
    # a draw of fewer images from the same seed is a subset (ValidationDraw.holds_out relies on it)
    fewer = DataConfig(val_size=40, val_seed=7)
    assert set(run_split(tagged, fewer, 3)[1].labels.tolist()) <= set(vals[0].tolist())
    assert ValidationDraw.of(shared, 0).holds_out(ValidationDraw.of(fewer, 3))
    assert not ValidationDraw.of(fewer, 3).holds_out(ValidationDraw.of(shared, 0))
    assert not ValidationDraw.of(DataConfig(val_size=100), 0).holds_out(ValidationDraw.of(fewer, 3))
    # other classes kept: another set permuted, so another draw; none in common: nothing trained on
    two, other_two = (DataConfig(val_size=100, val_seed=7, classes=c) for c in ([0, 1], [2, 3]))
    assert not ValidationDraw.of(two, 0).holds_out(ValidationDraw.of(shared, 0))
    assert ValidationDraw.of(shared, 0).may_have_trained_on(ValidationDraw.of(two, 0))
    assert ValidationDraw.of(two, 0).may_have_trained_on(ValidationDraw.of(shared, 0))
    assert not ValidationDraw.of(two, 0).may_have_trained_on(ValidationDraw.of(other_two, 0))
    assert not ValidationDraw.of(shared, 0).may_have_trained_on(ValidationDraw.of(fewer, 3))
    # the classes' order keeps the same images; CIFAR-100's fine and coarse labels too, all kept
    reordered = DataConfig(val_size=100, val_seed=7, classes=[1, 0])
    assert ValidationDraw.of(reordered, 0).holds_out(ValidationDraw.of(two, 0))
    fine, coarse = (DataConfig(dataset="cifar100", labels=lb, val_size=100) for lb in ("fine", "coarse"))
    assert ValidationDraw.of(fine, 0).holds_out(ValidationDraw.of(coarse, 0))
    assert ValidationDraw.of(fine, 1).may_have_trained_on(ValidationDraw.of(coarse, 0))
    assert not ValidationDraw.of(fine, 1).may_have_trained_on(ValidationDraw.of(two, 0))  # CIFAR-10's
    fine_two = DataConfig(dataset="cifar100", val_size=100, val_seed=7, classes=[0, 1])
    assert ValidationDraw.of(fine_two, 0).may_have_trained_on(ValidationDraw.of(coarse, 0))
    # a run of seed 1 validates on val_seed 0's images, and eval rebuilds that split from best.pt
    shared_val = tiny_config(cifar_bin, tmp_path / "runs", seed=1, train={"epochs": 1},
                             data={"val_size": 40, "val_seed": 0})
    cfg = write_yaml(tmp_path / "t.yaml", shared_val)
    assert main(["fit", "--config", str(cfg)]) == 0
    rebuilt, _ = checkpoint_split(load_model(tmp_path / "runs" / "tiny" / "best.pt"), "val")
    assert torch.equal(rebuilt.images, split_train_val(train, 40, 0)[1].images)
    fitted_on = load_data(config_from_dict(shared_val, "t"), distributed.SINGLE)[1]  # as fit split it
    assert torch.equal(fitted_on.images, rebuilt.images)
    assert not torch.equal(rebuilt.images, split_train_val(train, 40, 1)[1].images)


def test_crop_flip_matches_per_image_reference():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 32, 32), generator=g, dtype=torch.uint8)
    shifts = torch.randint(0, 9, (16, 2), generator=g)
    flips = torch.randint(0, 2, (16,), generator=g).bool()
    idx = torch.arange(16).flip(0)
    split = Split(images, torch.zeros(16, dtype=torch.int64))
    out = crop_flip(split, idx, shifts, flips)
    assert torch.equal(crop_flip(split, idx, shifts, flips, channels_last=True), out)
    for i in range(16):
        padded = TF.pad(images[idx[i]], [4, 4, 4, 4], fill=0)
        dy, dx = shifts[i].tolist()
        ref = TF.crop(padded, dy, dx, 32, 32)
        if flips[i]:
            ref = TF.horizontal_flip(ref)
        assert torch.equal(out[i], ref), i


def test_normalize_matches_torchvision():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    ref = TF.normalize(TF.to_dtype(images, torch.float32, scale=True), CIFAR10_MEAN, CIFAR10_STD)
    torch.testing.assert_close(normalize(images), ref, rtol=1e-5, atol=1e-5)


def test_normalize_gives_the_floats_of_a_converting_copy_and_two_passes_in_any_layout():
    """normalize (one multiply from the uint8 images from NCHW into channels_last, a converting
    copy and two passes otherwise) gives the floats of x.float() * scale - shift, from NCHW or
    channels_last uint8, into either layout."""
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    scale, shift = 1.0 / (255.0 * std), mean / std
    expected = images.float().mul_(scale).sub_(shift)
    for source in (images, images.contiguous(memory_format=torch.channels_last)):
        for channels_last in (False, True):
            out = normalize(source, channels_last)
            layout = torch.channels_last if channels_last else torch.contiguous_format
            assert torch.equal(out, expected) and out.is_contiguous(memory_format=layout)


def test_train_batches_shuffle_cover_and_repeat(cifar_bin):
    train, _, _ = load_cifar10(cifar_bin)
    tagged = Split(train.images, torch.arange(len(train)))
    first = list(train_batches(tagged, 128, torch.Generator().manual_seed(1)))
    again = list(train_batches(tagged, 128, torch.Generator().manual_seed(1)))
    assert len(first) == 1000 // 128  # the last partial batch is dropped
    seen = torch.cat([y for _, y in first])
    assert len(seen.unique()) == len(seen) == 7 * 128
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    x, _ = first[0]
    assert x.dtype == torch.float32 and x.shape == (128, 3, 32, 32)
    cl = next(train_batches(tagged, 128, torch.Generator().manual_seed(1), channels_last=True))[0]
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, x)

    # Shuffled (not in storage order, and another seed gives another order) and augmented: the same
    # batch without augmentation is the plain normalised images, with it most images differ.
    assert not torch.equal(seen, torch.arange(len(seen)))
    other = torch.cat([y for _, y in train_batches(tagged, 128, torch.Generator().manual_seed(2))])
    assert not torch.equal(other, seen)
    plain, ids = next(train_batches(tagged, 128, torch.Generator().manual_seed(1), aug=None))
    assert torch.equal(ids, first[0][1]) and torch.equal(plain, normalize(train.images[ids]))
    changed = (x != plain).flatten(1).any(1)
    assert changed.float().mean() > 0.9  # only no shift (1 in 81) and no flip (1 in 2) keeps one


def test_cutout_blanks_one_square_per_image_and_changes_nothing_else(cifar_bin):
    train, _, _ = load_cifar10(cifar_bin)
    tagged = Split(train.images, torch.arange(len(train)))
    aug, cut = Augmentation(padding=2), Augmentation(padding=2, cutout=8)
    plain = next(train_batches(tagged, 256, torch.Generator().manual_seed(3), aug))
    x, y = next(train_batches(tagged, 256, torch.Generator().manual_seed(3), cut))
    assert torch.equal(y, plain[1])  # the same images, crops and flips: cutout draws after them
    blank = (x != plain[0]).any(1)  # (B, 32, 32): where the cut changed a pixel
    zero = (x == 0).all(1)
    assert torch.equal(blank & ~zero, torch.zeros_like(blank))  # every changed pixel is the mean
    rows, cols = zero.any(2), zero.any(1)
    for i in range(len(x)):  # one 8x8 square, wholly inside the image
        r, c = rows[i].nonzero().flatten(), cols[i].nonzero().flatten()
        assert r.max() - r.min() == 7 and c.max() - c.min() == 7 and int(zero[i].sum()) == 64, i
    corners = torch.stack([rows.float().argmax(1), cols.float().argmax(1)], 1)
    assert len(corners.unique(dim=0)) > 30  # placed at random
    cl = next(train_batches(tagged, 256, torch.Generator().manual_seed(3), cut, channels_last=True))[0]
    assert torch.equal(cl, x)
    # data.cutout reaches the loop's augmentation; 0 leaves it off
    assert Augmentation.of(DataConfig(cutout=12)).cutout == 12 and Augmentation.of(DataConfig()).cutout == 0


def test_eval_batches_keep_order_and_remainder(cifar_bin):
    _, test, _ = load_cifar10(cifar_bin)
    batches = list(eval_batches(test, 150))
    assert [len(y) for _, y in batches] == [150, 150, 100]
    assert torch.equal(torch.cat([y for _, y in batches]), test.labels)


def test_class_names_that_are_not_utf8_are_read(cifar_py, tmp_path):
    root, base = _copy(cifar_py, tmp_path, "cifar-10-batches-py")
    names = [b"plane\xff"] + [n.encode() for n in CLASS_NAMES[1:]]
    (base / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    _, _, read = load_cifar10(root)
    assert read[0] == "plane\ufffd" and read[1:] == list(CLASS_NAMES[1:])


def test_an_unreadable_batch_is_a_data_error(cifar_bin, tmp_path, monkeypatch):
    root, base = _copy(cifar_bin, tmp_path, "cifar-10-batches-bin")
    real = type(base).read_bytes

    def read_bytes(path):  # tests run as root, where chmod 000 still reads
        if path.name == "data_batch_3.bin":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(type(base), "read_bytes", read_bytes)
    with pytest.raises(DataError, match=r"data_batch_3\.bin: Permission denied"):
        load_cifar10(root)


def test_synthetic_writer_command(tmp_path, capsys):
    from vggtrain.synthetic import main as synthetic_main

    assert synthetic_main([str(tmp_path / "syn"), "--per-batch", "4", "--test-size", "4"]) == 0
    train, test, names = load_cifar10(tmp_path / "syn")
    assert len(train) == 20 and len(test) == 4 and len(names) == 10
    assert not list((tmp_path / "syn").rglob(".*.tmp"))
    (tmp_path / "afile").write_text("x")
    assert synthetic_main([str(tmp_path / "afile" / "syn")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write the dataset there" in err
