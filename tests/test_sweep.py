"""`vggtrain sweep` and `vggtrain seeds` (issue 23): Optuna studies of normal fits, chosen on the
validation split only, shared by processes, resumable, and seeds summarised with their spread."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import vggtrain.eval as eval_module
from conftest import block_import, tiny_config, wait_for_line, write_yaml
from vggtrain import sweep
from vggtrain.cli import main
from vggtrain.eval import evaluate_checkpoint
from vggtrain.runs import list_runs

optuna = pytest.importorskip("optuna", reason="the [sweep] extra is not installed")

SPACE = {"optim.lr": {"type": "float", "low": 0.01, "high": 0.1, "log": True},
         "optim.label_smoothing": {"type": "categorical", "choices": [0.0, 0.1]}}


def _setup(cifar_bin: Path, tmp_path: Path, **train) -> tuple[Path, Path]:
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_bin, tmp_path / "runs",
                                                         train={"epochs": 2, **train}))
    return cfg, write_yaml(tmp_path / "space.yaml", SPACE)


def _quiet(argv: list[str]) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        return main(argv)


class PruneTrialOne(optuna.pruners.BasePruner):
    """Prunes trial 1 after its first epoch, nothing else: the pruning path, deterministically."""

    def prune(self, study, trial) -> bool:
        return trial.number == 1 and trial.last_step == 1


def test_a_sweep_chooses_on_validation_and_tests_the_best_once(cifar_bin, tmp_path, monkeypatch):
    cfg, space = _setup(cifar_bin, tmp_path)
    monkeypatch.setattr(sweep, "make_pruner", lambda optuna, prune_from: PruneTrialOne())
    tested = []
    original = eval_module.evaluate_checkpoint

    def counting(ckpt, split="test", *args, **kwargs):
        tested.append((str(ckpt), split))
        return original(ckpt, split, *args, **kwargs)

    monkeypatch.setattr(eval_module, "evaluate_checkpoint", counting)
    assert _quiet(["sweep", "--config", str(cfg), "--space", str(space), "--trials", "3",
                   "--study", "s"]) == 0
    study_dir = tmp_path / "runs" / "s"
    report = json.loads((study_dir / "report.json").read_text())
    assert report["trials"] == {"COMPLETE": 2, "PRUNED": 1, "FAIL": 0}
    assert [r["epochs"] for r in report["rows"]] == [2, 1, 2]
    assert report["epochs_run"] == 5 and report["epochs_without_pruning"] == 6
    assert report["pruning_saved"] == pytest.approx(1 / 6)

    # The best trial is the one with the best validation accuracy; the test set was touched once,
    # for it, after every trial had ended; no trial wrote a test report.
    completed = [r for r in report["rows"] if r["state"] == "COMPLETE"]
    best = max(completed, key=lambda r: r["value"])
    assert report["best_trial"]["number"] == best["number"]
    best_ckpt = study_dir / f"trial-{best['number']}" / "best.pt"
    assert tested == [(str(best_ckpt), "test")]
    assert report["best_trial"]["test_top1"] == evaluate_checkpoint(best_ckpt)["metrics"]["top1"]
    assert not list(study_dir.glob("trial-*/report.json"))
    assert "the only test measurement of the study" in (study_dir / "report.md").read_text()
    assert report["overhead_s_per_trial_max"] is not None  # measured (its size is a benchmark's)

    # Each trial is a normal run: its own config with the sampled values, curves, checkpoints.
    stored = optuna.load_study(study_name="s", storage=f"sqlite:///{study_dir / 'study.db'}")
    for t in stored.trials:
        run_cfg = yaml.safe_load((study_dir / f"trial-{t.number}" / "config.yaml").read_text())
        assert run_cfg["optim"]["lr"] == pytest.approx(t.params["optim.lr"])
        assert run_cfg["optim"]["label_smoothing"] == t.params["optim.label_smoothing"]
        assert list((study_dir / f"trial-{t.number}" / "tb").glob("events.out.tfevents.*"))
    rows = {r["name"]: r for r in list_runs(tmp_path / "runs")}
    assert set(rows) == {"s/trial-0", "s/trial-1", "s/trial-2"}  # the study's own report is not a run
    assert rows["s/trial-1"]["epochs"] == [1, 2] and rows["s/trial-1"]["status"] == "finished"


def test_the_pruner_waits_for_prune_from(cifar_bin, tmp_path, monkeypatch):
    # The median rule in epochs as trials report them (steps 1, 2, ...): four finished trials at
    # 0.9 every epoch, then one at 0.1 every epoch is pruned at epoch prune_from, not before.
    for prune_from in (1, 3):
        study = optuna.create_study(direction="maximize", pruner=sweep.make_pruner(optuna, prune_from))
        for _ in range(4):
            t = study.ask()
            for epoch in range(1, 6):
                t.report(0.9, epoch)
            study.tell(t, 0.9)
        t = study.ask()
        pruned_at = None
        for epoch in range(1, 6):
            t.report(0.1, epoch)
            if t.should_prune():
                pruned_at = epoch
                break
        assert pruned_at == prune_from
    assert [sweep.default_prune_from(e) for e in (1, 2, 8, 9, 16, 9.9)] == [1, 1, 4, 5, 8, 5]
    # --prune-from reaches the pruner, and the trials record it; by default half the epochs.
    cfg, space = _setup(cifar_bin, tmp_path, epochs=4)
    seen = []
    monkeypatch.setattr(sweep, "make_pruner", lambda optuna, prune_from: seen.append(prune_from)
                        or optuna.pruners.NopPruner())
    for study_name, flag in (("a", []), ("b", ["--prune-from", "3"])):
        assert _quiet(["sweep", "--config", str(cfg), "--space", str(space), "--trials", "1",
                       "--study", study_name, *flag]) == 0
    assert seen == [2, 3]
    rows = json.loads((tmp_path / "runs" / "b" / "report.json").read_text())["rows"]
    assert [r["prune_from"] for r in rows] == [3]
    assert "| prunable from epoch |" in (tmp_path / "runs" / "b" / "report.md").read_text()


@pytest.mark.parametrize("space, message", [
    ({"optim.nope": {"type": "float", "low": 0.1, "high": 0.2}}, "optim.nope"),
    ({"optim.lr": {"type": "gaussian"}}, "needs type: float | int | categorical"),
    ({"optim.lr": {"type": "categorical"}}, "choices"),
    ({"train.epochs": {"type": "int", "low": 1.5, "high": 3}}, "integers"),
    ({"optim.lr": {"type": "float", "low": -1.0, "high": 0.1}}, "optim.lr"),
    ({"optim.lr": {"type": "float", "low": 0.2, "high": 0.1}}, "optim.lr"),
    ([1, 2], "expected a mapping"),
])
def test_a_bad_space_is_one_line_before_any_trial(space, message, cifar_bin, tmp_path, capsys):
    cfg, _ = _setup(cifar_bin, tmp_path)
    bad = write_yaml(tmp_path / "bad.yaml", space)
    assert main(["sweep", "--config", str(cfg), "--space", str(bad), "--trials", "2", "--study", "s"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "runs").exists()


def test_a_sweep_needs_a_validation_split_and_optuna(cifar_bin, tmp_path, monkeypatch, capsys):
    cfg, space = _setup(cifar_bin, tmp_path)
    args = ["sweep", "--config", str(cfg), "--space", str(space), "--trials", "2", "--study", "s"]
    assert main([*args, "--set", "data.val_size=0"]) == 2
    assert "validation split" in capsys.readouterr().err
    block_import(monkeypatch, "optuna")
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == f"vggtrain: {sweep.SWEEP_EXTRA}"


def _sweep_process(cfg: Path, space: Path, trials: int, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vggtrain", "sweep", "--config", str(cfg), "--space",
                             str(space), "--trials", str(trials), "--study", "s"], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_two_processes_share_one_study(cifar_bin, tmp_path):
    cfg, space = _setup(cifar_bin, tmp_path, epochs=1)
    procs = [_sweep_process(cfg, space, 4, tmp_path) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'runs' / 's' / 'study.db'}")
    numbers = sorted(t.number for t in study.trials)
    assert numbers == [0, 1, 2, 3]  # no duplicate, none lost
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    ran = [{int(line.split()[1].rstrip(":")) for line in o[0].splitlines()
            if line.startswith("trial ") and "complete" in line} for o in outs]
    assert ran[0] | ran[1] == {0, 1, 2, 3} and not ran[0] & ran[1]  # each trial ran in one process
    for n in numbers:
        assert (tmp_path / "runs" / "s" / f"trial-{n}" / "best.pt").is_file()


def test_ctrl_c_keeps_finished_trials_and_the_next_sweep_resumes(cifar_bin, tmp_path):
    cfg, space = _setup(cifar_bin, tmp_path, epochs=3)
    proc = _sweep_process(cfg, space, 2, tmp_path)
    wait_for_line(proc, "trial 1:")
    wait_for_line(proc, "epoch 1/3")  # trial 1 has a last.pt
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    study_dir = tmp_path / "runs" / "s"
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{study_dir / 'study.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "RUNNING"]
    params = study.trials[1].params

    proc = _sweep_process(cfg, space, 2, tmp_path)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert f"trial 1 was cut short: queued again, to resume from {study_dir / 'trial-1'}/last.pt" in out
    assert "(resumed)" in out and "resuming at epoch 2" in out
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{study_dir / 'study.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert study.trials[2].params == params  # the same trial, continued under a new number
    assert not (study_dir / "trial-1").exists() and (study_dir / "trial-2" / "best.pt").is_file()
    report = json.loads((study_dir / "report.json").read_text())
    assert report["trials"] == {"COMPLETE": 2, "PRUNED": 0, "FAIL": 0}  # the requeued one is not counted


def test_seeds_summarise_accuracy_and_time_to_target(cifar_bin, tmp_path, capsys):
    cfg, _ = _setup(cifar_bin, tmp_path)
    out = tmp_path / "seeds.json"
    assert main(["seeds", "--config", str(cfg), "--seeds", "2", "--target", "0.3", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(out.read_text())
    runs_dir = tmp_path / "runs" / "tiny-seeds"
    accs = [json.loads((runs_dir / f"seed-{k}" / "report.json").read_text())["metrics"]["top1"]
            for k in (0, 1)]
    assert [r["test_top1"] for r in summary["runs"]] == accs
    assert summary["test_top1"]["median"] == pytest.approx(sum(accs) / 2)
    assert summary["test_top1"]["min"] == min(accs) and summary["test_top1"]["max"] == max(accs)
    assert summary["time_to_target_s"]["n"] == 2  # both reach 30% on the synthetic data
    assert all(0 < r["time_to_target_s"] <= r["train_time_s"] + 1e-6 for r in summary["runs"])
    assert "| test top-1 (%) | 2 |" in printed and "time to 30.00% (s)" in printed
    # calibration, as the seeds' reports have it (tiny's val_size 200: a temperature each)
    eces = [json.loads((runs_dir / f"seed-{k}" / "report.json").read_text())["calibration"]["ece"]
            for k in (0, 1)]
    assert [r["test_ece"] for r in summary["runs"]] == eces and summary["test_ece_calibrated"]["n"] == 2
    assert "| test ECE (%) | 2 |" in printed and "| test ECE after T (%) | 2 |" in printed
    # a rerun reuses finished seeds and adds the new one
    assert _quiet(["seeds", "--config", str(cfg), "--seeds", "3", "--target", "0.3"]) == 0
    assert json.loads((runs_dir / "seeds.json").read_text())["test_top1"]["n"] == 3
    # a seed finished before a config key existed (its report's config lacks it) is still reused;
    # one that ran another config is refused
    from vggtrain.config import digest_of

    seed_report = runs_dir / "seed-0" / "report.json"
    old = json.loads(seed_report.read_text())
    del old["config"]["data"]["val_seed"]
    old["config_digest"] = digest_of(old["config"])
    seed_report.write_text(json.dumps(old))
    assert _quiet(["seeds", "--config", str(cfg), "--seeds", "3"]) == 0
    old["config"]["optim"]["lr"] *= 2
    seed_report.write_text(json.dumps(old))
    assert main(["seeds", "--config", str(cfg), "--seeds", "3"]) == 2
    assert "seed-0 was trained with another config" in capsys.readouterr().err


def test_seeds_reuses_a_finished_seed_whose_data_mean_fit_measured(tmp_path):
    """A folder dataset's run writes its measured data.mean/std into its config (and report); the
    same config asked again, with mean null, is that run: reused, not refused."""
    from test_hostile_round2 import folder_fit_config, write_folder

    cfg = folder_fit_config(tmp_path, write_folder(tmp_path / "images"))
    assert _quiet(["seeds", "--config", str(cfg), "--seeds", "1"]) == 0
    seed_dir = tmp_path / "runs" / "tiny-seeds" / "seed-0"
    assert json.loads((seed_dir / "report.json").read_text())["config"]["data"]["mean"] is not None
    written = (seed_dir / "best.pt").stat().st_mtime_ns
    assert _quiet(["seeds", "--config", str(cfg), "--seeds", "1"]) == 0
    assert (seed_dir / "best.pt").stat().st_mtime_ns == written  # reused, not trained again
    # a stored config today's loader refuses is not this config, whatever its mean
    report = json.loads((seed_dir / "report.json").read_text())
    report["config"]["data"]["mean"] = "bogus"
    (seed_dir / "report.json").write_text(json.dumps(report))
    assert _quiet(["seeds", "--config", str(cfg), "--seeds", "1"]) == 2
