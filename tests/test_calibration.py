"""Calibration (issue 44): ECE, NLL and Brier in every report, checked by hand and against
torchmetrics; temperature scaling fitted on the validation split, stored in the checkpoint and
applied by eval, predict and export --calibrated."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import tiny_config, write_yaml
from vggtrain import calibration
from vggtrain.checkpoint import load_checkpoint, save_checkpoint, save_of
from vggtrain.cli import main
from vggtrain.data import CIFAR10_STATS, Split, load_dataset
from vggtrain.evaluate import EvalSettings, evaluate_split
from vggtrain.sweep import format_seeds

# Five images of three classes, their probabilities chosen away from the bins' edges (k / 15),
# then one image whose float32 softmax saturates at exactly 1.0 (torchmetrics' slot of its own).
PROBS = [[0.90, 0.05, 0.05], [0.90, 0.05, 0.05], [0.62, 0.28, 0.10], [0.25, 0.55, 0.20],
         [0.09, 0.09, 0.82]]
LABELS = [0, 1, 0, 2, 2]
# By hand. Bins (width 1/15): 0.90 -> bin 13 (2 images, 1 right, confidences 1.8): |1 - 1.8|;
# 0.62 -> bin 9, right: |1 - 0.62|; 0.55 -> bin 8, wrong: |0 - 0.55|; 0.82 -> bin 12, right:
# |1 - 0.82|; the saturated image is wrong: |0 - 1|.
ECE_5 = (0.8 + 0.38 + 0.55 + 0.18) / 5
ECE_6 = (0.8 + 0.38 + 0.55 + 0.18 + 1.0) / 6
NLL_5 = -(math.log(0.9) + math.log(0.05) + math.log(0.62) + math.log(0.20) + math.log(0.82)) / 5
# sum over classes of (p - onehot)^2, image by image
BRIER_5 = (0.015 + 1.715 + 0.2328 + 1.005 + 0.0486) / 5


def measured(logp: torch.Tensor, labels: torch.Tensor, batch: int = 4) -> calibration.Calibration:
    sums = calibration.new_sums(logp.device)
    pred = logp.argmax(1)
    for i in range(0, len(labels), batch):  # in batches, as evaluate_split adds them
        calibration.add_batch(sums, logp[i:i + batch], labels[i:i + batch], pred[i:i + batch])
    return calibration.summarize(*sums)


def fixed_set(saturated: bool) -> tuple[torch.Tensor, torch.Tensor]:
    logp = torch.tensor(PROBS).log()
    labels = torch.tensor(LABELS)
    if saturated:
        logp = torch.cat([logp, torch.log_softmax(torch.tensor([[40.0, -40.0, -40.0]]), 1)])
        labels = torch.cat([labels, torch.tensor([1])])
    return logp, labels


def test_ece_nll_brier_equal_the_hand_computed_values():
    c = measured(*fixed_set(saturated=False))
    assert c.ece == pytest.approx(ECE_5, abs=1e-6)
    assert c.nll == pytest.approx(NLL_5, abs=1e-5)
    assert c.brier == pytest.approx(BRIER_5, abs=1e-6)
    assert sum(c.images) == 5 and c.images[13] == 2 and c.correct[13] == 1
    assert measured(*fixed_set(saturated=True)).ece == pytest.approx(ECE_6, abs=1e-6)


def test_ece_equals_torchmetrics():
    from torchmetrics.functional.classification import multiclass_calibration_error

    g = torch.Generator().manual_seed(0)
    for logp, labels in [fixed_set(True), fixed_set(False)]:
        want = multiclass_calibration_error(logp.exp(), labels, num_classes=3, n_bins=15, norm="l1")
        assert measured(logp, labels).ece == pytest.approx(float(want), abs=1e-6)
    for scale in (0.5, 3.0, 30.0):  # underconfident, middling, saturating
        logits = torch.randn(3000, 10, generator=g) * scale
        labels = torch.randint(0, 10, (3000,), generator=g)
        logp = torch.log_softmax(logits, 1)
        want = multiclass_calibration_error(logp.exp(), labels, num_classes=10, n_bins=15, norm="l1")
        assert measured(logp, labels, batch=512).ece == pytest.approx(float(want), abs=1e-5)


@pytest.mark.parametrize("planted", [0.5, 2.5])
def test_temperature_fitting_recovers_a_planted_temperature(planted):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(20000, 10, generator=g) * 2
    labels = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)  # drawn from softmax(z)
    t = calibration.fit_temperature(z * planted, labels)  # the logits as presented: z * T0
    assert t == pytest.approx(planted, rel=0.05)
    assert calibration.fit_temperature(z, labels) == pytest.approx(1.0, rel=0.05)


class Lookup(torch.nn.Module):
    """A "model" returning fixed logits per image: image i is filled with the value i."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", logits)
        self.register_buffer("mean", torch.tensor(CIFAR10_STATS[0]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CIFAR10_STATS[1]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = ((x * self.std + self.mean) * 255).round()[:, 0, 0, 0].long()
        return self.table[index]


def test_evaluate_split_reports_the_sums_of_its_probabilities_and_after_a_temperature():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(200, 10, generator=g) * 3
    labels = torch.randint(0, 10, (200,), generator=g)
    images = torch.arange(200, dtype=torch.uint8)[:, None, None, None].expand(200, 3, 32, 32).contiguous()
    settings = EvalSettings(10, 64, torch.device("cpu"), calibration=True, temperature=1.7)
    ev = evaluate_split(Lookup(logits), Split(images, labels), settings)
    before = measured(torch.log_softmax(logits, 1), labels)
    after = measured(torch.log_softmax(logits / 1.7, 1), labels)
    assert ev.calibration.ece == pytest.approx(before.ece, abs=1e-6)
    assert ev.calibration.nll == pytest.approx(ev.loss, abs=1e-5) == pytest.approx(before.nll, abs=1e-5)
    assert ev.calibrated.ece == pytest.approx(after.ece, abs=1e-6)
    assert ev.calibrated.brier == pytest.approx(after.brier, abs=1e-6)
    assert ev.calibrated.ece != pytest.approx(ev.calibration.ece)
    assert evaluate_split(Lookup(logits), Split(images, labels),
                          EvalSettings(10, 64, torch.device("cpu"), calibration=True)).calibrated is None


def test_a_pass_without_calibration_sums_none_and_measures_the_same(monkeypatch):
    # Validation, bench, the corruption passes and the probes read no calibration: they skip its sums.
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(100, 10, generator=g) * 3
    labels = torch.randint(0, 10, (100,), generator=g)
    images = torch.arange(100, dtype=torch.uint8)[:, None, None, None].expand(100, 3, 32, 32).contiguous()
    split, cpu = Split(images, labels), torch.device("cpu")
    added = []
    add_batch = calibration.add_batch
    monkeypatch.setattr(calibration, "add_batch", lambda *a, **k: added.append(1))
    passes = [evaluate_split(Lookup(logits), split, s)
              for s in (EvalSettings(10, 32, cpu), EvalSettings(10, 32, cpu, temperature=1.5))]
    assert all(ev.calibration is None and ev.calibrated is None for ev in passes) and not added
    monkeypatch.setattr(calibration, "add_batch", add_batch)
    full = evaluate_split(Lookup(logits), split, EvalSettings(10, 32, cpu, calibration=True, temperature=1.5))
    assert full.calibration is not None and full.calibrated is not None
    for ev in passes:
        # the packed host reads, with no calibration sums in them, give the same measurements
        assert (ev.loss, ev.top1, ev.top5, ev.images) == (full.loss, full.top1, full.top5, full.images)
        assert torch.equal(ev.confusion, full.confusion) and torch.equal(ev.predictions, full.predictions)
        assert torch.equal(ev.confidence, full.confidence)


def test_add_batch_takes_the_confidence_the_caller_has():
    logp, labels = fixed_set(saturated=True)
    pred = logp.argmax(1)
    own = calibration.new_sums(logp.device)
    given = calibration.new_sums(logp.device)
    calibration.add_batch(own, logp, labels, pred)
    calibration.add_batch(given, logp, labels, pred, logp.gather(1, pred[:, None]).squeeze(1).exp())
    assert torch.equal(own[0], given[0]) and torch.equal(own[1], given[1])  # bit for bit
    # and it is what the bins are made of: every image at confidence 0.5 lands in bin 7
    halves = calibration.new_sums(logp.device)
    calibration.add_batch(halves, logp, labels, pred, torch.full((len(labels),), 0.5))
    assert calibration.summarize(*halves).images[7] == len(labels)


# --- fit, eval, predict, export ------------------------------------------------------------------

def quiet_main(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def run(cifar_bin, tmp_path_factory) -> Path:
    """One epoch of the tiny net with flip TTA and a validation split."""
    tmp = tmp_path_factory.mktemp("calib")
    cfg = write_yaml(tmp / "tiny.yaml",
                     tiny_config(cifar_bin, tmp / "runs", train={"epochs": 1, "tta": "flip"}))
    assert quiet_main(["fit", "--config", str(cfg)])[0] == 0
    return tmp / "runs" / "tiny"


def test_fit_stores_its_temperatures_and_reports_calibration_before_and_after(run):
    best = load_checkpoint(run / "best.pt")
    temps = best["temperature"]
    assert set(temps) == {"flip", "none"} and all(0.05 < t < 20 for t in temps.values())
    # last.pt holds them where it holds the same weights (one epoch: it does)
    assert save_of(load_checkpoint(run / "best.pt")) == save_of(load_checkpoint(run / "last.pt"))
    assert load_checkpoint(run / "last.pt")["temperature"] == temps
    report = json.loads((run / "report.json").read_text())
    c = report["calibration"]
    assert c["temperature"] == pytest.approx(temps["flip"]) and "validation" in c["temperature_from"]
    assert set(c["calibrated"]) == {"ece", "nll", "brier"} and c["n_bins"] == 15
    assert 0 <= c["ece"] <= 1 and 0 <= c["calibrated"]["ece"] <= 1
    assert c["nll"] == pytest.approx(report["metrics"]["loss"], rel=1e-4)
    assert c["calibrated"]["nll"] != pytest.approx(c["nll"])
    assert sum(b["images"] for b in c["bins"]) == report["metrics"]["images"] and len(c["bins"]) == 16
    by_bins = sum(abs(b["correct"] - b["images"] * (b["mean_confidence"] or 0)) for b in c["bins"])
    assert by_bins / report["metrics"]["images"] == pytest.approx(c["ece"], abs=1e-5)
    md = (run / "report.md").read_text()
    assert "## Calibration" in md and "![reliability diagram](reliability_diagram.png)" in md
    assert f"after temperature {c['temperature']:.3f}" in md
    with Image.open(run / "reliability_diagram.png") as img:
        assert img.width > 300 and img.height > 300


def test_eval_calibrated_uses_the_stored_temperature(run, tmp_path):
    out = tmp_path / "r.json"
    code, text = quiet_main(["eval", "--ckpt", str(run), "--calibrated", "--json", str(out)])
    assert code == 0 and "after temperature" in text
    report, fit_report = json.loads(out.read_text()), json.loads((run / "report.json").read_text())
    stored = load_checkpoint(run / "best.pt")["temperature"]
    c = report["calibration"]
    assert c["temperature"] == stored["flip"] and "stored in the checkpoint" in c["temperature_from"]
    for key in ("ece", "nll", "brier"):  # the run's own report, re-measured
        assert c[key] == pytest.approx(fit_report["calibration"][key], abs=1e-5)
        assert c["calibrated"][key] == pytest.approx(fit_report["calibration"]["calibrated"][key], abs=1e-5)
    plain = tmp_path / "plain.json"
    assert quiet_main(["eval", "--ckpt", str(run), "--json", str(plain)])[0] == 0
    c = json.loads(plain.read_text())["calibration"]
    assert c["temperature"] is None and c["calibrated"] is None


def test_an_old_checkpoint_without_a_temperature_evaluates_and_fits_one_on_request(run, tmp_path, capfd,
                                                                                    monkeypatch):
    state = load_checkpoint(run / "best.pt")
    del state["temperature"]
    old = tmp_path / "old.pt"
    save_checkpoint(old, state)
    out = tmp_path / "r.json"
    assert quiet_main(["eval", "--ckpt", str(old), "--json", str(out)])[0] == 0
    assert json.loads(out.read_text())["calibration"]["temperature"] is None
    capfd.readouterr()
    reads = []

    def counted(*args, **kwargs):
        reads.append(1)
        return load_dataset(*args, **kwargs)

    monkeypatch.setattr("vggtrain.eval.load_dataset", counted)
    assert quiet_main(["eval", "--ckpt", str(old), "--calibrated", "--json", str(out)])[0] == 0
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no temperature stored" in err[0] and "200 validation images" in err[0]
    assert len(reads) == 1  # the validation split the temperature is fitted on: the same read's
    c = json.loads(out.read_text())["calibration"]
    # the same validation split as fit's, rebuilt from the seed: the same temperature
    stored = load_checkpoint(run / "best.pt")["temperature"]["flip"]
    assert c["temperature"] == pytest.approx(stored, rel=1e-4)
    reads.clear()  # measured on the validation split itself: one read too
    argv = ["eval", "--ckpt", str(old), "--calibrated", "--split", "val", "--json", str(out)]
    assert quiet_main(argv)[0] == 0
    assert len(reads) == 1
    c = json.loads(out.read_text())["calibration"]
    assert c["temperature"] == pytest.approx(stored, rel=1e-4) and c["calibrated"] is not None


def test_predict_and_export_calibrated_apply_the_no_tta_temperature(run, cifar_bin, tmp_path):
    t = load_checkpoint(run / "best.pt")["temperature"]["none"]
    img = tmp_path / "a.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(img)
    raw, cal = tmp_path / "raw.json", tmp_path / "cal.json"
    assert quiet_main(["predict", "--ckpt", str(run), str(img), "--topk", "10", "--json", str(raw)])[0] == 0
    assert quiet_main(["predict", "--ckpt", str(run), str(img), "--topk", "10", "--calibrated",
                       "--json", str(cal)])[0] == 0
    p = {d["index"]: d["prob"] for d in json.loads(raw.read_text())["predictions"][0]["top"]}
    q = {d["index"]: d["prob"] for d in json.loads(cal.read_text())["predictions"][0]["top"]}
    logp = torch.tensor([p[i] for i in range(10)]).log()
    want = torch.softmax(logp / t, 0)  # softmax(log softmax(z) / T) = softmax(z / T)
    assert torch.allclose(torch.tensor([q[i] for i in range(10)]), want, atol=1e-5)
    assert json.loads(cal.read_text())["temperature"] == t
    out = tmp_path / "m.pt"
    assert quiet_main(["export", "--ckpt", str(run), "--format", "torchscript", "--out", str(out),
                       "--calibrated"])[0] == 0
    side = json.loads(Path(f"{out}.json").read_text())
    assert side["temperature"] == t and "temperature" in side["output"]["meaning"]
    assert side["parity"]["ok"] and "test images" in side["parity"]["images_from"]


def test_calibrated_without_a_temperature_or_a_validation_split_is_one_line(run, tmp_path, capfd):
    state = load_checkpoint(run / "best.pt")  # as a run without a validation split saves it
    del state["temperature"]
    state["config"]["data"]["val_size"] = 0
    ckpt = tmp_path / "noval.pt"
    save_checkpoint(ckpt, state)
    img = tmp_path / "a.png"
    Image.new("RGB", (32, 32)).save(img)
    for argv in (["eval", "--ckpt", str(ckpt), "--calibrated"],
                 ["predict", "--ckpt", str(ckpt), str(img), "--calibrated"],
                 ["export", "--ckpt", str(ckpt), "--format", "torchscript", "--out", str(tmp_path / "m.pt"),
                  "--calibrated"]):
        capfd.readouterr()
        assert quiet_main(argv)[0] == 2
        err = capfd.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no temperature stored" in err[0] and "data.val_size 0" in err[0], err
    assert not (tmp_path / "m.pt").exists()


def test_seeds_table_shows_ece_when_the_runs_have_it():
    def d(v):
        return {"n": 2, "median": v, "mean": v, "std": 0.0, "min": v, "max": v}

    s = {"test_top1": d(0.9), "train_time_s": d(10.0), "time_to_target_s": {"n": 0}, "target": None,
         "test_ece": d(0.031), "test_ece_calibrated": d(0.012), "runs": [{"seed": 0, "test_top1": 0.9}]}
    text = format_seeds(s)
    assert "| test ECE (%) | 2 | 3.10 |" in text and "| test ECE after T (%) | 2 | 1.20 |" in text
    old = {k: v for k, v in s.items() if not k.startswith("test_ece")}
    assert "ECE" not in format_seeds(old)


def test_adding_a_batch_reads_nothing_back_from_the_device():
    from vggtrain.stepcount import OpCounter

    logp, labels = fixed_set(saturated=True)
    sums = calibration.new_sums(logp.device)
    with OpCounter() as c:
        calibration.add_batch(sums, calibration.rescaled(logp, 1.5), labels, logp.argmax(1))
    assert c.syncs == 0, c.by_op
