"""VGG (Simonyan & Zisserman, 2014) sized for 32x32 inputs.

The conv stacks are the paper's configurations A, B, D and E: only 3x3 convolutions (padding 1)
and 2x2 max-pools. With five pools a 32x32 image ends as 1x1x512, so the paper's 224x224 head
(7x7x512 -> 4096 -> 4096) is replaced by a linear 512 -> classes layer, or by a small MLP with
the paper's shape (two hidden layers with ReLU and dropout).

airbench's options change the blocks, not the stack: the order conv -> pool -> BN -> activation
for a convolution followed by a pool, GELU, BN momentum and eps, convolutions without bias, and
a fixed whitening layer (of 3x3 patches as the first convolution, or of 2x2 patches in front).
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
WHITEN_2X2_WIDTH = 2 * 3 * 2 * 2  # +/- each eigenvector of the 12-dimensional 2x2 RGB patches


def layer_list(cfg: ModelConfig) -> list[int | str]:
    """The conv stack with the width multiplier applied."""
    base = cfg.layers if cfg.arch == "custom" else VGG_LAYERS[cfg.arch]
    assert base is not None  # config validation guarantees layers for arch: custom
    return [x if x == "M" else max(1, round(int(x) * cfg.width)) for x in base]


def _activation(name: str) -> nn.Module:
    return nn.GELU() if name == "gelu" else nn.ReLU(inplace=True)


class VGG(nn.Module):
    def __init__(self, layers: list[int | str], num_classes: int = 10, batch_norm: bool = True,
                 head: str = "linear", hidden: int = 512, dropout: float = 0.5,
                 global_pool: str = "none", identity_init: bool = False, bn_weight: bool = True,
                 logit_scale: float = 1.0, whiten: str = "none",
                 block_order: str = "conv_bn_act_pool", activation: str = "relu", conv_bias: bool = True,
                 bn_momentum: float = 0.1, bn_eps: float = 1e-5) -> None:
        super().__init__()
        self.logit_scale = logit_scale
        self.whiten_mode = None if whiten == "none" else whiten  # model.whiten: none, 3x3 or 2x2
        channels, size = 3, IMAGE_SIZE
        self.stem: nn.Module = nn.Identity()
        if self.whiten_mode == "2x2":  # airbench's first layer: no BN, padding 0 (31x31 out)
            self.stem = nn.Sequential(nn.Conv2d(3, WHITEN_2X2_WIDTH, 2, padding=0, bias=True),
                                      _activation(activation))
            channels, size = WHITEN_2X2_WIDTH, IMAGE_SIZE - 1
        blocks: list[nn.Module] = []
        pool_first = block_order == "conv_pool_bn_act"
        i = 0
        while i < len(layers):
            x = layers[i]
            i += 1
            if x == "M":
                blocks.append(nn.MaxPool2d(2, 2))
                size //= 2
                continue
            blocks.append(nn.Conv2d(channels, int(x), kernel_size=3, padding=1, bias=conv_bias))
            if pool_first and i < len(layers) and layers[i] == "M":
                blocks.append(nn.MaxPool2d(2, 2))  # BN and activation on the pooled map
                size //= 2
                i += 1
            if batch_norm:
                blocks.append(nn.BatchNorm2d(int(x), eps=bn_eps, momentum=bn_momentum))
            blocks.append(_activation(activation))
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
        self._init_weights(identity_init)
        if not bn_weight:  # fixed at 1: the BN layer only shifts
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.requires_grad_(False)
        if self.whiten_mode:  # a fixed layer: init_whitening fills it from the training images
            self.whitening().weight.requires_grad_(False)

    def _init_weights(self, identity_init: bool) -> None:
        # As torchvision.models.VGG does.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)
        if identity_init:  # airbench's Dirac init: a new layer starts by passing its input through
            for m in self.convs()[0 if self.whiten_mode == "2x2" else 1:]:
                with torch.no_grad():
                    nn.init.dirac_(m.weight[:m.in_channels])

    def convs(self) -> list[nn.Conv2d]:
        """The convolutions of the layer list (not the 2x2 whitening in front)."""
        return [m for m in self.features if isinstance(m, nn.Conv2d)]

    def whitening(self) -> nn.Conv2d | None:
        """The fixed whitening convolution, if the model has one."""
        if self.whiten_mode == "2x2":
            return self.stem[0]
        return self.convs()[0] if self.whiten_mode else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(self.stem(x)))
        logits = self.classifier(torch.flatten(x, 1))
        return logits * self.logit_scale if self.logit_scale != 1.0 else logits


def build_model(cfg: ModelConfig) -> VGG:
    return VGG(layer_list(cfg), num_classes=cfg.num_classes, batch_norm=cfg.batch_norm,
               head=cfg.head, hidden=cfg.hidden, dropout=cfg.dropout, global_pool=cfg.global_pool,
               identity_init=cfg.identity_init, bn_weight=cfg.bn_weight, logit_scale=cfg.logit_scale,
               whiten=cfg.whiten, block_order=cfg.block_order, activation=cfg.activation,
               conv_bias=cfg.conv_bias, bn_momentum=cfg.bn_momentum, bn_eps=cfg.bn_eps)


@torch.no_grad()
def init_whitening(model: VGG, images: torch.Tensor, eps: float = 5e-4) -> None:
    """Make the whitening convolution a fixed whitening of its patches (airbench's first-layer init).

    images: normalised float (N, 3, H, W). Its filters are the top width/2 eigenvectors of the
    patch covariance, each scaled by 1/sqrt(eigenvalue) and paired with its negation (so the
    ReLU after it loses nothing). A model built with whiten="3x3" keeps these weights fixed.
    """
    conv = model.whitening() or model.convs()[0]  # a model without whiten: its first convolution
    c, k = conv.in_channels, conv.kernel_size[0]
    dim = c * k * k
    if conv.out_channels % 2 or conv.out_channels > 2 * dim:
        raise ValueError(f"whitening needs an even width of at most {2 * dim}, got {conv.out_channels}")
    cov = torch.zeros(dim, dim, dtype=torch.float64)
    count = 0
    for chunk in images.split(500):  # patches of 500 images at a time: ~50 MB, not ~0.5 GB
        patches = chunk.float().cpu().unfold(2, k, 1).unfold(3, k, 1)  # (B, C, H', W', k, k)
        flat = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, dim).double()
        cov += flat.T @ flat
        count += len(flat)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov / max(count, 1))  # ascending
    top = conv.out_channels // 2
    filters = (eigenvectors.T[-top:] / torch.sqrt(eigenvalues[-top:, None] + eps)).view(top, c, k, k)
    weight = torch.cat([filters, -filters]).to(conv.weight.dtype)
    conv.weight.copy_(weight)
    if conv.bias is not None:
        conv.bias.zero_()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- layer names: the paper's, for `summary` and `gradcam --layer` ---------------------------

@dataclass
class Block:
    """A named group of consecutive modules (a conv with its BN and ReLU, a pool, a linear layer
    with its ReLU and dropout); its output is the output of its last module."""

    name: str
    modules: list[tuple[str, nn.Module]] = field(default_factory=list)

    @property
    def head(self) -> nn.Module:
        return self.modules[0][1]

    @property
    def output(self) -> tuple[str, nn.Module]:
        return self.modules[-1]


def blocks(model: nn.Module) -> list[Block]:
    """The model's layers under the paper's names, in forward order."""
    out: list[Block] = []
    if isinstance(model.stem, nn.Sequential):  # the 2x2 whitening in front of stage 1
        out.append(Block("whiten", [(f"stem.{n}", m) for n, m in model.stem.named_children()]))
    stage, index = 1, 0
    for name, m in model.features.named_children():
        qualified = f"features.{name}"
        if isinstance(m, nn.Conv2d):
            index += 1
            out.append(Block(f"conv{stage}_{index}", [(qualified, m)]))
        elif isinstance(m, nn.MaxPool2d):
            out.append(Block(f"pool{stage}", [(qualified, m)]))
            stage, index = stage + 1, 0
        else:  # BatchNorm2d, the activation: part of the conv (or the pool) before them
            out[-1].modules.append((qualified, m))
    if not isinstance(model.pool, nn.Identity):
        out.append(Block("global_pool", [("pool", model.pool)]))
    head = model.classifier
    children = list(head.named_children()) if isinstance(head, nn.Sequential) else [("", head)]
    linears = sum(isinstance(m, nn.Linear) for _, m in children)
    count = 0
    for name, m in children:
        qualified = f"classifier.{name}" if name else "classifier"
        if isinstance(m, nn.Linear):
            count += 1
            out.append(Block("fc" if linears == 1 else f"fc{count}", [(qualified, m)]))
        else:
            out[-1].modules.append((qualified, m))
    return out
