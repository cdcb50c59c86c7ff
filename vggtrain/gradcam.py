"""`vggtrain gradcam`: where the model looks, by Grad-CAM (Selvaraju et al., 2017).

For a class c and a convolutional layer with feature maps A^k, Grad-CAM weighs each map by the
spatial mean of d y_c / d A^k (y_c: the class's logit, before the softmax) and keeps the positive
part of the weighted sum: ReLU(sum_k alpha_k A^k), a map at the layer's resolution that is then
upsampled to the image. The default layer is the last convolutional block's rectified output, as
in the paper; with 32x32 inputs that is 2x2 for the paper's VGGs, so earlier blocks (--layer
conv4_3 at 4x4, conv3_3 at 8x8) trade semantics for resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps
from torch import nn

from vggtrain.data import CIFAR10_STATS, Stats, norm_stats, normalize
from vggtrain.draw import JET, apply_colormap, font, save_png, text_size, to_pil
from vggtrain.errors import DataError, UserError, os_reason, shown
from vggtrain.images import image_paths, read_image, to_model_size
from vggtrain.inference import LoadedModel
from vggtrain.model import blocks

PANEL = 256  # pixels per side of each picture in the overlay PNG
ALPHA = 0.5  # heat map opacity over the (grey) image


def find_layer(model: nn.Module, name: str | None) -> tuple[str, nn.Module]:
    """A block name as `vggtrain summary` prints it (conv5_3, pool4), or a module name
    (features.12); None: the last convolution's block, i.e. its BN and ReLU included."""
    named = blocks(model)
    convs = [b for b in named if isinstance(b.head, nn.Conv2d)]
    if name is None:
        return convs[-1].name, convs[-1].output[1]
    for b in named:
        if b.name == name and not b.name.startswith("fc"):
            return name, b.output[1]
    modules = dict(model.named_modules())
    if name.startswith("features.") and name in modules:
        return name, modules[name]
    choices = [b.name for b in named if b.name.startswith(("conv", "pool"))]
    raise UserError(f"--layer {name}: not a convolutional layer of this model (choose one of "
                    f"{', '.join(choices)}, or a module name such as features.0)")


@dataclass
class CamResult:
    cams: torch.Tensor  # float32 (N, h, w) >= 0 at the layer's resolution, each scaled to max 1
    probs: torch.Tensor  # float32 (N, C) softmax of the model's output
    classes: torch.Tensor  # int64 (N,) the class each map explains


def grad_cam(model: nn.Module, images: torch.Tensor, layer: nn.Module,
             classes: torch.Tensor | None = None, stats: Stats = CIFAR10_STATS) -> CamResult:
    """Grad-CAM for uint8 images (N, 3, 32, 32), for the given classes (default: the predicted);
    stats: the normalisation the model was trained with.

    Batched: in eval mode the images do not interact, so one backward pass of the summed scores
    gives every image its own gradients.
    """
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False  # an in-place ReLU would overwrite the hooked activations
    device = next(model.parameters()).device
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.enable_grad():
            logits = model(normalize(images.to(device), stats=stats)).float()
    finally:
        handle.remove()
    acts = captured[-1]
    if acts.ndim != 4:
        raise UserError(f"Grad-CAM needs a layer with spatial feature maps (this one gives shape "
                        f"{tuple(acts.shape[1:])})")
    if classes is None:
        classes = logits.argmax(1)
    classes = classes.to(device)
    score = logits.gather(1, classes[:, None]).sum()
    (grads,) = torch.autograd.grad(score, acts)
    weights = grads.mean(dim=(2, 3), keepdim=True)  # alpha_k: global-average-pooled gradients
    cams = F.relu((weights * acts).sum(1)).detach()
    peak = cams.amax(dim=(1, 2), keepdim=True)
    cams = torch.where(peak > 0, cams / peak.clamp(min=1e-12), cams)
    return CamResult(cams.float().cpu(), torch.softmax(logits.detach(), 1).cpu(), classes.cpu())


