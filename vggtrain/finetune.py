"""Fine-tuning (init.from): a new run whose network starts from a trained run's weights.

The source is read with the safe loader (checkpoint.load_checkpoint: weights_only) and its
weights are the ones it is tested with (its weight EMA's, where it kept one). Every tensor must
have this model's shape, except the head's when the class count differs: those tensors keep
this run's own random init, and the run says so in one line. The run gets its own optimizer and
schedule; init.freeze's layers keep the loaded weights (left out of the optimizer, their
BatchNorm layers in eval mode) and optim.lr_scale_backbone slows the loaded ones. A resumed
fine-tuning run reads none of this from the source again: its checkpoint holds the weights and
the record of where they started (`Start.record`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vggtrain.checkpoint import load_checkpoint, model_weights
from vggtrain.config import ModelConfig, TrainConfig, config_from_dict, digest_of
from vggtrain.data import Stats, ValidationDraw, held_out_note, norm_stats
from vggtrain.errors import CheckpointError, ConfigError
from vggtrain.inference import resolve_checkpoint
from vggtrain.model import build_model


@dataclass
class Start:
    """Where a fine-tuning run's weights come from."""

    source: str  # the checkpoint file read
    config_digest: str  # its stored config's digest, as its report.json gives it (report.config_digest)
    head: list[str]  # the tensors re-initialised (a new class count); empty: every tensor loaded
    weights: dict[str, torch.Tensor] | None = None  # the source's; None when resumed (the checkpoint's)
    stats: Stats | None = None  # the source's normalisation (data.mean, data.std), None when resumed
    notes: list[str] = field(default_factory=list)  # what the terminal is told, one line each

    def record(self) -> dict[str, Any]:
        """The checkpoint's and the report's `init` entry."""
        return {"from": self.source, "config_digest": self.config_digest,
                "head_reinitialised": list(self.head)}

    @classmethod
    def of_record(cls, record: Any, path: Path) -> Start:
        """A resumed run's start, from its checkpoint's `init` entry."""
        if not isinstance(record, dict) or not isinstance(record.get("from"), str) \
                or not isinstance(record.get("config_digest"), str) \
                or not all(isinstance(k, str) for k in record.get("head_reinitialised", ())):
            raise CheckpointError(f"{path}: cannot resume from it: init.from is set but it holds no "
                                  f"init entry (where its weights started)")
        return cls(record["from"], record["config_digest"], list(record.get("head_reinitialised", ())))


def open_source(cfg: TrainConfig) -> Start:
    """Read init.from and check it against cfg's model before anything is allocated or written:
    a tensor that does not fit (but the head's on a new class count) and an init.freeze name that
    names no layer are refused in one line."""
    path = resolve_checkpoint(str(cfg.init.from_))
    state = load_checkpoint(path)
    source_cfg = config_from_dict(state["config"], f"{path} (its stored config)", stored=True)
    weights, which = model_weights(state)
    head = check_shapes(cfg.model, source_cfg.model.num_classes, weights, path)
    check_freeze(cfg.init.freeze, list(weights), head)
    notes = []
    if head:
        notes.append(f"init: the head ({', '.join(head)}) re-initialised: {path} has "
                     f"{source_cfg.model.num_classes} classes, this run {cfg.model.num_classes}")
    loaded = "its weight EMA's" if which == "ema" else "its weights"
    notes.insert(0, f"init: {len(weights) - len(head)} of {len(weights)} tensors from {path} ({loaded})")
    source_draw = ValidationDraw.of(source_cfg.data, source_cfg.seed)
    if source_draw.may_have_trained_on(ValidationDraw.of(cfg.data, cfg.seed)):
        notes.append(held_out_note(f"init: {path}"))
    return Start(str(path), digest_of(state["config"]), head, weights, norm_stats(source_cfg.data), notes)


def _shape(t: Any) -> str:
    return "absent" if t is None else str(tuple(t.shape)) if isinstance(t, torch.Tensor) else "not a tensor"


def check_shapes(model_cfg: ModelConfig, source_classes: int, weights: dict[str, Any], path: Path
                 ) -> list[str]:
    """The head's tensors that differ only by the class count (re-initialised), after checking
    that every other tensor of the source fits the model model_cfg builds (on the meta device:
    shapes only, no memory)."""
    with torch.device("meta"):
        here = build_model(model_cfg).state_dict()
        as_source = build_model(dataclasses.replace(model_cfg, num_classes=source_classes)).state_dict()
    head = [k for k in here if k in as_source and here[k].shape != as_source[k].shape]
    for key in [*here, *(k for k in weights if k not in here)]:
        theirs, ours = weights.get(key), here.get(key)
        fits = isinstance(theirs, torch.Tensor) and ours is not None
        if fits and key in head and theirs.shape == as_source[key].shape:
            continue  # the head of the source's class count
        if not fits or theirs.shape != ours.shape:
            raise CheckpointError(f"init.from {path}: {key} is {_shape(theirs)} there and {_shape(ours)} "
                                  f"here (only the head may differ, when the class count does)")
    return head


def frozen_by(name: str, freeze: Sequence[str]) -> bool:
    """Whether a parameter's or module's name is one of init.freeze's names or under one."""
    return any(name == p or name.startswith(p + ".") for p in freeze)


def check_freeze(freeze: Sequence[str], names: list[str], head: list[str]) -> None:
    for prefix in freeze:
        matched = [n for n in names if frozen_by(n, [prefix])]
        if not matched:
            layers = sorted({n.rsplit(".", 1)[0] for n in names})
            raise ConfigError(f"init.freeze: {prefix!r} names no layer of this model (its "
                              f"layers: {', '.join(layers[:12])}{', ...' if len(layers) > 12 else ''})")
        if any(n in head for n in matched):
            raise ConfigError(f"init.freeze: {prefix!r} takes in the re-initialised head, "
                              f"which would stay random")


def choose_stats(cfg: TrainConfig, start: Start) -> None:
    """The source's normalisation, which its weights were trained for, written into cfg (and so
    into config.yaml and every checkpoint); a note when the new data's own differs."""
    if start.stats is None:  # resumed: the run's config already holds the choice
        return
    own = norm_stats(cfg.data)
    mean, std = (list(s) for s in start.stats)
    if own != start.stats:
        start.notes.append(f"init: normalising with the source's data.mean {mean} and data.std {std} "
                           f"(this data's would be {list(own[0])}, {list(own[1])}): its weights were "
                           f"trained for them")
    cfg.data.mean, cfg.data.std = mean, std


def _eval_mode(module: nn.Module, _args: Any) -> None:
    module.training = False  # a frozen layer: BatchNorm uses its running statistics and keeps them


def start_model(model: nn.Module, start: Start, freeze: Sequence[str]) -> set[str]:
    """Load the source's weights into a freshly built model (the head's tensors keep the model's
    own init), freeze init.freeze's layers, and return the names of the loaded parameters
    (optim.lr_scale_backbone's). For a resumed run (no weights) only the freezing is done, so that
    its optimizer's groups are the ones it saved."""
    if start.weights is not None:
        own = model.state_dict()
        model.load_state_dict({**start.weights, **{k: own[k] for k in start.head}})
    for name, p in model.named_parameters():
        if frozen_by(name, freeze):
            p.requires_grad_(False)
    for name, m in model.named_modules():
        if not any(True for _ in m.children()) and frozen_by(name, freeze):
            m.register_forward_pre_hook(_eval_mode)  # model.train() each epoch cannot undo it
    return {n for n, _ in model.named_parameters() if n not in start.head}
