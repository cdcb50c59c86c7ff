"""Hostile input, round two (issue 40): every file someone else may have written is read through
one boundary (vggtrain.safeio) and every image through one decoder (images.read_image).

Each refused case: exit 2 (74 for a full disk), at most three lines on stderr and no traceback,
nothing escaped raw to the terminal, no payload run, no user file changed or removed, no run
directory begun, and no hang (a reader that blocks is stopped by an alarm and fails the test).
Everything runs in process on tiny files: FIFOs, /dev/zero, sparse "huge" files take no time.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from conftest import tiny_config, write_yaml
from vggtrain import export
from vggtrain.checkpoint import save_checkpoint
from vggtrain.cli import main
from vggtrain.config import DataConfig, config_from_dict
from vggtrain.data import load_dataset
from vggtrain.model import build_model

pytestmark = pytest.mark.skipif(not (hasattr(os, "mkfifo") and os.path.exists("/dev/zero")),
                                reason="needs POSIX FIFOs and /dev/zero")

NAMES = ["ant", "bee"]
ESC = "\x1b]0;owned\x07\x1b[2J"  # sets a terminal's title, clears its screen
BAD_BYTE = "\udcff"  # the byte 0xff of a file name, as os.fsdecode gives it


class Hung(BaseException):
    """Not an Exception: run_reporting_errors must not turn it into an exit code."""


@pytest.fixture(autouse=True)
def bounded():
    """A reader that blocks (a FIFO opened without O_NONBLOCK) fails the test instead of hanging it."""
    def hung(signum, frame):
        raise Hung("blocked for 60 s")

    before = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, before)


# --- helpers ----------------------------------------------------------------------------------------

def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under root (links and FIFOs not followed): mode, size, mtime."""
    out = {}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            st = os.lstat(os.path.join(top, name))
            out[os.path.join(top, name)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def run_cli(capfd, argv: list[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    captured = capfd.readouterr()  # file descriptors 1 and 2: a C library's chatter too
    return code, captured.out, captured.err


def refused(capfd, argv: list[str], root: Path, expect: str = "", code: int = 2, lines: int = 1) -> str:
    """Run argv; it must exit code with at most `lines` (<= 3) lines on stderr naming `expect`,
    and leave everything under root as it was."""
    before = snapshot(root)
    got, out, err = run_cli(capfd, argv)
    assert got == code, (argv, got, err)
    assert 1 <= err.count("\n") <= lines <= 3 and "Traceback" not in err, err
    assert "\x1b" not in err + out and "\x07" not in err + out, err
    assert expect in err, (expect, err)
    assert snapshot(root) == before, "a file was changed, added or removed"
    return err


def specials(d: Path) -> dict[str, Path]:
    """Files no reader should open, or read to the end: a FIFO, a symlink to /dev/zero, a directory,
    and a 3 GB file (sparse: no disk used)."""
    d.mkdir(parents=True, exist_ok=True)
    os.mkfifo(d / "fifo.yaml")
    (d / "zero.yaml").symlink_to("/dev/zero")
    (d / "dir.yaml").mkdir()
    with open(d / "huge.yaml", "wb") as f:
        f.truncate(3 << 30)
    return {"fifo": d / "fifo.yaml", "zero": d / "zero.yaml", "huge": d / "huge.yaml"}


SPECIAL_MESSAGES = {"fifo": "a FIFO (named pipe), not a regular file", "zero": "a character device",
                    "huge": "more than such a file may hold"}


def png(path: Path, size: tuple[int, int] = (32, 32), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="PNG")
    return path


def chatty_tiff(path: Path) -> Path:
    """An LZW TIFF whose compressed strip is garbage: libtiff writes "Using code not yet in table"
    straight to file descriptor 2 before Pillow raises."""
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path, compression="tiff_lzw")
    with Image.open(path) as im:
        offset, length = im.tag_v2[273][0], im.tag_v2[279][0]
    data = bytearray(path.read_bytes())
    data[offset:offset + length] = b"\xff" * length
    path.write_bytes(bytes(data))
    return path


def dds_unknown_format(path: Path) -> Path:
    """A DirectDraw Surface with a pixel format Pillow does not know: NotImplementedError."""
    import struct

    header = struct.pack("<6I", 0x1007, 4, 4, 16, 0, 1) + bytes(44) + struct.pack("<4I", 32, 0x80000, 0, 32)
    path.write_bytes(b"DDS " + struct.pack("<I", 124) + header + bytes(36) + bytes(64))
    return path


def blp_bad_compression(path: Path) -> Path:
    """A Blizzard Mipmap whose compression field is neither JPEG nor raw: BLPFormatError."""
    import struct

    path.write_bytes(b"BLP1" + struct.pack("<iIIIi", 2, 0, 4, 4, 5) + bytes(4) + bytes(2048))
    return path


class _BoomFile(ImageFile.ImageFile):
    """A Pillow plugin that opens its files and fails to decode them with an exception type
    Pillow's own plugins are not known for."""

    format, format_description = "BOOM", "a plugin that cannot decode"

    def _open(self) -> None:
        if self.fp.read(4) != b"BOOM":
            raise SyntaxError("not a BOOM file")
        self._mode, self._size = "RGB", (4, 4)

    def load(self):
        raise NotImplementedError("this plugin cannot decode its own files")


@pytest.fixture
def boom_plugin(monkeypatch):
    """Registers *.boom with Pillow for the test."""
    Image.init()
    monkeypatch.setitem(Image.OPEN, "BOOM", (_BoomFile, lambda prefix: prefix[:4] == b"BOOM"))
    monkeypatch.setattr(Image, "ID", [*Image.ID, "BOOM"])
    monkeypatch.setitem(Image.EXTENSION, ".boom", "BOOM")


def write_folder(root: Path, per_class: int = 2) -> Path:
    for split in ("train", "test"):
        for k, name in enumerate(NAMES):
            for i in range(per_class):
                png(root / split / name / f"{i}.png", seed=10 * k + i)
    return root


@pytest.fixture(scope="module")
def model_ckpt(tmp_path_factory) -> Path:
    """An untrained two-class checkpoint, as load_model reads one (no training: instant)."""
    d = tmp_path_factory.mktemp("ckpt")
    raw = tiny_config(d / "no-data", d / "runs", model={"num_classes": 2})
    cfg = config_from_dict(raw, "t")
    torch.manual_seed(0)
    state = {"model": build_model(cfg.model).state_dict(), "config": cfg.to_dict(), "class_names": NAMES,
             "epoch": 1}
    save_checkpoint(d / "m.pt", state)
    return d / "m.pt"


def folder_fit_config(tmp_path: Path, root: Path) -> Path:
    cfg = tiny_config(root, tmp_path / "runs", data={"dataset": "folder", "val_size": 1},
                      model={"num_classes": 2}, train={"epochs": 1, "batch_size": 2})
    return write_yaml(tmp_path / "folder.yaml", cfg)


# --- configs, sweep spaces, checkpoints: files that are not files --------------------------------------

@pytest.mark.parametrize("kind", ["fifo", "zero", "huge"])
def test_a_config_that_is_not_a_small_regular_file(kind, tmp_path, capfd):
    path = specials(tmp_path / "s")[kind]
    refused(capfd, ["fit", "--config", str(path)], tmp_path, SPECIAL_MESSAGES[kind])
    refused(capfd, ["summary", "--config", str(path)], tmp_path, SPECIAL_MESSAGES[kind])


@pytest.mark.parametrize("text, expect", [
    ("seed: 2020-01-01\n", "seed must be an integer (got '2020-01-01')"),  # a date is text, not a number
    ("optim:\n  lr: 2020-01-01 10:00:00\n", "optim.lr must be a number"),
    ("seed: " + "9" * 200 + "\n", "an integer of 200 characters"),
    ("model:\n  layers: " + "[" * 40 + "]" * 40 + "\n", "nested more than 32 levels deep"),
    ("a: &a [1]\nb: [" + ", ".join(["*a"] * 1001) + "]\n", "more than 1000 aliases"),
    ("a: &a [1, *a]\n", "an alias inside the value it names"),
    ("!!python/object/apply:os.system ['touch pwned']\n", "could not determine a constructor"),
])
def test_config_yaml_is_bounded_and_typed(text, expect, tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "c.yaml"
    path.write_text(text)
    refused(capfd, ["fit", "--config", str(path)], tmp_path, expect)
    assert not (tmp_path / "pwned").exists()


def test_an_error_never_writes_a_path_raw_to_the_terminal(tmp_path, capfd):
    name = tmp_path / f"x{ESC}{BAD_BYTE}\u202e.yaml"
    err = refused(capfd, ["fit", "--config", str(name)], tmp_path, "no such config file")
    assert "\\x1b]0;owned\\x07\\x1b[2J\\xff\\u202e.yaml" in err


@pytest.mark.parametrize("kind", ["fifo", "zero"])
def test_a_checkpoint_that_is_not_a_regular_file(kind, model_ckpt, tmp_path, capfd):
    path = specials(tmp_path / "s")[kind]
    refused(capfd, ["fit", "--resume", str(path)], tmp_path, "checkpoint error")
    refused(capfd, ["eval", "--ckpt", str(path)], tmp_path, "checkpoint error")


def test_a_compressed_checkpoint_is_refused_before_it_inflates(model_ckpt, tmp_path, capfd):
    import zipfile

    # Deflated, an entry may declare any size: this one inflates to 100 MB from about 100 KB.
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(model_ckpt) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for entry in src.infolist():
            data = src.read(entry)
            dst.writestr(entry.filename, data + bytes(100 << 20) if entry.filename.endswith("/0") else data)
    refused(capfd, ["eval", "--ckpt", str(bomb)], tmp_path, "is compressed or larger than the file")


SPACE_OK = "{type: float, low: 0.01, high: 0.1}"
# Eight anchors, each nine of the one before: 9^8 values once expanded, in 200 bytes.
BOMB = "[&a [x, x, x, x, x, x, x, x, x], " + ", ".join(
    f"&{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefg", "bcdefgh", strict=True)) + "]"


@pytest.mark.parametrize("text, expect", [
    # Written out as JSON for a probe, it would never end: the loader refuses it (it was refused by the
    # space's checks, "choices are at most 1000 plain values", before the loader counted values).
    (f"optim.lr: {{type: categorical, choices: {BOMB}}}\n", "more than 100,000 values once its aliases"),
    (f"optim.lr: {{type: float, low: {BOMB}, high: 0.1}}\n", "more than 100,000 values once its aliases"),
    ("optim.lr: {type: categorical, choices: [" + ", ".join(["0.1"] * 1001) + "]}\n",
     "choices are at most 1000 plain values"),
    ("optim.lr: {type: float, low: 2020-01-01, high: 0.1}\n", "low is not a number ('2020-01-01')"),
    ("train.epochs: {type: int, low: 1, high: 1" + "0" * 200 + "}\n", "an integer of 201 characters"),
    ("optim.lr: {type: float, low: 0.01, high: .inf}\n", "high must be a finite number"),
    ("optim.lr: {type: float, low: .nan, high: 0.1}\n", "low must be a finite number"),
    ("optim.lr: {type: float, low: 0.01, high: 0.1, log: yes please}\n", "log must be true or false"),
    (f"1: {SPACE_OK}\n", "1 is not a dotted config key"),
    ('"optim.lr\\e]0;owned\\a\\e[2J": ' + SPACE_OK + "\n", "is not a dotted config key"),
    (f"optim.lr: {'[' * 40}{']' * 40}\n", "nested more than 32 levels deep"),
    ("optim.lr: !!python/object/apply:os.system ['touch pwned']\n", "could not determine a constructor"),
])
def test_a_hostile_sweep_space_is_one_line_before_any_trial(text, expect, cifar_bin, tmp_path, capfd,
                                                            monkeypatch):
    pytest.importorskip("optuna", reason="the [sweep] extra is not installed")
    monkeypatch.chdir(tmp_path)
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_bin, tmp_path / "runs"))
    space = tmp_path / "space.yaml"
    space.write_text(text)
    refused(capfd, ["sweep", "--config", str(cfg), "--space", str(space), "--trials", "2", "--study", "s"],
            tmp_path, expect)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("url, expect", [("nosuch://db", "NoSuchModuleError"),
                                         ("not a url", "ArgumentError")])
