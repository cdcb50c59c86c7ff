"""Drawing helpers for the report's pictures and Grad-CAM overlays: fonts, colour maps and
tensor <-> Pillow conversions. Pillow draws; matplotlib would add only axes we do not need."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from vggtrain.atomic import atomic_write

# A white-to-blue ramp (ColorBrewer "Blues") for rates, and "jet" for Grad-CAM heat maps.
BLUES = [(0.0, (247, 251, 255)), (0.25, (198, 219, 239)), (0.5, (107, 174, 214)),
         (0.75, (33, 113, 181)), (1.0, (8, 48, 107))]
JET = [(0.0, (0, 0, 143)), (0.125, (0, 0, 255)), (0.375, (0, 255, 255)), (0.625, (255, 255, 0)),
       (0.875, (255, 0, 0)), (1.0, (128, 0, 0))]


def font(size: int) -> tuple[ImageFont.ImageFont | ImageFont.FreeTypeFont, str]:
    """(font, arrow): DejaVu Sans where installed (it has an arrow glyph), else Pillow's own."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size), "\u2192"
    except OSError:
        pass
    try:
        return ImageFont.load_default(size=size), "->"  # Pillow >= 10.1 with FreeType
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default(), "->"


def text_size(draw: ImageDraw.ImageDraw, text: str, f: Any) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=f)
    return right - left, bottom - top


def apply_colormap(values: torch.Tensor, stops: list[tuple[float, tuple[int, int, int]]]) -> torch.Tensor:
    """values in [0, 1], any shape -> uint8 RGB with a leading channel axis, by linear interpolation."""
    pos = torch.tensor([p for p, _ in stops])
    col = torch.tensor([c for _, c in stops], dtype=torch.float32)
    v = values.float().clamp(0, 1).contiguous()
    i = torch.searchsorted(pos, v, right=True).clamp(1, len(stops) - 1)
    t = ((v - pos[i - 1]) / (pos[i] - pos[i - 1])).unsqueeze(-1)
    rgb = col[i - 1] * (1 - t) + col[i] * t
    return rgb.round().to(torch.uint8).movedim(-1, 0)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """A Pillow RGB image as a uint8 (3, H, W) tensor, what TensorBoard's add_image takes."""
    return torch.frombuffer(bytearray(img.convert("RGB").tobytes()), dtype=torch.uint8) \
        .view(img.height, img.width, 3).permute(2, 0, 1).contiguous()


def to_pil(chw: torch.Tensor) -> Image.Image:
    return Image.fromarray(chw.permute(1, 2, 0).contiguous().numpy(), "RGB")


def save_png(path: Path, img: Image.Image | torch.Tensor) -> None:
    pil = to_pil(img) if isinstance(img, torch.Tensor) else img
    atomic_write(path, lambda f: pil.save(f, format="PNG", optimize=True))


def text_rotated(img: Image.Image, xy: tuple[int, int], text: str, f: Any, fill: tuple) -> None:
    """Text reading bottom to top, its top-left corner at xy (after rotation)."""
    probe = ImageDraw.Draw(img)
    left, top, right, bottom = probe.textbbox((0, 0), text, font=f)
    mask = Image.new("L", (right - left + 2, bottom - top + 2), 0)
    ImageDraw.Draw(mask).text((-left + 1, -top + 1), text, font=f, fill=255)
    mask = mask.rotate(90, expand=True)
    img.paste(Image.new("RGB", mask.size, fill), xy, mask)
