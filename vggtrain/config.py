"""The run's configuration: YAML in, typed and validated dataclasses out.

Every field is declared once, with what it means, its rule (``check=``) and, where only some
runs use it, when it applies (``applies=``); one loop validates a file, a ``--set`` override and
a config read back from a checkpoint the same way, every error names the source and the dotted
key on one line, and ``config_reference`` renders the same declarations as docs/config.md.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import reprlib
import types
import typing
from collections.abc import Callable, Collection, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from vggtrain.errors import ConfigError
from vggtrain.safeio import BoundedLoader, read_yaml, yaml_problem

Check = Callable[[Any], "str | None"]
ARCHS = ("vgg11", "vgg13", "vgg16", "vgg19", "custom")
TTA_MODES = ("none", "flip", "multicrop")
POLICIES = ("none", "autoaugment", "randaugment", "trivialaugment")
RANDAUGMENT_OPS = 15  # kornia's RandAugment candidates, of which each image takes N distinct ones
WHITEN_MODES = ("none", "3x3", "2x2")
BLOCK_ORDERS = ("conv_bn_act_pool", "conv_pool_bn_act")
SCHEDULES = ("step", "multistep", "linear", "cosine", "onecycle")
WHITEN_MAX_WIDTH = 2 * 3 * 3 * 3  # +/- each eigenvector of the 27-dimensional 3x3 RGB patches
PROJECT_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DEVICE_RULE = "auto, cpu, cuda, cuda:N or mps"
RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}\Z")  # one safe path component, never . or ..
RUN_NAME_RULE = "1-100 letters, digits, '.', '_' or '-', starting with a letter or digit"


def _ruled(rule: str, check: Check) -> Check:
    """check, carrying the rule it enforces as the reference shows it."""
    check.rule = rule  # type: ignore[attr-defined]
    return check


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 2**64 else f"{x:g}"


def _between(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Check:
    left, right = ("(" if lo_open else "["), (")" if hi_open else "]")

    def check(v: float) -> str | None:
        ok_lo = v > lo if lo_open else v >= lo
        ok_hi = v < hi if hi_open else v <= hi
        if ok_lo and ok_hi:
            return None
        if hi <= 1:  # a fraction: the whole interval says it best
            return f"must be in {left}{lo:g}, {hi:g}{right}"
        if not ok_lo:
            return f"must be {'>' if lo_open else '>='} {lo:g}"
        return f"must be {'<' if hi_open else '<='} {hi:g}"

    if hi == math.inf:
        return _ruled(f"{'>' if lo_open else '>='} {_num(lo)}", check)
    return _ruled(f"{left}{_num(lo)}, {_num(hi)}{right}", check)


def _one_of(*choices: str) -> Check:
    def check(v: str) -> str | None:
        return None if v in choices else f"must be one of {', '.join(choices)}"

    return _ruled(", ".join(choices), check)


def _or_null(check: Check) -> Check:
    def either(v: Any) -> str | None:
        problem = None if v is None else check(v)
        return f"{problem} or null" if problem else None

    return _ruled(f"{check.rule}, or null", either)  # type: ignore[attr-defined]


def _matches(pattern: re.Pattern, rule: str) -> Check:
    return _ruled(rule, lambda v: None if v is None or pattern.match(v) else f"must be {rule}")


@dataclass(frozen=True)
class Applies:
    """Which runs use a field: ``when`` says it (the reference's "applies only with" line, the
    error's end), ``test`` decides it on the whole config. A value other than the field's default
    where ``test`` is false is refused; ``message`` (formatted with ``cfg``) words a rule whose
    older error text tests and users rely on."""

    when: str
    test: Callable[[TrainConfig], bool]
    message: str | None = None

    def refusal(self, key: str, cfg: TrainConfig) -> str:
        return self.message.format(cfg=cfg) if self.message else f"{key} applies only with {self.when}"


def _opt(default: Any, doc: str, check: Check | None = None, *, applies: Applies | None = None,
         accepts: Any = None, canon: Callable[[Any], Any] | None = None) -> Any:
    """A config field: its default, one line of meaning (doc), its rule (check), the runs that use
    it (applies), and for a field read as a name but also given as true / false, the types it
    accepts and the function that turns them into the name (canon)."""
    meta = {"doc": doc, "check": check, "applies": applies, "accepts": accepts, "canon": canon}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _as_mode(value: bool | str, true_mode: str) -> str:
    if isinstance(value, bool):
        return true_mode if value else "none"
    return value


def _mode(modes: tuple[str, ...], true_mode: str, doc: str) -> Any:
    """A field that names one of modes ("none" the default); YAML's true means true_mode, false
    none. The config holds the name, so every reader compares names, never truthiness."""
    check = _ruled(f"{', '.join(modes)}; true ({true_mode}), false (none)",
                   lambda v: None if v in modes else f"must be true, false or one of {', '.join(modes)}")
    return _opt("none", doc, check, accepts=bool | str, canon=lambda v: _as_mode(v, true_mode))


def yaml_key(f: Field) -> str:
    """A field's key in YAML: its name, less the trailing underscore of one named for a Python
    keyword (init.from is held as InitConfig.from_)."""
    return f.name.removesuffix("_")


def default_of(f: Field) -> Any:
    """A config field's default value."""
    return f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]


def _check_stats(v: list | None, low: float) -> str | None:
    if v is None:
        return None
    if len(v) != 3 or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                              and low <= x <= 1 for x in v):
        return f"must be null or three numbers in [{low:g}, 1] (R, G, B)"
    return None


def _check_milestones(milestones: list) -> str | None:
    if not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in milestones) \
            or list(milestones) != sorted(set(milestones)):
        return "must be a list of increasing epochs >= 1"
    return None


def _check_layers(layers: list | None) -> str | None:
    if layers is None:
        return None
    if not layers or not any(isinstance(x, int) for x in layers):
        return "must contain at least one convolution width"
    for x in layers:
        if x != "M" and not (isinstance(x, int) and 1 <= x <= 8192):
            return f"entries must be channel counts in [1, 8192] or 'M' (bad entry {_show(x)})"
    if layers.count("M") > 5:
        return "may hold at most 5 'M' pools (a 32x32 image is 1x1 after five)"
    return None


CLASSES_RULE = "two or more distinct class names or indices (>= 0)"


def _check_classes(classes: list) -> str | None:
    named = all(isinstance(c, str) and c or isinstance(c, int) and not isinstance(c, bool) and c >= 0
                for c in classes)
    return None if named and len(classes) >= 2 and len(set(classes)) == len(classes) else \
        f"must be {CLASSES_RULE}"