def test_a_storage_that_does_not_open_leaves_no_study_directory(url, expect, cifar_bin, tmp_path, capfd):
    pytest.importorskip("optuna", reason="the [sweep] extra is not installed")
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_bin, tmp_path / "runs"))
    space = write_yaml(tmp_path / "space.yaml", {"optim.lr": {"type": "float", "low": 0.01, "high": 0.1}})
    refused(capfd, ["sweep", "--config", str(cfg), "--space", str(space), "--trials", "2", "--study", "s",
                    "--storage", url], tmp_path, expect)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("kind", ["fifo", "zero", "huge"])
def test_a_sweep_space_that_is_not_a_small_regular_file(kind, cifar_bin, tmp_path, capfd):
    pytest.importorskip("optuna", reason="the [sweep] extra is not installed")
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_bin, tmp_path / "runs"))
    path = specials(tmp_path / "s")[kind]
    refused(capfd, ["sweep", "--config", str(cfg), "--space", str(path), "--trials", "2", "--study", "s"],
            tmp_path, SPECIAL_MESSAGES[kind])


# --- seeds' earlier reports ----------------------------------------------------------------------------

def _seed_reports(cfg: Path, out: Path) -> dict[str, object]:
    from vggtrain.config import load_config
    from vggtrain.report import config_digest

    digest = config_digest(load_config(str(cfg), ["seed=0", "name=seed-0",
                                                  f"train.out_dir={json.dumps(str(out))}"]))
    return {
        "garbage": "not JSON at all",
        "a list": "[]",
        "deep": "[" * 100_000 + "]" * 100_000,
        "digits": '{"config_digest": ' + "9" * 5000 + "}",
        "top1 a string": json.dumps({"config_digest": digest, "metrics": {"top1": "high"}}),
        "top1 above 1": json.dumps({"config_digest": digest, "metrics": {"top1": 7}}),
        "time a list": json.dumps({"config_digest": digest, "metrics": {"top1": 0.5}, "train_time_s": []}),
    }


