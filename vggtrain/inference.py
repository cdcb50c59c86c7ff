"""A trained model back from its checkpoint, ready for `eval`, `predict` and `gradcam`: the model
its own stored config describes, its weights, its class names."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from vggtrain.checkpoint import (
    check_weights_fit,
    load_checkpoint,
    load_model_state,
    model_weights,
    stored_temperatures,
)
from vggtrain.config import TrainConfig, config_from_dict, digest_of
from vggtrain.device import channels_last_for
from vggtrain.errors import CheckpointError, shown
from vggtrain.model import build_model


@dataclass
class LoadedModel:
    model: nn.Module  # in eval mode, on the requested device
    cfg: TrainConfig
    class_names: list[str]
    path: Path
    epoch: int
    weights: str = "raw"  # "ema": the run's weight EMA (optim.ema_decay), else the trained weights
    # TTA mode -> the temperature fit fitted under it (calibration.py); {}: none stored
    temperatures: dict[str, float] = field(default_factory=dict)
    config_digest: str = ""  # its stored config's digest (config.digest_of), as its report.json gives it
    names_recorded: bool = True  # False: the checkpoint holds no class names (class_names are "0", "1", ...)


def load_model(path: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Rebuild the model a checkpoint's own config describes and load its weights into it.

    Raises CheckpointError (or ConfigError for a stored config that no longer validates) on a
    file that is missing, not a checkpoint, truncated, or whose weights do not fit that model.
    """
    path = Path(path)
    state = load_checkpoint(path)
    cfg = config_from_dict(state["config"], f"{path} (its stored config)", stored=True)
    check_weights_fit(cfg.model, state["model"], path)
    model = build_model(cfg.model)
    weights, which = model_weights(state)
    # the raw weights were scanned for NaN and infinity by check_weights_fit; the EMA's were not
    load_model_state(model, weights, path, scan=weights is not state["model"])
    names = state.get("class_names")
    recorded = names is not None
    if names is None:
        names = [str(i) for i in range(cfg.model.num_classes)]
    if not isinstance(names, list) or len(names) != cfg.model.num_classes \
            or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{path}: class_names does not list {cfg.model.num_classes} names")
    names = [shown(n) for n in names]  # printed and written as text: no escape sequences, valid UTF-8
    try:
        epoch = int(state.get("epoch", 0))
    except (TypeError, ValueError):
        raise CheckpointError(f"{path}: epoch is not a number") from None
    temperatures = stored_temperatures(state, path)
    model = model.to(device)
    if channels_last_for(cfg.train.channels_last, torch.device(device)):
        model = model.to(memory_format=torch.channels_last)
    model.eval()
    return LoadedModel(model, cfg, list(names), path, epoch, which, temperatures, digest_of(state["config"]),
                       recorded)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as given, or a run directory's best.pt."""
    path = Path(path)
    return path / "best.pt" if path.is_dir() else path