LAYERS_RULE = "widths in [1, 8192] (3x3 convolutions) and M (2x2 max-pools, at most 5), one width at least"
_STATS = _ruled("null, or three numbers (R, G, B) in [0, 1]", lambda v: _check_stats(v, 0.0))
_STD = _ruled("null, or three numbers (R, G, B) in (0, 1]", lambda v: _check_stats(v, 1e-6))


_when = Applies  # short beside the fields: _when("optim.name: muon", lambda c: c.optim.name == "muon")


_AUGMENTED = _when("data.augment: true", lambda c: c.data.augment)
_RANDAUGMENT = _when("data.policy: randaugment", lambda c: c.data.augment and c.data.policy == "randaugment")
_MLP = _when("model.head: mlp", lambda c: c.model.head == "mlp")
_BN = _when("model.batch_norm: true", lambda c: c.model.batch_norm)
_MUON = _when("optim.name: muon", lambda c: c.optim.name == "muon")
_SELECTING = _when("data.select_keep set", lambda c: c.data.select_keep is not None)
_STARTED = _when("init.from set", lambda c: c.init.from_ is not None)  # fine-tuning (finetune.py)
_DISTILLING = _when("distill.teachers set", lambda c: bool(c.distill.teachers))  # distillation (distill.py)

# A section's rules that tie several keys together (not "applies when"): each returns its problem
# (None: none) and names the key its error is reported against. Declared below each section.
Rule = Callable[["TrainConfig"], "str | None"]
SECTION_RULES: dict[str, list[tuple[str, Rule]]] = {}


def _section_rule(section: str, key: str) -> Callable[[Rule], Rule]:
    def register(rule: Rule) -> Rule:
        SECTION_RULES.setdefault(section, []).append((key, rule))
        return rule

    return register


@dataclass
class DataConfig:
    """What the model trains and is measured on, and how training images are augmented."""

    dataset: str = _opt("cifar10", "cifar10; cifar100 (its 100 fine classes, or its 20 superclasses with "
                        "labels: coarse); folder: the images in root/train/CLASS/ and root/test/CLASS/ "
                        "(folder.py)",
                        _one_of("cifar10", "cifar100", "folder"))
    labels: str = _opt("fine", "CIFAR-100's 100 fine classes, or its 20 coarse superclasses",
                       _one_of("fine", "coarse"), applies=_when(
                           "data.dataset: cifar100", lambda c: c.data.dataset == "cifar100",
                           "data.labels: coarse is CIFAR-100's 20 superclasses (data.dataset is "
                           "{cfg.data.dataset})"))
    root: str = _opt("data", "The directory that holds the dataset (CIFAR's python or binary layout, or "
                     "the folder dataset's train/ and test/)")
    download: bool = _opt(False, "Fetch and verify CIFAR's python layout into root when it is missing",
                          applies=_when("data.dataset: cifar10 or cifar100",
                                        lambda c: c.data.dataset != "folder"))
    val_size: int = _opt(5000, "Training images held out (at random, from the seed) for validation, which "
                         "picks best.pt; 0: none, all train", _between(0, 50_000))
    val_seed: int | None = _opt(None, "The seed that draws the validation images; null: the run's seed. One "
                                "value across runs of different seeds validates them all on the same images "
                                "(an ensemble distilled into a student that validates on images none of its "
                                "teachers trained on)", _or_null(_between(0, 2**63 - 1)),
                                applies=_when("data.val_size > 0", lambda c: c.data.val_size > 0,
                                              "data.val_seed needs a validation split (data.val_size is 0)"))
    classes: list[int | str] | None = _opt(None, "A subset of the dataset's classes, by name or index, "
                                           "relabelled 0..k-1 in this order in the training, validation "
                                           "and test splits alike (the reports keep their names); "
                                           "model.num_classes must be its length. null: every class",
                                           _or_null(_ruled(CLASSES_RULE, _check_classes)))
    train_per_class: int | None = _opt(None, "Training images kept of each class, at random from the seed, "
                                       "drawn after the validation split (which it never changes) from the "
                                       "images left; a class with fewer is refused. null: all",
                                       _or_null(_between(1, 1_000_000)))
    augment: bool = _opt(True, "Random crop and horizontal flip of the training images, batched on the "
                         "device")
    crop_padding: int = _opt(4, "How far a random crop may translate an image, in pixels each way "
                             "(airbench: 2)", _between(0, 16), applies=_AUGMENTED)
    crop_pad_mode: str = _opt("zeros", "What the crop pads with: zeros, or the image reflected at its "
                              "border (airbench)", _one_of("zeros", "reflect"),
                              applies=_when("data.augment: true and data.crop_padding > 0",
                                            lambda c: c.data.augment and c.data.crop_padding > 0))
    flip: str = _opt("random", "random: each image flipped with probability 1/2 every epoch; alternating: "
                     "each flipped at random once, then the whole set mirrored every other epoch "
                     "(airbench)", _one_of("random", "alternating"), applies=_AUGMENTED)
    cutout: int = _opt(0, "The side in pixels (0: off) of a square of each training image set to the mean "
                       "colour, placed at random wholly inside the image (airbench's cutout)",
                       _between(0, 32), applies=_AUGMENTED)
    policy: str = _opt("none", "A per-image policy on the device after crop and flip (kornia; the augment "
                       "extra): autoaugment (the CIFAR-10 policy), randaugment, trivialaugment; none: off",
                       _one_of(*POLICIES), applies=_AUGMENTED)
    policy_ops: int = _opt(2, "RandAugment's N: distinct operations applied to each image",
                           _between(1, RANDAUGMENT_OPS), applies=_RANDAUGMENT)
    policy_magnitude: int = _opt(9, "RandAugment's M: every operation's strength, of 30 (kornia takes 1-29)",
                                 _between(1, 29), applies=_RANDAUGMENT)
    random_erasing: float = _opt(0.0, "The chance each training image gets a random rectangle (2-33% of its "
                                 "area, aspect 0.3-3.3) set to the mean colour (kornia's RandomErasing; "
                                 "the augment extra); 0: off", _between(0, 1), applies=_AUGMENTED)
    mean: list[float] | None = _opt(None, "The per-channel mean (fractions of 255) images are normalised "
                                    "with; null: CIFAR's published one, or what a folder run measures on "
                                    "its training split when it starts (and writes here)", _STATS)
    std: list[float] | None = _opt(None, "The per-channel std, set with mean (null: as mean)", _STD)
    mixup_alpha: float = _opt(0.0, "MixUp (torchvision.transforms.v2) of each training batch: Beta(alpha, "
                              "alpha) mixing of each image and its target with its neighbour; 0: off",
                              _between(0, 100))
    cutmix_alpha: float = _opt(0.0, "CutMix (torchvision.transforms.v2) of each training batch, likewise; "
                               "0: off", _between(0, 100))
    mix_prob: float = _opt(1.0, "The chance a training batch is mixed at all", _between(0, 1),
                           applies=_when("data.mixup_alpha > 0 or data.cutmix_alpha > 0",
                                         lambda c: c.data.mixup_alpha > 0 or c.data.cutmix_alpha > 0))
    mix_switch_prob: float = _opt(0.5, "With both on, the chance a mixed batch gets CutMix rather than "
                                  "MixUp", _between(0, 1),
                                  applies=_when("data.mixup_alpha > 0 and data.cutmix_alpha > 0",
                                                lambda c: c.data.mixup_alpha > 0 and c.data.cutmix_alpha > 0))
    select_keep: float | None = _opt(None, "Data selection by a proxy (airbench96_faster; selection.py): "
                                     "each step the model trains only on this fraction of the batch with "
                                     "the proxy's highest losses; null: off, every example trains",
                                     _or_null(_between(0, 1, lo_open=True)))
    select_layers: list[int | str] = _opt([32, "M", 32, 64, "M", 64, 64, "M", 64], "The proxy's layers "
                                          "(as model.layers; its other settings are the model's)",
                                          _ruled(LAYERS_RULE, _check_layers), applies=_SELECTING)
    select_every: int = _opt(4, "The proxy takes an optimizer step on its kept examples every N steps",
                             _between(1, 1_000_000), applies=_SELECTING)