def test_an_earlier_seeds_damaged_report_is_one_line(cifar_bin, tmp_path, capfd):
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_bin, tmp_path / "runs"))
    seed_dir = tmp_path / "runs" / "tiny-seeds" / "seed-0"
    seed_dir.mkdir(parents=True)
    (seed_dir / "last.pt").write_bytes(b"kept")
    argv = ["seeds", "--config", str(cfg), "--seeds", "1"]
    for what, text in _seed_reports(cfg, seed_dir.parent).items():
        (seed_dir / "report.json").write_text(text)
        err = refused(capfd, argv, tmp_path, f"move {seed_dir} away to run this seed again")
        assert "report.json" in err, what
    (seed_dir / "report.json").unlink()
    os.mkfifo(seed_dir / "report.json")
    refused(capfd, argv, tmp_path, "a FIFO")
    (seed_dir / "report.json").unlink()
    (seed_dir / "report.json").symlink_to("/dev/zero")
    refused(capfd, argv, tmp_path, "a character device")
    assert not (seed_dir.parent / "seeds.json").exists()


# --- runs: lists what it can, never hangs, never writes the terminal's escapes -------------------------

def test_runs_passes_over_files_it_must_not_read_and_escapes_what_it_shows(tmp_path, capfd):
    root = tmp_path / "runs"
    status = {"name": "x", "arch": f"vgg{ESC}", "epoch": 1, "epochs": 2, "state": "running",
              "precision": "fp32", "device": "cpu"}
    for name in ("fifo", "zero", "huge", "deep", "bomb", "digits", f"esc{ESC}", f"bytes{BAD_BYTE}"):
        (root / name).mkdir(parents=True)
        (root / name / "last.pt").write_bytes(b"")  # a run directory by its checkpoint
        (root / name / "status.json").write_text(json.dumps(status))
    for f in ("status.json", "report.json", "config.yaml"):
        (root / "fifo" / f).unlink(missing_ok=True)
        os.mkfifo(root / "fifo" / f)
        (root / "zero" / f).unlink(missing_ok=True)
        (root / "zero" / f).symlink_to("/dev/zero")
    with open(root / "huge" / "report.json", "wb") as f:
        f.truncate(3 << 30)
    (root / "deep" / "status.json").write_text("[" * 100_000 + "]" * 100_000)
    (root / "bomb" / "status.json").unlink()  # so its config.yaml is read: 9^8 values in 200 bytes
    (root / "bomb" / "config.yaml").write_text(f"model:\n  arch: {BOMB}\ntrain:\n  precision: {BOMB}\n")
    (root / "digits" / "status.json").write_text('{"epoch": ' + "9" * 4000 + ', "params": 1e999}')
    before = snapshot(tmp_path)
    code, out, err = run_cli(capfd, ["runs", str(root)])
    assert code == 0 and not err, err
    assert "\x1b" not in out and "\x07" not in out
    assert "esc\\x1b]0;owned\\x07\\x1b[2J" in out and "bytes\\xff" in out and "vgg\\x1b" in out
    assert len(out.splitlines()) == 9  # a header and eight rows: every directory listed
    code, out, err = run_cli(capfd, ["runs", str(root), "--json"])
    assert code == 0 and len(json.loads(out)) == 8
    assert snapshot(tmp_path) == before


def test_force_never_reads_a_fifo_to_decide_what_a_run_is(cifar_bin, tmp_path, capfd):
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_bin, tmp_path / "runs", train={"epochs": 1}))
    precious = tmp_path / "runs" / "tiny"
    precious.mkdir(parents=True)
    (precious / "notes.txt").write_text("mine")
    os.mkfifo(precious / "config.yaml")
    refused(capfd, ["fit", "--config", str(cfg), "--force"], tmp_path, "--force refuses to delete")


