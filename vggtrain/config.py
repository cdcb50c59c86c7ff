"""The run's configuration: YAML in, typed and validated dataclasses out.

Every rule lives next to its field (``check=``), so one loop validates a file, a ``--set``
override and a config read back from a checkpoint the same way, and every error names the
source and the dotted key on one line.
"""

from __future__ import annotations

import copy
import math
import re
import reprlib
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from vggtrain.errors import ConfigError
from vggtrain.safeio import BoundedLoader, read_yaml, yaml_problem

Check = Callable[[Any], "str | None"]
ARCHS = ("vgg11", "vgg13", "vgg16", "vgg19", "custom")
TTA_MODES = ("none", "flip", "multicrop")
WHITEN_MODES = ("3x3", "2x2")
BLOCK_ORDERS = ("conv_bn_act_pool", "conv_pool_bn_act")
SCHEDULES = ("step", "multistep", "linear", "cosine", "onecycle")
WHITEN_MAX_WIDTH = 2 * 3 * 3 * 3  # +/- each eigenvector of the 27-dimensional 3x3 RGB patches
PROJECT_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


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

    return check


def _one_of(*choices: str) -> Check:
    def check(v: str) -> str | None:
        return None if v in choices else f"must be one of {', '.join(choices)}"

    return check


def _opt(default: Any, check: Check | None = None) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"check": check})
    return field(default=default, metadata={"check": check})


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


@dataclass
class DataConfig:
    # cifar10; cifar100 (its 100 fine classes, or the 20 superclasses with labels: coarse);
    # folder: root/train/<class>/* and root/test/<class>/* (folder.py)
    dataset: str = _opt("cifar10", _one_of("cifar10", "cifar100", "folder"))
    labels: str = _opt("fine", _one_of("fine", "coarse"))
    root: str = _opt("data")
    download: bool = _opt(False)
    val_size: int = _opt(5000, _between(0, 50_000))
    # Random crop (zero padding crop_padding) and horizontal flip, applied batched on the device.
    augment: bool = _opt(True)
    # How far a random crop may translate an image, in pixels each way (airbench uses 2).
    crop_padding: int = _opt(4, _between(0, 16))
    # What the crop pads with: zeros, or the image reflected at its border (airbench).
    crop_pad_mode: str = _opt("zeros", _one_of("zeros", "reflect"))
    # random: each image flipped with probability 1/2 every epoch; alternating: each image flipped
    # at random once, then the whole set mirrored every other epoch (airbench).
    flip: str = _opt("random", _one_of("random", "alternating"))
    # Cutout: each training image gets one square of this side (pixels, 0 = off) set to the mean
    # colour, placed at random wholly inside the image (as airbench's cutout).
    cutout: int = _opt(0, _between(0, 32))
    # MixUp / CutMix (torchvision.transforms.v2, on each training batch): Beta(alpha, alpha) mixing
    # of each image with its neighbour in the shuffled batch, targets mixed alike; 0 turns one off.
    # With both on, a batch gets CutMix with probability mix_switch_prob, else MixUp; mix_prob is
    # the chance a batch is mixed at all.
    # The per-channel mean and std (fractions of 255) images are normalised with, three each.
    # null: CIFAR's published constants (cifar10, cifar100); a folder run measures them on its
    # training split when it starts and writes them here, so its checkpoints carry them.
    mean: list[float] | None = _opt(None, lambda v: _check_stats(v, 0.0))
    std: list[float] | None = _opt(None, lambda v: _check_stats(v, 1e-6))
    mixup_alpha: float = _opt(0.0, _between(0, 100))
    cutmix_alpha: float = _opt(0.0, _between(0, 100))
    mix_prob: float = _opt(1.0, _between(0, 1))
    mix_switch_prob: float = _opt(0.5, _between(0, 1))
    # Data selection by a proxy (airbench96_faster; selection.py): a small network with layers
    # select_layers (the model's other settings) trains beside the model; each step the model trains
    # only on the select_keep fraction of the batch with the proxy's highest losses, and every
    # select_every steps the proxy takes a step on those. null: off, every example trains.
    select_keep: float | None = _opt(None, lambda v: None if v is None or 0 < v <= 1
                                     else "must be in (0, 1] or null")
    select_layers: list[int | str] = _opt([32, "M", 32, 64, "M", 64, 64, "M", 64], _check_layers)
    select_every: int = _opt(4, _between(1, 1_000_000))