def upsample(cam: torch.Tensor, size: int) -> torch.Tensor:
    """(h, w) -> (size, size), bilinear, as the paper upsamples its maps."""
    return F.interpolate(cam[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]


def overlay_image(original: torch.Tensor, cam: torch.Tensor, title: str, caption: str) -> Image.Image:
    """Side by side: the image as the model saw it (its whole frame, squared) and the heat map over
    it, with a colour bar, a title and a caption."""
    from torchvision.transforms.v2.functional import resize

    small = min(original.shape[1:]) <= 64  # pixel-sized images: show their pixels, do not blur them
    if small:
        base = to_pil(original).resize((PANEL, PANEL), Image.NEAREST)
    else:
        base = to_pil(resize(original, [PANEL, PANEL], antialias=True))
    heat = to_pil(apply_colormap(upsample(cam, PANEL), JET))
    # Over a grey copy: the image's own colours would otherwise mix into the heat map's (a blue
    # object under red heat reads as purple, neither high nor low).
    mixed = Image.blend(ImageOps.grayscale(base).convert("RGB"), heat, ALPHA)

    f_title, _ = font(15)
    f_text, _ = font(13)
    pad, top, bar_w = 10, 52, 14
    width = pad + PANEL + pad + PANEL + pad + bar_w + 44
    img = Image.new("RGB", (width, top + PANEL + 26), "white")
    draw = ImageDraw.Draw(img)
    draw.text((pad, 8), title, font=f_title, fill=(20, 20, 20))
    draw.text((pad, 30), caption, font=f_text, fill=(90, 90, 90))
    img.paste(base, (pad, top))
    img.paste(mixed, (2 * pad + PANEL, top))
    for label, x in (("input", pad), ("Grad-CAM", 2 * pad + PANEL)):
        w, _ = text_size(draw, label, f_text)
        draw.text((x + (PANEL - w) // 2, top + PANEL + 5), label, font=f_text, fill=(20, 20, 20))
    ramp = torch.linspace(1, 0, PANEL)[:, None].expand(PANEL, bar_w)
    bar_x = 3 * pad + 2 * PANEL
    img.paste(to_pil(apply_colormap(ramp, JET)), (bar_x, top))
    draw.text((bar_x + bar_w + 4, top - 2), "high", font=f_text, fill=(20, 20, 20))
    draw.text((bar_x + bar_w + 4, top + PANEL - 14), "low", font=f_text, fill=(20, 20, 20))
    return img


def output_paths(paths: list[str], out_dir: Path) -> list[Path]:
    """out_dir/<stem>.gradcam.png per image, numbered where two inputs share a stem."""
    taken: set[str] = set()
    out = []
    for p in paths:
        stem, n = Path(p).stem or "image", 1
        name = f"{stem}.gradcam.png"
        while name in taken:
            n += 1
            name = f"{stem}-{n}.gradcam.png"
        taken.add(name)
        out.append(out_dir / name)
    return out


def explain_files(loaded: LoadedModel, paths: list[str], out_dir: Path, layer: str | None = None,
                  class_name: str | None = None) -> tuple[list[str], list[str]]:
    """Write one overlay PNG per readable image (a directory stands for the images under it);
    (a line per PNG written, an error per image not), escaped for the terminal."""
    names = loaded.class_names
    layer_name, module = find_layer(loaded.model, layer)
    target = None
    if class_name is not None:
        if class_name not in names:
            raise UserError(f"--class {class_name}: not a class of this model (one of {', '.join(names)})")
        target = torch.tensor([names.index(class_name)])
    paths, missing = image_paths(paths)
    done, errors = [], [e["error"] for e in missing]
    for path, out in zip(paths, output_paths(paths, out_dir), strict=True):
        try:
            original = read_image(path)
        except DataError as e:
            errors.append(str(e))
            continue
        res = grad_cam(loaded.model, to_model_size(original)[None], module, target,
                       stats=norm_stats(loaded.cfg.data))
        probs, cls = res.probs[0], int(res.classes[0])
        pred = int(probs.argmax())
        h, w = res.cams.shape[1:]
        title = f"{shown(Path(path).name)}: predicted {names[pred]} ({probs[pred].item():.1%})"
        caption = (f"Grad-CAM for {names[cls]} ({probs[cls].item():.1%}) at {layer_name} ({h}x{w} map); "
                   f"red: most evidence for {names[cls]}")
        try:
            save_png(out, overlay_image(original, res.cams[0], title, caption))
        except OSError as e:  # an unwritable --out: said once, not once per image
            errors.append(shown(f"--out {out.parent}: cannot write {out.name} ({os_reason(e)})"))
            break
        done.append(shown(f"{path}: predicted {names[pred]} {probs[pred].item():.1%}; Grad-CAM for "
                          f"{names[cls]} at {layer_name} ({h}x{w}) -> {out}"))
    return done, errors
