"""The report at the end of `fit` and `vggtrain eval` (issue 3): metrics, schema, pictures, errors."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from conftest import tiny_config, write_yaml
from vggtrain.checkpoint import load_checkpoint
from vggtrain.cli import main
from vggtrain.config import ModelConfig, TrainConfig
from vggtrain.data import Split
from vggtrain.evaluate import EvalSettings, evaluate_split, log_probs
from vggtrain.model import build_model
from vggtrain.report import SCHEMA, build_report, confusion_image, format_text

# The documented schema (docs/evaluation.md, "The report"): eval writes exactly these keys ...
EVAL_KEYS = {"schema", "split", "metrics", "tta", "tta_mode", "per_class", "class_names", "confusion_matrix",
             "checkpoint", "checkpoint_epoch", "weights", "parameters", "device", "precision", "images_per_s",
             "eval_time_s", "torch_version", "vggtrain_version", "config_digest", "config", "calibration"}
# ... and fit's report.json adds the run's training facts.
FIT_KEYS = EVAL_KEYS | {"test", "best_epoch", "val_acc", "epochs", "train_time_s", "allocator",
                        "deterministic", "cuda_graphs", "timings_s", "init", "stopped_early",
                        "distill"}


@pytest.fixture(scope="module")
def run(cifar_bin, tmp_path_factory) -> Path:
    """One epoch of the tiny net: good, but not so good that it makes no mistakes to show."""
    tmp = tmp_path_factory.mktemp("eval")
    cfg = write_yaml(tmp / "tiny.yaml", tiny_config(cifar_bin, tmp / "runs", train={"epochs": 1}))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["fit", "--config", str(cfg)]) == 0
    assert "top-5" in out.getvalue()
    return tmp / "runs" / "tiny"


def _png(path: Path) -> torch.Tensor:
    """A PNG decoded back, as uint8 (3, H, W); it must be plain 8-bit RGB."""
    with Image.open(path) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def _not_blank(img: torch.Tensor, min_colours: int = 20) -> None:
    colours = torch.unique(img.flatten(1).T, dim=0)
    assert len(colours) >= min_colours and img.float().std() > 20


def _eval(capsys, *args: str) -> tuple[int, str, str]:
    # On the CPU the model was trained on, unless a test says otherwise: a GPU would change the
    # device in the report and the last bits of the metrics compared with fit's.
    device = [] if "--device" in args else ["--device", "cpu"]
    try:
        code = main(["eval", *args, *device])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- the report at the end of fit ----------------------------------------------------------------

def test_fit_report_json_is_consistent(run):
    report = json.loads((run / "report.json").read_text())
    assert set(report) == FIT_KEYS and report["schema"] == SCHEMA and report["split"] == "test"
    m, n = report["metrics"], 400
    assert m["images"] == n and 0.3 < m["top1"] <= m["top5"] <= 1  # chance is 0.1
    cm = torch.tensor(report["confusion_matrix"])
    assert cm.shape == (10, 10) and int(cm.sum()) == n
    assert int(cm.trace()) == round(m["top1"] * n)
    per_class = report["per_class"]
    assert [r["class"] for r in per_class] == report["class_names"]
    assert [r["total"] for r in per_class] == cm.sum(1).tolist()
    assert [r["correct"] for r in per_class] == cm.diag().tolist()
    assert all(r["acc"] == pytest.approx(r["correct"] / r["total"]) for r in per_class)
    # fit's first keys keep their meaning
    assert report["test"] == {"loss": m["loss"], "acc": m["top1"], "images": n}
    best = load_checkpoint(run / "best.pt")
    assert report["checkpoint_epoch"] == report["best_epoch"] == best["epoch"] == 1
    assert report["checkpoint"] == str(run / "best.pt")
    assert report["config_digest"].startswith("sha256:") and len(report["config_digest"]) == 7 + 64
    assert report["images_per_s"] > 0 and report["train_time_s"] > 0


def test_fit_report_md(run):
    report = json.loads((run / "report.json").read_text())
    md = (run / "report.md").read_text()
    assert f"top-1 {report['metrics']['top1']:.2%}" in md
    assert "best epoch | 1 of 1" in md and "training time" in md and "images/s" in md
    for r in report["per_class"]:
        assert f"| {r['class']} | {r['correct']} | {r['total']} |" in md
    assert "| **truck** | " + " | ".join(map(str, report["confusion_matrix"][9])) + " |" in md
    assert "![confusion matrix](confusion_matrix.png)" in md and "(misclassified.png)" in md


def test_fit_pictures_decode(run):
    cm = _png(run / "confusion_matrix.png")
    assert cm.shape[1] >= 500 and cm.shape[2] >= 500
    _not_blank(cm)
    # the darkest blue of the ramp marks the well-recognised classes' diagonal cells
    dark = (cm[0] < 60) & (cm[1] < 90) & (cm[2] > 90)
    assert dark.sum() > 1000
    mistakes = _png(run / "misclassified.png")
    assert mistakes.shape[2] > 1000 and mistakes.shape[1] > 150
    _not_blank(mistakes, min_colours=200)


def test_fit_logs_pictures_and_hparams_to_tensorboard(run):
    acc = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"test/confusion_matrix", "test/misclassified"} <= set(tags["images"])
    img = acc.Images("test/confusion_matrix")[-1]
    assert (img.width, img.height) == tuple(_png(run / "confusion_matrix.png").shape[2:0:-1])
    report = json.loads((run / "report.json").read_text())
    assert acc.Scalars("test/top5")[-1].value == pytest.approx(report["metrics"]["top5"])
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hp = start.session_start_info.hparams
    assert hp["optim.lr"].number_value == pytest.approx(0.05)
    assert hp["model.layers"].string_value == "[8, 'M', 16, 'M', 16, 'M']"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    metrics = {m.name.tag for m in experiment.experiment.metric_infos}
    assert {"test/acc", "test/top5", "test/loss", "val/acc"} <= metrics


# --- vggtrain eval -------------------------------------------------------------------------------

def test_eval_reproduces_the_fit_report(run, tmp_path, capsys):
    code, out, err = _eval(capsys, "--ckpt", str(run), "--json", str(tmp_path / "eval.json"))
    assert code == 0, err
    fit_report = json.loads((run / "report.json").read_text())
    report = json.loads((tmp_path / "eval.json").read_text())
    assert set(report) == EVAL_KEYS and report["tta"] is False and report["device"] == "cpu"
    for key in ("metrics", "per_class", "confusion_matrix", "config_digest", "checkpoint_epoch",
                "checkpoint", "parameters", "class_names"):
        assert report[key] == fit_report[key], key
    # what it prints: headline, the per-class table and the labelled confusion matrix
    assert f"top-1 {report['metrics']['top1']:.2%}" in out and "top-5" in out and "loss" in out
    for r in report["per_class"]:
        assert any(line.split()[:4] == [r["class"], str(r["correct"]), "/", str(r["total"])]
                   for line in out.splitlines()), r
    lines = out.splitlines()
    header = lines[lines.index("confusion matrix (rows: true class, columns: predicted class)") + 1]
    assert header.split() == ["airpl", "autom", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                              "truck"]
    truck_row = [line for line in out.splitlines() if line.startswith("truck ")][-1]
    assert truck_row.split()[1:] == [str(v) for v in report["confusion_matrix"][9]]


def test_eval_val_split_is_the_runs_validation_split(run, capsys):
    code, out, err = _eval(capsys, "--ckpt", str(run / "best.pt"), "--split", "val", "--json", "-",
                           "--batch-size", "64")
    assert code == 0, err
    report = json.loads(out)  # --json - prints only the JSON
    assert report["split"] == "val" and report["metrics"]["images"] == 200
    assert report["metrics"]["top1"] == pytest.approx(load_checkpoint(run / "best.pt")["best_metric"])


def test_eval_tta(run, capsys):
    code, out, err = _eval(capsys, "--ckpt", str(run), "--tta", "--json", "-")
    assert code == 0, err
    report = json.loads(out)
    assert report["tta"] is True and report["metrics"]["images"] == 400
    assert 0.3 < report["metrics"]["top1"] <= report["metrics"]["top5"]
    code, out, err = _eval(capsys, "--ckpt", str(run), "--json", "-")
    assert code == 0, err
    assert json.loads(out)["metrics"]["loss"] != report["metrics"]["loss"]  # the flips were averaged in


def test_flip_tta_averages_probabilities():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="custom", layers=[4, "M", 8, "M"], global_pool="avg")).eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        tta = log_probs(model, x, tta="flip")
        assert torch.allclose(tta, log_probs(model, x.flip(3), tta="flip"), atol=1e-6)  # flip-invariant
        mean = (torch.softmax(model(x), 1) + torch.softmax(model(x.flip(3)), 1)) / 2
    assert torch.allclose(tta.exp(), mean, atol=1e-6)


class _Fixed(torch.nn.Module):
    """Logits looked up by the image's first pixel, so every prediction is chosen by the test."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = ((x[:, 0, 0, 0] * 0.2470 + 0.4914) * 255).round().long()  # undo normalize
        return self.table[idx]