# --- image folders -------------------------------------------------------------------------------------

@pytest.mark.parametrize("case, expect", [
    ("fifo", "a FIFO (named pipe), not an image file"),
    ("device", "a character device, not an image file"),
    ("empty train class", "no images of class 'bee' (an empty class cannot be learned"),
    ("test lacks a class", "no images of class 'bee' (every class needs test images"),
    ("test class empty", "no images of class 'bee' (every class needs test images"),
    ("plugin raises", "cannot decode the image (NotImplementedError: this plugin cannot decode"),
    ("dds", "cannot decode the image (NotImplementedError: Unknown pixel format flags"),
    ("blp", "cannot decode the image (BLPFormatError: Unsupported BLP compression"),
    ("libtiff talks", "cannot decode the image (OSError: decoder error"),
    ("bomb", "cannot decode the image (DecompressionBombError"),
])
def test_a_folder_dataset_with_a_bad_file_is_one_line_and_no_run(case, expect, tmp_path, capfd,
                                                                  boom_plugin, monkeypatch):
    root = write_folder(tmp_path / "imgs")
    bee_train, bee_test = root / "train" / "bee", root / "test" / "bee"
    if case == "fifo":
        os.mkfifo(bee_train / "2.png")
    elif case == "device":
        (bee_train / "2.png").symlink_to("/dev/zero")
    elif case == "empty train class":
        for f in bee_train.iterdir():
            f.unlink()
        (bee_train / "notes.txt").write_text("not an image")
    elif case == "test lacks a class":
        for f in bee_test.iterdir():
            f.unlink()
        bee_test.rmdir()
    elif case == "test class empty":
        for f in bee_test.iterdir():
            f.unlink()
    elif case == "plugin raises":
        (bee_train / "2.boom").write_bytes(b"BOOM and more")
    elif case == "dds":
        dds_unknown_format(bee_train / "2.dds")
    elif case == "blp":
        blp_bad_compression(bee_train / "2.blp")
    elif case == "libtiff talks":
        chatty_tiff(bee_train / "2.tif")
    elif case == "bomb":
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 32x32 is over 2x: refused
    cfg = folder_fit_config(tmp_path, root)
    refused(capfd, ["fit", "--config", str(cfg)], tmp_path, expect)
    assert not (tmp_path / "runs").exists()


def test_decoder_warnings_do_not_reach_the_terminal(tmp_path, capfd, monkeypatch):
    import warnings

    root = write_folder(tmp_path / "imgs")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)  # 32x32 = 1024: a DecompressionBombWarning each
    with warnings.catch_warnings(record=True) as shown_warnings:  # what Python would print
        warnings.simplefilter("always")
        train, _, names = load_dataset(DataConfig(dataset="folder", root=str(root)))
    assert len(train) == 4 and names == NAMES and not shown_warnings, shown_warnings
    captured = capfd.readouterr()
    assert not captured.err and not captured.out, captured.err


def test_names_that_are_not_utf8_or_hold_escapes_are_cached_and_shown_escaped(tmp_path, monkeypatch):
    from vggtrain import folder

    root = tmp_path / "imgs"
    for split in ("train", "test"):
        png(root / split / f"caf{BAD_BYTE}" / f"{BAD_BYTE}.png", seed=1)
        png(root / split / f"x{ESC}" / f"{ESC}.png", seed=2)
    data = DataConfig(dataset="folder", root=str(root))
    train, test, names = load_dataset(data)
    assert names == ["caf\\xff", "x\\x1b]0;owned\\x07\\x1b[2J"] and len(train) == len(test) == 2
    names[0].encode("utf-8")  # reports and checkpoints can be written

    def never(files):
        raise AssertionError("decoded again although nothing changed")

    monkeypatch.setattr(folder, "_decode", never)
    again, _, _ = load_dataset(data)  # the cache, keyed by the names' own bytes
    assert torch.equal(again.images, train.images)


def _forged_caches(good: dict) -> dict[str, object]:
    """Caches that carry the right key: anyone can compute it from the files' names and times."""
    wrong_labels = dict(good, train_labels=torch.full_like(good["train_labels"], 99))
    wrong_shape = dict(good, test_images=good["test_images"][:, :, :16])
    wrong_dtype = dict(good, train_labels=good["train_labels"].to(torch.int32))
    negative = dict(good, train_labels=good["train_labels"] - 5)
    floats = dict(good, train_labels=good["train_labels"].float())
    swapped = dict(good, train_labels=good["train_labels"].flip(0))
    return {"labels out of range": wrong_labels, "negative": negative, "float": floats,
            "shape": wrong_shape, "dtype": wrong_dtype,
            "labels not the files'": swapped, "classes": dict(good, classes=["x", "y"])}


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_forged_or_odd_folder_cache_is_decoded_again_not_trusted(tmp_path):
    from vggtrain.folder import CACHE_NAME

    root = write_folder(tmp_path / "imgs")
    data = DataConfig(dataset="folder", root=str(root))
    train, test, _ = load_dataset(data)
    cache = root / CACHE_NAME
    good = torch.load(cache, weights_only=True)
    marker = tmp_path / "pwned"
    for what, forged in _forged_caches(good).items():
        torch.save(forged, cache)
        again, again_test, _ = load_dataset(data)
        assert torch.equal(again.labels, train.labels) and torch.equal(again_test.images, test.images), what
        assert torch.equal(torch.load(cache, weights_only=True)["train_labels"], train.labels), what
    cache.write_bytes(pickle.dumps(_Payload(marker)))
    assert torch.equal(load_dataset(data)[0].labels, train.labels)
    torch.save({"key": good["key"], "x": _Payload(marker)}, cache)
    assert torch.equal(load_dataset(data)[0].labels, train.labels)
    assert not marker.exists()
    for odd in ("fifo", "device", "huge"):
        cache.unlink()
        if odd == "fifo":
            os.mkfifo(cache)
        elif odd == "device":
            cache.symlink_to("/dev/zero")
        else:
            with open(cache, "wb") as f:
                f.truncate(3 << 30)
        assert torch.equal(load_dataset(data)[0].images, train.images), odd
        assert cache.is_file() and not cache.is_symlink() and cache.stat().st_size < 1 << 20, odd