@_section_rule("data", "data.mean")
def _stats_together(c: TrainConfig) -> str | None:
    """data.mean and data.std are set together, or both null."""
    if (c.data.mean is None) != (c.data.std is None):
        return "data.mean and data.std are set together (or both null)"
    return None


@dataclass
class ModelConfig:
    """The network: a VGG of the paper's 3x3 convolutions, or a custom list of layers."""

    arch: str = _opt("vgg16", "The paper's VGG-A/B/D/E convolution stacks, or custom: model.layers",
                     _one_of(*ARCHS))
    layers: list[int | str] | None = _opt(None, "The custom network's layers, e.g. [64, 64, M, 128, M]: "
                                          "an integer is a 3x3 convolution of that width, M a 2x2 max-pool",
                                          _ruled(LAYERS_RULE, _check_layers), applies=_when(
                                              "model.arch: custom", lambda c: c.model.arch == "custom",
                                              "model.layers is only used with model.arch: custom (got arch "
                                              "{cfg.model.arch!r})"))
    batch_norm: bool = _opt(True, "A BatchNorm2d after each convolution")
    width: float = _opt(1.0, "Multiplies every convolution's width", _between(0, 16, lo_open=True))
    num_classes: int = _opt(10, "Outputs of the head: the dataset's classes", _between(2, 100_000))
    head: str = _opt("linear", "linear: features -> classes; mlp: features -> hidden -> hidden -> classes "
                     "(the paper's head: ReLU and dropout)", _one_of("linear", "mlp"))
    hidden: int = _opt(512, "The MLP head's hidden width", _between(1, 65_536), applies=_MLP)
    dropout: float = _opt(0.5, "The MLP head's dropout", _between(0, 1, hi_open=True), applies=_MLP)
    global_pool: str = _opt("none", "What the features pass through before the head: none (flattened), or "
                            "a global max or average pool", _one_of("none", "max", "avg"))
    whiten: str = _mode(WHITEN_MODES, "3x3", "3x3: the first convolution becomes a fixed whitening of the "
                        "training images' 3x3 patches (its width even, at most 54); 2x2: a fixed 24-wide "
                        "whitening of 2x2 patches (padding 0, bias, activation) in front of the layers, "
                        "airbench's first layer")
    whiten_bias_epochs: int | float | None = _opt(None, "Train the whitening layer's bias for the first N "
                                                  "epochs only (airbench: 3); null: throughout",
                                                  _or_null(_between(0, math.inf)), applies=_when(
                                                      "model.whiten: 3x3 or 2x2",
                                                      lambda c: c.model.whiten != "none",
                                                      "model.whiten_bias_epochs needs model.whiten (a "
                                                      "whitening layer whose bias trains)"))
    block_order: str = _opt("conv_bn_act_pool", "conv_bn_act_pool: VGG's order; conv_pool_bn_act: a "
                            "convolution followed by a pool is pooled first, so its BN and activation run on "
                            "the 4x smaller map (airbench)", _one_of(*BLOCK_ORDERS))
    activation: str = _opt("relu", "The activation after each convolution (the MLP head's is ReLU)",
                           _one_of("relu", "gelu"))
    conv_bias: bool = _opt(True, "The 3x3 convolutions have a bias (false: a BN that follows makes it "
                           "redundant)")
    bn_momentum: float = _opt(0.1, "BatchNorm2d's momentum in PyTorch's sense, the weight of each new batch "
                              "(airbench's \"momentum 0.6\" is 0.4 here)", _between(0, 1, lo_open=True),
                              applies=_BN)
    bn_eps: float = _opt(1e-5, "BatchNorm2d's eps (airbench: 1e-12)", _between(0, 1, lo_open=True),
                         applies=_BN)
    identity_init: bool = _opt(False, "Each later convolution starts as the identity on its first "
                               "in-channels filters, plus the usual random init elsewhere (airbench's Dirac "
                               "init)")
    bn_weight: bool = _opt(True, "false: batch-norm weights stay 1 and only their biases learn (airbench's "
                           "BatchNorm)", applies=_BN)
    logit_scale: float = _opt(1.0, "Logits = head output x this (airbench: 1/9)",
                              _between(0, 1000, lo_open=True))


def _first_width(layers: list) -> int:
    return next(x for x in layers if x != "M")


@_section_rule("model", "model.num_classes")
def _classes_counted(c: TrainConfig) -> str | None:
    """A class subset's length is the head's width: said before any data is read."""
    if c.data.classes is not None and len(c.data.classes) != c.model.num_classes:
        return (f"model.num_classes is {c.model.num_classes} but data.classes names "
                f"{len(c.data.classes)} classes")
    return None


@_section_rule("model", "model.layers")
def _custom_needs_layers(c: TrainConfig) -> str | None:
    """model.layers is required when model.arch is custom."""
    if c.model.arch == "custom" and c.model.layers is None:
        return "model.layers is required when model.arch is custom"
    return None


