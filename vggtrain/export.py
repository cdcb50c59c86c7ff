"""`vggtrain export`: a checkpoint's model for runtimes other than this tool (ONNX Runtime, a
`torch.export` program, TorchScript), checked against the checkpoint before it is kept.

What is exported is one forward pass of the eval-mode model (the weight EMA's weights where the
run kept one) with the run's normalisation inside: float RGB images in [0, 1], (N, 3, 32, 32),
any N, in; logits out. A sidecar JSON beside the file says so, with the class names and the
source checkpoint's digest. The file and its sidecar are written only after the exported model
agreed with the checkpoint (the test set when its data is at hand, else random images), both
to temp files that are renamed into place together at the end: a failed or refused export
leaves nothing behind and the files it would have replaced as they were.

With int8 (ONNX only; vggtrain.quantize), the checked fp32 export is quantized by ONNX Runtime,
calibrated on seeded training images, and the int8 model's test accuracy is measured against the
fp32 model's before anything is written: a drop over --max-drop points writes nothing.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vggtrain import __version__
from vggtrain.atomic import replace_together
from vggtrain.data import Split, norm_stats, run_split
from vggtrain.errors import STORAGE_ERRNOS, DataError, UserError, WriteError, first_line, os_reason
from vggtrain.inference import LoadedModel, load_model, resolve_checkpoint
from vggtrain.quantize import Int8Options
from vggtrain.safeio import field, read_json, sha256_of

FORMATS = ("onnx", "exported", "torchscript")
SUFFIXES = {"onnx": ".onnx", "exported": ".pt2", "torchscript": ".pt"}
MAX_ABS_LOGIT_DIFF = 1e-4  # fp32 parity: the exported model's logits against the checkpoint's
# ...unless the logits are so large that fp32 cannot resolve 1e-4 in them (an ulp of 12,800 is
# 0.001: a barely trained VGG16 has such logits): then 16 ulps of the largest logit.
ULPS = 16
RANDOM_IMAGES = 1000  # parity images when the run's test data is not at hand
ONNX_EXTRA = "ONNX export needs onnx, onnxscript and onnxruntime: pip install 'vggtrain[export]'"


class ImagesToLogits(nn.Module):
    """The deployable model: float images in [0, 1] -> logits, the run's normalisation inside
    (the same (x - mean) / std that training applied to x / 255); with a temperature T, logits / T
    (calibrated: their softmax is the calibrated probabilities)."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
                 temperature: float | None = None) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.temperature = temperature  # a constant of the graph, not a buffer: None leaves no op

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.model((images - self.mean) / self.std)
        return logits if self.temperature is None else logits / self.temperature


def deployable(loaded: LoadedModel, temperature: float | None = None) -> ImagesToLogits:
    model = loaded.model.to("cpu", memory_format=torch.contiguous_format).float()
    return ImagesToLogits(model, *norm_stats(loaded.cfg.data), temperature).eval()


def export_checkpoint(ckpt: str | Path, fmt: str, out: str | Path, data_root: str | None = None,
                      batch_size: int = 500, calibrated: bool = False,
                      note: Callable[[str], None] = print, int8: Int8Options | None = None) -> dict[str, Any]:
    """Export, check parity (and with int8, quantize and check its accuracy), then write `out`
    and `out`.json. Returns the sidecar's contents.
    calibrated: the checkpoint's no-TTA temperature T baked in (eval.checkpoint_temperature; note
    gets its line when one had to be fitted): the exported model outputs logits / T."""
    if fmt not in FORMATS:
        raise UserError(f"usage error: --format is one of {', '.join(FORMATS)} (got {fmt!r})")
    if int8 is not None:
        if fmt != "onnx":
            raise UserError(f"usage error: --quantize int8 needs --format onnx (got {fmt})")
        int8.check()
    if fmt == "onnx":
        _require_onnx()
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out}: is a directory; name the file to write")
    if fmt == "exported" and out.suffix != ".pt2":  # torch.export.load expects the name to say so
        raise UserError(f"--out {out}: a torch.export program's file name ends in .pt2")
    path = resolve_checkpoint(ckpt)
    if Path(f"{out}.json").is_dir():
        raise UserError(f"--out {out}: {out.name}.json, its description, would replace a directory")
    if out.exists() and path.exists() and os.path.samefile(out, path):
        raise UserError(f"--out {out}: is the checkpoint being exported; name another file")
    loaded = load_model(path, "cpu")
    temperature = None
    if calibrated:  # the exported graph is one forward pass: the temperature fitted without TTA
        from vggtrain.eval import checkpoint_temperature

        temperature = checkpoint_temperature(loaded, "none", data_root, note=note)[0]
    net = deployable(loaded, temperature)
    try:
        if int8 is not None:
            return _export_int8(loaded, path, net, out, int8, data_root, batch_size)
        images, source = parity_images(loaded, data_root)
        return _export_checked(loaded, path, net, fmt, out, images, source, batch_size)
    except OSError as e:  # the output directory or the disk refused a write
        if e.errno in STORAGE_ERRNOS:
            raise WriteError.of(e, out) from None
        raise UserError(f"--out {out}: cannot write it ({os_reason(e)})") from None