def test_cifar_label_names_that_are_not_a_small_file(cifar_bin, tmp_path, capfd):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(cifar_bin, data)
    meta = data / "cifar-10-batches-bin" / "batches.meta.txt"
    meta.unlink()
    with open(meta, "wb") as f:
        f.truncate(3 << 30)
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(data, tmp_path / "runs"))
    refused(capfd, ["fit", "--config", str(cfg)], tmp_path, "more than such a file may hold")


# --- predict and gradcam: a directory, one bad file skipped, nothing raw on the terminal ---------------

def test_predict_on_a_directory_reports_each_bad_file_and_predicts_the_rest(model_ckpt, tmp_path, capfd,
                                                                           boom_plugin):
    d = tmp_path / "imgs"
    good = [png(d / "a.png"), png(d / "sub" / "b.png", (64, 40), seed=3)]
    (d / "c.boom").write_bytes(b"BOOM!")
    os.mkfifo(d / "d.png")
    chatty_tiff(d / "e.tif")
    (d / ".hidden.png").write_text("skipped, as a folder dataset skips it")
    (d / "notes.txt").write_text("not an image's extension: skipped")
    before = snapshot(tmp_path)
    code, out, err = run_cli(capfd, ["predict", "--ckpt", str(model_ckpt), str(d), "--device", "cpu",
                                     "--json", str(tmp_path / "p.json")])
    assert code == 2 and "Traceback" not in err
    assert [line.split(": ")[0] for line in out.splitlines()] == [str(p) for p in good]
    lines = err.splitlines()
    assert len(lines) == 3, err  # one per bad file, and not a byte of libtiff's own
    assert "c.boom: cannot decode the image (NotImplementedError" in lines[0]
    assert "d.png: a FIFO (named pipe), not a regular file" in lines[1]
    assert "e.tif: cannot decode the image (OSError" in lines[2]
    written = json.loads((tmp_path / "p.json").read_text())
    assert len(written["predictions"]) == 2 and len(written["errors"]) == 3
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.endswith("p.json")} == before


def test_predict_survives_every_decoder_that_raises_its_own_type(model_ckpt, tmp_path, capfd):
    d = tmp_path / "imgs"
    png(d / "a.png")
    dds_unknown_format(d / "b.dds")
    blp_bad_compression(d / "c.blp")
    for args in ([str(d)], [str(d / "b.dds"), str(d / "c.blp"), str(d / "a.png")]):
        code, out, err = run_cli(capfd, ["predict", "--ckpt", str(model_ckpt), *args, "--device", "cpu"])
        assert code == 2 and "Traceback" not in err and err.count("\n") == 2, err
        assert "b.dds: cannot decode the image (NotImplementedError" in err
        assert "c.blp: cannot decode the image (BLPFormatError" in err
        assert out.startswith(f"{d / 'a.png'}: ")
    code, _, err = run_cli(capfd, ["gradcam", "--ckpt", str(model_ckpt), str(d), "--out",
                                   str(tmp_path / "cams"), "--device", "cpu"])
    assert code == 2 and "Traceback" not in err and err.count("\n") == 2, err
    assert [p.name for p in (tmp_path / "cams").iterdir()] == ["a.gradcam.png"]


def test_predict_names_with_escapes_and_bytes_are_shown_escaped(model_ckpt, tmp_path, capfd):
    odd = png(tmp_path / f"{ESC}{BAD_BYTE}.png")
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = run_cli(capfd, ["predict", "--ckpt", str(model_ckpt), str(odd),
                                     str(tmp_path / "zero.png"), str(empty), "--device", "cpu"])
    assert code == 2 and "Traceback" not in err
    assert "\x1b" not in out + err and "\x07" not in out + err
    assert out.startswith(str(tmp_path) + "/\\x1b]0;owned\\x07\\x1b[2J\\xff.png: ")
    assert err.count("\n") == 2 and "a directory without image files" in err and "a character device" in err
    code, out, _ = run_cli(capfd, ["predict", "--ckpt", str(model_ckpt), str(odd), "--json", "-"])
    assert code == 0 and json.loads(out)["predictions"][0]["image"] == str(odd)


def test_gradcam_on_a_directory_skips_the_bad_file(model_ckpt, tmp_path, capfd):
    d = tmp_path / "imgs"
    png(d / "a.png")
    (d / "b.png").write_bytes(png(tmp_path / "whole.png").read_bytes()[:200])  # cut short
    code, out, err = run_cli(capfd, ["gradcam", "--ckpt", str(model_ckpt), str(d), "--out",
                                     str(tmp_path / "cams"), "--device", "cpu"])
    assert code == 2 and err.count("\n") == 1 and "b.png: cannot decode" in err and "Traceback" not in err
    assert [p.name for p in (tmp_path / "cams").iterdir()] == ["a.gradcam.png"]


# --- export: the model and its description replace the old pair together, or not at all -----------------

@pytest.fixture
def old_export(tmp_path) -> tuple[Path, dict[str, bytes]]:
    out = tmp_path / "out" / "model.pt"
    out.parent.mkdir()
    out.write_bytes(b"the previous export")
    Path(f"{out}.json").write_text('{"previous": true}\n')
    return out, {p.name: p.read_bytes() for p in out.parent.iterdir()}


def _unchanged(out: Path, before: dict[str, bytes]) -> None:
    assert {p.name: p.read_bytes() for p in out.parent.iterdir()} == before  # no temp file either