@_section_rule("model", "model.whiten")
def _whiten_width(c: TrainConfig) -> str | None:
    """model.whiten: 3x3 needs an even first convolution width of at most 54 (at model.width)."""
    m = c.model
    if m.whiten != "3x3":
        return None
    first = max(1, round(int(_first_width(m.layers) if m.layers else 64) * m.width))  # the paper VGGs: 64
    if first % 2 or first > WHITEN_MAX_WIDTH:
        return (f"model.whiten needs an even first convolution width of at most {WHITEN_MAX_WIDTH} "
                f"(got {first})")
    return None


@_section_rule("model", "data.select_layers")
def _proxy_whiten_width(c: TrainConfig) -> str | None:
    """model.whiten: 3x3 with data.select_keep needs the proxy's first width even and at most 54 too."""
    first = _first_width(c.data.select_layers)  # the proxy's, at width 1
    if c.model.whiten == "3x3" and c.data.select_keep is not None and (first % 2 or first > WHITEN_MAX_WIDTH):
        return (f"model.whiten needs the proxy's first convolution to be even and at most "
                f"{WHITEN_MAX_WIDTH} wide too (got {first})")
    return None


@_section_rule("model", "model.whiten_bias_epochs")
def _whiten_bias_exists(c: TrainConfig) -> str | None:
    """model.whiten_bias_epochs with model.whiten: 3x3 needs model.conv_bias (that layer's bias)."""
    if c.model.whiten_bias_epochs is not None and c.model.whiten == "3x3" and not c.model.conv_bias:
        return "the 3x3 whitening layer has no bias with model.conv_bias false"
    return None


@dataclass
class OptimConfig:
    """The optimizer (SGD, Muon on the 3x3 filters, or AdamW), its parameter groups and the weight
    averaging (lookahead, EMA) around it."""

    lr: float = _opt(0.05, "The learning rate (of every group but Muon's filters, at its peak)",
                     _between(0, 100, lo_open=True))
    momentum: float = _opt(0.9, "SGD's momentum; AdamW's beta1", _between(0, 1, hi_open=True))
    nesterov: bool = _opt(False, "Nesterov momentum for SGD (Muon's filters always use it)",
                          applies=_when("optim.name: sgd or muon, and optim.momentum > 0",
                                        lambda c: c.optim.name != "adamw" and c.optim.momentum > 0))
    weight_decay: float = _opt(5e-4, "L2 weight decay (AdamW: decoupled); none on Muon's filters",
                               _between(0, 1, hi_open=True))
    label_smoothing: float = _opt(0.0, "Label smoothing of the cross-entropy loss",
                                  _between(0, 1, hi_open=True))
    exclude_bn_bias_from_decay: bool = _opt(False, "No weight decay on batch-norm weights and on biases "
                                            "(every 1-D parameter)")
    bn_bias_lr_scale: float = _opt(1.0, "Batch-norm biases train at lr x this, weight decay / this (the "
                                   "same decay per step); airbench: 64", _between(0, 1000, lo_open=True),
                                   applies=_BN)
    lookahead_every: int = _opt(0, "Lookahead: every N steps (and at each epoch end) the weights move back "
                                "to slow weights that follow them with a decay growing as progress^3 up to "
                                "0.95^N (airbench's schedule); 0: off", _between(0, 1000))
    lookahead_final_full_sync: bool = _opt(False, "The last step ends on the slow weights themselves "
                                           "(airbench's final full sync), not on the usual interpolation",
                                           applies=_when("optim.lookahead_every > 0",
                                                         lambda c: c.optim.lookahead_every > 0))
    whiten_bias_lr_scale: float = _opt(1.0, "The whitening bias (of model.whiten_bias_epochs) trains at lr "
                                       "x this, weight decay / this", _between(0, 1000, lo_open=True),
                                       applies=_when("model.whiten_bias_epochs set",
                                                     lambda c: c.model.whiten_bias_epochs is not None,
                                                     "optim.whiten_bias_lr_scale applies to the whitening "
                                                     "bias of model.whiten_bias_epochs, which is not set"))
    name: str = _opt("sgd", "sgd; muon: the 3x3 filters get Muon's orthogonalised momentum updates, the "
                     "rest SGD (airbench94_muon); adamw: torch's AdamW with betas (momentum, adam_beta2), "
                     "the same parameter groups", _one_of("sgd", "muon", "adamw"))
    muon_lr: float = _opt(0.24, "Muon's learning rate (of the 3x3 filters)", _between(0, 100, lo_open=True),
                          applies=_MUON)
    muon_momentum: float = _opt(0.6, "Muon's (Nesterov) momentum", _between(0, 1, hi_open=True),
                                applies=_MUON)
    adam_beta2: float = _opt(0.999, "AdamW's beta2", _between(0, 1, hi_open=True),
                             applies=_when("optim.name: adamw", lambda c: c.optim.name == "adamw"))
    clip_grad_norm: float | None = _opt(None, "Clip the gradients' global L2 norm to this before each step "
                                        "(the norm before clipping is logged as train/grad_norm); null: no "
                                        "clipping", _or_null(_between(0, math.inf, lo_open=True)))
    ema_decay: float | None = _opt(None, "Weight EMA of the weights and BN statistics, updated after every "
                                   "step with this decay: validated beside the raw weights, it chooses "
                                   "best.pt and is what the test report, eval, predict and gradcam use; "
                                   "null: off", _or_null(_between(0, 1, lo_open=True, hi_open=True)))
    lr_scale_backbone: float = _opt(1.0, "The layers loaded from init.from (all but a re-initialised "
                                    "head) train at this x their group's rate (Muon's filters: x muon_lr)",
                                    _between(0, 1000, lo_open=True), applies=_STARTED)


