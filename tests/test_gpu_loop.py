"""The GPU loop (issue 39), checked where it can be on the CPU: operators and host syncs per step,
the weight EMA against torch's AveragedModel, Muon's batched orthogonalisation, the background
checkpoint writer, the rates a CUDA graph reads, the fall-back from train.cuda_graphs, the report's
timings. The CUDA-only checks carry the `gpu` marker (scripts/gpu_check.sh runs them)."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from conftest import tiny_config, write_yaml
from vggtrain.averaging import WeightEMA
from vggtrain.checkpoint import CheckpointWriter, load_checkpoint, save_checkpoint
from vggtrain.cli import main
from vggtrain.config import config_from_dict, load_config
from vggtrain.stepcount import count_step

SMALL = ["model.width=0.125", "train.batch_size=16", "train.device=cpu"]  # counts do not depend on size


@pytest.mark.parametrize("config, most_ops", [("vgg16_cifar.yaml", 300), ("airbench94_muon.yaml", 250)])
def test_a_shipped_step_launches_few_operators_and_never_syncs(config, most_ops):
    counted = count_step(load_config(config, SMALL))
    assert counted.syncs == 0, counted.by_op
    assert counted.ops <= most_ops, counted.by_op  # 803 and 475 before issue 39
    assert counted.ops >= 150  # the network's own forward and backward are most of it: it counted them


def test_the_counter_sees_a_host_read_and_a_python_value_copied_in():
    from vggtrain.stepcount import OpCounter

    t = torch.ones(3)
    with OpCounter() as c:
        _ = bool(t.sum() > 0)  # a device read
        _ = torch.tensor([1.0, 2.0])  # a Python value made a tensor: on a GPU, a copy to it
        _ = t * 2
    assert c.syncs == 2 and c.ops >= 4


def _bn_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, after_step) -> None:
    """steps of a toy loss on seeded random batches, after_step() after each optimizer step."""
    for step in range(steps):
        x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        after_step()


def test_the_weight_ema_is_torch_averaged_models_bit_for_bit_and_loads_its_state():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = _bn_net()
    ours = WeightEMA(model, 0.9)
    torchs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, opt, 5, lambda: (ours.step(), torchs.update_parameters(model)))
    mine, theirs = ours.state_dict(), torchs.state_dict()
    assert mine.keys() == theirs.keys() and int(mine["n_averaged"]) == int(theirs["n_averaged"]) == 5
    for k in mine:
        assert torch.equal(mine[k], theirs[k].to(mine[k].device)), k
    # A checkpoint written with AveragedModel (vggtrain before issue 39) resumes into WeightEMA.
    again = WeightEMA(_bn_net(), 0.9)
    again.load_state_dict(theirs)
    assert again.n_averaged == 5 and all(torch.equal(a, b) for a, b in
                                         zip(again.module.state_dict().values(),
                                             torchs.module.state_dict().values(), strict=True))
    with pytest.raises(ValueError):
        again.load_state_dict({"module.0.weight": torch.zeros(1)})


def test_muon_orthogonalises_filters_of_every_shape_in_one_padded_batch():
    from vggtrain.optim import MuonSGD, orthogonalize

    torch.manual_seed(0)
    shapes = [(8, 3, 3, 3), (16, 8, 3, 3), (16, 16, 3, 3), (40, 2, 2, 2)]  # the last is wide: 40 > 8
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    expected = []
    for p in params:  # one filter bank at a time, as before the batching
        g = p.grad + 0.6 * p.grad  # nesterov, first step: buffer = grad
        update = orthogonalize(g.reshape(len(g), -1)).view(g.shape)
        expected.append(p.detach() * (len(p) ** 0.5 / p.detach().norm()) - 0.1 * update)
    opt = MuonSGD([{"params": params, "muon": True, "lr": 0.1, "momentum": 0.6, "nesterov": True,
                    "weight_decay": 0.0}], lr=0.1, momentum=0.6, nesterov=True)
    opt.step()
    for p, e in zip(params, expected, strict=True):
        # bf16 Newton-Schulz: the padded batch sums its products in another order
        torch.testing.assert_close(p.detach(), e, atol=3e-3, rtol=0)


def _sgd_run_with(rates_on_device: bool, name: str) -> list[torch.Tensor]:
    from vggtrain.graphs import lr_on_device
    from vggtrain.optim import build_optimizer
    from vggtrain.schedule import build_scheduler

    cfg = config_from_dict(tiny_config(".", ".", optim={"name": name, "lr": 0.05},
                                       schedule={"kind": "linear", "warmup_epochs": 1}), "t")
    model = _bn_net()
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.schedule, 4, 8)
    if rates_on_device:
        lr_on_device(opt, torch.device("cpu"))
    _train(model, opt, 8, sched.step)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["sgd", "muon"])
def test_rates_as_device_tensors_train_exactly_as_python_floats(name):
    # What a captured CUDA graph reads: the scheduler fills the rate tensors in place.
    for a, b in zip(_sgd_run_with(False, name), _sgd_run_with(True, name), strict=True):
        assert torch.equal(a, b)


def test_checkpoints_are_written_in_the_background_in_order_one_at_a_time(tmp_path):
    gate, written = threading.Event(), []

    def slow_write(path, state):
        gate.wait(10)
        save_checkpoint(path, state)
        written.append(path.name)

    weights = torch.zeros(4)
    writer = CheckpointWriter()
    t0 = time.perf_counter()
    writer.save([tmp_path / "best.pt", tmp_path / "last.pt"], {"model": {"w": weights}, "config": {}},
                write=slow_write)
    assert time.perf_counter() - t0 < 5 and written == []  # returned before writing anything
    weights += 1  # the loop goes on changing the weights: the snapshot keeps the saved values
    gate.set()
    writer.save([tmp_path / "last.pt"], {"model": {"w": weights}, "config": {}}, write=slow_write)
    writer.wait()  # the second save waited for the first
    assert written == ["best.pt", "last.pt", "last.pt"]  # best.pt before last.pt
    assert torch.equal(load_checkpoint(tmp_path / "best.pt")["model"]["w"], torch.zeros(4))
    assert torch.equal(load_checkpoint(tmp_path / "last.pt")["model"]["w"], torch.ones(4))


def test_a_failed_background_write_is_reported_at_the_next_wait(tmp_path):
    writer = CheckpointWriter()
    blocked = tmp_path / "file"
    blocked.write_text("x")
    writer.save([blocked / "last.pt"], {"model": {}, "config": {}})  # a file where the directory goes
    with pytest.raises(OSError):
        writer.wait()
    writer.wait()  # reported once


def test_cuda_graphs_on_the_cpu_warn_in_one_line_and_train_eagerly(cifar_bin, tmp_path, capsys):
    cfg = tiny_config(cifar_bin, tmp_path / "runs", train={"epochs": 1, "cuda_graphs": True,
                                                             "deterministic": True})
    assert main(["fit", "--config", str(write_yaml(tmp_path / "g.yaml", cfg))]) == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "cuda_graphs" in ln]
    assert lines == ["vggtrain: warning: train.cuda_graphs: needs CUDA (the run is on cpu); training "
                     "with the eager step"]
    report = json.loads((tmp_path / "runs" / "tiny" / "report.json").read_text())
    assert report["cuda_graphs"] is False and report["deterministic"] is True
    timings = report["timings_s"]
    assert list(timings) == ["startup_s", "data_load_s", "setup_s", "train_s", "test_s", "report_s",
                             "total_s"]
    assert all(v >= 0 for v in timings.values()) and timings["train_s"] > 0
    assert timings["total_s"] >= sum(v for k, v in timings.items() if k != "total_s") - 0.01
    torch.use_deterministic_algorithms(False)  # the run turned it on for this process


@pytest.mark.gpu
def test_a_cuda_graph_step_trains_as_the_eager_step(cifar_bin, tmp_path):
    """The same run eager and captured: the weights agree to float tolerance (cuDNN may pick
    other algorithms, so not bit for bit), and the captured run really replayed its graph."""
    from vggtrain.fit import fit

    finals = {}
    for graphs in (False, True):
        raw = tiny_config(cifar_bin, tmp_path / str(graphs), data={"val_size": 0},
                          optim={"ema_decay": 0.9},
                          train={"epochs": 2, "device": "cuda", "cuda_graphs": graphs,
                                 "deterministic": True, "precision": "bf16"})
        report = fit(config_from_dict(raw, "t"), tmp_path / str(graphs) / "tiny")
        assert report["cuda_graphs"] is graphs
        finals[graphs] = load_checkpoint(tmp_path / str(graphs) / "tiny" / "last.pt")
    for key, value in finals[False]["model"].items():
        torch.testing.assert_close(finals[True]["model"][key], value, rtol=2e-2, atol=2e-3)


@pytest.mark.gpu
def test_a_deterministic_cuda_run_resumes_bit_identically(cifar_bin, tmp_path, monkeypatch):
    from conftest import die_after_mid_epoch_checkpoint

    base = tiny_config(cifar_bin, tmp_path / "runs", train={"epochs": 2, "device": "cuda",
                                                            "deterministic": True, "precision": "bf16"})
    assert main(["fit", "--config", str(write_yaml(tmp_path / "a.yaml", {**base, "name": "a"}))]) == 0
    base["train"]["checkpoint_every_steps"] = 3
    die_after_mid_epoch_checkpoint(monkeypatch)
    assert main(["fit", "--config", str(write_yaml(tmp_path / "b.yaml", {**base, "name": "b"}))]) == 130
    monkeypatch.undo()
    assert main(["fit", "--resume", str(tmp_path / "runs" / "b")]) == 0
    a, b = (load_checkpoint(tmp_path / "runs" / n / "last.pt")["model"] for n in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
