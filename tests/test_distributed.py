"""Data-parallel training under torchrun: two CPU processes with gloo on this machine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from conftest import tiny_config, wait_for_line, write_yaml
from vggtrain.cli import main
from vggtrain.data import Split, train_batches

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", "-m", "vggtrain", *args],
                          env=env, capture_output=True, text=True, timeout=600)


def test_shards_are_disjoint_and_cover_the_split():
    n = 1000
    split = Split(torch.zeros(n, 3, 32, 32, dtype=torch.uint8), torch.arange(n))
    seen = []
    for rank in range(4):
        ys = [y for _, y in train_batches(split, 10, torch.Generator().manual_seed(7), rank=rank, world=4)]
        assert len(ys) == 25  # 250 images per rank
        seen.append(torch.cat(ys))
    everything = torch.cat(seen)
    assert len(everything.unique()) == n  # disjoint, and together the whole split
    one = torch.cat([y for _, y in train_batches(split, 10, torch.Generator().manual_seed(7))])
    assert torch.equal(everything.sort().values, one.sort().values)


def test_torchrun_fit_learns_writes_one_set_and_matches_single_process_eval(cifar_bin, tmp_path, capsys):
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_bin, tmp_path / "runs",
                                                         train={"epochs": 3, "batch_size": 25}))
    proc = _torchrun("fit", "--config", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "tiny"
    out = proc.stdout
    assert out.count("epoch 1/3 |") == 1 and "x 2 ranks (batch 25 each)" in out  # rank 0 alone prints
    assert len(list((run / "tb").iterdir())) == 1  # one event file: rank 0 alone logs
    report = json.loads((run / "report.json").read_text())
    assert report["test"]["acc"] > 0.5 and report["epochs"] == 3

    # The distributed run's sharded, all-reduced validation equals one process measuring best.pt.
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(run / "best.pt"), "--split", "val", "--device", "cpu",
                 "--json", "-"]) == 0
    single = json.loads(capsys.readouterr().out)
    assert single["metrics"]["top1"] == report["val_acc"]
    assert main(["eval", "--ckpt", str(run / "best.pt"), "--device", "cpu", "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["top1"] == report["test"]["acc"]


def test_torchrun_resume_continues_exactly(cifar_bin, tmp_path):
    def cfg(name: str, epochs: int) -> str:
        return str(write_yaml(tmp_path / f"{name}.yaml", tiny_config(
            cifar_bin, tmp_path / "runs", name=name, train={"epochs": epochs, "batch_size": 25})))

    for args in (("--config", cfg("straight", 3)), ("--config", cfg("split", 2)),
                 ("--resume", str(tmp_path / "runs" / "split"), "--set", "train.epochs=3")):
        proc = _torchrun("fit", *args)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(tmp_path / "runs" / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "runs" / "split" / "last.pt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 3 * 16  # 800 images / 2 ranks / 25
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_sigint_to_torchrun_stops_every_rank_with_one_checkpoint(cifar_bin, tmp_path):
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_bin, tmp_path / "runs",
                                                         train={"epochs": 500, "batch_size": 25}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", "-m", "vggtrain", "fit", "--config", str(cfg)],
                            env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_line(proc, "epoch 2/500")
    proc.send_signal(signal.SIGINT)  # torchrun passes it on to every rank
    _, err = proc.communicate(timeout=120)
    assert err.count("vggtrain: stopped by SIGINT") == 1  # rank 0 alone says so
    state = torch.load(tmp_path / "runs" / "tiny" / "last.pt", weights_only=True)
    assert state["epoch"] >= 2 and not (tmp_path / "runs" / "tiny" / "report.json").exists()


def test_a_torchrun_rank_flushes_its_output_and_skips_finalization(tmp_path):
    # A rank ends with os._exit (see cli._exit_without_finalizing): its output, piped and so
    # block-buffered, must still arrive, with the command's exit code; atexit handlers never run.
    script = ("import atexit, sys; atexit.register(print, 'FINALIZED'); "
              "from vggtrain.cli import main; sys.argv = ['vggtrain'] + sys.argv[1:]; sys.exit(main())")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
    ok = subprocess.run([sys.executable, "-c", script, "info"], env=env, capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0 and "torch:" in ok.stdout and "FINALIZED" not in ok.stdout
    bad = subprocess.run([sys.executable, "-c", script, "fit", "--config", str(tmp_path / "no.yaml")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no.yaml" in bad.stderr and "FINALIZED" not in bad.stdout
    env.pop("WORLD_SIZE")
    alone = subprocess.run([sys.executable, "-c", script, "info"], env=env, capture_output=True, text=True,
                           timeout=120)
    assert alone.returncode == 0 and "FINALIZED" in alone.stdout  # one process finalizes as usual


def test_torchrun_accumulation_equals_one_big_batch(cifar_bin, tmp_path):
    """2 ranks x 2 micro-batches of 25 (no_sync on the first: DDP all-reduces the summed gradients
    once) train as one process's batches of 100, without BatchNorm or augmentation."""
    def cfg(name: str, batch: int, accum: int) -> Path:
        return write_yaml(tmp_path / f"{name}.yaml", tiny_config(
            cifar_bin, tmp_path / "runs", name=name, data={"augment": False}, model={"batch_norm": False},
            train={"epochs": 1, "batch_size": batch, "accum_steps": accum}))

    proc = _torchrun("fit", "--config", str(cfg("ddp", 25, 2)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(["fit", "--config", str(cfg("one", 100, 1))]) == 0
    a = torch.load(tmp_path / "runs" / "ddp" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "runs" / "one" / "last.pt", weights_only=True)
    assert a["global_step"] == 16 and b["global_step"] == 8  # batches: 400 per rank / 25; 800 / 100
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5), k