@dataclass
class ScheduleConfig:
    """The learning rate over the run, applied per step (schedule.py)."""

    kind: str = _opt("step", "step: StepLR (gamma every step_size epochs after the warm-up); multistep: "
                     "gamma at each milestone; linear / cosine: from start_factor up to 1 over the warm-up, "
                     "then linearly / along a half cosine down to end_factor at the last step; onecycle: "
                     "the same with a cosine warm-up", _one_of(*SCHEDULES))
    step_size: int = _opt(30, "step: epochs between the rate's cuts by gamma, counted from the end of the "
                          "warm-up", _between(1, 1_000_000),
                          applies=_when("schedule.kind: step", lambda c: c.schedule.kind == "step"))
    gamma: float = _opt(0.1, "The rate is multiplied by this at each cut", _between(0, 1, lo_open=True),
                        applies=_when("schedule.kind: step or multistep",
                                      lambda c: c.schedule.kind in ("step", "multistep")))
    milestones: list[int] = _opt([30, 60, 80], "multistep: the epochs (from the run's start) at which the "
                                 "rate is cut by gamma", _ruled("increasing epochs >= 1", _check_milestones),
                                 applies=_when("schedule.kind: multistep",
                                               lambda c: c.schedule.kind == "multistep"))
    warmup_epochs: int | float = _opt(0, "A linear warm-up of the rate, step by step, over the first N "
                                      "epochs (fractions allowed): from lr x start_factor (step: from lr / "
                                      "its steps); 0: none", _between(0, 1_000_000))
    start_factor: float = _opt(0.2, "The warm-up's first rate is lr x this", _between(0, 1),
                               applies=_when("schedule.warmup_epochs > 0 and schedule.kind: multistep, "
                                             "linear, cosine or onecycle",
                                             lambda c: c.schedule.kind != "step"
                                             and c.schedule.warmup_epochs > 0))
    end_factor: float = _opt(0.0, "The last step's rate is lr x this", _between(0, 1),
                             applies=_when("schedule.kind: linear, cosine or onecycle",
                                           lambda c: c.schedule.kind in ("linear", "cosine", "onecycle")))


@dataclass
class EarlyStopConfig:
    """train.early_stop: end training when the validation accuracy (the metric best.pt is chosen
    by) stops improving."""

    patience: int = _opt(10, "Stop after this many monitored epochs in a row without an improvement",
                         _between(1, 1_000_000))
    min_delta: float = _opt(0.0, "An improvement is a validation accuracy (a fraction) above the best so "
                            "far by more than this", _between(0, 1))
    start_epoch: int = _opt(0, "Epochs 1..N are not monitored (a warm-up's noise neither counts nor "
                            "stops): the earliest stop is after epoch N + 1 + patience",
                            _between(0, 1_000_000))


EARLY_STOP_RULE = "null (off), or a mapping of patience (>= 1), min_delta ([0, 1]), start_epoch (>= 0)"


@dataclass
class LoopConfig:
    """The YAML's ``train:`` section: how the loop runs, not what it optimises."""

    epochs: int | float = _opt(30, "How long to train; a fraction ends the last epoch early, at ceil(epochs "
                               "x steps per epoch) steps (airbench: 9.9)",
                               _between(0, 1_000_000, lo_open=True))
    batch_size: int = _opt(128, "Training images per step (per rank under torchrun); an epoch's last partial "
                           "batch is dropped", _between(1, 65_536))
    eval_batch_size: int = _opt(1000, "Images per batch of validation and testing", _between(1, 65_536))
    device: str = _opt("auto", "Where to train; auto: cuda, then mps, then cpu",
                       _matches(DEVICE_RE, DEVICE_RULE))
    precision: str = _opt("fp32", "fp32, or autocast to bf16 or fp16 (fp16 with a GradScaler)",
                          _one_of("fp32", "bf16", "fp16"))
    channels_last: bool | None = _opt(None, "The channels_last memory format; null: on where it is faster "
                                      "(CUDA), off elsewhere")
    compile: bool = _opt(False, "torch.compile the train step (falls back, with a warning)")
    cuda_graphs: bool = _opt(False, "CUDA: capture the whole step (forward, backward, optimizer, weight EMA) "
                             "as one CUDA graph and replay it (the eager step, with one warning line, where "
                             "it cannot)")
    deterministic: bool = _opt(False, "Deterministic kernels (cuDNN, cuBLAS): a resumed CUDA run ends "
                               "bit-identical to an uninterrupted one, at some cost in speed (the CPU always "
                               "does)")
    sync_bn: bool = _opt(False, "Under torchrun on CUDA: batch-norm statistics over all ranks "
                         "(SyncBatchNorm)", applies=_BN)
    tta: str = _mode(TTA_MODES, "flip", "Test-time augmentation of validation and the test report: none; "
                     "flip (each image with its mirror); multicrop (flip, plus the image shifted one pixel "
                     "up-left and down-right: airbench's level 2)")
    log_every: int = _opt(20, "Steps between reads of the loss from the device", _between(1, 1_000_000))
    checkpoint_every_steps: int = _opt(0, "Also write last.pt every N steps inside an epoch; 0: only at "
                                       "each epoch's end", _between(0, 1_000_000_000))
    out_dir: str = _opt("runs", "Where run directories go: out_dir/NAME/")
    accum_steps: int = _opt(1, "Gradient accumulation: one optimizer step per N batches, each batch's loss "
                            "/ N (the gradients of one N times larger batch; BatchNorm still sees each "
                            "batch alone); the schedule, lookahead, the EMA, clipping and the loss scaler "
                            "go per optimizer step. The epoch's (and the run's) batches must divide by N",
                            _between(1, 65_536))
    early_stop: EarlyStopConfig | None = _opt(
        None, "Early stopping on the validation accuracy: {patience, min_delta, start_epoch} (each "
        "optional; {} takes the defaults: 10, 0.0, 0); the counters are in every checkpoint, the stop in "
        "the report; null: off", _ruled(EARLY_STOP_RULE, lambda v: None),
        applies=_when("data.val_size > 0", lambda c: c.data.val_size > 0,
                      "train.early_stop needs a validation split (data.val_size is 0)"))


@_section_rule("train", "train.checkpoint_every_steps")
def _checkpoints_between_accumulations(c: TrainConfig) -> str | None:
    """train.checkpoint_every_steps is a multiple of train.accum_steps (a checkpoint lands between two
    optimizer steps)."""
    if c.train.checkpoint_every_steps % c.train.accum_steps:
        return (f"train.checkpoint_every_steps ({c.train.checkpoint_every_steps}) must be a multiple of "
                f"train.accum_steps ({c.train.accum_steps}): checkpoints land between optimizer steps")
    return None


def _check_path(v: str | None) -> str | None:
    return None if v is None or v.strip() else "must be a path (or null)"


def _check_freeze(names: list) -> str | None:
    if not all(isinstance(n, str) and n and n == n.strip() for n in names):
        return "must be a list of layer names or prefixes (non-empty, no surrounding spaces)"
    return None


@dataclass
class InitConfig:
    """Where a new run's weights start: random, or a trained run's (fine-tuning; finetune.py)."""

    from_: str | None = _opt(None, "A run directory (its best.pt) or a checkpoint whose weights (its weight "
                              "EMA's, where it kept one) start a new run with its own optimizer and "
                              "schedule; every tensor must fit this model, but a head whose class count "
                              "differs is re-initialised; its data.mean and data.std are used; null: a "
                              "random init", _ruled("a path, or null", _check_path))
    freeze: list[str] = _opt([], "Layers that keep the loaded weights, as state-dict names or their "
                             "prefixes (features.0, features): left out of the optimizer, their BatchNorm "
                             "layers in eval mode (running statistics used, never updated)",
                             _ruled("layer names or prefixes", _check_freeze), applies=_STARTED)