def test_a_full_disk_while_describing_the_export_keeps_the_previous_pair(model_ckpt, old_export, capfd,
                                                                         monkeypatch):
    import errno

    out, before = old_export
    monkeypatch.setattr(export, "RANDOM_IMAGES", 20)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "sidecar_for", full)
    refused(capfd, ["export", "--ckpt", str(model_ckpt), "--format", "torchscript", "--out", str(out)],
            out.parent, "No space left on device", code=74)
    _unchanged(out, before)
    monkeypatch.undo()
    monkeypatch.setattr(export, "RANDOM_IMAGES", 20)
    real = export.load_exported
    monkeypatch.setattr(export, "load_exported", lambda fmt, path: lambda x: real(fmt, path)(x) + 1)
    refused(capfd, ["export", "--ckpt", str(model_ckpt), "--format", "torchscript", "--out", str(out)],
            out.parent, "export refused")
    _unchanged(out, before)


def test_export_never_replaces_its_own_checkpoint_or_a_directory(model_ckpt, tmp_path, capfd):
    import shutil

    ckpt = tmp_path / "m.pt"
    shutil.copy(model_ckpt, ckpt)
    refused(capfd, ["export", "--ckpt", str(ckpt), "--format", "torchscript", "--out", str(ckpt)],
            tmp_path, "is the checkpoint being exported")
    (tmp_path / "m2.pt").write_bytes(b"the user's earlier export")  # kept: snapshot
    (tmp_path / "m2.pt.json").mkdir()
    refused(capfd, ["export", "--ckpt", str(ckpt), "--format", "torchscript", "--out",
                    str(tmp_path / "m2.pt")], tmp_path, "would replace a directory")
    assert (tmp_path / "m2.pt").read_bytes() == b"the user's earlier export"


# --- round two, second pass: every printed line escaped --------------------------------------------------

BIDI = "\u202e"  # RIGHT-TO-LEFT OVERRIDE: reverses what a terminal shows after it
HOSTILE = f"{ESC}{BAD_BYTE}{BIDI}"


def raw_on_terminal(text: str) -> list[str]:
    """What of a terminal's escapes, bidirectional overrides or undecodable bytes text holds."""
    return [c for c in ("\x1b", "\x07", BIDI, BAD_BYTE, "\ufffd") if c in text]


def test_fit_runs_eval_and_resume_print_hostile_paths_escaped(cifar_bin, tmp_path, capfd):
    data = tmp_path / f"data{HOSTILE}"
    data.symlink_to(cifar_bin)
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(data, tmp_path / f"runs{HOSTILE}",
                                                         data={"val_size": 100},
                                                         train={"epochs": 1, "batch_size": 100}))
    # A run directory's path must be UTF-8 (TensorBoard's writer encodes it): refused before any work.
    refused(capfd, ["fit", "--config", str(cfg)], tmp_path, "holds a byte that is not UTF-8")
    out_dir = tmp_path / f"runs{ESC}{BIDI}"
    code, out, err = run_cli(capfd, ["fit", "--config", str(cfg), "--set",
                                     f"train.out_dir={json.dumps(str(out_dir))}"])
    assert code == 0 and not raw_on_terminal(out + err), (out, err)
    assert "runs\\x1b]0;owned\\x07\\x1b[2J\\u202e/tiny" in out  # the "run DIR: ..." header
    run = out_dir / "tiny"
    for argv in (["runs", str(out_dir)], ["eval", "--ckpt", str(run), "--device", "cpu"]):
        code, out, err = run_cli(capfd, argv)
        assert code == 0 and not raw_on_terminal(out + err), (argv, out, err)
    (run / "metrics.csv").write_bytes(b"epoch,loss\n\xff\xfe\n")  # not UTF-8: a warning naming it
    code, out, err = run_cli(capfd, ["fit", "--resume", str(run), "--set", "train.epochs=2"])
    assert code == 0 and "metrics.csv" in err and not raw_on_terminal(out + err), (out, err)
    # A neighbour: a file the resumed run rewrites is not a file (it would fail at the first rename).
    for name, make in (("metrics.csv", os.mkdir), ("status.json", os.mkdir), ("report.json", os.mkfifo)):
        kept = run / name
        os.replace(kept, run / "kept")
        make(kept)
        refused(capfd, ["fit", "--resume", str(run), "--set", "train.epochs=3"], tmp_path,
                f"{name} is a {'FIFO' if make is os.mkfifo else 'directory'}")
        kept.rmdir() if kept.is_dir() else kept.unlink()
        os.replace(run / "kept", kept)


def test_a_warning_naming_a_hostile_path_is_shown_escaped(tmp_path):
    import warnings

    from vggtrain.program import run_reporting_errors

    shown_as = []

    def command() -> int:  # Python's own showwarning formats through warnings.formatwarning
        shown_as.append(warnings.formatwarning(f"cannot delete {tmp_path / HOSTILE}", UserWarning, "x.py", 1))
        return 0

    assert run_reporting_errors("vggtrain", command) == 0
    assert "cannot delete" in shown_as[0] and "\\x1b]0;owned" in shown_as[0], shown_as
    assert not raw_on_terminal(shown_as[0])


def test_sweep_lines_show_hostile_paths_and_choices_escaped(cifar_bin, tmp_path, capfd):
    pytest.importorskip("optuna", reason="the [sweep] extra is not installed")
    out_dir = tmp_path / f"runs{HOSTILE}"
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_bin, out_dir, data={"val_size": 100},
                                                         train={"epochs": 1, "batch_size": 100}))
    space = write_yaml(tmp_path / "space.yaml", {"optim.lr": {"type": "categorical", "choices": [0.05]}})
    code, out, err = run_cli(capfd, ["sweep", "--config", str(cfg), "--space", str(space), "--trials", "1",
                                     "--study", "s"])
    assert not raw_on_terminal(out + err), (out, err)
    assert "study s in sqlite:///" in out and "trial 0: failed (run directory" in out, (out, err)