@dataclass
class ModelConfig:
    arch: str = _opt("vgg16", _one_of(*ARCHS))
    layers: list[int | str] | None = _opt(None, _check_layers)  # only for arch: custom
    batch_norm: bool = _opt(True)
    width: float = _opt(1.0, _between(0, 16, lo_open=True))
    num_classes: int = _opt(10, _between(2, 100_000))
    head: str = _opt("linear", _one_of("linear", "mlp"))
    hidden: int = _opt(512, _between(1, 65_536))
    dropout: float = _opt(0.5, _between(0, 1, hi_open=True))
    global_pool: str = _opt("none", _one_of("none", "max", "avg"))
    # true or "3x3": the first convolution becomes a fixed whitening of 3x3 patches, computed from
    # the training images before training (its width must be even, at most 54). "2x2": a fixed
    # 24-wide whitening of 2x2 patches (padding 0, with a bias, then the activation) in front of the
    # layers, as airbench's first layer.
    whiten: bool | str = _opt(False, lambda v: None if v in (True, False) or v in WHITEN_MODES
                              else f"must be true, false or one of {', '.join(WHITEN_MODES)}")
    # Train the whitening layer's bias for the first N epochs only (null: throughout); airbench: 3.
    whiten_bias_epochs: int | float | None = _opt(None, lambda v: None if v is None or v >= 0
                                                  else "must be >= 0")
    # conv_bn_act_pool: VGG's order; conv_pool_bn_act: a convolution followed by a pool is pooled
    # first, so its BN and activation run on the 4x smaller map (airbench).
    block_order: str = _opt("conv_bn_act_pool", _one_of(*BLOCK_ORDERS))
    activation: str = _opt("relu", _one_of("relu", "gelu"))
    conv_bias: bool = _opt(True)
    # BatchNorm2d's momentum (PyTorch's sense: the weight of each new batch) and eps; airbench's
    # "momentum 0.6" is 0.4 here, its eps 1e-12.
    bn_momentum: float = _opt(0.1, _between(0, 1, lo_open=True))
    bn_eps: float = _opt(1e-5, _between(0, 1, lo_open=True))
    # Each later convolution starts as the identity on its first in-channels filters (plus the
    # usual random init elsewhere), as airbench's Dirac init does.
    identity_init: bool = _opt(False)
    # false: batch-norm weights stay 1 and only their biases learn (airbench's BatchNorm).
    bn_weight: bool = _opt(True)
    # Logits = head output x this; airbench scales its logits by 1/9.
    logit_scale: float = _opt(1.0, _between(0, 1000, lo_open=True))


@dataclass
class OptimConfig:
    lr: float = _opt(0.05, _between(0, 100, lo_open=True))
    momentum: float = _opt(0.9, _between(0, 1, hi_open=True))
    nesterov: bool = _opt(False)
    weight_decay: float = _opt(5e-4, _between(0, 1, hi_open=True))
    label_smoothing: float = _opt(0.0, _between(0, 1, hi_open=True))
    # No weight decay on batch-norm weights and on biases (every 1-D parameter).
    exclude_bn_bias_from_decay: bool = _opt(False)
    # Learning rate of batch-norm biases = lr x this (their weight decay / this, so the decay per
    # step stays the same); airbench trains them 64x faster.
    bn_bias_lr_scale: float = _opt(1.0, _between(0, 1000, lo_open=True))
    # Lookahead: every N steps (and at each epoch end) the weights move back to slow weights that
    # follow them with a decay growing as progress^3 up to 0.95^N (airbench's schedule); 0: off.
    lookahead_every: int = _opt(0, _between(0, 1000))
    # The last step ends on the slow weights themselves (airbench's final full sync), not on the
    # usual interpolation.
    lookahead_final_full_sync: bool = _opt(False)
    # The whitening bias (when model.whiten_bias_epochs is set) at lr x this, weight decay / this.
    whiten_bias_lr_scale: float = _opt(1.0, _between(0, 1000, lo_open=True))
    # sgd; muon: the 3x3 filters get Muon's orthogonalised momentum updates (muon_lr,
    # muon_momentum, nesterov, no weight decay), everything else SGD as above (airbench94_muon).
    # adamw: torch's AdamW (decoupled weight decay) with betas (momentum, adam_beta2), the same
    # parameter groups (decay exclusions, BN-bias and whitening-bias rates).
    name: str = _opt("sgd", _one_of("sgd", "muon", "adamw"))
    muon_lr: float = _opt(0.24, _between(0, 100, lo_open=True))
    muon_momentum: float = _opt(0.6, _between(0, 1, hi_open=True))
    adam_beta2: float = _opt(0.999, _between(0, 1, hi_open=True))
    # Clip the gradients' global L2 norm to this before each step (null: no clipping); the norm
    # before clipping is logged to TensorBoard as train/grad_norm either way it is set.
    clip_grad_norm: float | None = _opt(None, lambda v: None if v is None or v > 0 else "must be > 0 or null")
    # Weight EMA: an exponential moving average of the weights and BN statistics, updated after
    # every step with this decay (null: off). It is validated beside the raw weights, chooses
    # best.pt, and is what the test report, eval, predict and gradcam use.
    ema_decay: float | None = _opt(None, lambda v: None if v is None or 0 < v < 1
                                   else "must be in (0, 1) or null")


