"""`vggtrain summary` (issue 3): per-layer shapes, parameters, MACs; totals match the real model."""

from __future__ import annotations

import time

import pytest

from conftest import write_yaml
from vggtrain.cli import main
from vggtrain.config import PROJECT_CONFIGS, ModelConfig, load_config
from vggtrain.model import VGG_LAYERS, blocks, build_model, count_parameters
from vggtrain.summary import summarize


def _macs_by_hand(layers: list, classes: int = 10) -> int:
    """Convolutions at 'same' padding: H*W*Cout*Cin*9 each; five pools leave 1x1x512 -> linear."""
    total, c, size = 0, 3, 32
    for x in layers:
        if x == "M":
            size //= 2
        else:
            total += size * size * x * c * 9
            c = x
    return total + c * size * size * classes


@pytest.mark.parametrize("path", sorted(PROJECT_CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_parameter_total_is_the_models(path):
    cfg = load_config(str(path))
    rows = summarize(cfg.model)
    assert sum(r.params for r in rows) == count_parameters(build_model(cfg.model))


@pytest.mark.parametrize("model", [
    ModelConfig(arch="vgg16"),
    ModelConfig(arch="vgg11", batch_norm=False, head="mlp", hidden=256, num_classes=7),
    ModelConfig(arch="custom", layers=[8, "M", 16, 16, "M"], global_pool="avg", width=1.5),
    ModelConfig(arch="vgg13", global_pool="max"),
])
def test_other_models_match_too(model):
    assert sum(r.params for r in summarize(model)) == count_parameters(build_model(model))


def test_vgg16_rows():
    rows = summarize(ModelConfig(arch="vgg16"))
    assert [r.name for r in rows][:6] == ["conv1_1", "conv1_2", "pool1", "conv2_1", "conv2_2", "pool2"]
    assert [r.name for r in rows][-3:] == ["conv5_3", "pool5", "fc"]
    by = {r.name: r for r in rows}
    assert by["conv1_1"].shape == (64, 32, 32) and by["conv1_1"].params == 3 * 64 * 9 + 64 + 2 * 64
    assert by["conv1_1"].macs == 32 * 32 * 64 * 3 * 9
    assert by["conv4_2"].shape == (512, 4, 4) and by["pool5"].shape == (512, 1, 1)
    assert by["fc"].params == 5130 and by["fc"].macs == 5120
    assert sum(r.macs for r in rows) == _macs_by_hand(VGG_LAYERS["vgg16"]) == 313_201_664
    # receptive fields: +2 per 3x3 conv, doubled steps after each pool
    assert [by[n].rf for n in ("conv1_1", "conv1_2", "pool1", "conv2_1")] == [3, 5, 6, 10]


def test_cli_prints_the_table_and_the_papers_argument(capsys):
    assert main(["summary", "--config", "vgg16_cifar"]) == 0
    out = capsys.readouterr().out
    # vgg16_cifar.yaml's convolutions have no bias (BN follows each): 4,224 fewer than the paper's 14,728,266
    assert "14,724,042" in out and "313,201,664" in out
    conv = next(line for line in out.splitlines() if line.startswith("conv3_2 "))
    assert conv.split()[:2] == ["conv3_2", "conv"] and "256x8x8" in conv and "590,336" in conv  # + BN
    # stage 4 holds 40% of the weights, stage 1 a quarter of a percent but an eighth of the MACs
    stage1 = next(line for line in out.splitlines() if line.startswith("stage 1 ")).split()
    assert stage1[2:] == ["32x32", "0.3%", "12.6%"]
    # three 3x3 convs (7x7 receptive field) against one 7x7: 27C^2 vs 49C^2 weights
    assert "7x7" in out and f"{3 * 9 * 512 * 512:,}" in out and f"{49 * 512 * 512:,}" in out
    assert "1.81x" in out


def test_huge_models_are_summarised_without_allocating_them():
    t0 = time.perf_counter()
    rows = summarize(ModelConfig(arch="vgg19", width=16))  # ~3.7 billion parameters: 15 GB as floats
    assert time.perf_counter() - t0 < 10
    widths = [x * 16 for x in VGG_LAYERS["vgg19"] if x != "M"]
    ins = [3, *widths[:-1]]
    fc = widths[-1] * 10 + 10
    expected = sum(9 * cin * cout + 3 * cout for cin, cout in zip(ins, widths, strict=True)) + fc
    assert sum(r.params for r in rows) == expected > 3e9


def test_names_shared_with_gradcam():
    model = build_model(ModelConfig(arch="vgg11", batch_norm=True))
    named = {b.name: b for b in blocks(model)}
    assert named["conv5_2"].output[0] == "features.27"  # its ReLU, after conv and BN
    assert [m for m, _ in named["conv1_1"].modules] == ["features.0", "features.1", "features.2"]


def test_cli_overrides_and_errors(tmp_path, capsys):
    assert main(["summary", "--config", "vgg11_cifar", "--set", "model.width=0.5"]) == 0
    half = capsys.readouterr().out
    assert half.startswith("vgg11 (width x0.5)") and "3->32" in half
    cfg = write_yaml(tmp_path / "c.yaml", {"model": {"arch": "vgg99"}})
    assert main(["summary", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.arch must be one of" in err
    assert main(["summary", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "no such config file" in capsys.readouterr().err
