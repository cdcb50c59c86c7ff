"""`vggtrain runs` (issue 24): one row per run from what runs wrote, each status told apart, and
half-written or foreign directories never trip it."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from contextlib import ExitStack
from pathlib import Path

import pytest

import vggtrain.train as train_module
from conftest import tiny_config, write_yaml
from vggtrain.cli import main
from vggtrain.rundir import lock_run_dir
from vggtrain.runs import list_runs


@pytest.fixture(scope="module")
def runs(cifar_bin, tmp_path_factory) -> Path:
    """runs/: a finished run, a diverged one, and a sweep-like nested one."""
    tmp = tmp_path_factory.mktemp("runs")
    out = tmp / "runs"
    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet, contextlib.redirect_stderr(io.StringIO()):
        cfg = write_yaml(tmp / "a.yaml", tiny_config(cifar_bin, out, name="finished"))
        assert main(["fit", "--config", str(cfg)]) == 0
        cfg = write_yaml(tmp / "b.yaml", tiny_config(cifar_bin, out, name="diverged"))
        with pytest.MonkeyPatch.context() as mp:  # epoch 2's first update breaks the weights
            real_step = train_module.train_step

            def step(run, x, y, criterion):
                result = real_step(run, x, y, criterion)
                if run.epoch == 1:
                    next(run.model.parameters()).data[0] = float("nan")
                return result

            mp.setattr(train_module, "train_step", step)
            assert main(["fit", "--config", str(cfg)]) == 1
        cfg = write_yaml(tmp / "c.yaml", tiny_config(cifar_bin, out / "study", name="trial-0",
                                                     train={"epochs": 1}))
        assert main(["fit", "--config", str(cfg)]) == 0
    return out


def _rows(root: Path) -> dict[str, dict]:
    return {r["name"]: r for r in list_runs(root)}


def test_each_status_is_told_apart(runs, tmp_path):
    work = tmp_path / "runs"
    shutil.copytree(runs, work)
    for name in ("killed", "live"):  # before its report: status.json says running (finished after it)
        shutil.copytree(work / "finished", work / name)
        (work / name / "report.json").unlink()
        status = json.loads((work / name / "status.json").read_text())
        assert status["state"] == "finished"
        (work / name / "status.json").write_text(json.dumps({**status, "state": "running"}))
    with ExitStack() as held:
        assert lock_run_dir(work / "live", held)  # as a fit training in it holds it
        rows = _rows(work)
    assert {n: r["status"] for n, r in rows.items()} == {
        "finished": "finished", "diverged": "diverged", "study/trial-0": "finished",
        "killed": "stopped", "live": "running"}

    done = rows["finished"]
    report = json.loads((work / "finished" / "report.json").read_text())
    assert done["test_top1"] == report["metrics"]["top1"] and done["best_val"] == report["val_acc"]
    assert done["epochs"] == [3, 3] and done["params"] == report["parameters"]
    assert done["arch"] == "custom" and done["precision"] == "fp32" and done["device"] == "cpu"
    assert rows["study/trial-0"]["epochs"] == [1, 1]
    assert rows["killed"]["test_top1"] is None and rows["killed"]["best_val"] == done["best_val"]


def test_the_table_and_json(runs, capsys):
    assert main(["runs", str(runs), "--sort", "epochs", "--reverse"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "arch", "params", "epochs", "best_val", "test_top1", "test_ece",
                                "time_s", "precision", "device", "status"]
    assert [ln.split()[0] for ln in lines[1:]][0] == "finished"  # 3 epochs done: first, reversed
    assert main(["runs", str(runs), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted(r["name"] for r in rows) == ["diverged", "finished", "study/trial-0"]
    assert main(["runs", str(runs), "--sort", "colour"]) == 2
    assert "--sort takes one of" in capsys.readouterr().err
    assert main(["runs", str(runs / "nowhere")]) == 2


def test_half_written_and_foreign_directories(runs, tmp_path, capsys):
    work = tmp_path / "runs"
    shutil.copytree(runs / "finished", work / "torn")
    (work / "torn" / "report.json").write_text('{"metrics": {"top1": ')  # cut short
    (work / "torn" / "status.json").write_text("[1, 2, 3]")  # valid JSON, not ours
    (work / "torn" / "config.yaml").write_text("train: [unclosed\n")
    (work / "photos" / "2024").mkdir(parents=True)  # nothing a run writes: passed over
    (work / "photos" / "2024" / "a.jpg").write_bytes(b"\xff\xd8")
    (work / "notes.txt").write_text("not a directory")
    (work / "odd").mkdir()
    (work / "odd" / "config.yaml").write_text("model: {arch: 7}\ntrain: {epochs: lots}\n")
    (work / ".hidden-temp").mkdir()
    rows = _rows(work)
    assert set(rows) == {"torn", "odd"}
    assert rows["torn"]["status"] == "stopped" and rows["torn"]["test_top1"] is None
    assert rows["odd"]["epochs"] == [None, None] and rows["odd"]["arch"] == "7"
    (work / "odd" / "status.json").write_text('{"params": Infinity, "epoch": NaN, "arch": ["x"]}')
    assert _rows(work)["odd"]["params"] is None and _rows(work)["odd"]["epochs"][0] is None
    for key in ("arch", "params", "epochs", "name"):  # sorts whatever the values are
        assert main(["runs", str(work), "--sort", key]) == 0
    assert main(["runs", str(work)]) == 0  # and the table prints whatever the values are
    out = capsys.readouterr().out
    assert "torn" in out and "odd" in out