@dataclass
class ScheduleConfig:
    # step: StepLR (gamma every step_size epochs, counted from the end of the warm-up); multistep:
    # gamma at each milestone epoch; linear / cosine: from start_factor up to 1 over the warm-up,
    # then linearly / along a half cosine down to end_factor at the last step; onecycle: the same
    # with a cosine warm-up. All applied per step (schedule.py).
    kind: str = _opt("step", _one_of(*SCHEDULES))
    step_size: int = _opt(30, _between(1, 1_000_000))
    gamma: float = _opt(0.1, _between(0, 1, lo_open=True))
    # multistep: the rate x gamma at each of these epochs (counted from the run's start)
    milestones: list[int] = _opt([30, 60, 80], _check_milestones)
    # Linear warm-up of the learning rate, step by step, over the first N epochs (fractions of an
    # epoch allowed).
    warmup_epochs: int | float = _opt(0, _between(0, 1_000_000))
    start_factor: float = _opt(0.2, _between(0, 1))  # the warm-up's first rate x this (not step)
    end_factor: float = _opt(0.0, _between(0, 1))  # linear, cosine, onecycle: the last step's rate x this


@dataclass
class LoopConfig:
    """The YAML's ``train:`` section: how the loop runs, not what it optimises."""

    # A fraction ends the last epoch early, at ceil(epochs x steps per epoch) steps (airbench: 9.9).
    epochs: int | float = _opt(30, _between(0, 1_000_000, lo_open=True))
    batch_size: int = _opt(128, _between(1, 65_536))
    eval_batch_size: int = _opt(1000, _between(1, 65_536))
    device: str = _opt("auto")
    precision: str = _opt("fp32", _one_of("fp32", "bf16", "fp16"))
    channels_last: bool | None = _opt(None)  # null: on where faster (CUDA), off elsewhere
    compile: bool = _opt(False)  # torch.compile the train step (falls back, with a warning)
    # CUDA: capture the whole step (forward, backward, optimizer, weight EMA) as one CUDA graph and
    # replay it (falls back to the eager step, with one warning line, where it cannot).
    cuda_graphs: bool = _opt(False)
    # Deterministic kernels (cuDNN, cuBLAS, torch.use_deterministic_algorithms): a resumed CUDA
    # run ends bit-identical to an uninterrupted one, at some cost in speed. The CPU always is.
    deterministic: bool = _opt(False)
    sync_bn: bool = _opt(False)  # under torchrun: batch-norm statistics over all ranks (CUDA)
    # Test-time augmentation for validation and the test report: none; flip (each image with its
    # mirror); multicrop (flip, plus the image shifted one pixel up-left and down-right, airbench's
    # level 2). true means flip, false none.
    tta: bool | str = _opt(False, lambda v: None if v in (True, False) or v in TTA_MODES
                           else f"must be true, false or one of {', '.join(TTA_MODES)}")
    log_every: int = _opt(20, _between(1, 1_000_000))
    # Also write last.pt every N steps inside an epoch (0: only at the end of each epoch).
    checkpoint_every_steps: int = _opt(0, _between(0, 1_000_000_000))
    out_dir: str = _opt("runs")


@dataclass
class TrainConfig:
    name: str | None = _opt(None)
    seed: int = _opt(0, _between(0, 2**63 - 1))
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: LoopConfig = field(default_factory=LoopConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DEVICE_RULE = "auto, cpu, cuda, cuda:N or mps"
RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}\Z")  # one safe path component, never . or ..
RUN_NAME_RULE = "1-100 letters, digits, '.', '_' or '-', starting with a letter or digit"
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


