"""CIFAR-10-C corruptions (Hendrycks & Dietterich, 2019) made on the device from the test split's
uint8 tensor, and the robustness evaluation `vggtrain eval --corruptions` runs with them: accuracy
per corruption and severity, the mean, the (relative) mean corruption error against a baseline,
and their report section and heat map.

Each family is a small function of float images in [0, 1] (B, 3, H, W), one severity's constant
(the paper's CIFAR values, hendrycks/robustness ImageNet-C/create_c/make_cifar_c.py) and a
torch.Generator; FAMILIES maps its name to it and to the five constants. Families that need the
original texture files (frost), a fractal made by a sequential algorithm (fog), or a per-pixel
sequential shuffle (glass blur) are left out; docs/evaluation.md says which families differ from
the paper's code and how.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vggtrain.data import Split
from vggtrain.device import synchronize
from vggtrain.errors import UserError
from vggtrain.numfmt import pct

Images = torch.Tensor  # float (B, 3, H, W) in [0, 1]
SEVERITIES = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class Family:
    apply: Callable[[Images, Any, torch.Generator], Images]
    levels: tuple  # the constant of severities 1..5
    random: bool  # whether it draws from the generator


KORNIA_FAMILIES = ("defocus_blur", "brightness", "saturate")  # the `robust` extra's


def _kornia(needing: Sequence[str] = KORNIA_FAMILIES) -> Any:
    """kornia, imported when first needed (an optional extra); where it is missing, the one-line
    UserError naming the corruptions (needing) that need it."""
    try:
        import kornia
    except ImportError:
        raise UserError(f"{', '.join(needing)} need kornia: pip install 'vggtrain[robust]'") from None
    return kornia


def require_extras(names: Sequence[str]) -> None:
    """Refuse, before any work, corruptions whose library is not installed."""
    needing = [n for n in names if n in KORNIA_FAMILIES]
    if needing:
        _kornia(needing)


def _wide(x: torch.Tensor) -> torch.dtype:
    """float64 for the coordinate arithmetic, but on MPS, which has none."""
    return torch.float32 if x.device.type == "mps" else torch.float64


def _uniform(shape: Sequence[int], low: float, high: float, x: Images, g: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=g, device=x.device, dtype=x.dtype) * (high - low) + low


# --- noise ----------------------------------------------------------------------------------------

def gaussian_noise(x: Images, c: float, g: torch.Generator) -> Images:
    return x + c * torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)


def shot_noise(x: Images, c: float, g: torch.Generator) -> Images:
    return torch.poisson(x * c, generator=g) / c


def impulse_noise(x: Images, c: float, g: torch.Generator) -> Images:
    # skimage's random_noise(mode="s&p"): each value (per channel) flipped with probability c, to
    # 1 or 0 with equal odds.
    flipped = _uniform(x.shape, 0, 1, x, g) < c
    salt = (_uniform(x.shape, 0, 1, x, g) < 0.5).to(x.dtype)
    return torch.where(flipped, salt, x)


# --- blur -----------------------------------------------------------------------------------------

def _disk_kernel(radius: float, alias_blur: float) -> torch.Tensor:
    """The paper's defocus kernel: an aliased disk on a 17x17 grid, normalised, smoothed by a 3x3
    Gaussian (cv2.GaussianBlur), cut to its non-zero support (the zeros add nothing)."""
    size = torch.arange(-8, 9, dtype=torch.float64)
    yy, xx = torch.meshgrid(size, size, indexing="ij")
    disk = (xx ** 2 + yy ** 2 <= radius ** 2).double()
    disk /= disk.sum()
    g = torch.exp(-torch.arange(-1, 2, dtype=torch.float64) ** 2 / (2 * alias_blur ** 2))
    g /= g.sum()
    kernel = F.conv2d(disk[None, None], torch.outer(g, g)[None, None], padding=1)[0, 0]
    rows, cols = kernel.abs().sum(1).nonzero(), kernel.abs().sum(0).nonzero()
    return kernel[rows.min():rows.max() + 1, cols.min():cols.max() + 1].float()


def defocus_blur(x: Images, c: tuple[float, float], g: torch.Generator) -> Images:
    kernel = _disk_kernel(*c).to(x.device, x.dtype)
    # kornia's "reflect" border is cv2.filter2D's default (BORDER_REFLECT_101).
    return _kornia().filters.filter2d(x, kernel[None], border_type="reflect")


def motion_blur(x: Images, c: tuple[int, float], g: torch.Generator) -> Images:
    """ImageMagick's MotionBlurImage(radius, sigma, angle), the paper's tool: a one-sided line of
    2*radius+1 taps with Gaussian weights exp(-i^2 / 2 sigma^2), tap i read at the nearest pixel
    i steps along the angle, edges replicated; angle uniform in [-45, 45] degrees per image.
    Written here because kornia's motion kernel is a symmetric line of equal weights, another blur."""
    radius, sigma = c
    b, _, h, w = x.shape
    angle = torch.deg2rad(_uniform((b,), -45, 45, x, g).to(_wide(x)))
    width = 2 * radius + 1
    weights = torch.exp(-torch.arange(width, dtype=torch.float64) ** 2 / (2 * sigma ** 2))
    weights = (weights / weights.sum()).tolist()
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    flat, out = x.flatten(2), torch.zeros_like(x)
    for i in range(width):
        dx = torch.ceil(i * torch.cos(angle) - 0.5).long()
        dy = torch.ceil(i * torch.sin(angle) - 0.5).long()
        r = (rows[None] + dy[:, None]).clamp(0, h - 1)
        q = (cols[None] + dx[:, None]).clamp(0, w - 1)
        index = (r[:, :, None] * w + q[:, None, :]).flatten(1)[:, None].expand(-1, x.shape[1], -1)
        out += weights[i] * flat.gather(2, index).view_as(x)
    return out


