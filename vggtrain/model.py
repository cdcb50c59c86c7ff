"""VGG (Simonyan & Zisserman, 2014) sized for 32x32 inputs.

The conv stacks are the paper's configurations A, B, D and E: only 3x3 convolutions (padding 1)
and 2x2 max-pools. With five pools a 32x32 image ends as 1x1x512, so the paper's 224x224 head
(7x7x512 -> 4096 -> 4096) is replaced by a linear 512 -> classes layer, or by a small MLP with
the paper's shape (two hidden layers with ReLU and dropout).
"""

from __future__ import annotations

import torch
from torch import nn

from vggtrain.config import ModelConfig

# The same tables as torchvision.models.vgg (cfgs "A", "B", "D", "E").
VGG_LAYERS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
              512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}
IMAGE_SIZE = 32


def layer_list(cfg: ModelConfig) -> list[int | str]:
    """The conv stack with the width multiplier applied."""
    base = cfg.layers if cfg.arch == "custom" else VGG_LAYERS[cfg.arch]
    assert base is not None  # config validation guarantees layers for arch: custom
    return [x if x == "M" else max(1, round(int(x) * cfg.width)) for x in base]


class VGG(nn.Module):
    def __init__(self, layers: list[int | str], num_classes: int = 10, batch_norm: bool = True,
                 head: str = "linear", hidden: int = 512, dropout: float = 0.5,
                 global_pool: str = "none") -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        channels, size = 3, IMAGE_SIZE
        for x in layers:
            if x == "M":
                blocks.append(nn.MaxPool2d(2, 2))
                size //= 2
                continue
            blocks.append(nn.Conv2d(channels, int(x), kernel_size=3, padding=1))
            if batch_norm:
                blocks.append(nn.BatchNorm2d(int(x)))
            blocks.append(nn.ReLU(inplace=True))
            channels = int(x)
        self.features = nn.Sequential(*blocks)
        pool = {"none": nn.Identity(), "max": nn.AdaptiveMaxPool2d(1), "avg": nn.AdaptiveAvgPool2d(1)}
        self.pool = pool[global_pool]
        in_features = channels if global_pool != "none" else channels * size * size
        if head == "linear":
            self.classifier: nn.Module = nn.Linear(in_features, num_classes)
        else:
            self.classifier = nn.Sequential(
                nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                nn.Linear(hidden, num_classes),
            )
        self._init_weights()

    def _init_weights(self) -> None:
        # As torchvision.models.VGG does.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def build_model(cfg: ModelConfig) -> VGG:
    return VGG(layer_list(cfg), num_classes=cfg.num_classes, batch_norm=cfg.batch_norm,
               head=cfg.head, hidden=cfg.hidden, dropout=cfg.dropout, global_pool=cfg.global_pool)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
