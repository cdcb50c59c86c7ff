"""`vggtrain predict`: class probabilities for image files, from a checkpoint alone.

An image is decoded to RGB (grey, palette and alpha images too), resized as a whole to the 32x32
the model was trained on (no crop: CIFAR's objects fill their frame), and normalised exactly as
its training batches were (data.normalize with the run's own mean and std).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vggtrain.data import CIFAR10_STATS, Stats, norm_stats, normalize
from vggtrain.errors import DataError, first_line, shown
from vggtrain.inference import LoadedModel
from vggtrain.model import IMAGE_SIZE

SCHEMA = "vggtrain.predict/1"


def read_image(path: str | Path) -> torch.Tensor:
    """An image file as uint8 RGB (3, H, W), EXIF orientation applied. DataError naming the file
    if it is missing, not a regular file or cannot be decoded.

    Pillow decodes it: its failures are Python exceptions, where libpng (under torchvision.io)
    also writes its own complaint to stderr, and it reads more than PNG and JPEG. Its plugins
    raise many types for a file they cannot read (OSError, SyntaxError, ValueError, struct.error,
    NotImplementedError, ...): every one is this file's fault, said in one line, and what the
    decoders print on the way is silenced (safeio.quiet_decoding).
    """
    import numpy as np  # arrives with torchvision
    from PIL import Image, ImageOps, UnidentifiedImageError

    from vggtrain.safeio import IMAGE_LIMIT, open_regular, quiet_decoding

    if not os.path.lexists(path):
        raise DataError(f"{path}: no such image file")
    with open_regular(path, DataError, limit=IMAGE_LIMIT) as f:  # no FIFO, no device
        try:
            with quiet_decoding(), Image.open(f) as img:
                img = ImageOps.exif_transpose(img)
                if img.mode.startswith("I;16") or img.mode == "I":  # 16-bit grey: scale, do not clip
                    img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257).clip(0, 255)
                                          .astype(np.uint8))
                rgb = np.asarray(img.convert("RGB"))
        except UnidentifiedImageError:
            raise DataError(f"{path}: not an image file Pillow can read (PNG, JPEG, ...)") from None
        except Exception as e:  # noqa: BLE001 - see above: the file's, whatever its type
            why = first_line(e, 160)
            raise DataError(f"{path}: cannot decode the image ({type(e).__name__}: {why})") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
        raise DataError(f"{path}: cannot decode the image (it gave pixels of shape {rgb.shape})")
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def image_paths(paths: Sequence[str]) -> tuple[list[str], list[dict[str, str]]]:
    """The images named: a file as given, a directory as the image files under it, listed as a
    folder dataset lists them (the extensions Pillow reads, hidden files and folders left out,
    sorted); (paths, an error per directory without images)."""
    from vggtrain.folder import image_extensions, walk_images

    out: list[str] = []
    errors: list[dict[str, str]] = []
    extensions = None
    for p in paths:
        if not os.path.isdir(p):
            out.append(p)
            continue
        extensions = extensions or image_extensions()
        found = sorted(walk_images(p, extensions))
        if not found:
            errors.append({"image": p, "error": str(DataError(f"{p}: a directory without image files"))})
        out += found
    return out, errors


def to_model_size(img: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (3, 32, 32), antialiased when shrinking."""
    from torchvision.transforms.v2.functional import resize

    if tuple(img.shape[1:]) == (IMAGE_SIZE, IMAGE_SIZE):
        return img
    return resize(img, [IMAGE_SIZE, IMAGE_SIZE], antialias=True)


@torch.no_grad()
def probabilities(model: torch.nn.Module, images: torch.Tensor, device: torch.device,
                  batch_size: int = 256, stats: Stats = CIFAR10_STATS) -> torch.Tensor:
    """uint8 (N, 3, 32, 32) -> float32 class probabilities (N, C) on the CPU; stats: the
    normalisation the model was trained with."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start:start + batch_size].to(device), stats=stats)
        out.append(torch.softmax(model(x).float(), dim=1).cpu())
    return torch.cat(out)


def predict_files(loaded: LoadedModel, paths: Sequence[str], device: torch.device, topk: int
                  ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
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
        probs = probabilities(loaded.model, torch.stack(images), device, stats=norm_stats(loaded.cfg.data))
        k = min(topk, probs.shape[1])
        values, indices = probs.topk(k, dim=1)
        for p, vs, ix in zip(ok_paths, values.tolist(), indices.tolist(), strict=True):
            results.append({"image": p, "top": [{"class": loaded.class_names[i], "index": i, "prob": v}
                                                for v, i in zip(vs, ix, strict=True)]})
    return results, errors


def predictions_json(loaded: LoadedModel, results: list[dict[str, Any]], errors: list[dict[str, str]],
                     topk: int) -> dict[str, Any]:
    return {"schema": SCHEMA, "checkpoint": str(loaded.path), "checkpoint_epoch": loaded.epoch,
            "weights": loaded.weights,
            "class_names": loaded.class_names, "topk": topk, "predictions": results, "errors": errors}


def format_predictions(results: list[dict[str, Any]]) -> str:
    """One line per image: `path: class 91.2%, class 6.1%, ...` (a file name's control characters
    and bytes that are not UTF-8 escaped)."""
    return "".join(shown(f"{r['image']}: " + ", ".join(f"{t['class']} {t['prob']:.1%}" for t in r["top"]))
                   + "\n" for r in results)