def _clipped_zoom(x: Images, zoom: float) -> Images:
    """The paper's clipped_zoom: the centre ceil(h / zoom) square scaled up by zoom with
    scipy.ndimage.zoom(order=1) (whose grid maps corner to corner: align_corners=True), the
    centre h x h kept."""
    h = x.shape[-1]
    ch = math.ceil(h / zoom)
    top = (h - ch) // 2
    size = round(ch * zoom)
    big = F.interpolate(x[..., top:top + ch, top:top + ch], size=(size, size), mode="bilinear",
                        align_corners=True)
    trim = (size - h) // 2
    return big[..., trim:trim + h, trim:trim + h]


def zoom_blur(x: Images, c: int, g: torch.Generator) -> Images:
    # c zoom factors 1.00, 1.01, ...: the lengths of the paper's np.arange(1, 1.06, 0.01) etc.,
    # whose float end points make them 7, 12, 16, 21, 26.
    out = x.clone()
    for i in range(c):
        out += _clipped_zoom(x, 1 + 0.01 * i)
    return out / (c + 1)


# --- colour (kornia's HSV conversion, the paper's skimage rgb2hsv/hsv2rgb) -------------------------

def contrast(x: Images, c: float, g: torch.Generator) -> Images:
    means = x.mean(dim=(2, 3), keepdim=True)  # per image and channel, as the paper's axis=(0, 1)
    return (x - means) * c + means


def brightness(x: Images, c: float, g: torch.Generator) -> Images:
    color = _kornia().color
    hsv = color.rgb_to_hsv(x)
    hsv = torch.cat([hsv[:, :2], (hsv[:, 2:] + c).clamp(0, 1)], dim=1)
    return color.hsv_to_rgb(hsv)


def saturate(x: Images, c: tuple[float, float], g: torch.Generator) -> Images:
    color = _kornia().color
    hsv = color.rgb_to_hsv(x)
    hsv = torch.cat([hsv[:, :1], (hsv[:, 1:2] * c[0] + c[1]).clamp(0, 1), hsv[:, 2:]], dim=1)
    return color.hsv_to_rgb(hsv)


# --- digital ----------------------------------------------------------------------------------------

