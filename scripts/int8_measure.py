"""The measurements behind docs/export.md's int8 section (issue 42), with vggtrain's own export
and quantization code:

  methods CKPT WORKDIR   the fp32 ONNX export of CKPT quantized with each calibration method
                         (MinMax, Entropy, Percentile) on the same seeded training images, each
                         scored on the run's VALIDATION split (data.val_size, drawn by
                         data.val_seed or the run's seed): how export's default method was chosen
                         (never on the test set)
  speed FP32 INT8        images/s of both ONNX files in ONNX Runtime on the CPU, intra-op
                         threads 2, batch 256, alternated repeats side by side; then one profiled
                         int8 run, whose kernel names say what executed

Reads the run's data where its config says (data.root; never downloads), checked to have the
checkpoint's classes. Prints JSON lines. Nothing here is timed inside a test: these are
measurements for the docs.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vggtrain import export, quantize
from vggtrain.data import run_split, validation_seed
from vggtrain.eval import checkpoint_dataset
from vggtrain.inference import load_model, resolve_checkpoint


def methods(ckpt: str, work: str, count: int = 1000, seed: int = 0) -> None:
    work_dir = Path(work)
    work_dir.mkdir(parents=True, exist_ok=True)
    loaded = load_model(resolve_checkpoint(ckpt), "cpu")
    net = export.deployable(loaded)
    full, _, _, _ = checkpoint_dataset(loaded, download=False)
    train, val = run_split(full, loaded.cfg.data, loaded.cfg.seed)
    images = quantize.calibration_images(train, count, seed)
    fp32 = work_dir / "fp32.onnx"
    export._export(net, "onnx", fp32)  # the export's own step
    base = quantize.accuracy(quantize.session(fp32), val, 500)
    drawn_by = validation_seed(loaded.cfg.data, loaded.cfg.seed)
    print(json.dumps({"split": f"val ({len(val)} images, seed {drawn_by})", "fp32_top1": base}),
          flush=True)
    for method in quantize.METHODS:
        out = work_dir / f"int8_{method}.onnx"
        t0 = time.perf_counter()
        quantize.quantize_onnx(fp32, out, images, method, work_dir)
        seconds = time.perf_counter() - t0
        top1 = quantize.accuracy(quantize.session(out), val, 500)
        print(json.dumps({"method": method, "calibration_images": count, "seed": seed, "val_top1": top1,
                          "drop_points": round(base - top1, 4), "quantize_s": round(seconds, 1)}), flush=True)


def _images_per_s(sess: Any, x: np.ndarray) -> float:
    t0 = time.perf_counter()
    sess.run(["logits"], {"images": x})
    return len(x) / (time.perf_counter() - t0)


def speed(fp32: str, int8: str, batch: int = 256, threads: int = 2, repeats: int = 7) -> None:
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)).numpy()
    sessions: dict[str, Any] = {"fp32": quantize.session(Path(fp32), threads=threads),
                "int8": quantize.session(Path(int8), threads=threads)}
    for sess in sessions.values():  # warm-up: first-run allocations and packing
        sess.run(["logits"], {"images": x})
    runs: dict[str, list[float]] = {"fp32": [], "int8": []}
    for i in range(repeats):
        for name in (("fp32", "int8") if i % 2 == 0 else ("int8", "fp32")):  # alternated
            runs[name].append(_images_per_s(sessions[name], x))
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(json.dumps({"batch": batch, "intra_op_threads": threads, "repeats": repeats,
                      "images_per_s": {k: [round(r, 1) for r in v] for k, v in runs.items()},
                      "median": {k: round(v, 1) for k, v in med.items()},
                      "int8_over_fp32": round(med["int8"] / med["fp32"], 3),
                      "cpu": quantize.cpu_int8_units()}), flush=True)
    for name, path in (("fp32", fp32), ("int8", int8)):
        print(json.dumps({"profile": name, "kernels_ms": _profiled(Path(path), x, threads)}), flush=True)


def _profiled(path: Path, x: np.ndarray, threads: int) -> dict[str, float]:
    """Total ms per (operator type, execution provider) in one profiled run of path."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix("")) + "_profile"
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    sess.run(["logits"], {"images": x})
    events = json.loads(Path(sess.end_profiling()).read_text())
    total: Counter[str] = Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            args = e.get("args", {})
            total[f"{args.get('op_name')} ({args.get('provider')})"] += e.get("dur", 0) / 1000
    return {k: round(v, 1) for k, v in total.most_common()}


if __name__ == "__main__":
    if sys.argv[1] == "methods":
        methods(sys.argv[2], sys.argv[3], *(int(a) for a in sys.argv[4:]))
    elif sys.argv[1] == "speed":
        speed(sys.argv[2], sys.argv[3], *(int(a) for a in sys.argv[4:]))
    else:
        sys.exit(__doc__)