def _export_checked(loaded: LoadedModel, path: Path, net: ImagesToLogits, fmt: str, out: Path,
                    images: torch.Tensor, source: str, batch_size: int) -> dict[str, Any]:
    side = Path(f"{out}.json")
    # The model and its description are written to temp files and renamed into place together,
    # after the parity check: a refused or failed export leaves the files before it as they were.
    # The description is renamed first and the model last, the model's rename being the commit:
    # a kill between the two leaves the user's old model in place beside a description whose
    # file_sha256 does not match it (pair_problem says so), the old description kept aside.
    with replace_together([side, out]) as (tmp_side, tmp):
        _export(net, fmt, tmp)
        parity = checked_parity(net, fmt, tmp, images, source, path, batch_size)
        sidecar = sidecar_for(loaded, path, fmt, out, parity, net, tmp)
        tmp_side.write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    return sidecar


def checked_parity(net: ImagesToLogits, fmt: str, exported: Path, images: torch.Tensor, source: str,
                   ckpt: Path, batch_size: int) -> dict[str, Any]:
    """check_parity's figures, or the export refused in one line when the file disagrees."""
    parity = check_parity(net, load_exported(fmt, exported), images, batch_size)
    parity["images_from"] = source
    if not parity["ok"]:
        raise UserError(f"export refused: the {fmt} model disagrees with {ckpt} on {source} "
                        f"(max |logit difference| {parity['max_abs_logit_diff']:.2e}, top-1 differs "
                        f"on {parity['top1_disagree']} images); nothing was written")
    return parity


def _export_int8(loaded: LoadedModel, path: Path, net: ImagesToLogits, out: Path, opts: Int8Options,
                 data_root: str | None, batch_size: int) -> dict[str, Any]:
    from vggtrain import quantize

    train, test, source = int8_data(loaded, data_root)
    calibration = quantize.calibration_images(train, opts.calibration_images, opts.calibration_seed)
    n = len(test) if opts.eval_images is None else min(opts.eval_images, len(test))
    evaluated = Split(test.images[:n], test.labels[:n])
    side = Path(f"{out}.json")
    # The fp32 export and ORT's intermediate files go to a temp directory; the int8 model and its
    # description to temp files beside `out`, renamed into place only once its accuracy passed.
    with replace_together([side, out]) as (tmp_side, tmp), \
            tempfile.TemporaryDirectory(prefix="vggtrain-int8-") as work:
        fp32 = Path(work) / "fp32.onnx"
        _export(net, "onnx", fp32)
        parity = checked_parity(net, "onnx", fp32, test.images, source, path, batch_size)
        scheme = _quantized(fp32, tmp, calibration, opts.method, Path(work))
        measured = int8_accuracy(fp32, tmp, evaluated, batch_size, Path(work))
        ran = measured.pop("kernels")
        measured["images_from"] = f"the first {n:,} of {source}" if n < len(test) else source
        if measured["drop_points"] > opts.max_drop:
            raise UserError(f"export refused: int8 test accuracy {measured['int8_top1']:.2f}% against fp32 "
                            f"{measured['fp32_top1']:.2f}% on {measured['images_from']} loses "
                            f"{measured['drop_points']:.2f} points, over --max-drop {opts.max_drop:g}; "
                            f"nothing was written")
        sidecar = sidecar_for(loaded, path, "onnx", out, parity, net, tmp)
        sidecar["quantize"] = "int8"
        sidecar["int8"] = {"calibration": {"images": len(calibration), "seed": opts.calibration_seed,
                                           "method": opts.method, "from": "the run's training split "
                                                                          "(its validation images excluded)"},
                           "scheme": scheme, "accuracy": measured | {"max_drop": opts.max_drop},
                           "onnxruntime_version": _ort_version(), "kernels": ran}
        tmp_side.write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    return sidecar


