"""`vggtrain export` (issue 24): each format runs outside vggtrain's own code, agrees with the
checkpoint, takes any batch size and [0, 1] images; a failed or refused export leaves nothing."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import block_import, tiny_config, write_yaml
from vggtrain import export
from vggtrain.cli import main
from vggtrain.data import load_cifar10, normalize
from vggtrain.inference import load_model

FILES = {"onnx": "model.onnx", "exported": "model.pt2", "torchscript": "model.pt"}


@pytest.fixture(scope="module")
def run(cifar_bin, tmp_path_factory) -> Path:
    """A tiny run with the parts an exporter could trip on: the 2x2 whitening layer, pooled BN,
    GELU, a logit scale, and a weight EMA (what must be exported)."""
    tmp = tmp_path_factory.mktemp("export")
    data = tmp / "data"  # its own copy: a test moves it away for a while
    shutil.copytree(cifar_bin, data)
    model = {"arch": "custom", "layers": [8, "M", 16, "M", 16, "M"], "global_pool": "max",
             "whiten": "2x2", "block_order": "conv_pool_bn_act", "activation": "gelu",
             "logit_scale": 0.5}
    cfg = write_yaml(tmp / "tiny.yaml", tiny_config(data, tmp / "runs", model=model,
                                                    optim={"ema_decay": 0.9}))
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["fit", "--config", str(cfg)]) == 0
    return tmp / "runs" / "tiny"


def _run_file(fmt: str, path: Path, images: torch.Tensor) -> torch.Tensor:
    """The exported file run as its own runtime runs it: no vggtrain code involved."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: images.numpy()})[0])
    if fmt == "exported":
        return torch.export.load(path).module()(images)
    return torch.jit.load(path)(images)


@pytest.mark.parametrize("fmt", ["onnx", "exported", "torchscript"])
def test_export_matches_the_checkpoint_at_any_batch_size(fmt, run, cifar_bin, tmp_path, capsys):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="the [export] extra is not installed")
    out = tmp_path / FILES[fmt]
    assert main(["export", "--ckpt", str(run), "--format", fmt, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "parity on the 400 test images" in printed and "top-1 the same on all 400" in printed

    side = json.loads(Path(f"{out}.json").read_text())
    assert side["format"] == fmt and side["source"]["weights"] == "ema"
    assert side["source"]["sha256"] == export.sha256_of(run / "best.pt")
    assert side["class_names"] == load_cifar10(cifar_bin)[2]
    assert side["parity"]["ok"] and side["parity"]["images"] == 400
    assert side["parity"]["max_abs_logit_diff"] <= 1e-4 and side["parity"]["tolerance"] == 1e-4

    # The checkpoint's model on vggtrain's own normalised input, against the file on [0, 1] images.
    loaded = load_model(run / "best.pt")
    _, test, _ = load_cifar10(cifar_bin)
    for n in (1, 7, 64):  # a batch size the export never saw
        images = test.images[:n]
        with torch.no_grad():
            want = loaded.model(normalize(images))
            got = _run_file(fmt, out, images.float() / 255)
        assert got.shape == (n, 10)
        assert (got - want).abs().max().item() <= 1e-4
    assert not list(tmp_path.glob(".*.tmp*"))  # no temp file left beside it


def test_a_model_that_disagrees_is_not_written(run, tmp_path, monkeypatch, capsys):
    real = export.load_exported

    def off_by_a_little(fmt, path):
        module = real(fmt, path)
        return lambda x: module(x) + 1e-3

    monkeypatch.setattr(export, "load_exported", off_by_a_little)
    out = tmp_path / "model.pt"
    assert main(["export", "--ckpt", str(run), "--format", "torchscript", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "export refused" in err and "nothing was written" in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_without_the_data_parity_uses_random_images(run, tmp_path, monkeypatch, capsys):
    # The run's data moved away: the check still runs, on random images, and says so.
    monkeypatch.setattr(export, "RANDOM_IMAGES", 50)
    stored = load_model(run / "best.pt").cfg.data.root
    monkeypatch.chdir(tmp_path)
    moved = tmp_path / "moved"
    Path(stored).rename(moved)
    try:
        out = tmp_path / "model.pt"
        assert main(["export", "--ckpt", str(run), "--format", "torchscript", "--out", str(out)]) == 0
        assert "parity on 50 random images" in capsys.readouterr().out
        # An explicit --data-root that holds nothing is an error, not a silent fallback.
        assert main(["export", "--ckpt", str(run), "--format", "torchscript", "--out", str(out),
                     "--data-root", str(tmp_path / "nowhere")]) == 2
        assert "data error" in capsys.readouterr().err
        assert main(["export", "--ckpt", str(run), "--format", "torchscript", "--out", str(out),
                     "--data-root", str(moved)]) == 0
        assert "parity on the 400 test images" in capsys.readouterr().out
    finally:
        moved.rename(stored)


def test_onnx_without_the_extra_is_one_line(run, tmp_path, monkeypatch, capsys):
    block_import(monkeypatch, "onnxruntime")
    assert main(["export", "--ckpt", str(run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"vggtrain: {export.ONNX_EXTRA}"
    assert list(tmp_path.iterdir()) == []


def test_bad_outputs_and_checkpoints_are_refused(run, tmp_path, capsys):
    assert main(["export", "--ckpt", str(run), "--format", "exported", "--out", str(tmp_path / "m.pt")]) == 2
    assert "ends in .pt2" in capsys.readouterr().err
    assert main(["export", "--ckpt", str(run), "--format", "torchscript", "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    assert main(["export", "--ckpt", str(bogus), "--format", "torchscript",
                 "--out", str(tmp_path / "m2.pt")]) == 2
    assert "checkpoint error" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bogus.pt"]


def test_the_tolerance_is_1e_4_unless_fp32_cannot_resolve_it():
    images = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    small = lambda x: torch.full((len(x), 3), 5.0)  # noqa: E731
    large = lambda x: torch.full((len(x), 3), 12800.0)  # noqa: E731
    assert export.check_parity(small, lambda x: small(x) + 5e-5, images, 2)["ok"]
    assert not export.check_parity(small, lambda x: small(x) + 5e-4, images, 2)["ok"]
    # 12,800 + 0.002 is two fp32 ulps away: rounding, not a different model
    assert export.check_parity(large, lambda x: large(x) + 0.002, images, 2)["ok"]
    assert not export.check_parity(large, lambda x: large(x) + 1.0, images, 2)["ok"]
