"""`vggtrain predict` and `vggtrain gradcam` on a tiny model trained on synthetic data (issue 3)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import fit_tiny_run
from vggtrain.cli import main
from vggtrain.data import load_cifar10, normalize
from vggtrain.gradcam import PANEL, find_layer, grad_cam, output_paths, upsample
from vggtrain.images import read_image
from vggtrain.inference import load_model
from vggtrain.predict import SCHEMA
from vggtrain.synthetic import SIGNAL


@pytest.fixture(scope="module")
def run(cifar_bin, tmp_path_factory) -> Path:
    return fit_tiny_run(cifar_bin, tmp_path_factory.mktemp("predict"))


@pytest.fixture(scope="module")
def test_split(cifar_bin):
    _, test, names = load_cifar10(cifar_bin)
    return test, names


@pytest.fixture(scope="module")
def images(test_split, tmp_path_factory) -> dict[str, Path]:
    """One PNG per class (32x32, as CIFAR stores them), a large non-square JPEG, and variants."""
    test, names = test_split
    d = tmp_path_factory.mktemp("images")
    out = {}
    for k in range(10):
        i = int((test.labels == k).nonzero()[0])
        out[names[k]] = d / f"{i}_{names[k]}.png"
        Image.fromarray(test.images[i].permute(1, 2, 0).numpy()).save(out[names[k]])
    i = int((test.labels == 8).nonzero()[1])  # a ship, 5x bigger and stretched
    big = Image.fromarray(test.images[i].permute(1, 2, 0).numpy()).resize((240, 160), Image.NEAREST)
    out["jpeg"] = d / "ship_big.jpg"
    big.save(out["jpeg"], quality=95)
    out["broken"] = d / "broken.png"  # cut short
    out["broken"].write_bytes(out["cat"].read_bytes()[:200])
    out["text"] = d / "notes.jpg"
    out["text"].write_text("not an image")
    return out


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    device = [] if "--device" in args else ["--device", "cpu"]  # where the model was trained
    try:
        code = main([*args, *device])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- predict --------------------------------------------------------------------------------------

def test_predict_prints_topk_per_image(run, images, capsys):
    names = list(images)[:10]
    paths = [str(images[n]) for n in names] + [str(images["jpeg"])]
    code, out, err = _cli(capsys, "predict", "--ckpt", str(run), *paths)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 11
    for line, path, truth in zip(lines, paths, names + ["ship"], strict=True):
        image, _, rest = line.partition(": ")
        top = [part.rsplit(" ", 1) for part in rest.split(", ")]
        assert image == path and len(top) == 3  # --topk defaults to 3
        assert top[0][0] == truth, line
        probs = [float(p.rstrip("%")) for _, p in top]
        assert probs == sorted(probs, reverse=True) and probs[0] > 50


def test_predict_json_schema_and_topk(run, images, tmp_path, capsys):
    out_file = tmp_path / "pred.json"
    code, out, err = _cli(capsys, "predict", "--ckpt", str(run / "best.pt"), str(images["cat"]),
                          "--topk", "20", "--json", str(out_file))
    assert code == 0, err
    data = json.loads(out_file.read_text())
    assert set(data) == {"schema", "checkpoint", "checkpoint_epoch", "weights", "temperature", "class_names",
                         "topk", "predictions", "errors"}
    assert data["temperature"] is None  # without --calibrated
    assert data["schema"] == SCHEMA and data["errors"] == [] and data["topk"] == 20
    (pred,) = data["predictions"]
    assert pred["image"] == str(images["cat"]) and len(pred["top"]) == 10  # all the classes there are
    assert [t["class"] for t in pred["top"]] == [data["class_names"][t["index"]] for t in pred["top"]]
    assert sum(t["prob"] for t in pred["top"]) == pytest.approx(1, abs=1e-5)
    assert pred["top"][0]["class"] == "cat"


def test_predict_sees_what_training_saw(run, test_split, images, capsys):
    """A 32x32 PNG goes through no resize and the training normalisation: same probabilities."""
    test, _ = test_split
    i = int(images["dog"].name.split("_")[0])
    model = load_model(run / "best.pt").model
    with torch.no_grad():
        expected = torch.softmax(model(normalize(test.images[i:i + 1])), 1)[0]
    code, out, _ = _cli(capsys, "predict", "--ckpt", str(run), str(images["dog"]), "--topk", "10",
                        "--json", "-")
    assert code == 0
    top = json.loads(out)["predictions"][0]["top"]
    got = torch.zeros(10)
    for t in top:
        got[t["index"]] = t["prob"]
    assert torch.allclose(got, expected, atol=1e-6)


def test_unreadable_images_are_named_and_the_rest_still_predicted(run, images, tmp_path, capsys):
    missing = tmp_path / "missing.png"
    paths = [str(images["broken"]), str(images["cat"]), str(images["text"]), str(missing), str(images["dog"])]
    code, out, err = _cli(capsys, "predict", "--ckpt", str(run), *paths, "--json", str(tmp_path / "p.json"))
    assert code == 2
    assert [line.split(": ")[0] for line in out.splitlines()] == [str(images["cat"]), str(images["dog"])]
    lines = err.splitlines()
    assert len(lines) == 3 and "Traceback" not in err
    assert lines[0].startswith(f"vggtrain: data error: {images['broken']}: cannot decode")
    assert lines[1].startswith(f"vggtrain: data error: {images['text']}: not an image file")
    assert lines[2] == f"vggtrain: data error: {missing}: no such image file"
    data = json.loads((tmp_path / "p.json").read_text())
    assert [e["image"] for e in data["errors"]] == [paths[0], paths[2], paths[3]]
    assert len(data["predictions"]) == 2


def test_read_image_converts_to_rgb(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("L").save(tmp_path / "grey.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(tmp_path / "grey16.png")
    Image.fromarray(rgb).save(tmp_path / "photo.jpg", quality=95)
    assert torch.equal(read_image(tmp_path / "rgba.png"), torch.from_numpy(rgb).permute(2, 0, 1))
    grey = read_image(tmp_path / "grey.png")
    assert grey.shape == (3, 20, 30) and torch.equal(grey[0], grey[2])
    assert read_image(tmp_path / "palette.png").shape == (3, 20, 30)
    assert int(read_image(tmp_path / "grey16.png").min()) == 255  # scaled, not clipped to garbage
    jpeg = read_image(tmp_path / "photo.jpg")
    assert jpeg.dtype == torch.uint8 and jpeg.shape == (3, 20, 30)


def test_predict_bad_checkpoint(images, tmp_path, capsys):
    code, out, err = _cli(capsys, "predict", "--ckpt", str(tmp_path / "none.pt"), str(images["cat"]))
    assert code == 2 and err.count("\n") == 1 and "no such file" in err and not out


# --- Grad-CAM -------------------------------------------------------------------------------------

def test_gradcam_mass_sits_on_the_signal(run, test_split):
    """The class signal is the square at rows/cols 8..23 (a quarter of the image): Grad-CAM on the
    last conv block must put most of its mass, and its peak, there."""
    test, _ = test_split
    model = load_model(run / "best.pt").model
    name, layer = find_layer(model, None)
    assert name == "conv3_1"  # the tiny net's last convolution
    res = grad_cam(model, test.images[:200], layer)
    assert torch.equal(res.classes, res.probs.argmax(1))
    maps = torch.stack([upsample(c, 32) for c in res.cams])  # at the image's resolution
    inside = maps[:, SIGNAL, SIGNAL].sum((1, 2)) / maps.sum((1, 2))
    assert inside.mean() > 0.45 and inside.min() > 0.3  # vs 0.25 for a map that ignores the image
    peak = maps.flatten(1).argmax(1)
    rows, cols = peak // 32, peak % 32
    in_square = (rows >= 8) & (rows < 24) & (cols >= 8) & (cols < 24)
    assert in_square.float().mean() > 0.95
    # a higher-resolution layer localises more sharply still
    _, layer = find_layer(model, "conv2_1")
    sharp = grad_cam(model, test.images[:200], layer).cams
    assert (sharp[:, 4:12, 4:12].sum((1, 2)) / sharp.sum((1, 2))).mean() > 0.6


def test_gradcam_for_a_chosen_class_differs(run, test_split):
    test, _ = test_split
    model = load_model(run / "best.pt").model
    _, layer = find_layer(model, None)
    x = test.images[:8]
    own = grad_cam(model, x, layer)
    other = grad_cam(model, x, layer, (own.classes + 1) % 10)
    assert torch.equal(other.classes, (own.classes + 1) % 10)
    assert not torch.allclose(own.cams, other.cams)


def _panel_pixel(img: np.ndarray, panel: int, y: int, x: int) -> np.ndarray:
    top, left = 52, 10 + panel * (PANEL + 10)  # the layout overlay_image draws
    return img[top + y, left + x].astype(int)


def test_gradcam_cli_writes_readable_overlays(run, images, tmp_path, capsys):
    out_dir = tmp_path / "cams"
    paths = [str(images["cat"]), str(images["broken"]), str(images["jpeg"])]
    code, out, err = _cli(capsys, "gradcam", "--ckpt", str(run), *paths, "--out", str(out_dir))
    assert code == 2 and err.count("\n") == 1 and str(images["broken"]) in err
    assert sorted(p.name for p in out_dir.iterdir()) == \
        [images["cat"].stem + ".gradcam.png", "ship_big.gradcam.png"]
    lines = out.splitlines()
    assert len(lines) == 2 and "predicted cat" in lines[0] and "Grad-CAM for cat at conv3_1 (8x8)" in lines[0]
    for png in out_dir.iterdir():
        with Image.open(png) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (600, 334)
            arr = np.asarray(im)
        assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 500 and arr.std() > 20
        centre = _panel_pixel(arr, 1, PANEL // 2, PANEL // 2)
        corner = _panel_pixel(arr, 1, 6, 6)
        assert centre[0] > centre[2] + 60, centre  # hot (red) over the signal
        assert corner[2] > corner[0] + 40, corner  # cold (blue) over the noise


def test_gradcam_options_and_errors(run, images, tmp_path, capsys):
    out_dir = tmp_path / "cams"
    code, out, err = _cli(capsys, "gradcam", "--ckpt", str(run), str(images["cat"]), "--out", str(out_dir),
                          "--class", "dog", "--layer", "conv1_1")
    assert code == 0, err
    assert "predicted cat" in out and "Grad-CAM for dog at conv1_1 (32x32)" in out
    code, out, err = _cli(capsys, "gradcam", "--ckpt", str(run), str(images["cat"]), "--out", str(out_dir),
                          "--layer", "features.3")
    assert code == 0 and "at features.3 (16x16)" in out, err
    for args, message in [
        (["--layer", "fc"], "--layer fc: not a convolutional layer of this model (choose one of conv1_1, "
                            "pool1, conv2_1"),
        (["--layer", "conv9_9"], "--layer conv9_9: not a convolutional layer"),
        (["--class", "puma"], "--class puma: not a class of this model (one of airplane, automobile"),
        (["--out", str(images["cat"])], "exists and is not a directory"),
    ]:
        argv = ["gradcam", "--ckpt", str(run), str(images["cat"]), "--out", str(out_dir), *args]
        code, _, err = _cli(capsys, *argv)
        assert code == 2 and err.count("\n") == 1 and message in err, (args, err)


def test_output_names_never_collide(tmp_path):
    paths = ["a/cat.png", "b/cat.png", "cat.jpg", "dog.png"]
    assert [p.name for p in output_paths(paths, tmp_path)] == \
        ["cat.gradcam.png", "cat-2.gradcam.png", "cat-3.gradcam.png", "dog.gradcam.png"]


def test_read_image_applies_exif_orientation(tmp_path):
    # A phone photo stores its pixels sideways plus an EXIF Orientation tag; viewers rotate it,
    # and so must we, or the model sees the image on its side.
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    Image.fromarray(rgb).save(tmp_path / "sideways.png", exif=exif)
    shown = read_image(tmp_path / "sideways.png")
    assert shown.shape == (3, 30, 20)
    assert torch.equal(shown, torch.from_numpy(np.rot90(rgb, k=-1).copy()).permute(2, 0, 1))