def test_optunas_own_warnings_are_shown_escaped(capfd):
    pytest.importorskip("optuna", reason="the [sweep] extra is not installed")
    import logging

    from vggtrain.sweep import require_optuna

    require_optuna()
    # Optuna's handler keeps the stream it was made with: in a whole test session that may be an
    # earlier test's captured stderr, so point it at this test's for the check.
    handlers = [h for h in logging.getLogger("optuna").handlers if isinstance(h, logging.StreamHandler)]
    streams = [h.setStream(sys.stderr) for h in handlers]
    try:
        logging.getLogger("optuna.study.study").warning("Trial 0 failed with parameters: %s",
                                                        {"name": HOSTILE})
    finally:
        for h, stream in zip(handlers, streams, strict=True):
            h.setStream(stream)
    err = capfd.readouterr().err
    assert "Trial 0 failed" in err and "\\x1b]0;owned" in err and not raw_on_terminal(err), err


# --- YAML: a document that expands past 100,000 values is refused by the loader itself ------------------

LAUGHS = "\n".join([f"l0: &l0 [{', '.join(['lol'] * 9)}]"] + [
    f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]) + "\n"  # 9^9 values


def test_billion_laughs_is_about_a_kilobyte():
    assert 300 < len(LAUGHS) < 1100


def test_a_billion_laughs_config_is_refused_by_the_loader(tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(LAUGHS)
    refused(capfd, ["fit", "--config", str(cfg)], tmp_path, "more than 100,000 values once its aliases")
    (tmp_path / "base.yaml").write_text(LAUGHS)
    cfg.write_text("base: base.yaml\n")
    refused(capfd, ["summary", "--config", str(cfg)], tmp_path, "more than 100,000 values")
    cfg.write_text("name: x\n")
    refused(capfd, ["summary", "--config", str(cfg), "--set", "model.layers=" + LAUGHS.replace("\n", ", ")
                    .join("{}")], tmp_path, "more than 100,000 values")


@pytest.mark.parametrize("where", ["categorical choices", "a bound"])
def test_a_billion_laughs_sweep_space_is_refused_by_the_loader(where, cifar_bin, tmp_path, capfd):
    pytest.importorskip("optuna", reason="the [sweep] extra is not installed")
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_bin, tmp_path / "runs"))
    inline = LAUGHS.replace("\n", ", ").strip(", ")
    spec = (f"{{type: categorical, choices: [{{{inline}}}]}}" if where == "categorical choices"
            else f"{{type: float, low: {{{inline}}}, high: 0.1}}")
    space = tmp_path / "space.yaml"
    space.write_text(f"optim.lr: {spec}\n")
    refused(capfd, ["sweep", "--config", str(cfg), "--space", str(space), "--trials", "1", "--study", "s"],
            tmp_path, "more than 100,000 values once its aliases are expanded")
    assert not (tmp_path / "runs").exists()


def test_runs_lists_a_run_whose_config_is_a_billion_laughs(tmp_path, capfd):
    run = tmp_path / "runs" / "bomb"
    run.mkdir(parents=True)
    (run / "last.pt").write_bytes(b"")
    (run / "config.yaml").write_text(LAUGHS + "model:\n  arch: *l8\n")
    code, out, err = run_cli(capfd, ["runs", str(tmp_path / "runs")])
    assert code == 0 and not err and len(out.splitlines()) == 2 and "bomb" in out, (out, err)


def test_a_few_aliases_that_share_small_values_still_load():
    from vggtrain.safeio import load_yaml

    text = "a: &a [1, 2, 3]\nb: {x: *a, y: *a}\nc: [" + ", ".join(["*a"] * 900) + "]\n"
    assert load_yaml(text)["c"][899] == [1, 2, 3]


# --- export: the two renames, a failure or a kill between them ------------------------------------------

def _export_argv(ckpt: Path, out: Path) -> list[str]:
    return ["export", "--ckpt", str(ckpt), "--format", "torchscript", "--out", str(out)]


def test_an_export_records_its_file_digest_and_a_mismatch_is_detected(model_ckpt, tmp_path, capfd,
                                                                       monkeypatch):
    monkeypatch.setattr(export, "RANDOM_IMAGES", 20)
    out = tmp_path / "m.pt"
    code, _, err = run_cli(capfd, _export_argv(model_ckpt, out))
    assert code == 0, err
    side = json.loads(Path(f"{out}.json").read_text())
    assert side["file_sha256"] == export.sha256_of(out) and export.pair_problem(out) is None
    out.write_bytes(b"another model")  # as a kill between the renames leaves it: new description, old file
    assert "describes another file than" in export.pair_problem(out)
    Path(f"{out}.json").write_text('{"file": "m.pt"}\n')  # written before the digest was recorded
    assert "records no file_sha256" in export.pair_problem(out)


@pytest.mark.parametrize("fails", ["the model's rename", "the model's rename and the undo"])
def test_a_failure_between_the_two_renames_loses_no_file(fails, model_ckpt, old_export, capfd, monkeypatch):
    import errno

    out, before = old_export
    monkeypatch.setattr(export, "RANDOM_IMAGES", 20)
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(Path(dst).name)
        if len(calls) == 2 or (fails.endswith("undo") and len(calls) == 3):
            raise OSError(errno.EIO, "Input/output error", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    code, _, err = run_cli(capfd, _export_argv(model_ckpt, out))
    assert code == 74 and "Input/output error" in err and "Traceback" not in err, err
    assert calls[:2] == ["model.pt.json", "model.pt"]  # the description first, the model last
    if fails == "the model's rename":
        _unchanged(out, before)  # the description put back: the old pair, whole, and no temp file
        return
    # The undo failed too (as a kill between the renames would leave it): the old model in place, the
    # new description beside it saying it describes another file, the old description kept aside.
    assert out.read_bytes() == b"the previous export"
    assert "describes another file than" in export.pair_problem(out)
    kept = [p for p in out.parent.iterdir() if p.name.endswith(".old")]
    assert [p.read_bytes() for p in kept] == [before["model.pt.json"]]
    assert not [p for p in out.parent.iterdir() if ".tmp" in p.name]


def test_replace_together_puts_every_renamed_file_back(tmp_path, monkeypatch):
    from vggtrain.atomic import replace_together

    paths = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    paths[0].write_text("old a")  # b is new: removed again; c is never reached
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError), replace_together(paths) as temps:
        for t in temps:
            t.write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"] and paths[0].read_text() == "old a"


