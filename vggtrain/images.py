"""Image files for the model: found (the extensions Pillow reads), decoded to uint8 RGB in one
bounded, quiet pass, and resized as a whole to the 32x32 the models take. `vggtrain predict`,
`vggtrain gradcam` and folder datasets (folder.py) all read images through here, so an image
means the same to each of them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from vggtrain.errors import DataError, first_line
from vggtrain.model import IMAGE_SIZE
from vggtrain.safeio import IMAGE_LIMIT, open_regular, quiet_decoding


def image_extensions() -> set[str]:
    """The file extensions Pillow reads (".png", ".jpg", ...), lowercase."""
    return {ext.lower() for ext in Image.registered_extensions()}


def walk_images(top: str | Path, extensions: set[str]) -> Iterator[str]:
    """The files under top whose extension Pillow reads, hidden files and folders left out, in
    os.walk's order (unsorted)."""
    for dirpath, dirs, names in os.walk(top):
        dirs[:] = [x for x in dirs if not x.startswith(".")]
        for n in names:
            if not n.startswith(".") and os.path.splitext(n)[1].lower() in extensions:
                yield os.path.join(dirpath, n)


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