def test_metrics_on_chosen_predictions():
    # 3 classes, 6 images; logits rank the classes per image
    table = torch.tensor([[3.0, 2.0, 1.0],   # pred 0, then 1
                          [1.0, 3.0, 2.0],   # pred 1, then 2
                          [2.0, 1.0, 3.0],   # pred 2, then 0
                          [1.0, 2.0, 3.0]])  # pred 2, then 1
    rows = [0, 0, 1, 2, 3, 3]
    labels = torch.tensor([0, 1, 1, 2, 0, 1])
    images = torch.zeros(6, 3, 32, 32, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.tensor(rows, dtype=torch.uint8)
    ev = evaluate_split(_Fixed(table), Split(images, labels),
                        EvalSettings(3, batch_size=4, device=torch.device("cpu")))
    assert ev.top1 == pytest.approx(3 / 6)  # images 0, 2, 3
    # top-min(5, 3) = top-3 is always right with 3 classes
    assert ev.top5 == 1.0
    assert ev.confusion.tolist() == [[1, 0, 1], [1, 1, 1], [0, 0, 1]]
    expected = torch.nn.functional.cross_entropy(table[rows], labels).item()
    assert ev.loss == pytest.approx(expected, rel=1e-6)
    assert ev.predictions.tolist() == [0, 0, 1, 2, 2, 2]
    assert ev.per_class() == [(1, 2), (1, 3), (1, 1)]


def test_report_from_a_diverged_model_is_valid_json():
    table = torch.tensor([[float("nan"), 0.0]])
    ev = evaluate_split(_Fixed(table), Split(torch.zeros(2, 3, 32, 32, dtype=torch.uint8),
                                             torch.tensor([0, 1])),
                        EvalSettings(2, 8, torch.device("cpu"), calibration=True))
    cfg = TrainConfig()
    report = build_report(ev, split="test", model=_Fixed(table), cfg=cfg, class_names=["a", "b"],
                          checkpoint="x.pt", checkpoint_epoch=1, device="cpu", precision="fp32")
    assert report["metrics"]["loss"] is None and math.isnan(ev.loss)
    assert report["calibration"]["ece"] is None and report["calibration"]["nll"] is None
    json.dumps(report, allow_nan=False)
    assert "loss -" in format_text(report)


def test_confusion_image_colours_by_row_rate():
    cm = [[90, 10, 0], [50, 50, 0], [0, 0, 0]]  # the last class has no images
    img = confusion_image(cm, ["alpha", "beta", "gamma"], "title")
    assert img.dtype == torch.uint8 and img.shape[0] == 3
    _not_blank(img)
    pixels = {tuple(p) for p in img.flatten(1).T.tolist()}
    assert (8, 48, 107) not in pixels  # no row is 100% one cell, so the darkest blue is absent
    assert any(r < 40 and b > 120 for r, _, b in pixels)  # 90%: a dark blue


# --- bad input: exit 2, one line ------------------------------------------------------------------

def _bad_checkpoints(run: Path, tmp: Path, cifar_bin: Path) -> dict[str, tuple[list[str], str]]:
    text = tmp / "notes.pt"
    text.write_text("not a checkpoint\n")
    truncated = tmp / "truncated.pt"
    truncated.write_bytes((run / "best.pt").read_bytes()[:5000])
    state = load_checkpoint(run / "best.pt")
    state["config"]["model"]["layers"] = [8, "M", 32, "M", 16, "M"]
    torch.save(state, tmp / "reshaped.pt")
    state = load_checkpoint(run / "best.pt")
    state["config"]["model"]["num_classes"] = 3
    state["model"]["classifier.weight"] = state["model"]["classifier.weight"][:3]
    state["model"]["classifier.bias"] = state["model"]["classifier.bias"][:3]
    state["class_names"] = ["a", "b", "c"]
    torch.save(state, tmp / "three.pt")
    twelve = tmp / "twelve"
    shutil.copytree(cifar_bin, twelve)
    (twelve / "cifar-10-batches-bin" / "batches.meta.txt").write_text(
        "\n".join(f"class{i}" for i in range(12)) + "\n")
    return {
        "missing": (["--ckpt", str(tmp / "nope.pt")], "no such file"),
        "not a checkpoint": (["--ckpt", str(text)], "notes.pt: not a checkpoint (not a zip archive"),
        "truncated": (["--ckpt", str(truncated)], "truncated.pt: truncated or damaged checkpoint"),
        "another shape": (["--ckpt", str(tmp / "reshaped.pt")], "weights do not fit"),
        "fewer classes than the data": (["--ckpt", str(tmp / "three.pt")],
                                        "the data has 10 classes but the checkpoint's model predicts 3"),
        "more classes in the data": (["--ckpt", str(run), "--data-root", str(twelve)],
                                     "the data has 12 classes but the checkpoint's model predicts 10"),
        "no data": (["--ckpt", str(run), "--data-root", str(tmp / "empty")], "no CIFAR-10 found"),
        "bad device": (["--ckpt", str(run), "--device", "gpu"], "expected auto, cpu"),
        "bad batch size": (["--ckpt", str(run), "--batch-size", "0"], "positive integer"),
    }


def test_bad_input_exits_2_with_one_line(run, cifar_bin, tmp_path, capsys):
    for what, (args, message) in _bad_checkpoints(run, tmp_path, cifar_bin).items():
        code, out, err = _eval(capsys, *args)
        assert code == 2, (what, err)
        assert err.count("\n") == 1 and message in err, (what, err)
        assert "Traceback" not in err and not out, what


def test_a_checkpoint_declaring_a_giant_model_is_refused_before_it_is_built(run, tmp_path, capsys,
                                                                            monkeypatch):
    # 64 convolutions of width 8192 (~150 GB of weights) in the stored config, the tiny net's
    # weights in the file: refused from the shapes alone, the model itself never built.
    state = load_checkpoint(run / "best.pt")
    state["config"]["model"]["layers"] = [8192] * 64
    torch.save(state, tmp_path / "giant.pt")

    def never(*args, **kwargs):
        raise AssertionError("the model was built before its shapes were checked")

    monkeypatch.setattr("vggtrain.inference.build_model", never)
    monkeypatch.setattr("vggtrain.trainable.build_model", never)
    code, out, err = _eval(capsys, "--ckpt", str(tmp_path / "giant.pt"))
    assert code == 2 and "giant.pt: weights do not fit this model" in err and err.count("\n") == 1
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    torch.save(state, resumed / "last.pt")
    assert main(["fit", "--resume", str(resumed)]) == 2
    assert "last.pt: weights do not fit this model" in capsys.readouterr().err


def test_val_split_of_a_run_without_one(cifar_bin, run, tmp_path, capsys):
    state = load_checkpoint(run / "best.pt")
    state["config"]["data"]["val_size"] = 0
    torch.save(state, tmp_path / "noval.pt")
    code, _, err = _eval(capsys, "--ckpt", str(tmp_path / "noval.pt"), "--split", "val")
    assert code == 2 and "held out no validation images" in err