def _box_resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """Pillow's BOX resampling along one axis as an (n_out, n_in) matrix (Resample.c's
    precompute_coeffs with box_filter): weight 1 for each input whose centre falls in the output
    pixel's span, normalised. Written as a matrix so a whole batch resizes in one matmul."""
    scale = n_in / n_out
    support = 0.5 * max(scale, 1.0)
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for o in range(n_out):
        center = (o + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
        for i in range(lo, hi):
            t = (i - center + 0.5) / max(scale, 1.0)
            m[o, i] = 1.0 if -0.5 < t <= 0.5 else 0.0
        m[o] /= m[o].sum()
    return m


def _pil_box_resize(x255: torch.Tensor, size: int) -> torch.Tensor:
    """Pillow's resize(BOX) of 0..255 values: horizontal pass, then vertical, each rounded to
    8 bits as Pillow's intermediate image is."""
    mw = _box_resize_matrix(x255.shape[-1], size).to(x255.device, x255.dtype)
    mh = _box_resize_matrix(x255.shape[-2], size).to(x255.device, x255.dtype)
    horizontal = torch.floor(x255 @ mw.T + 0.5)
    return torch.floor(mh @ horizontal + 0.5)


def pixelate(x: Images, c: float, g: torch.Generator) -> Images:
    h = x.shape[-1]
    small = _pil_box_resize(torch.round(x * 255), int(h * c))
    return _pil_box_resize(small, h) / 255


def jpeg_compression(x: Images, c: int, g: torch.Generator) -> Images:
    """Encoded at quality c and decoded with torchvision (libjpeg, 4:2:0, as Pillow's save; on a
    CUDA device nvJPEG, batched); on the CPU one image at a time, as libjpeg works."""
    from torchvision.io import decode_jpeg, encode_jpeg

    images = list(torch.round(x * 255).to(torch.uint8))
    with warnings.catch_warnings():  # torchvision 0.29 points to TorchCodec, not a dependency here
        warnings.simplefilter("ignore", DeprecationWarning)
        if x.device.type == "cuda":
            decoded = decode_jpeg(encode_jpeg(images, quality=c), device=x.device)
        else:
            decoded = [decode_jpeg(encode_jpeg(img, quality=c)) for img in images]
    return torch.stack(decoded).to(x.dtype) / 255


def _gaussian_filter_reflect(noise: torch.Tensor, sigma: float, truncate: float = 3.0) -> torch.Tensor:
    """scipy.ndimage.gaussian_filter(mode="reflect", truncate) of (B, H, W): separable, radius
    int(truncate * sigma + 0.5), half-sample symmetric borders (d c b a | a b c d), which neither
    F.pad nor kornia offers."""
    radius = int(truncate * sigma + 0.5)
    if radius == 0:
        return noise
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * taps ** 2 / sigma ** 2)
    kernel = (kernel / kernel.sum()).to(noise)
    for dim in (1, 2):
        n = noise.movedim(dim, -1)
        padded = torch.cat([n[..., :radius].flip(-1), n, n[..., -radius:].flip(-1)], dim=-1)
        n = padded.unfold(-1, 2 * radius + 1, 1) @ kernel
        noise = n.movedim(-1, dim)
    return noise


def _random_affine(x: Images, spread: float, g: torch.Generator) -> Images:
    """cv2.warpAffine(BORDER_REFLECT_101) by the affine map moving three fixed points (the
    paper's pts1) by uniform(-spread, spread) each; grid_sample's reflection about the edge pixels'
    centres (align_corners=True) is REFLECT_101."""
    b, _, h, w = x.shape
    centre, side = h // 2, h // 3
    src = torch.tensor([[centre + side, centre + side], [centre + side, centre - side],
                        [centre - side, centre - side]], dtype=_wide(x), device=x.device)
    dst = src + _uniform((b, 3, 2), -spread, spread, x, g).to(_wide(x))
    ones = torch.ones(3, 1, dtype=_wide(x), device=x.device)
    forward = torch.linalg.solve(torch.cat([src, ones], 1), dst).transpose(1, 2)  # (B, 2, 3): src -> dst
    last_row = torch.tensor([[[0.0, 0.0, 1.0]]], dtype=_wide(x), device=x.device).expand(b, 1, 3)
    inverse = torch.linalg.inv(torch.cat([forward, last_row], 1))[:, :2]
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device, dtype=_wide(x)),
                            torch.arange(w, device=x.device, dtype=_wide(x)), indexing="ij")
    points = torch.stack([xs, ys, torch.ones_like(xs)], -1).view(-1, 3)  # (HW, 3) as x, y, 1
    source = (points @ inverse.transpose(1, 2)).view(b, h, w, 2)
    grid = source / torch.tensor([w - 1, h - 1], device=x.device) * 2 - 1
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="reflection",
                         align_corners=True)


