"""Crash safety, exact resume, graceful stop and hostile input (the reliability issue)."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import tb_scalars, tiny_config, wait_for_line, write_yaml
from vggtrain import fit as fit_module
from vggtrain.atomic import atomic_write
from vggtrain.checkpoint import load_checkpoint, save_checkpoint
from vggtrain.cli import main
from vggtrain.config import config_from_dict
from vggtrain.errors import CheckpointError, UserError
from vggtrain.fit import fit
from vggtrain.train import StopSignals

ROOT = Path(__file__).resolve().parents[1]


def _start_fit(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "vggtrain", "fit", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --- graceful stop ---------------------------------------------------------------------------

@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_after_the_step_saves_and_resumes(cifar_bin, tmp_path, sig, code):
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_bin, tmp_path / "runs",
                                                         train={"epochs": 500}))
    proc = _start_fit("--config", str(cfg))
    wait_for_line(proc, "epoch 1/500")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    run = tmp_path / "runs" / "tiny"
    assert f"stopped by {signal.Signals(sig).name}" in err and f"vggtrain fit --resume {run}" in err
    last = load_checkpoint(run / "last.pt")
    assert 1 <= last["epoch"] < 500 and not (run / "report.json").exists()
    # last.pt is what the stop saved, at the place it names (not merely the last epoch end).
    mid = re.search(r"at epoch (\d+), step (\d+)", err)
    if mid:
        assert (last["epoch"], last["progress"]["step"]) == (int(mid[1]) - 1, int(mid[2])), err
    else:
        after = re.search(r"after epoch (\d+)", err)
        assert after and (last["epoch"], last["progress"]["step"]) == (int(after[1]), 0), err
    # The stop landed mid-epoch: the resumed epoch must pick up at the saved step.
    assert main(["fit", "--resume", str(run), "--set", f"train.epochs={last['epoch'] + 1}"]) == 0
    assert json.loads((run / "report.json").read_text())["epochs"] == last["epoch"] + 1


def test_second_signal_aborts_at_once():
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT  # the first one only asks
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(cifar_bin, tmp_path):
    cfg = tiny_config(cifar_bin, tmp_path / "runs", train={"epochs": 6, "batch_size": 25,
                                                          "checkpoint_every_steps": 5})
    killed = write_yaml(tmp_path / "killed.yaml", {**cfg, "name": "killed"})
    proc = _start_fit("--config", str(killed))
    wait_for_line(proc, "epoch 2/6")
    time.sleep(0.2)
    proc.kill()
    proc.wait(timeout=30)
    run = tmp_path / "runs" / "killed"
    assert not (run / "report.json").exists(), "the kill came too late to test anything"
    saved = load_checkpoint(run / "last.pt")  # loadable whatever instant the kill hit
    load_checkpoint(run / "best.pt")
    assert saved["global_step"] >= 2 * 32
    assert main(["fit", "--resume", str(run)]) == 0

    straight = write_yaml(tmp_path / "straight.yaml", {**cfg, "name": "straight"})
    assert main(["fit", "--config", str(straight)]) == 0
    a = load_checkpoint(tmp_path / "runs" / "straight" / "last.pt")
    b = load_checkpoint(run / "last.pt")
    assert a["global_step"] == b["global_step"] == 6 * 32
    _same_weights(a["model"], b["model"])
    report_a = json.loads((tmp_path / "runs" / "straight" / "report.json").read_text())
    report_b = json.loads((run / "report.json").read_text())
    assert report_a["test"] == report_b["test"]
    # What the killed run logged after its last checkpoint was purged on resume, then logged
    # again: the curves have each step once, as the straight run's do.
    sa, sb = tb_scalars(tmp_path / "runs" / "straight"), tb_scalars(run)
    for tag in ("train/loss_step", "train/loss", "train/lr", "val/acc"):
        assert [step for step, _ in sa[tag]] == [step for step, _ in sb[tag]], tag
        assert [v for _, v in sa[tag]] == pytest.approx([v for _, v in sb[tag]]), tag


def test_a_resume_in_the_same_second_as_the_killed_run_keeps_the_curves_in_order(cifar_bin, tmp_path):
    # TensorBoard reads a run's event files in name order: the second the writer opened, then its
    # pid. Name the first run's file as a writer opened in the coming second by a high pid would
    # (a kill and resume within one second, or a clock a little ahead): the resumed run's file
    # must still be read after it, or its steps come before the first run's.
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_bin, tmp_path / "runs",
                                                         train={"epochs": 1, "log_every": 1}))
    assert main(["fit", "--config", str(cfg)]) == 0
    run = tmp_path / "runs" / "tiny"
    [first] = (run / "tb").glob("events.out.tfevents.*")
    parts = first.name.split(".")
    parts[3], parts[-2] = str(int(time.time()) + 1), "9999999"
    first.rename(first.with_name(".".join(parts)))
    assert main(["fit", "--resume", str(run), "--set", "train.epochs=2"]) == 0
    assert sorted((run / "tb").glob("events.out.tfevents.*"))[0].name == ".".join(parts)
    steps = [step for step, _ in tb_scalars(run)["train/loss_step"]]
    assert steps == list(range(1, load_checkpoint(run / "last.pt")["global_step"] + 1))


def test_one_process_at_a_time_trains_in_a_run_directory(cifar_bin, tmp_path, capsys):
    fcntl = pytest.importorskip("fcntl")
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_bin, tmp_path / "runs",
                                                         train={"epochs": 1}))
    assert main(["fit", "--config", str(cfg)]) == 0
    run = tmp_path / "runs" / "tiny"
    before = sorted(p.name for p in run.iterdir())
    stale = run / ".last.pt.k1ll3d.tmp"  # what a SIGKILL in the middle of a save leaves
    stale.write_bytes(b"half a checkpoint")
    others = run / ".notes.txt.x1.tmp"  # another program's: not fit's to delete
    others.write_bytes(b"")
    capsys.readouterr()

    holder = os.open(run, os.O_RDONLY)  # the lock a run still training (or still saving) holds
    try:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for args in (["--resume", str(run), "--set", "train.epochs=2"], ["--config", str(cfg), "--force"]):
            assert main(["fit", *args]) == 2
            err = capsys.readouterr().err
            assert err == f"vggtrain: run directory {run} is in use by another vggtrain process; " \
                          f"wait for it to end, or stop it, then run this again\n", err
            assert sorted(p.name for p in run.iterdir()) == sorted([*before, stale.name, others.name])
    finally:
        os.close(holder)
    assert main(["fit", "--resume", str(run), "--set", "train.epochs=2"]) == 0
    assert not stale.exists() and others.exists()
    assert load_checkpoint(run / "last.pt")["epoch"] == 2
    holder = os.open(run, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the finished run let go of it
    finally:
        os.close(holder)


@pytest.mark.parametrize("other_run_is_live", [True, False])
def test_a_run_of_the_same_name_started_while_the_data_loaded_is_left_alone(
        cifar_bin, tmp_path, monkeypatch, capsys, other_run_is_live):
    # Both processes found no run directory at first; the other one created (and locked) it while
    # this one loaded its data. --force must not delete a live run, nor a plain fit use a new one.
    fcntl = pytest.importorskip("fcntl")
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_bin, tmp_path / "runs",
                                                         train={"epochs": 1}))
    run = tmp_path / "runs" / "tiny"
    load_dataset, holder = fit_module.load_dataset, []

    def load_while_the_other_run_starts(*args, **kwargs):
        run.mkdir(parents=True)
        (run / "config.yaml").write_text((tmp_path / "tiny.yaml").read_text())
        if other_run_is_live:
            holder.append(os.open(run, os.O_RDONLY))
            fcntl.flock(holder[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
        return load_dataset(*args, **kwargs)

    monkeypatch.setattr(fit_module, "load_dataset", load_while_the_other_run_starts)
    try:
        assert main(["fit", "--config", str(cfg), *(["--force"] if other_run_is_live else [])]) == 2
    finally:
        for fd in holder:
            os.close(fd)
    err = capsys.readouterr().err
    assert ("is in use by another vggtrain process" if other_run_is_live else "already exists") in err
    assert [p.name for p in run.iterdir()] == ["config.yaml"]


def test_a_resume_refuses_a_checkpoint_saved_again_after_it_was_read(cifar_bin, tmp_path, capsys):
    # The run's previous process was still finishing its last save when the resume read last.pt.
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_bin, tmp_path / "runs",
                                                         train={"epochs": 1}))
    assert main(["fit", "--config", str(cfg)]) == 0
    last = tmp_path / "runs" / "tiny" / "last.pt"
    read = load_checkpoint(last)
    save_checkpoint(last, {**read, "global_step": read["global_step"] + 1})
    capsys.readouterr()
    cfg2 = config_from_dict(read["config"], "last.pt")
    cfg2.train.epochs = 2
    with pytest.raises(UserError, match="was saved again while this resume read it"):
        fit(cfg2, last.parent, resume=(last, read))
    assert load_checkpoint(last)["global_step"] == read["global_step"] + 1  # left as it was


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(cifar_bin, tmp_path, capsys):
    # An absurd learning rate and no batch norm to lean on: the loss blows up within steps.
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(
        cifar_bin, tmp_path / "runs", model={"batch_norm": False},
        optim={"lr": 100.0, "momentum": 0.99}, train={"checkpoint_every_steps": 1, "log_every": 1}))
    assert main(["fit", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "at epoch 1, step" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    bad_step = int(err.split("step ")[1].split(";")[0])
    last = load_checkpoint(tmp_path / "runs" / "tiny" / "last.pt")
    assert last["global_step"] == bad_step - 1  # the step before the bad one
    assert all(torch.isfinite(t).all() for t in last["model"].values() if t.is_floating_point())


def test_resume_refuses_changes_that_would_not_apply(cifar_bin, tmp_path, capsys):
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_bin, tmp_path / "runs",
                                                         train={"epochs": 1}))
    assert main(["fit", "--config", str(cfg)]) == 0
    capsys.readouterr()
    assert main(["fit", "--resume", str(tmp_path / "runs" / "tiny"), "--set", "optim.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr cannot change when resuming (the run has 0.05, asked 0.5)" in err
    assert main(["fit", "--config", str(cfg), "--resume", "--set", "seed=3"]) == 2
    assert "seed cannot change when resuming" in capsys.readouterr().err


# --- atomic writes ---------------------------------------------------------------------------

def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {}, "config": {}, "epoch": 1})

    def torn(f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, torn)
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def _disk_fills_at(monkeypatch, name: str, after: int = 0) -> None:
    """The disk fills up while `name` is written (after `after` whole writes of it): its fsync
    fails with ENOSPC, as a delayed-allocation filesystem reports it."""
    real_fsync, writes = os.fsync, []

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        if Path(target).name.startswith(f".{name}."):  # atomic_write's temp file for name
            writes.append(target)
            if len(writes) > after:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # no thread traceback
@pytest.mark.parametrize("name, after", [("last.pt", 1), ("report.md", 0), ("report.json", 0),
                                         ("events", 0), ("config.yaml", 0), ("metrics.csv", 1)])
def test_a_full_disk_is_one_line_and_loses_nothing(cifar_bin, tmp_path, capsys, monkeypatch, name, after):
    # One line naming the file and the cause, exit 74, the files written before it whole, no temp
    # file, and the run goes on once there is space: from its checkpoint, or from the start.
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_bin, tmp_path / "runs", train={"epochs": 2}))
    run = tmp_path / "runs" / "tiny"
    if name == "events":  # TensorBoard's writer thread: the failure surfaces at a later call
        from tensorboard.summary.writer.record_writer import RecordWriter

        real_write = RecordWriter.write

        def write(self, data):
            if (run / "last.pt").exists():  # from the first write after epoch 1's checkpoint
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(self, data)

        monkeypatch.setattr(RecordWriter, "write", write)
    else:
        _disk_fills_at(monkeypatch, name, after)
    assert main(["fit", "--config", str(cfg)]) == 74
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    where = r"\S*tfevents\S*" if name == "events" else re.escape(str(run / name))
    then = "start it again with --force" if name == "config.yaml" else f"vggtrain fit --resume {run}"
    assert re.search(rf"^vggtrain: cannot write {where}: No space left on device; .* free space, "
                     rf"then {re.escape(then)}", err), err
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]  # no temp file left behind
    if name == "last.pt":  # epoch 1's checkpoints are whole; epoch 2 is redone on resume
        assert load_checkpoint(run / "last.pt")["epoch"] == 1
    monkeypatch.undo()  # space freed
    again = ["--config", str(cfg), "--force"] if name == "config.yaml" else ["--resume", str(run)]
    assert main(["fit", *again]) == 0
    assert json.loads((run / "report.json").read_text())["epochs"] == 2


def test_a_really_full_disk_mid_run(cifar_bin, tmp_path, capsys):
    # The kernel's own ENOSPC on a small tmpfs, filled up after epoch 1: it reaches torch.save's zip
    # writer, which reports it as "RuntimeError: unexpected pos" unless the OSError is dug out.
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        cfg = tiny_config(cifar_bin, disk, train={"epochs": 2})
        cfg["model"]["layers"] = [32, "M", 64, "M", 64, "M"]  # 0.5 MB checkpoints: written in parts
        cfg = config_from_dict(cfg, "test")
        run, filler = disk / "tiny", disk / "filler"

        def fill_the_disk(r) -> bool:
            r.checkpoints.wait()  # epoch 1's checkpoints on disk (they are written in the background)
            with filler.open("wb", buffering=0) as f, pytest.raises(OSError, match="No space left"):
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            # room for part of a checkpoint: torch.save fails after it has written some of it
            os.truncate(filler, filler.stat().st_size - 200_000)
            return False

        from vggtrain.cli import run_reporting_errors

        code = run_reporting_errors("vggtrain", lambda: fit(cfg, run, on_epoch_end=fill_the_disk))
        err = capsys.readouterr().err
        assert code == 74 and err.count("\n") == 1, err
        assert re.match(rf"vggtrain: cannot write {re.escape(str(run))}/(best|last)\.pt: No space left on "
                        rf"device; .* vggtrain fit --resume {re.escape(str(run))}$", err.strip()), err
        assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
        assert load_checkpoint(run / "last.pt")["epoch"] == 1
        filler.unlink()  # space freed
        assert main(["fit", "--resume", str(run)]) == 0
        assert json.loads((run / "report.json").read_text())["epochs"] == 2
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# --- hostile and broken checkpoints -------------------------------------------------------------

class _Payload:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _broken_checkpoints(tmp_path: Path, good: Path) -> dict[str, Path]:
    files = {}
    marker = tmp_path / "pwned"
    files["payload"] = tmp_path / "payload.pt"
    torch.save({"model": {}, "config": {}, "x": _Payload(marker)}, files["payload"])
    files["raw-pickle"] = tmp_path / "raw.pt"
    files["raw-pickle"].write_bytes(pickle.dumps(_Payload(marker)))
    files["empty"] = tmp_path / "empty.pt"
    files["empty"].write_bytes(b"")
    files["random"] = tmp_path / "random.pt"
    files["random"].write_bytes(os.urandom(4096))
    files["truncated"] = tmp_path / "truncated.pt"
    files["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    files["not-ours"] = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(3)}, files["not-ours"])
    return files


def test_hostile_and_broken_checkpoints_are_refused(cifar_bin, tmp_path, capsys):
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_bin, tmp_path / "runs",
                                                         train={"epochs": 1}))
    assert main(["fit", "--config", str(cfg)]) == 0
    good = tmp_path / "runs" / "tiny" / "last.pt"
    capsys.readouterr()
    for kind, path in _broken_checkpoints(tmp_path, good).items():
        with pytest.raises(CheckpointError):
            load_checkpoint(path)
        assert main(["fit", "--resume", str(path)]) == 2, kind
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "checkpoint error" in err and "Traceback" not in err, (kind, err)
    assert not (tmp_path / "pwned").exists()
    bad = tmp_path / "progress.pt"  # loads, but cannot be resumed
    torch.save({**load_checkpoint(good), "progress": [3]}, bad)
    assert main(["fit", "--resume", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no epoch progress entry" in err


def test_wrong_architecture_or_class_count_is_refused(cifar_bin, tmp_path, capsys):
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_bin, tmp_path / "runs",
                                                         train={"epochs": 1}))
    assert main(["fit", "--config", str(cfg)]) == 0
    run = tmp_path / "runs" / "tiny"
    capsys.readouterr()
    assert main(["fit", "--resume", str(run), "--set", "model.layers=[8, M, 32, M]"]) == 2
    assert "model.layers cannot change when resuming" in capsys.readouterr().err

    state = load_checkpoint(run / "last.pt")
    state["model"]["classifier.weight"] = state["model"]["classifier.weight"][:5]
    state["model"]["classifier.bias"] = state["model"]["classifier.bias"][:5]
    save_checkpoint(tmp_path / "five.pt", state)
    assert main(["fit", "--resume", str(tmp_path / "five.pt"), "--set", "train.epochs=2"]) == 2
    err = capsys.readouterr().err
    assert "weights do not fit this model" in err and "classifier.weight" in err


# --- run directories, diverged weights, the schedule --------------------------------------------

def test_force_deletes_only_run_directories(cifar_bin, tmp_path, capsys):
    precious = tmp_path / "out" / "data"
    precious.mkdir(parents=True)
    (precious / "keep.txt").write_text("not a run")
    (precious / "config.yaml").write_text("jobs: 4\n")  # somebody else's config.yaml
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_bin, tmp_path / "out", train={"epochs": 1}))
    assert main(["fit", "--config", str(cfg), "--name", "data", "--force"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force refuses to delete" in err and "not a run directory" in err
    assert (precious / "keep.txt").read_text() == "not a run"
    (tmp_path / "out" / "afile").write_text("x")
    assert main(["fit", "--config", str(cfg), "--name", "afile"]) == 2
    assert "is a file" in capsys.readouterr().err
    blocked = write_yaml(tmp_path / "b.yaml", tiny_config(cifar_bin, tmp_path / "out" / "afile"))
    assert main(["fit", "--config", str(blocked)]) == 2  # out_dir under a file: mkdir fails
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write it" in err and "Traceback" not in err
    assert main(["fit", "--config", str(cfg), "--name", "run1"]) == 0
    assert main(["fit", "--config", str(cfg), "--name", "run1", "--force"]) == 0  # a run: deleted


def test_force_whose_delete_fails_halfway_leaves_no_half_run(cifar_bin, tmp_path, monkeypatch):
    import vggtrain.rundir as rundir_module

    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_bin, tmp_path / "runs", train={"epochs": 1}))
    assert main(["fit", "--config", str(cfg)]) == 0

    def rmtree_that_fails(path, *args, **kwargs):  # as a file it may not remove would make it
        for f in sorted(Path(path).rglob("*.pt")):
            f.unlink()
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(rundir_module.shutil, "rmtree", rmtree_that_fails)
    with pytest.warns(UserWarning, match="remove that directory by hand"):
        assert main(["fit", "--config", str(cfg), "--force", "--set", "seed=5"]) == 0
    monkeypatch.undo()
    run = tmp_path / "runs" / "tiny"
    assert load_checkpoint(run / "last.pt")["config"]["seed"] == 5 and (run / "report.json").is_file()
    assert len(list((tmp_path / "runs").glob(".tiny.deleting-*"))) == 1  # named in the warning


def test_force_deletes_nothing_until_data_and_config_check_out(cifar_bin, tmp_path, capsys):
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_bin, tmp_path / "runs", train={"epochs": 1}))
    assert main(["fit", "--config", str(cfg)]) == 0
    last = tmp_path / "runs" / "tiny" / "last.pt"
    before = last.read_bytes()
    capsys.readouterr()
    assert main(["fit", "--config", str(cfg), "--force", "--set", f"data.root={tmp_path / 'nodata'}",
                 "--set", "data.download=false"]) == 2
    assert main(["fit", "--config", str(cfg), "--force", "--set", "train.batch_size=5000"]) == 2
    assert main(["fit", "--config", str(cfg), "--force", "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 3 and "--resume and --force exclude each other" in err
    assert last.read_bytes() == before


def test_exit_codes_of_the_error_kinds(capsys):
    from vggtrain.cli import run_reporting_errors
    from vggtrain.errors import RunStopped, UserError, WriteError

    def raises(e: BaseException):
        def command() -> int:
            raise e
        return command

    assert run_reporting_errors("x", lambda: 0) == 0
    assert run_reporting_errors("x", raises(UserError("config error: bad"))) == 2
    assert capsys.readouterr().err == "x: config error: bad\n"
    assert run_reporting_errors("x", raises(WriteError("cannot write f: No space left"))) == 74
    assert run_reporting_errors("x", raises(RunStopped("stopped by SIGTERM", 143))) == 143
    assert run_reporting_errors("x", raises(KeyboardInterrupt())) == 130
    capsys.readouterr()
    assert run_reporting_errors("x", raises(ZeroDivisionError("a bug"))) == 1
    err = capsys.readouterr().err  # a bug is reported with its traceback
    assert "Traceback" in err and "ZeroDivisionError: a bug" in err and "unexpected failure" in err


def test_a_crash_between_best_and_last_redoes_that_epoch(cifar_bin, tmp_path, monkeypatch):
    # Without validation every epoch is the best: both checkpoints are written at each epoch end.
    import vggtrain.train as train_module

    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_bin, tmp_path / "runs",
                                                         data={"val_size": 0}, train={"epochs": 2}))
    real_save, written = train_module.save_checkpoint, []

    def save_then_die(path, state):
        epoch_end_2 = state["epoch"] == 2 and not state["progress"]["step"]
        if epoch_end_2 and written:
            raise KeyboardInterrupt  # killed after the first of epoch 2's two writes
        real_save(path, state)
        if epoch_end_2:
            written.append(path.name)

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    assert main(["fit", "--config", str(cfg)]) == 130
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    run = tmp_path / "runs" / "tiny"
    assert main(["fit", "--resume", str(run)]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["best_epoch"] == 2, "the report tested a best.pt older than last.pt's best epoch"
    assert load_checkpoint(run / "best.pt")["epoch"] == load_checkpoint(run / "last.pt")["epoch"] == 2


def test_resume_refuses_what_it_would_get_wrong(cifar_bin, tmp_path, capsys):
    import shutil

    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_bin, tmp_path / "runs", train={"epochs": 1}))
    assert main(["fit", "--config", str(cfg)]) == 0
    run = tmp_path / "runs" / "tiny"
    before = (run / "report.json").read_bytes()
    capsys.readouterr()
    assert main(["fit", "--resume", str(run)]) == 2  # finished and reported: nothing to do
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has finished its 1 epochs" in err and "vggtrain eval --ckpt" in err
    assert main(["fit", "--resume", str(run), "--config", str(cfg), "--set", "train.epochs=2"]) == 2
    assert "drop --config" in capsys.readouterr().err

    permuted = tmp_path / "permuted"  # the same data with two class names swapped
    shutil.copytree(cifar_bin, permuted)
    meta = permuted / "cifar-10-batches-bin" / "batches.meta.txt"
    names = meta.read_text().split()
    meta.write_text("\n".join([names[1], names[0], *names[2:]]) + "\n")
    assert main(["fit", "--resume", str(run), "--set", "train.epochs=2",
                 "--set", f"data.root={json.dumps(str(permuted))}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trained on the classes" in err
    assert (run / "report.json").read_bytes() == before
    assert load_checkpoint(run / "last.pt")["epoch"] == 1


def test_non_finite_weights_stop_before_the_checkpoint(cifar_bin, tmp_path, capsys, monkeypatch):
    # No validation to catch it and every loss finite: the epoch's last update alone breaks the net.
    import vggtrain.train as train_module

    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_bin, tmp_path / "runs",
                                                         data={"val_size": 0}, train={"epochs": 2}))
    real_step = train_module.train_step

    def step(run, x, y, criterion):
        out = real_step(run, x, y, criterion)
        if run.epoch == 1 and run.progress.step == 19:  # the last of 20 steps of epoch 2
            next(run.model.parameters()).data[0] = float("nan")
        return out

    monkeypatch.setattr(train_module, "train_step", step)
    assert main(["fit", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "non-finite weights after epoch 2: training diverged" in err, err
    run = tmp_path / "runs" / "tiny"
    for name in ("last.pt", "best.pt"):
        state = load_checkpoint(run / name)
        assert state["epoch"] == 1
        assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert not (run / "report.json").exists()


def test_logged_rate_is_the_one_each_epoch_starts_with(cifar_bin, tmp_path, capsys):
    # 800 training images, batch 50: 16 steps; one warm-up epoch starts at lr / 16.
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(
        cifar_bin, tmp_path / "runs", schedule={"warmup_epochs": 1, "step_size": 1, "gamma": 0.5},
        train={"epochs": 3}))
    assert main(["fit", "--config", str(cfg)]) == 0
    rates = [line.split("| lr ")[1].split(" ")[0] for line in capsys.readouterr().out.splitlines()
             if line.startswith("epoch ")]
    assert rates == ["0.003125", "0.05", "0.025"]


def test_epoch_end_resume_with_another_rank_count_keeps_the_schedule(cifar_bin, tmp_path):
    # A checkpoint as 2 ranks write it after epoch 1 (8 steps each), resumed by one process
    # (16 steps an epoch): warm-up ends with the second epoch at the full rate, as it would have.
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_bin, tmp_path / "runs",
                                                         schedule={"warmup_epochs": 2}, train={"epochs": 1}))
    assert main(["fit", "--config", str(cfg)]) == 0
    last = tmp_path / "runs" / "tiny" / "last.pt"
    state = load_checkpoint(last)
    # The rate of the next step: step 17 of the 32 warm-up steps.
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.05 * 17 / 32)
    save_checkpoint(last, {**state, "global_step": 8, "world_size": 2})
    assert main(["fit", "--resume", str(last.parent), "--set", "train.epochs=2"]) == 0
    assert load_checkpoint(last)["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.05)


def test_ctrl_c_in_bench_interrupts_without_a_resume_hint(tmp_path, capsys, monkeypatch):
    # bench trains in a temporary directory: there is nothing to resume afterwards.
    import vggtrain.bench as bench_module

    real = bench_module.train_one_epoch

    def interrupted(*args):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args)

    monkeypatch.setattr(bench_module, "train_one_epoch", interrupted)
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(tmp_path / "unused", tmp_path / "runs"))
    assert main(["bench", "--config", str(cfg), "--parts", "fit", "--steps", "2", "--warmup", "1"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" not in err


def test_unwritable_bench_json_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "bench.json"
    assert main(["bench", "--config", "smoke.yaml", "--parts", "bare", "--steps", "1", "--warmup", "1",
                 "--set", "train.batch_size=8", "--set", "train.device=cpu", "--json", str(out)]) == 2
    captured = capsys.readouterr()
    assert "bare step" in captured.out  # what was measured is shown before the write fails
    assert captured.err.count("\n") == 1 and f"--json {out}: cannot write it" in captured.err