def _check_teachers(paths: list) -> str | None:
    if not all(isinstance(p, str) and p.strip() for p in paths):
        return "must be a list of run directories or checkpoint files"
    if len(set(paths)) != len(paths):
        return "must not name a teacher twice"
    return None


@dataclass
class DistillConfig:
    """Knowledge distillation: trained runs' averaged soft targets in the loss (distill.py)."""

    teachers: list[str] = _opt([], "Trained runs (their best.pt) or checkpoints whose soft targets on each "
                               "augmented batch join the loss, each built from its own stored config with "
                               "its weight EMA's weights where it kept one, frozen; each must have this "
                               "run's classes; []: no distillation",
                               _ruled("run directories or checkpoint files", _check_teachers))
    alpha: float = _opt(0.5, "The distillation term's weight: loss = (1 - alpha) x the usual loss + alpha x "
                        "T^2 x KL(teachers' soft targets || the network's softened prediction)",
                        _between(0, 1), applies=_DISTILLING)
    temperature: float = _opt(4.0, "T: the teachers' and the network's logits are divided by it before "
                              "the softmax (softer targets as it grows)",
                              _between(0, 1000, lo_open=True), applies=_DISTILLING)


MLFLOW_DEFAULT_STORE = "mlruns"  # log.mlflow: true


def _check_store(v: str | None) -> str | None:
    return None if v is None or v.strip() else "must be a path or a URI (or null)"


@dataclass
class LogConfig:
    """Where a run's metrics go besides its own directory (tb/, metrics.csv, report.json)."""

    mlflow: str | None = _opt(
        None, "MLflow tracking (pip install 'vggtrain[mlflow]'): the config as params, the TensorBoard "
        "scalars as metrics at their steps, the report and config.yaml as artifacts; a resumed run goes on "
        "in the same MLflow run. A path or a file: URI: a local store in that directory (an SQLite "
        "database and the artifacts; relative to the current directory); http(s)://HOST:PORT: a tracking "
        f"server; any other MLflow URI as it is; true: {MLFLOW_DEFAULT_STORE}; null: off",
        _ruled("null, true, a path or a URI", _check_store), accepts=bool | str | None,
        canon=lambda v: MLFLOW_DEFAULT_STORE if v is True else None if v is False else v)


@dataclass
class TrainConfig:
    """The top level: the run's name and seed, and the sections."""

    name: str | None = _opt(None, "The run's name, its directory under train.out_dir; null: the stem of "
                            "the file that is run (never a base's)", _matches(RUN_NAME_RE, RUN_NAME_RULE))
    seed: int = _opt(0, "Model init, data order and augmentation, the validation split (unless "
                     "data.val_seed)",
                     _between(0, 2**63 - 1))
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    init: InitConfig = field(default_factory=InitConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)


def _plain(obj: Any) -> Any:
    """A config as the plain mapping YAML and checkpoints hold (dataclasses.asdict, with yaml_key's keys)."""
    if is_dataclass(obj):
        return {yaml_key(f): _plain(getattr(obj, f.name)) for f in fields(obj)}
    return copy.deepcopy(obj)


# TrainConfig's sections, YAML's order
SECTIONS = ("data", "model", "optim", "schedule", "train", "init", "distill", "log")
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


_SHORT = reprlib.Repr()  # bounded: a value built from nested YAML aliases may be huge or very deep
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxtuple = 3, 6, 4, 6
_SHORT.maxstring, _SHORT.maxother = 40, 40


def _show(v: Any) -> str:
    try:
        text = _SHORT.repr(v)
    except (RecursionError, ValueError):  # ValueError: an integer too long to convert to text
        text = "a value too large to show"
    return text if len(text) <= 40 else text[:37] + "..."


def _clip(item: str) -> str:
    """A --set item as typed, cut short: a message stays one readable line."""
    return item if len(item) <= 60 else item[:57] + "..."


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return "a list"
    if is_dataclass(hint):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            type(None): "null"}.get(hint, getattr(hint, "__name__", str(hint)))


def _convert(hint: Any, value: Any) -> tuple[bool, Any]:
    """(ok, converted value) for a YAML value against a field's type hint."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            ok, out = _convert(arg, value)
            if ok:
                return True, out
        return False, None
    if origin is list:
        if not isinstance(value, list):
            return False, None
        (item_hint,) = typing.get_args(hint)
        items = [_convert(item_hint, v) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if hint is type(None):
        return value is None, None
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        # YAML 1.1 reads "5e-4" (no dot) as a string; accept it as the number it plainly is.
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                out = float(value)
            except OverflowError:
                return False, None
            return math.isfinite(out), out
        return False, None
    if hint is str:
        return isinstance(value, str), value
    return False, None


def _optional_section(hint: Any) -> type | None:
    """The dataclass of a `Section | None` field (train.early_stop), else None."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next((a for a in typing.get_args(hint) if is_dataclass(a)), None)
    return None


def _build(cls: type, raw: Any, prefix: str, where: Callable[[str], str]) -> Any:
    if not isinstance(raw, dict):
        what = prefix.rstrip(".") or "the top level"
        raise ConfigError(f"{where(prefix.rstrip('.'))}: {what} must be a mapping (got {_show(raw)})")
    hints = typing.get_type_hints(cls)
    names = [yaml_key(f) for f in fields(cls)]
    for key in raw:
        if key not in names:
            shown = key if isinstance(key, str) and key.isidentifier() else _show(key)
            dotted = prefix + (key if isinstance(key, str) else _show(key))  # as --set and origins hold it
            raise ConfigError(f"{where(dotted)}: unknown key {prefix}{shown} "
                              f"(expected one of: {', '.join(names)})")
    kwargs = {}
    for f in fields(cls):
        if yaml_key(f) not in raw:
            continue
        key, value, hint = prefix + yaml_key(f), raw[yaml_key(f)], hints[f.name]
        if is_dataclass(hint):
            kwargs[f.name] = _build(hint, value, key + ".", where)
            continue
        nested = _optional_section(hint)
        if nested is not None and isinstance(value, dict):  # a sub-mapping that may be null
            kwargs[f.name] = _build(nested, value, key + ".", where)
            continue
        hint = f.metadata.get("accepts") or hint  # what YAML may give, where it differs from what is held
        ok, converted = _convert(hint, value)
        if not ok:
            raise ConfigError(f"{where(key)}: {key} must be {_type_name(hint)} (got {_show(value)})")
        if f.metadata.get("canon"):
            converted = f.metadata["canon"](converted)
        check = f.metadata.get("check")
        problem = check(converted) if check else None
        if problem:
            raise ConfigError(f"{where(key)}: {key} {problem} (got {_show(value)})")
        kwargs[f.name] = converted
    return cls(**kwargs)