def elastic_transform(x: Images, c: tuple[float, float, float], g: torch.Generator) -> Images:
    """The paper's: a random affine warp, then every pixel displaced by smoothed uniform noise
    (scale c[0], smoothing sigma c[1]) and read bilinearly with scipy's map_coordinates
    (mode="reflect": half-sample symmetric, which is grid_sample's reflection with
    align_corners=False)."""
    alpha, sigma, spread = c
    b, _, h, w = x.shape
    x = _random_affine(x, spread, g)
    dx = _gaussian_filter_reflect(_uniform((b, h, w), -1, 1, x, g).to(_wide(x)), sigma) * alpha
    dy = _gaussian_filter_reflect(_uniform((b, h, w), -1, 1, x, g).to(_wide(x)), sigma) * alpha
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device, dtype=_wide(x)),
                            torch.arange(w, device=x.device, dtype=_wide(x)), indexing="ij")
    grid = torch.stack([((xs + dx) * 2 + 1) / w - 1, ((ys + dy) * 2 + 1) / h - 1], -1)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="reflection",
                         align_corners=False)


# The paper's CIFAR constants per severity 1..5 (make_cifar_c.py), in its order.
FAMILIES: dict[str, Family] = {
    "gaussian_noise": Family(gaussian_noise, (0.04, 0.06, 0.08, 0.09, 0.10), True),
    "shot_noise": Family(shot_noise, (500, 250, 100, 75, 50), True),
    "impulse_noise": Family(impulse_noise, (0.01, 0.02, 0.03, 0.05, 0.07), True),
    "defocus_blur": Family(defocus_blur, ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)), False),
    "motion_blur": Family(motion_blur, ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)), True),
    "zoom_blur": Family(zoom_blur, (7, 12, 16, 21, 26), False),
    "brightness": Family(brightness, (0.05, 0.1, 0.15, 0.2, 0.3), False),
    "contrast": Family(contrast, (0.75, 0.5, 0.4, 0.3, 0.15), False),
    "elastic_transform": Family(elastic_transform, ((0, 0, 2.56), (1.6, 6.4, 2.24), (2.56, 1.92, 1.92),
                                                    (3.2, 1.28, 1.6), (3.2, 0.96, 0.96)), True),
    "pixelate": Family(pixelate, (0.95, 0.9, 0.85, 0.75, 0.65), False),
    "jpeg_compression": Family(jpeg_compression, (80, 65, 58, 50, 40), False),
    "saturate": Family(saturate, ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)), False),
}


# --- making corrupted images ----------------------------------------------------------------------

def _generator(seed: int, name: str, severity: int, batch: int, device: torch.device) -> torch.Generator:
    """A generator seeded from (seed, corruption, severity, batch index) alone, so any batch of
    any corruption is made again without the others (a stable hash: Python's hash() is salted)."""
    digest = hashlib.blake2b(f"{seed}/{name}/{severity}/{batch}".encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") >> 1)


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int = 0, batch: int = 0) -> torch.Tensor:
    """uint8 (B, 3, H, W) images corrupted by a family at a severity (0: unchanged), on their
    device; uint8 out, truncated as the paper's np.uint8 does."""
    if severity == 0:
        return images.clone()
    family = FAMILIES[name]
    g = _generator(seed, name, severity, batch, images.device)
    out = family.apply(images.float() / 255, family.levels[severity - 1], g)
    # The small offset keeps a value the op left exact (k / 255 * 255) from truncating to k - 1.
    return (out.clamp(0, 1) * 255 + 1e-3).floor().to(torch.uint8)