def _quantized(fp32: Path, out: Path, images: torch.Tensor, method: str, work: Path) -> dict[str, Any]:
    from vggtrain.quantize import quantize_onnx

    try:
        return quantize_onnx(fp32, out, images, method, work)
    except OSError as e:
        if e.errno in STORAGE_ERRNOS:
            raise
        raise UserError(f"int8 quantization failed: {os_reason(e)}") from None
    except Exception as e:  # ORT's limit on a graph is the export's failure, not a traceback
        raise UserError(f"int8 quantization failed: {type(e).__name__}: {first_line(e)}") from None


def int8_accuracy(fp32: Path, int8: Path, test: Split, batch_size: int, work: Path) -> dict[str, Any]:
    """Both ONNX models' top-1 test accuracy (%) and the int8 model's drop in points; the fp32 one
    is the checkpoint's too, the parity check having found the same top-1 on every test image."""
    from vggtrain import quantize

    fp32_top1 = quantize.accuracy(quantize.session(fp32), test, batch_size)
    optimized = work / "int8.optimized.onnx"
    session = quantize.session(int8, optimized)
    int8_top1 = quantize.accuracy(session, test, batch_size)
    return {"images": len(test), "fp32_top1": round(fp32_top1, 4), "int8_top1": round(int8_top1, 4),
            "drop_points": round(fp32_top1 - int8_top1, 4), "kernels": quantize.kernels(session, optimized)}


def _ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


def int8_data(loaded: LoadedModel, data_root: str | None) -> tuple[Split, Split, str]:
    """(the training split, the test set, where from) of the run's dataset: calibration needs the
    former (its validation images kept out), the accuracy check the latter; no random fallback."""
    from vggtrain.eval import checkpoint_dataset

    train, test, _, root = checkpoint_dataset(loaded, data_root, download=False)
    train, _ = run_split(train, loaded.cfg.data, loaded.cfg.seed)
    return train, test, f"the {len(test):,} test images in {root}"


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise UserError(ONNX_EXTRA) from None


def _example() -> torch.Tensor:
    # batch 2: torch.export specialises a dimension whose example size is 0 or 1
    return torch.rand(2, 3, 32, 32)


def _export(net: ImagesToLogits, fmt: str, path: Path) -> None:
    from torch.export import Dim

    batch = Dim("batch", min=1, max=1 << 20)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # exporters' progress chatter and deprecation notes
            if fmt == "exported":
                program = torch.export.export(net, (_example(),), dynamic_shapes=({0: batch},))
                torch.export.save(program, path)
            elif fmt == "torchscript":
                # Tracing keeps the batch dimension symbolic: the network has no shape-dependent branch.
                torch.jit.save(torch.jit.trace(net, _example()), path)
            else:
                onnx_program = torch.onnx.export(net, (_example(),), dynamo=True, input_names=["images"],
                                                 output_names=["logits"],
                                                 dynamic_shapes={"images": {0: batch}}, verbose=False)
                onnx_program.save(path)
    except UserError:
        raise
    except OSError as e:
        if e.errno in STORAGE_ERRNOS:
            raise
        raise UserError(f"export to {fmt} failed: {os_reason(e)}") from None
    except Exception as e:  # an exporter's limit is the export's failure, not a traceback
        raise UserError(f"export to {fmt} failed: {type(e).__name__}: {first_line(e)}") from None