def _check_rules(cfg: TrainConfig, where: Callable[[str], str], only: Collection[str] | None = None) -> None:
    """Each section's keys set (away from their defaults) where they do not apply, then its rules
    that tie keys together. only: the keys whose "applies" is checked (None: all)."""
    for section in SECTIONS:
        part = getattr(cfg, section)
        for f in fields(part):
            applies, key = f.metadata.get("applies"), f"{section}.{yaml_key(f)}"
            if applies is None or (only is not None and key not in only):
                continue
            if getattr(part, f.name) != default_of(f) and not applies.test(cfg):
                raise ConfigError(f"{where(key)}: {applies.refusal(key, cfg)}")
        for key, rule in SECTION_RULES.get(section, ()):
            problem = rule(cfg)
            if problem:
                raise ConfigError(f"{where(key)}: {problem}")


def config_from_dict(raw: Any, source: str, overridden: dict[str, str] | None = None, *,
                     stored: bool = False, origins: dict[str, str] | None = None) -> TrainConfig:
    """Validate a plain mapping (a parsed YAML file, or one read back from a checkpoint).

    stored: the config of a run that exists (a checkpoint's, a run directory's config.yaml). A key
    it sets where it does not apply is not refused, unless a --set (overridden) sets it now: a run
    from before a key's rule was declared ran without it and still evaluates and resumes.
    origins: the file (a base) that set each key, where not source (see _compose)."""
    overridden = overridden or {}

    def where(key: str) -> str:
        if key in overridden:
            return f"--set {_clip(overridden[key])}"
        origin = _origin(origins or {}, key)
        return f"{source} (set in {origin})" if origin not in (None, source) else source

    cfg = _build(TrainConfig, raw, "", where)
    _check_rules(cfg, where, overridden.keys() if stored else None)
    return cfg


def _find_config(name: str, near: Path | None = None) -> Path | None:
    """name as a path (near: relative to that directory); else, a bare name, in ./configs, then
    in the project's configs/ (the .yaml suffix may be left off). None: not found."""
    given = Path(name)
    candidates = [given if near is None else near / given]
    if not given.parent.parts:
        for n in (name, name + ".yaml"):
            candidates += [Path("configs") / n, PROJECT_CONFIGS / n]
    for c in candidates:
        try:  # a FIFO or a device too: read_text says what it is
            if c.exists() and not c.is_dir():
                return c
        except (OSError, ValueError):  # a name too long, a NUL byte: no such file
            continue
    return None


def resolve_config_path(path_or_name: str) -> Path:
    """A path as given; else a bare name looked up in ./configs, then in the project's configs/."""
    found = _find_config(path_or_name)
    if found is not None:
        return found
    raise ConfigError(f"{path_or_name}: no such config file (also looked in configs/ and {PROJECT_CONFIGS})")


# --- base: composition ------------------------------------------------------------------------------
# A config names the files it builds on with base: (a name or a list of them, later wins). Each
# base is composed first (its own bases under it), then the file on top: the top level and each
# section merge key by key, any other value (a list too) replaces. Merging stops at the sections,
# the schema's depth, so an alias-built value is never walked. origins remembers, for a top-level
# key or a section.key, the file that set it (and all below it), for validation errors.

BASE_KEY = "base"
BASE_MAX_DEPTH = 16  # files in one chain of bases
BASE_MAX_FILES = 64  # files read for one config, its bases' bases included
BASE_DOC = ("Config files this one builds on: a name or a list of names (later wins), each looked up "
            "beside this file, else like --config; their keys merge under this file's, a section key "
            "by key, any other value (a list too) replaced. A base's name: is not inherited. Not "
            "stored: a run's config.yaml is the whole resolved config")
BASE_RULE = f"a config file name, a list of them, or null; no cycles, at most {BASE_MAX_DEPTH} files deep"


def _read_mapping(path: Path, label: str) -> dict:
    raw = read_yaml(path, error=ConfigError, label=label)  # bounded: regular file, size, depth
    if raw is None:
        raise ConfigError(f"{label}: file is empty (expected a mapping of config sections)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{label}: the top level must be a mapping (got {_show(raw)})")
    return raw


def _origin(origins: dict[str, str], key: str) -> str | None:
    """The file that set key, or the section holding it; None: no file did."""
    return origins.get(key) or origins.get(key.split(".")[0])


def _merge(dst: dict, origins: dict[str, str], src: dict, src_origin: Callable[[str], str]) -> None:
    """src deep-merged into dst (in place; dst's own sections are copies, so no alias is written
    through), origins following."""
    for key, value in src.items():
        section = key in SECTIONS and isinstance(value, dict)
        if section and isinstance(dst.get(key), dict):
            dst[key] = {**dst[key], **value}
        else:
            if key in SECTIONS and isinstance(dst.get(key), dict):  # the replaced keys' files go too
                for k in dst[key]:
                    origins.pop(f"{key}.{k}", None)
            dst[key] = value
            origins[str(key)] = src_origin(str(key))
        if section:
            origins.update({f"{key}.{k}": src_origin(f"{key}.{k}") for k in value})


def _base_names(value: Any, label: str) -> list[str]:
    names = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"{label}: {BASE_KEY} must be a config file name or a list of them "
                          f"(got {_show(value)})")
    return names


def _real(path: Path) -> str:
    try:
        return str(path.resolve())
    except (OSError, RuntimeError):  # a symlink loop: reading it will say so
        return str(path.absolute())


def _locate_base(name: str, path: Path, label: str, chain: list[tuple[str, str]],
                 budget: list[int]) -> tuple[Path, str, str]:
    """(the file, its label, its real path) of base name in the file at path; refused where it is
    missing, closes a cycle or goes past the limits."""
    found = _find_config(name, path.parent)
    shown = f"{label}: base {_clip(name)}"
    if found is None:
        where = f", in configs/ and {PROJECT_CONFIGS}" if not Path(name).parent.parts else ""
        raise ConfigError(f"{shown}: no such config file (looked beside it{where})")
    beside = found == path.parent / name  # labelled as a path from the including file's label
    base_label = os.path.normpath(os.path.join(os.path.dirname(label), name)) if beside else name
    real = _real(found)
    if real in (r for r, _ in chain):
        raise ConfigError(f"{shown}: a cycle ({' -> '.join([lbl for _, lbl in chain] + [base_label])})")
    budget[0] += 1
    if len(chain) >= BASE_MAX_DEPTH:
        raise ConfigError(f"{shown}: bases nest more than {BASE_MAX_DEPTH} files deep")
    if budget[0] > BASE_MAX_FILES:
        raise ConfigError(f"{shown}: more than {BASE_MAX_FILES} files in all through base:")
    return found, base_label, real