def corrupt_split(split: Split, name: str, severity: int, seed: int, batch_size: int) -> Split:
    """The split's images corrupted batch by batch on their device; labels shared."""
    parts = [corrupt(split.images[i:i + batch_size], name, severity, seed, i // batch_size)
             for i in range(0, len(split), batch_size)]
    return Split(torch.cat(parts) if parts else split.images.clone(), split.labels)


# --- the command line's choices -------------------------------------------------------------------

def parse_corruptions(text: str) -> tuple[str, ...]:
    """'all' or comma-separated family names -> the names, in the order given, once each."""
    names = list(FAMILIES) if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown or not names:
        what = f"unknown corruption {unknown[0]!r}" if unknown else "no corruption named"
        raise argparse.ArgumentTypeError(f"{what}; choose from all, {', '.join(FAMILIES)}")
    return tuple(dict.fromkeys(names))


def parse_severities(text: str) -> tuple[int, ...]:
    """'1-5', '2-4', '3' or '1,3,5' -> the severities, each in 1..5."""
    bad = argparse.ArgumentTypeError(f"severities are 1 to 5, as a range (1-5) or a list (1,3,5); "
                                     f"got {text!r}")
    found: list[int] = []
    for part in text.split(","):
        ends = part.strip().split("-")
        if len(ends) > 2 or not all(e.strip().isdigit() for e in ends):
            raise bad
        lo, hi = int(ends[0]), int(ends[-1])
        if not 1 <= lo <= hi <= 5:
            raise bad
        found += range(lo, hi + 1)
    return tuple(sorted(set(found)))


@dataclass(frozen=True)
class CorruptionRequest:
    """What `eval --corruptions` measures."""

    names: tuple[str, ...]
    severities: tuple[int, ...] = SEVERITIES
    seed: int = 0
    baseline: str | None = None  # a reference checkpoint for the mean corruption error


# --- measuring ----------------------------------------------------------------------------------

def measure_corruptions(model: torch.nn.Module, split: Split, settings: Any, request: CorruptionRequest
                        ) -> dict[str, Any]:
    """Top-1 per corruption and severity on the split (on its device), with the time spent making
    the images and the time spent in evaluate_split. settings: evaluate.EvalSettings."""
    from vggtrain.evaluate import evaluate_split

    accuracy: dict[str, list[float]] = {}
    making = forward = 0.0
    for name in request.names:
        accuracy[name] = []
        for severity in request.severities:
            synchronize(split.images.device)
            t0 = time.perf_counter()
            corrupted = corrupt_split(split, name, severity, request.seed, settings.batch_size)
            synchronize(split.images.device)
            making += time.perf_counter() - t0
            ev = evaluate_split(model, corrupted, settings)
            forward += ev.seconds
            accuracy[name].append(ev.top1)
    return {"accuracy": accuracy, "generate_s": making, "forward_s": forward}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def corruption_errors(clean: float, accuracy: dict[str, list[float]], base_clean: float,
                      base_accuracy: dict[str, list[float]]) -> dict[str, Any]:
    """The paper's corruption errors against a baseline: CE_c = sum_s E_cs / sum_s E^base_cs and
    the relative CE_c = sum_s (E_cs - E_clean) / sum_s (E^base_cs - E^base_clean); mCE and relative
    mCE average them over corruptions (null where a baseline's sum is not positive)."""
    ce, rel = {}, {}
    for name, accs in accuracy.items():
        errors, base = [1 - a for a in accs], [1 - a for a in base_accuracy[name]]
        ce[name] = _ratio(sum(errors), sum(base))
        rel[name] = _ratio(sum(e - (1 - clean) for e in errors), sum(b - (1 - base_clean) for b in base))
    mce = None if None in ce.values() else _mean(list(ce.values()))
    rmce = None if None in rel.values() else _mean(list(rel.values()))
    return {"ce": ce, "mce": mce, "relative_ce": rel, "relative_mce": rmce}


def corruption_section(request: CorruptionRequest, tta: str, clean_top1: float, measured: dict[str, Any],
                       baseline: dict[str, Any] | None = None) -> dict[str, Any]:
    """report.json's `corruptions`. baseline: {checkpoint, clean_top1, accuracy} of the
    reference checkpoint, measured on the same corrupted images."""
    accuracy = measured["accuracy"]
    every = [a for accs in accuracy.values() for a in accs]
    section = {"seed": request.seed, "severities": list(request.severities), "tta_mode": tta,
               "clean_top1": clean_top1, "accuracy": accuracy,
               "mean_per_corruption": {n: _mean(a) for n, a in accuracy.items()},
               "mean_acc": _mean(every), "images": measured.get("images"),
               "generate_s": measured["generate_s"], "forward_s": measured["forward_s"],
               "baseline": None, "ce": None, "mce": None, "relative_ce": None, "relative_mce": None}
    if baseline is not None:
        base_every = [a for accs in baseline["accuracy"].values() for a in accs]
        section["baseline"] = {**baseline, "mean_acc": _mean(base_every)}
        section.update(corruption_errors(clean_top1, accuracy, baseline["clean_top1"], baseline["accuracy"]))
    return section


# --- presenting -----------------------------------------------------------------------------------

def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def corruption_markdown(section: dict[str, Any]) -> list[str]:
    """report.md's section: accuracy per corruption (rows) and severity (columns), the means and,
    with a baseline, each corruption's CE and relative CE."""
    sev, base = section["severities"], section["baseline"]
    out = ["", "## Corruptions (CIFAR-10-C)", "",
           f"Mean corruption accuracy **{pct(section['mean_acc'])}** (clean {pct(section['clean_top1'])}) "
           f"over {len(section['accuracy'])} corruptions x severities {', '.join(map(str, sev))}; seed "
           f"{section['seed']}, TTA {section['tta_mode']}."]
    if base is not None:
        out += ["", f"Against `{base['checkpoint']}` (clean {pct(base['clean_top1'])}, mean corruption "
                    f"accuracy {pct(base['mean_acc'])}): mCE {_num(section['mce'])}, relative mCE "
                    f"{_num(section['relative_mce'])}."]
    extra = " CE | relative CE |" if base is not None else ""
    out += ["", "| corruption | " + " | ".join(f"severity {s}" for s in sev) + " | mean |" + extra,
            "|---|" + "--:|" * (len(sev) + 1) + ("--:|--:|" if base is not None else "")]
    for name, accs in section["accuracy"].items():
        mean = pct(section["mean_per_corruption"][name])
        row = f"| {name} | " + " | ".join(pct(a) for a in accs) + f" | {mean} |"
        if base is not None:
            row += f" {_num(section['ce'][name])} | {_num(section['relative_ce'][name])} |"
        out.append(row)
    return out


def corruption_text(section: dict[str, Any]) -> list[str]:
    """What `vggtrain eval` prints of it."""
    sev, base = section["severities"], section["baseline"]
    width = max(len(n) for n in section["accuracy"])
    lines = ["", f"corruptions (seed {section['seed']}, TTA {section['tta_mode']}): mean accuracy "
                 f"{pct(section['mean_acc'])}, clean {pct(section['clean_top1'])}"]
    if base is not None:
        lines.append(f"against {base['checkpoint']}: mCE {_num(section['mce'])}, relative mCE "
                     f"{_num(section['relative_mce'])}")
    lines.append(f"{'corruption':<{width}}" + "".join(f"  {'s' + str(s):>7}" for s in sev) + f"  {'mean':>7}")
    for name, accs in section["accuracy"].items():
        lines.append(f"{name:<{width}}" + "".join(f"  {pct(a):>7}" for a in accs)
                     + f"  {pct(section['mean_per_corruption'][name]):>7}")
    lines.append(f"made in {section['generate_s']:.1f} s, measured in {section['forward_s']:.1f} s")
    return lines


def corruption_heatmap(section: dict[str, Any], title: str = "") -> torch.Tensor:
    """Accuracy per corruption (rows) and severity (columns), with the row means: white (0%) to
    dark blue (100%), the value written in each cell. uint8 (3, H, W)."""
    from PIL import Image, ImageDraw

    from vggtrain.draw import BLUES, apply_colormap, font, text_size, to_tensor

    names, sev = list(section["accuracy"]), section["severities"]
    columns = [f"sev {s}" for s in sev] + ["mean"]
    values = torch.tensor([[*section["accuracy"][n], section["mean_per_corruption"][n]] for n in names],
                          dtype=torch.float32)
    label_f, _ = font(13)
    title_f, _ = font(16)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(text_size(scratch, n, label_f)[0] for n in names) + 12
    cell_w, cell_h, pad = 64, 26, 14
    title = title or f"accuracy under corruption (mean {pct(section['mean_acc'])})"
    x0, y0 = pad + label_w, pad + 30 + cell_h
    width = max(x0 + cell_w * len(columns) + pad, 2 * pad + text_size(scratch, title, title_f)[0])
    img = Image.new("RGB", (width, y0 + cell_h * len(names) + pad), "white")
    draw = ImageDraw.Draw(img)
    ink = (20, 20, 20)
    draw.text((pad, pad), title, font=title_f, fill=ink)
    colours = apply_colormap(values, BLUES)
    for j, col in enumerate(columns):
        tw, _ = text_size(draw, col, label_f)
        draw.text((x0 + j * cell_w + (cell_w - tw) // 2, y0 - cell_h + 4), col, font=label_f, fill=ink)
    for i, name in enumerate(names):
        draw.text((pad, y0 + i * cell_h + 5), name, font=label_f, fill=ink)
        for j in range(len(columns)):
            box = (x0 + j * cell_w, y0 + i * cell_h, x0 + (j + 1) * cell_w - 1, y0 + (i + 1) * cell_h - 1)
            draw.rectangle(box, fill=tuple(colours[:, i, j].tolist()), outline=(225, 225, 225))
            text = f"{values[i, j].item():.1%}"
            tw, th = text_size(draw, text, label_f)
            draw.text((box[0] + (cell_w - tw) // 2, box[1] + (cell_h - th) // 2 - 2), text, font=label_f,
                      fill="white" if values[i, j] > 0.55 else ink)
    return to_tensor(img)
