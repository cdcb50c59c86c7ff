"""`vggtrain predict`: class probabilities for image files, from a checkpoint alone.

An image is decoded to RGB (grey, palette and alpha images too), resized as a whole to the 32x32
the model was trained on (no crop: CIFAR's objects fill their frame; both in images.py), and
normalised exactly as its training batches were (data.normalize with the run's own mean and std).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vggtrain.data import CIFAR10_STATS, Stats, norm_stats, normalize
from vggtrain.errors import DataError, shown
from vggtrain.images import image_paths, read_image, to_model_size
from vggtrain.inference import LoadedModel

SCHEMA = "vggtrain.predict/1"


@torch.no_grad()
def probabilities(model: torch.nn.Module, images: torch.Tensor, device: torch.device,
                  batch_size: int = 256, stats: Stats = CIFAR10_STATS,
                  temperature: float | None = None) -> torch.Tensor:
    """uint8 (N, 3, 32, 32) -> float32 class probabilities (N, C) on the CPU; stats: the
    normalisation the model was trained with; temperature: softmax(logits / T) (calibration.py)."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start:start + batch_size].to(device), stats=stats)
        logits = model(x).float()
        out.append(torch.softmax(logits if temperature is None else logits / temperature, dim=1).cpu())
    return torch.cat(out)


def predict_files(loaded: LoadedModel, paths: Sequence[str], device: torch.device, topk: int,
                  temperature: float | None = None) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """(one result per readable image, one error per unreadable one), each in input order; a
    directory stands for the images under it (image_paths), each unreadable one an error that
    the others go on without."""
    paths, errors = image_paths(paths)
    ok_paths, images = [], []
    for p in paths:
        try:
            images.append(to_model_size(read_image(p)))
            ok_paths.append(p)
        except DataError as e:
            errors.append({"image": p, "error": str(e)})
    results = []
    if images:
        probs = probabilities(loaded.model, torch.stack(images), device, stats=norm_stats(loaded.cfg.data),
                              temperature=temperature)
        k = min(topk, probs.shape[1])
        values, indices = probs.topk(k, dim=1)
        for p, vs, ix in zip(ok_paths, values.tolist(), indices.tolist(), strict=True):
            results.append({"image": p, "top": [{"class": loaded.class_names[i], "index": i, "prob": v}
                                                for v, i in zip(vs, ix, strict=True)]})
    return results, errors


def predictions_json(loaded: LoadedModel, results: list[dict[str, Any]], errors: list[dict[str, str]],
                     topk: int, temperature: float | None = None) -> dict[str, Any]:
    return {"schema": SCHEMA, "checkpoint": str(loaded.path), "checkpoint_epoch": loaded.epoch,
            "weights": loaded.weights, "temperature": temperature,
            "class_names": loaded.class_names, "topk": topk, "predictions": results, "errors": errors}


def format_predictions(results: list[dict[str, Any]]) -> str:
    """One line per image: `path: class 91.2%, class 6.1%, ...` (a file name's control characters
    and bytes that are not UTF-8 escaped)."""
    return "".join(shown(f"{r['image']}: " + ", ".join(f"{t['class']} {t['prob']:.1%}" for t in r["top"]))
                   + "\n" for r in results)
