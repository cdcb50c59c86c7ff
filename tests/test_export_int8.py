"""`vggtrain export --format onnx --quantize int8` (issue 42): ONNX Runtime's static quantization,
calibrated on seeded training images and measured against fp32 on the test set before anything is
written; a failed accuracy check or a bad value writes nothing, in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import block_import, fit_tiny_run
from vggtrain import export, quantize
from vggtrain.cli import main
from vggtrain.data import Split, load_cifar10

ort = pytest.importorskip("onnxruntime", reason="the [export] extra is not installed")
onnx = pytest.importorskip("onnx", reason="the [export] extra is not installed")


@pytest.fixture(scope="module")
def run(cifar_bin, tmp_path_factory) -> Path:
    """A tiny trained run with BatchNorm (folded into the convolutions before quantization)."""
    return fit_tiny_run(cifar_bin, tmp_path_factory.mktemp("int8"))


def _logits(path: Path, images: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": images.float().div(255).numpy()})[0])


def test_int8_export_agrees_with_fp32_and_says_so(run, cifar_bin, tmp_path, capsys):
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    assert main(["export", "--ckpt", str(run), "--format", "onnx", "--out", str(fp32)]) == 0
    assert main(["export", "--ckpt", str(run), "--format", "onnx", "--out", str(int8), "--quantize", "int8",
                 "--calibration-images", "300", "--calibration-seed", "3"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1].startswith("int8: test accuracy") and "the 400 test images" in printed[-1]

    side = json.loads(Path(f"{int8}.json").read_text())
    assert side["quantize"] == "int8" and side["format"] == "onnx"
    q = side["int8"]
    assert q["calibration"]["images"] == 300 and q["calibration"]["seed"] == 3
    assert q["calibration"]["method"] == "minmax" and q["onnxruntime_version"] == ort.__version__
    assert q["kernels"]["execution_providers"] == ["CPUExecutionProvider"]
    # ORT fused each DQ -> Conv -> Q into its int8 convolution (com.microsoft.QLinearConv, NHWC)
    ran = q["kernels"]["optimized_graph_ops"]
    assert sum(n for op, n in ran.items() if op.endswith("QLinearConv")) == 3 and "Conv" not in ran

    # The written file is int8 QDQ, and the accuracies in its description are the file's own.
    ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    _, test, _ = load_cifar10(cifar_bin)
    got, want = _logits(int8, test.images), _logits(fp32, test.images)
    a = q["accuracy"]
    assert a["images"] == 400 and a["max_drop"] == 1.0
    assert a["int8_top1"] == pytest.approx(100 * (got.argmax(1) == test.labels).float().mean().item())
    assert a["fp32_top1"] == pytest.approx(100 * (want.argmax(1) == test.labels).float().mean().item())
    assert a["drop_points"] == pytest.approx(a["fp32_top1"] - a["int8_top1"])
    assert (got.argmax(1) == want.argmax(1)).float().mean().item() >= 0.9
    assert not list(tmp_path.glob(".*.tmp*"))


def test_entropy_calibration_keeps_onnx_runtimes_progress_off_stdout(run, tmp_path, capsys):
    """ORT's entropy calibrator print()s its progress; the user's stdout has vggtrain's lines only."""
    out = tmp_path / "int8.onnx"
    assert main(["export", "--ckpt", str(run), "--format", "onnx", "--out", str(out), "--quantize", "int8",
                 "--calibration-images", "100", "--calibration-method", "entropy"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and printed[0].startswith("wrote ") and printed[1].startswith("int8: "), printed
    assert json.loads(Path(f"{out}.json").read_text())["int8"]["calibration"]["method"] == "entropy"


def test_a_failed_accuracy_check_writes_nothing(run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"the user's model")
    Path(f"{out}.json").write_text("the user's description")
    real, calls = quantize.accuracy, []

    def int8_worse(session, test, batch_size):  # the second call measures the int8 model
        calls.append(len(test))
        return real(session, test, batch_size) - (3.0 if len(calls) == 2 else 0.0)

    monkeypatch.setattr(quantize, "accuracy", int8_worse)
    assert main(["export", "--ckpt", str(run), "--format", "onnx", "--out", str(out), "--quantize", "int8",
                 "--calibration-images", "100", "--eval-images", "150"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "export refused: int8 test accuracy" in err
    assert "first 150 of the 400 test images" in err and "over --max-drop 1" in err
    assert "nothing was written" in err and calls == [150, 150]
    assert out.read_bytes() == b"the user's model"
    assert Path(f"{out}.json").read_text() == "the user's description"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.json"]


@pytest.mark.parametrize(("extra", "message"), [
    (["--quantize", "int8", "--calibration-images", "0"], "--calibration-images must be at least 1"),
    (["--quantize", "int8", "--calibration-images", "100000"], "more than the 800 training images"),
    (["--quantize", "int8", "--eval-images", "0"], "--eval-images must be at least 1"),
    (["--quantize", "int8", "--max-drop", "nan"], "--max-drop must be a finite number"),
    (["--calibration-images", "10"], "--calibration-images only apply with --quantize int8"),
])
def test_bad_values_are_one_line(run, tmp_path, capsys, extra, message):
    assert main(["export", "--ckpt", str(run), "--format", "onnx", "--out", str(tmp_path / "m.onnx"),
                 *extra]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and message in err
    assert list(tmp_path.iterdir()) == []


def test_int8_needs_onnx_and_its_extra(run, tmp_path, monkeypatch, capsys):
    assert main(["export", "--ckpt", str(run), "--format", "torchscript", "--out", str(tmp_path / "m.pt"),
                 "--quantize", "int8"]) == 2
    assert "--quantize int8 needs --format onnx" in capsys.readouterr().err
    block_import(monkeypatch, "onnxruntime")
    assert main(["export", "--ckpt", str(run), "--format", "onnx", "--out", str(tmp_path / "m.onnx"),
                 "--quantize", "int8"]) == 2
    assert capsys.readouterr().err.strip() == f"vggtrain: {export.ONNX_EXTRA}"
    assert list(tmp_path.iterdir()) == []


def test_calibration_images_are_seeded_and_distinct():
    train = Split(torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1).expand(50, 3, 32, 32).clone(),
                  torch.zeros(50, dtype=torch.long))
    a = quantize.calibration_images(train, 20, seed=1)[:, 0, 0, 0]
    assert torch.equal(a, quantize.calibration_images(train, 20, seed=1)[:, 0, 0, 0])
    assert not torch.equal(a, quantize.calibration_images(train, 20, seed=2)[:, 0, 0, 0])
    assert len(set(a.tolist())) == 20
