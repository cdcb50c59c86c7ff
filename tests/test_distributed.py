"""Data-parallel training under torchrun: two CPU processes with gloo on this machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from conftest import tiny_config, write_yaml
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