def load_exported(fmt: str, path: Path) -> Any:
    """A callable float (N, 3, 32, 32) tensor -> logits tensor, running the exported file the way
    a user of that format would."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        module = torch.export.load(path).module() if fmt == "exported" else torch.jit.load(path, "cpu")
    return lambda x: module(x)


def parity_images(loaded: LoadedModel, data_root: str | None) -> tuple[torch.Tensor, str]:
    """uint8 test images of the run's dataset, or random ones when the data is not at hand (with
    --data-root given, missing data is an error)."""
    from vggtrain.eval import checkpoint_dataset

    try:
        # images only: parity compares logits, so data of other classes serves as well
        _, test, _, root = checkpoint_dataset(loaded, data_root, download=False, check_classes=False)
    except DataError:
        if data_root is not None:
            raise
        g = torch.Generator().manual_seed(0)
        return (torch.randint(0, 256, (RANDOM_IMAGES, 3, 32, 32), dtype=torch.uint8, generator=g),
                f"{RANDOM_IMAGES} random images (no test data at {loaded.cfg.data.root}; give --data-root)")
    return test.images, f"the {len(test):,} test images in {root}"


@torch.no_grad()
def check_parity(reference: nn.Module, exported: Any, images: torch.Tensor, batch_size: int
                 ) -> dict[str, Any]:
    """Both models on the same fp32 images: the largest |logit difference| and how many top-1
    predictions differ; the exported model's images/s is measured on the way."""
    worst, largest, disagree, seconds = 0.0, 0.0, 0, 0.0
    for chunk in images.split(batch_size):
        x = chunk.float().div_(255)
        want = reference(x)
        t0 = time.perf_counter()
        got = exported(x)
        seconds += time.perf_counter() - t0
        diff = (got.float() - want).abs().max().item()
        worst = max(worst, diff if math.isfinite(diff) else math.inf)  # NaN would slip through max()
        largest = max(largest, want.abs().max().item())
        disagree += int((got.argmax(1) != want.argmax(1)).sum())
    tolerance = max(MAX_ABS_LOGIT_DIFF, ULPS * torch.finfo(torch.float32).eps * largest)
    return {"images": len(images), "max_abs_logit_diff": worst, "max_abs_logit": largest,
            "top1_disagree": disagree, "tolerance": tolerance,
            "ok": worst <= tolerance and disagree == 0,
            "exported_images_per_s": round(len(images) / seconds, 1) if seconds else None}


def sidecar_for(loaded: LoadedModel, ckpt: Path, fmt: str, out: Path, parity: dict[str, Any],
                net: ImagesToLogits, exported: Path) -> dict[str, Any]:
    """The description written beside out. exported: the model file as written (the temp file
    renamed to out after the description): its file_sha256, which pair_problem checks the pair by."""
    mean, std = norm_stats(loaded.cfg.data)
    t = net.temperature
    return {
        "file": out.name, "format": fmt, "vggtrain_version": __version__,
        "torch_version": str(torch.__version__),
        "input": {"name": "images", "shape": ["N", 3, 32, 32], "dtype": "float32",
                  "layout": "NCHW, RGB", "range": [0.0, 1.0],
                  "normalization": "inside the model: (x - mean) / std", "mean": list(mean),
                  "std": list(std)},
        "output": {"name": "logits", "shape": ["N", loaded.cfg.model.num_classes],
                   "meaning": "unnormalised scores; softmax gives probabilities" if t is None else
                   f"the model's logits divided by the temperature {t:.6g} (inside the graph); softmax "
                   "gives calibrated probabilities"},
        "temperature": t,
        "class_names": loaded.class_names,
        "test_time_augmentation": "none (one forward pass; the run's report used "
                                  f"{loaded.cfg.train.tta})",
        "source": {"checkpoint": str(ckpt), "sha256": sha256_of(ckpt), "epoch": loaded.epoch,
                   "weights": loaded.weights, "arch": loaded.cfg.model.arch},
        "parity": parity,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "file_sha256": sha256_of(exported),
    }


def pair_problem(out: str | Path) -> str | None:
    """What is wrong with an exported file and its FILE.json as a pair, or None when the
    description is of this very file (its file_sha256 matches): the check for a reader that
    relies on the description, and for an export killed between its two renames."""
    out = Path(out)
    side = read_json(f"{out}.json", label=f"{out}.json")
    recorded = field(side, "file_sha256", "string|null", label=f"{out}.json")
    if recorded is None:
        return f"{out}.json records no file_sha256 (written before vggtrain recorded one)"
    try:
        actual = sha256_of(out)
    except OSError as e:
        return f"{out}: cannot read it ({os_reason(e)})"
    if actual != recorded:
        return (f"{out}.json describes another file than {out} (sha256 {recorded[:12]}..., the file's "
                f"{actual[:12]}...)")
    return None