def _build(cls: type, raw: Any, prefix: str, where: Callable[[str], str]) -> Any:
    if not isinstance(raw, dict):
        what = prefix.rstrip(".") or "the top level"
        raise ConfigError(f"{where(prefix.rstrip('.'))}: {what} must be a mapping (got {_show(raw)})")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    for key in raw:
        if key not in names:
            shown = key if isinstance(key, str) and key.isidentifier() else _show(key)
            raise ConfigError(f"{where(prefix + _show(key))}: unknown key {prefix}{shown} "
                              f"(expected one of: {', '.join(names)})")
    kwargs = {}
    for f in fields(cls):
        if f.name not in raw:
            continue
        key, value, hint = prefix + f.name, raw[f.name], hints[f.name]
        if is_dataclass(hint):
            kwargs[f.name] = _build(hint, value, key + ".", where)
            continue
        ok, converted = _convert(hint, value)
        if not ok:
            raise ConfigError(f"{where(key)}: {key} must be {_type_name(hint)} (got {_show(value)})")
        check = f.metadata.get("check")
        problem = check(converted) if check else None
        if problem:
            raise ConfigError(f"{where(key)}: {key} {problem} (got {_show(value)})")
        kwargs[f.name] = converted
    return cls(**kwargs)


def _cross_check(cfg: TrainConfig, where: Callable[[str], str]) -> None:
    m = cfg.model
    if (cfg.data.mean is None) != (cfg.data.std is None):
        raise ConfigError(f"{where('data.mean')}: data.mean and data.std are set together (or both null)")
    if cfg.data.labels == "coarse" and cfg.data.dataset != "cifar100":
        raise ConfigError(f"{where('data.labels')}: data.labels: coarse is CIFAR-100's 20 superclasses "
                          f"(data.dataset is {cfg.data.dataset})")
    if m.arch == "custom" and m.layers is None:
        raise ConfigError(f"{where('model.layers')}: model.layers is required when model.arch is custom")
    if m.arch != "custom" and m.layers is not None:
        raise ConfigError(f"{where('model.layers')}: model.layers is only used with model.arch: custom "
                          f"(got arch {m.arch!r})")
    if m.whiten in (True, "3x3"):
        first = next(x for x in m.layers if x != "M") if m.layers else 64  # the paper VGGs: 64
        first = max(1, round(int(first) * m.width))
        if first % 2 or first > WHITEN_MAX_WIDTH:
            raise ConfigError(f"{where('model.whiten')}: model.whiten needs an even first convolution "
                              f"width of at most {WHITEN_MAX_WIDTH} (got {first})")
        first = next(x for x in cfg.data.select_layers if x != "M")  # the proxy's, at width 1
        if cfg.data.select_keep is not None and (first % 2 or first > WHITEN_MAX_WIDTH):
            raise ConfigError(f"{where('data.select_layers')}: model.whiten needs the proxy's first "
                              f"convolution to be even and at most {WHITEN_MAX_WIDTH} wide too (got {first})")
    if m.whiten_bias_epochs is not None and not m.whiten:
        raise ConfigError(f"{where('model.whiten_bias_epochs')}: model.whiten_bias_epochs needs "
                          f"model.whiten (a whitening layer whose bias trains)")
    if m.whiten_bias_epochs is not None and m.whiten in (True, "3x3") and not m.conv_bias:
        raise ConfigError(f"{where('model.whiten_bias_epochs')}: the 3x3 whitening layer has no bias "
                          f"with model.conv_bias false")
    if cfg.optim.whiten_bias_lr_scale != 1.0 and m.whiten_bias_epochs is None:
        raise ConfigError(f"{where('optim.whiten_bias_lr_scale')}: optim.whiten_bias_lr_scale applies to "
                          f"the whitening bias of model.whiten_bias_epochs, which is not set")
    if not DEVICE_RE.match(cfg.train.device):
        raise ConfigError(f"{where('train.device')}: train.device must be {DEVICE_RULE} "
                          f"(got {_show(cfg.train.device)})")
    if cfg.name is not None and not RUN_NAME_RE.match(cfg.name):
        raise ConfigError(f"{where('name')}: name must be {RUN_NAME_RULE} (got {_show(cfg.name)})")


def config_from_dict(raw: Any, source: str, overridden: dict[str, str] | None = None) -> TrainConfig:
    """Validate a plain mapping (a parsed YAML file, or one read back from a checkpoint)."""
    overridden = overridden or {}

    def where(key: str) -> str:
        return f"--set {_clip(overridden[key])}" if key in overridden else source

    cfg = _build(TrainConfig, raw, "", where)
    _cross_check(cfg, where)
    return cfg


