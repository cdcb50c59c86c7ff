from __future__ import annotations

import math

import pytest
import torch

from vggtrain.config import ModelConfig
from vggtrain.model import VGG_LAYERS, build_model, count_parameters, layer_list


def test_pinned_parameter_counts():
    assert count_parameters(build_model(ModelConfig(arch="vgg16", batch_norm=True))) == 14_728_266
    assert count_parameters(build_model(ModelConfig(arch="vgg11", batch_norm=False))) == 9_225_610


@pytest.mark.parametrize("arch, convs", [("vgg11", 8), ("vgg13", 10), ("vgg16", 13), ("vgg19", 16)])
def test_paper_configurations(arch, convs):
    layers = VGG_LAYERS[arch]
    assert sum(1 for x in layers if x != "M") == convs and layers.count("M") == 5
    model = build_model(ModelConfig(arch=arch, width=0.125))
    assert sum(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
               for m in model.modules()) == convs
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_batch_norm_switch():
    with_bn = build_model(ModelConfig(arch="vgg11", batch_norm=True))
    without = build_model(ModelConfig(arch="vgg11", batch_norm=False))
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in with_bn.modules()) == 8
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in without.modules())


def test_mlp_head_has_the_papers_shape():
    model = build_model(ModelConfig(arch="vgg16", head="mlp", hidden=256, dropout=0.3, num_classes=7))
    linears = [m for m in model.classifier if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 256), (256, 256), (256, 7)]
    drops = [m.p for m in model.classifier if isinstance(m, torch.nn.Dropout)]
    assert drops == [0.3, 0.3]
    linear = build_model(ModelConfig(arch="vgg16", num_classes=7))
    extra = (512 * 256 + 256) + (256 * 256 + 256) + (256 * 7 + 7) - (512 * 7 + 7)
    assert count_parameters(model) - count_parameters(linear) == extra


def test_width_multiplier_and_custom_layers():
    assert layer_list(ModelConfig(arch="vgg11", width=0.5))[:3] == [32, "M", 64]
    cfg = ModelConfig(arch="custom", layers=[8, "M", 16], global_pool="none", num_classes=3)
    model = build_model(cfg)
    assert model.classifier.in_features == 16 * 16 * 16
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    pooled = build_model(ModelConfig(arch="custom", layers=[8, "M", 16], global_pool="max"))
    assert pooled.classifier.in_features == 16


def test_kaiming_init_like_torchvision():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="vgg11"))
    conv = model.features[-4]  # a 512 -> 512 conv
    assert isinstance(conv, torch.nn.Conv2d)
    expected = math.sqrt(2.0 / (conv.out_channels * 9))  # fan_out, ReLU gain
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.02)
    assert torch.count_nonzero(conv.bias) == 0
    assert model.classifier.weight.std().item() == pytest.approx(0.01, rel=0.1)


def test_channels_last_defaults_to_where_it_is_faster():
    from vggtrain.device import channels_last_for

    assert channels_last_for(None, torch.device("cuda")) is True
    assert channels_last_for(None, torch.device("cpu")) is False
    assert channels_last_for(True, torch.device("cpu")) is True
    assert channels_last_for(False, torch.device("cuda")) is False
