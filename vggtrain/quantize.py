"""int8 ONNX for CPU deployment (`vggtrain export --format onnx --quantize int8`): ONNX Runtime's
own static quantization of the fp32 export, calibrated on seeded training images, then measured
against the fp32 model on the test set before anything is kept.

Nothing here quantizes by hand: onnxruntime.quantization prepares the graph (shape inference and
Conv+BatchNorm folding), collects the activation ranges and writes a QDQ model, whose
DequantizeLinear -> Conv -> QuantizeLinear groups ONNX Runtime fuses into its int8 kernels when
it loads the file. This module chooses the options and checks the result.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import platform
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vggtrain.data import Split
from vggtrain.errors import UserError

METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
CALIBRATION_BATCH = 100  # images per calibration batch: ORT keeps every batch's activations
MAX_INTERMEDIATE_OUTPUTS = 8  # MinMax merges its ranges every 8 batches: bounded memory


@dataclass
class Int8Options:
    calibration_images: int = 1000
    calibration_seed: int = 0
    # ORT's own default; not yet chosen by measurement (scripts/int8_measure.py methods does it on a
    # run's validation split; docs/export.md says why it has not run yet)
    method: str = "minmax"
    max_drop: float = 1.0  # test-accuracy points the int8 model may lose against fp32
    eval_images: int | None = None  # the first N test images; None: all of them

    def check(self) -> None:
        """Refuse values that cannot work, in one line each."""
        if self.calibration_images < 1:
            raise UserError(f"usage error: --calibration-images must be at least 1 "
                            f"(got {self.calibration_images})")
        if self.eval_images is not None and self.eval_images < 1:
            raise UserError(f"usage error: --eval-images must be at least 1 (got {self.eval_images})")
        if not math.isfinite(self.max_drop):
            raise UserError(f"usage error: --max-drop must be a finite number of points "
                            f"(got {self.max_drop})")
        if self.method not in METHODS:
            raise UserError(f"usage error: --calibration-method is one of {', '.join(METHODS)} "
                            f"(got {self.method!r})")


def calibration_images(train: Split, count: int, seed: int) -> torch.Tensor:
    """count uint8 training images drawn at random (without repeats) from the seed."""
    if count > len(train):
        raise UserError(f"usage error: --calibration-images {count:,} is more than the "
                        f"{len(train):,} training images")
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:count]
    return train.images[pick.sort().values]


class ImageBatches:
    """ONNX Runtime's CalibrationDataReader protocol (get_next; the ABC accepts any class that
    has one): the images as the exported model takes them, float32 in [0, 1], batch by batch."""

    def __init__(self, images: torch.Tensor, batch_size: int = CALIBRATION_BATCH) -> None:
        self._chunks = iter(images.split(batch_size))

    def get_next(self) -> dict[str, Any] | None:
        chunk = next(self._chunks, None)
        return None if chunk is None else {"images": chunk.float().div_(255).numpy()}


def quantize_onnx(fp32: Path, out: Path, images: torch.Tensor, method: str, work: Path) -> dict[str, Any]:
    """The int8 QDQ model of fp32 at out, calibrated on images; returns how it was made.

    Activations uint8 and weights int8 per output channel with reduce_range (7-bit weights): ORT's
    advice for x86 CPUs without VNNI, whose 8-bit multiply-add (AVX2's vpmaddubsw) can saturate
    its 16-bit sums with full-range weights.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = work / "prepared.onnx"
    # Shape inference and ORT's graph optimisations (BatchNorm folded into Conv): one Conv per
    # layer to quantize, and the ranges measured where the int8 kernel will see them.
    # ORT's quantizer logs through the root logger, e.g. "Axis 1 is out-of-range for weight ... with
    # rank 1" for each 1-D weight (a BatchNorm left unfolded: it quantizes it per tensor instead):
    # lines on the user's terminal about nothing they can change; the result is checked below.
    # Its entropy and percentile calibrators also print() their progress ("Collecting tensor
    # data ..."): kept off standard output, which carries vggtrain's own lines only.
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
            quantize_static(str(prepared), str(out), ImageBatches(images), quant_format=QuantFormat.QDQ,
                            per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8,
                            calibrate_method=getattr(CalibrationMethod, METHODS[method]),
                            extra_options={"CalibMaxIntermediateOutputs": MAX_INTERMEDIATE_OUTPUTS})
    finally:
        logging.disable(logging.NOTSET)
    return {"format": "QDQ", "activations": "uint8 (asymmetric, per tensor)",
            "weights": "int8 per output channel, reduce_range (7-bit)",
            "prepared_with": "onnxruntime.quantization.quant_pre_process"}


def session(path: Path, optimized: Path | None = None, threads: int = 0) -> Any:
    """An ONNX Runtime CPU session of path (optimized: where to save the graph it actually runs)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
        # ...saved for kernels() to read, not for use elsewhere: ORT's warning that the saved graph
        # is specific to this CPU would be a stray line on the user's terminal
        options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def accuracy(sess: Any, test: Split, batch_size: int) -> float:
    """Top-1 accuracy (%) of an ONNX session on a labelled split."""
    right = 0
    for images, labels in zip(test.images.split(batch_size), test.labels.split(batch_size), strict=True):
        logits = sess.run(["logits"], {"images": images.float().div_(255).numpy()})[0]
        right += int((torch.from_numpy(logits).argmax(1) == labels).sum())
    return 100.0 * right / len(test)


def kernels(sess: Any, optimized: Path) -> dict[str, Any]:
    """What ran: the session's execution providers and the operators of the graph it executed
    after its own fusions (QLinearConv where DQ -> Conv -> Q was fused into an int8 kernel)."""
    import onnx

    graph = onnx.load(str(optimized)).graph
    ops = Counter(f"{n.domain}.{n.op_type}" if n.domain else n.op_type for n in graph.node)
    return {"execution_providers": list(sess.get_providers()),
            "optimized_graph_ops": dict(sorted(ops.items())), "cpu": cpu_int8_units()}


def cpu_int8_units() -> str:
    """The CPU's 8-bit dot-product units as /proc/cpuinfo lists them (Linux), for the record."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"{platform.machine()} (no /proc/cpuinfo)"
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    found = [f for f in ("avx512_vnni", "avx_vnni", "amx_int8", "avx512bw", "avx2") if f in flags]
    vnni = any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))
    return f"{platform.machine()}: {', '.join(found) or 'none of avx2/avx512/vnni/amx'}" + \
        ("" if vnni else " (no VNNI or AMX)")