# --- a hostile Optuna database ----------------------------------------------------------------------------

def _storages(d: Path) -> dict[str, Path]:
    import sqlite3

    import optuna

    d.mkdir()
    (d / "garbage.db").write_bytes(b"\x00garbage\xff" * 100)
    con = sqlite3.connect(d / "unrelated.db")
    con.execute("CREATE TABLE accounts (name TEXT)")
    con.commit()
    con.close()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(study_name="s", storage=f"sqlite:///{d / 'schema.db'}")
    con = sqlite3.connect(d / "schema.db")
    con.execute("UPDATE alembic_version SET version_num = 'v99.0.0'")
    con.commit()
    con.close()
    (d / "dir.db").mkdir()
    os.mkfifo(d / "fifo.db")
    (d / "zero.db").symlink_to("/dev/zero")
    (d / "readonly.db").write_bytes((d / "schema.db").read_bytes())
    (d / "readonly.db").chmod(0o444)
    (d / "locked.db").write_bytes((d / "schema.db").read_bytes())
    return {p.name.split(".")[0]: p for p in d.iterdir()}


STORAGE_MESSAGES = {
    "garbage": "not an SQLite database",
    "unrelated": "an SQLite database of something else (tables accounts)",
    "schema": "no longer compatible with the table schema", "dir": "a directory, not a regular file",
    "fifo": "a FIFO (named pipe), not a regular file", "zero": "a character device",
    "readonly": "read-only", "locked": "locked by another process for more than 0.2 s",
}


def test_a_hostile_optuna_database_is_one_line_and_left_as_it_was(cifar_bin, tmp_path, capfd, monkeypatch):
    pytest.importorskip("optuna", reason="the [sweep] extra is not installed")
    import sqlite3

    from vggtrain import sweep

    monkeypatch.setattr(sweep, "LOCK_WAIT_S", 0.2)
    dbs = _storages(tmp_path / "dbs")
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_bin, tmp_path / "runs"))
    space = write_yaml(tmp_path / "space.yaml", {"optim.lr": {"type": "float", "low": 0.01, "high": 0.1}})
    holder = sqlite3.connect(dbs["locked"], isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process's write, held
    try:
        for kind, expect in STORAGE_MESSAGES.items():
            refused(capfd, ["sweep", "--config", str(cfg), "--space", str(space), "--trials", "1",
                            "--study", "s", "--storage", f"sqlite:///{dbs[kind]}"], tmp_path, expect)
            assert not (tmp_path / "runs").exists(), kind
    finally:
        holder.close()
    refused(capfd, ["sweep", "--config", str(cfg), "--space", str(space), "--trials", "1", "--study", "s",
                    "--storage", f"sqlite:///{tmp_path / 'no' / 'such' / 'x.db'}"], tmp_path,
            "is not a directory this process can write in")


# --- neighbours of the classes above -----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["fifo", "zero", "huge"])
def test_a_base_config_that_is_not_a_small_regular_file(kind, tmp_path, capfd):
    path = specials(tmp_path / "s")[kind]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"base: {path}\n")
    refused(capfd, ["summary", "--config", str(cfg)], tmp_path, SPECIAL_MESSAGES[kind])


def test_init_from_a_file_that_is_no_checkpoint_begins_no_run(model_ckpt, cifar_bin, tmp_path, capfd):
    d = tmp_path / "src"
    d.mkdir()
    (d / "text.pt").write_text("hello")
    os.mkfifo(d / "fifo.pt")
    torch.save({"a": 1}, d / "dict.pt")
    torch.save([1, 2], d / "list.pt")
    (d / "empty").mkdir()
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_bin, tmp_path / "runs", train={"epochs": 1}))
    for name, expect in (("text.pt", "not a checkpoint"), ("fifo.pt", "a FIFO"),
                         ("dict.pt", "no model/config"), ("list.pt", "no model/config"),
                         ("empty", "best.pt: no such file"), ("/dev/zero", "a character device")):
        refused(capfd, ["fit", "--config", str(cfg), "--set", f"init.from={json.dumps(str(d / name))}"],
                tmp_path, expect)
    assert not (tmp_path / "runs").exists()


def _weights_of_the_wrong_kind(ckpt: Path) -> dict[str, dict]:
    state = torch.load(ckpt, weights_only=True)
    key = next(k for k, v in state["model"].items() if v.dim() == 4)
    weight = state["model"][key]
    wrong = {"integers": weight.to(torch.int64), "booleans": weight.bool(),
             "complex": weight.to(torch.complex64), "NaN": torch.full_like(weight, float("nan")),
             "infinity": torch.full_like(weight, float("inf")),
             "a trillion values": torch.zeros(1).expand(1 << 40), "text": "weights"}
    return {what: {**state, "model": {**state["model"], key: value}} for what, value in wrong.items()}


def test_a_checkpoint_whose_weights_are_of_the_wrong_kind_is_one_line(model_ckpt, tmp_path, capfd):
    ckpt = tmp_path / "c.pt"
    for what, state in _weights_of_the_wrong_kind(model_ckpt).items():
        save_checkpoint(ckpt, state)
        expect = {"NaN": "NaN or infinite", "infinity": "NaN or infinite", "a trillion values": "do not fit",
                  "text": "do not fit"}.get(what, "values where the model has torch.float32 weights")
        for argv in (["eval", "--ckpt", str(ckpt), "--device", "cpu"],
                     ["predict", "--ckpt", str(ckpt), str(png(tmp_path / "i" / "a.png")), "--device", "cpu"]):
            refused(capfd, argv, tmp_path, expect)


def test_lr_find_out_that_is_a_directory_is_refused_before_any_step(cifar_bin, tmp_path, capfd):
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_bin, tmp_path / "runs"))
    (tmp_path / "pics").mkdir()
    refused(capfd, ["lr-find", "--config", str(cfg), "--out", str(tmp_path / "pics"), "--steps", "10"],
            tmp_path, "--out")