def _compose(path: Path, label: str, chain: list[tuple[str, str]], budget: list[int]) -> tuple[dict, dict]:
    """(the file's mapping with its bases merged under it, its origins). chain: the (real path,
    label) of the files that led here, the first the one that is run; budget: [files read]."""
    raw = _read_mapping(path, label)
    merged: dict = {}
    origins: dict[str, str] = {}
    for name in _base_names(raw.pop(BASE_KEY, None), label):
        found, base_label, real = _locate_base(name, path, label, chain, budget)
        sub, sub_origins = _compose(found, base_label, [*chain, (real, base_label)], budget)
        sub.pop("name", None)  # a run is named by the file that is run (name: or its stem)
        _merge(merged, origins, sub, lambda k, o=sub_origins, b=base_label: _origin(o, k) or b)
    _merge(merged, origins, raw, lambda k: label)
    return merged, origins


def _apply_override(raw: dict, item: str) -> str:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {_clip(item)}: expected key.sub=value")
    try:
        value = yaml.load(text, Loader=BoundedLoader) if text.strip() else None  # noqa: S506
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {_clip(item)}: value is not valid YAML ({yaml_problem(e)})") from None
    except RecursionError:
        raise ConfigError(f"--set {key}: value is nested too deeply") from None
    except ValueError as e:
        raise ConfigError(f"--set {key}: value cannot be read ({str(e).split(';')[0]})") from None
    node = raw
    parts = key.split(".")
    if parts[0] == BASE_KEY:
        raise ConfigError(f"--set {_clip(item)}: {BASE_KEY}: is read from config files only (--set "
                          f"applies after they merge)")
    for part in parts[:-1]:
        if not isinstance(node.get(part, {}), dict):
            raise ConfigError(f"--set {_clip(item)}: {part} is not a section")
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return key


def load_config(path_or_name: str, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read (its base: files merged under it), override and validate a YAML config. Raises
    ConfigError with a one-line message."""
    path = resolve_config_path(path_or_name)
    source = str(path_or_name)
    raw, origins = _compose(path, source, [(_real(path), source)], [1])  # base: files merged under it
    cfg = config_with_overrides(raw, source, overrides, origins=origins)
    if cfg.name is None:
        cfg.name = path.stem  # not checked here: summary and bench name no run (see check_run_name)
    return cfg


def check_run_name(cfg: TrainConfig, source: str) -> None:
    """Before a new run directory is named after the config file's stem, check it as a name: key
    is checked, so the run can be evaluated and resumed (and "..yaml" cannot name runs/ itself)."""
    if not RUN_NAME_RE.match(str(cfg.name)):
        raise ConfigError(f"{source}: the file name {_show(cfg.name)} cannot name the run ({RUN_NAME_RULE}); "
                          f"set name: in the file, or pass --name or --set name=...")


def config_with_overrides(raw: dict, source: str, overrides: Sequence[str] = (), *,
                          stored: bool = False, origins: dict[str, str] | None = None) -> TrainConfig:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a mapping, then validate
    (stored, origins: as config_from_dict)."""
    raw = copy.deepcopy(raw)
    overridden = {}
    for item in overrides:
        overridden[_apply_override(raw, item)] = item
    return config_from_dict(raw, source, overridden, stored=stored, origins=origins)


# What may differ between a run and its resumption: where and how fast it runs, how long, and where
# it is tracked. Anything else (model, optimizer, data split, seed) would silently not apply or
# corrupt the run.
RESUMABLE_KEYS = {"train.epochs", "train.device", "train.log_every", "train.checkpoint_every_steps",
                  "train.eval_batch_size", "data.root", "data.download", "log.mlflow"}


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def comparable(stored: dict[str, Any], cfg: TrainConfig, source: str
               ) -> tuple[dict[str, Any] | None, TrainConfig]:
    """A finished run's stored config and cfg made comparable, for resume and seeds, which both
    ask whether cfg is that run's config: the stored one as today's loader reads it (a key added
    since at its default, so a run from before it is no other config; None where today's loader
    refuses it), and cfg with the run's data.mean/std where cfg leaves them null (fit measured
    them and wrote them into the run's config: a folder's, init.from's source's)."""
    try:
        today = config_from_dict(stored, source, stored=True)
    except ConfigError:
        return None, cfg
    if cfg.data.mean is None:
        cfg = replace(cfg, data=replace(cfg.data, mean=today.data.mean, std=today.data.std))
    return today.to_dict(), cfg


def check_resume_changes(stored: dict, cfg: TrainConfig, source: str) -> TrainConfig:
    """Refuse a resumed config that changes more than RESUMABLE_KEYS allows; return cfg with the
    run's measured data.mean/std where it leaves them null."""
    today, cfg = comparable(stored, cfg, source)
    old, new = _flatten(stored if today is None else today), _flatten(cfg.to_dict())
    for key in sorted(old.keys() | new.keys()):
        if key not in RESUMABLE_KEYS and old.get(key) != new.get(key):
            raise ConfigError(f"{source}: {key} cannot change when resuming (the run has "
                              f"{_show(old.get(key))}, asked {_show(new.get(key))}); "
                              f"only {', '.join(sorted(RESUMABLE_KEYS))} may")
    return cfg


def digest_of(config: dict[str, Any]) -> str:
    """sha256 of a config mapping as canonical JSON (report.json's config_digest): equal digests,
    equal configs; a checkpoint's stored config gives its run's digest."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


__all__ = ["TrainConfig", "DataConfig", "ModelConfig", "OptimConfig", "ScheduleConfig", "LoopConfig",
           "InitConfig", "DistillConfig", "LogConfig", "load_config", "config_from_dict",
           "config_with_overrides", "dump_config",
           "resolve_config_path", "check_resume_changes", "comparable", "check_run_name", "RESUMABLE_KEYS",
           "digest_of",
           "TTA_MODES", "WHITEN_MODES", "SECTIONS", "SECTION_RULES", "Applies", "default_of", "DEVICE_RE",
           "DEVICE_RULE", "RUN_NAME_RE", "RUN_NAME_RULE", "yaml_key", "EarlyStopConfig"]