def resolve_config_path(path_or_name: str) -> Path:
    """A path as given; else a bare name looked up in ./configs, then in the project's configs/."""
    candidates = [Path(path_or_name)]
    if not Path(path_or_name).parent.parts:
        for name in (path_or_name, path_or_name + ".yaml"):
            candidates += [Path("configs") / name, PROJECT_CONFIGS / name]
    for c in candidates:
        if c.exists() and not c.is_dir():  # a FIFO or a device too: read_text says what it is
            return c
    raise ConfigError(f"{path_or_name}: no such config file (also looked in configs/ and {PROJECT_CONFIGS})")


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
    for part in parts[:-1]:
        if not isinstance(node.get(part, {}), dict):
            raise ConfigError(f"--set {_clip(item)}: {part} is not a section")
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return key


def load_config(path_or_name: str, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read, override and validate a YAML config. Raises ConfigError with a one-line message."""
    path = resolve_config_path(path_or_name)
    source = str(path_or_name)
    raw = read_yaml(path, error=ConfigError, label=source)  # bounded: regular file, size, depth
    if raw is None:
        raise ConfigError(f"{source}: file is empty (expected a mapping of config sections)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping (got {_show(raw)})")
    cfg = config_with_overrides(raw, source, overrides)
    if cfg.name is None:
        cfg.name = path.stem  # not checked here: summary and bench name no run (see check_run_name)
    return cfg


def check_run_name(cfg: TrainConfig, source: str) -> None:
    """Before a new run directory is named after the config file's stem, check it as a name: key
    is checked, so the run can be evaluated and resumed (and "..yaml" cannot name runs/ itself)."""
    if not RUN_NAME_RE.match(str(cfg.name)):
        raise ConfigError(f"{source}: the file name {_show(cfg.name)} cannot name the run ({RUN_NAME_RULE}); "
                          f"set name: in the file, or pass --name or --set name=...")


def config_with_overrides(raw: dict, source: str, overrides: Sequence[str] = ()) -> TrainConfig:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a mapping, then validate."""
    raw = copy.deepcopy(raw)
    overridden = {}
    for item in overrides:
        overridden[_apply_override(raw, item)] = item
    return config_from_dict(raw, source, overridden)


# What may differ between a run and its resumption: where and how fast it runs, and how long.
# Anything else (model, optimizer, data split, seed) would silently not apply or corrupt the run.
RESUMABLE_KEYS = {"train.epochs", "train.device", "train.log_every", "train.checkpoint_every_steps",
                  "train.eval_batch_size", "data.root", "data.download"}


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def check_resume_changes(stored: dict, cfg: TrainConfig, source: str) -> None:
    """Refuse a resumed config that changes more than RESUMABLE_KEYS allows."""
    try:  # the stored config with today's defaults, so a key added since is not a "change"
        stored = config_from_dict(stored, source).to_dict()
    except ConfigError:
        pass
    if cfg.data.mean is None and isinstance(stored.get("data"), dict):  # null: the run's measured ones
        cfg.data.mean, cfg.data.std = stored["data"].get("mean"), stored["data"].get("std")
    old, new = _flatten(stored), _flatten(cfg.to_dict())
    for key in sorted(old.keys() | new.keys()):
        if key not in RESUMABLE_KEYS and old.get(key) != new.get(key):
            raise ConfigError(f"{source}: {key} cannot change when resuming (the run has "
                              f"{_show(old.get(key))}, asked {_show(new.get(key))}); "
                              f"only {', '.join(sorted(RESUMABLE_KEYS))} may")


def tta_mode(tta: bool | str) -> str:
    """train.tta (or eval's --tta) as one of TTA_MODES."""
    if isinstance(tta, bool):
        return "flip" if tta else "none"
    return tta


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


__all__ = ["TrainConfig", "DataConfig", "ModelConfig", "OptimConfig", "ScheduleConfig", "LoopConfig",
           "load_config", "config_from_dict", "config_with_overrides", "dump_config",
           "resolve_config_path", "check_resume_changes", "check_run_name", "RESUMABLE_KEYS", "tta_mode",
           "TTA_MODES", "DEVICE_RE", "DEVICE_RULE", "RUN_NAME_RE", "RUN_NAME_RULE"]
