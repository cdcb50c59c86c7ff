"""Small synthetic datasets in CIFAR-10's published layouts, for tests and `make smoke`.

Each image is noise with a class-coloured square in its centre: learnable in a few epochs by a
tiny VGG, and the signal sits in a known region (rows and columns 8..23).
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import torch

from vggtrain.atomic import atomic_write, atomic_write_text
from vggtrain.data import BIN_DIR, PY_DIR, TEST_BATCHES, TRAIN_BATCHES
from vggtrain.errors import UserError, os_reason, shown
from vggtrain.program import positive_int, run_reporting_errors

CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer",
               "dog", "frog", "horse", "ship", "truck"]
SIGNAL = slice(8, 24)  # rows and columns of the class-coloured square


def synthetic_images(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """uint8 (N, 3, 32, 32): noise, plus a square whose colour encodes the label."""
    n = len(labels)
    images = torch.randint(0, 128, (n, 3, 32, 32), generator=generator, dtype=torch.uint8)
    # Ten distinct colours: the three bits of k for k = 1..7, then three mixed ones.
    palette = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1],
                            [0, 1, 1], [1, 1, 1], [1, .5, 0], [0, .5, 1], [.5, 0, 1]])
    colour = (palette[labels % 10] * 255).to(torch.uint8)  # (N, 3)
    images[:, :, SIGNAL, SIGNAL] = colour[:, :, None, None]
    return images


def write_synthetic_cifar10(root: str | Path, layout: str = "bin", per_batch: int = 200,
                            test_size: int = 500, seed: int = 0) -> Path:
    """Write five training batches of per_batch images and a test batch; returns the layout dir."""
    import numpy as np

    g = torch.Generator().manual_seed(seed)
    base = Path(root) / (BIN_DIR if layout == "bin" else PY_DIR)
    base.mkdir(parents=True, exist_ok=True)
    for name, n in [(b, per_batch) for b in TRAIN_BATCHES] + [(TEST_BATCHES[0], test_size)]:
        labels = torch.randint(0, 10, (n,), generator=g)
        images = synthetic_images(labels, g)
        if layout == "bin":
            records = torch.cat([labels.to(torch.uint8)[:, None], images.view(n, -1)], dim=1)
            _write_bytes(base / f"{name}.bin", records.numpy().tobytes())
        else:
            batch = {b"batch_label": name.encode(), b"labels": labels.tolist(),
                     b"data": images.view(n, -1).numpy().astype(np.uint8),
                     b"filenames": [f"{i}.png".encode() for i in range(n)]}
            _write_bytes(base / name, pickle.dumps(batch, protocol=2))
    if layout == "bin":
        atomic_write_text(base / "batches.meta.txt", "\n".join(CLASS_NAMES) + "\n\n")
    else:
        meta = {b"label_names": [c.encode() for c in CLASS_NAMES],
                b"num_cases_per_batch": per_batch, b"num_vis": 3072}
        _write_bytes(base / "batches.meta", pickle.dumps(meta, protocol=2))
    return base


def write_synthetic_cifar100(root: str | Path, layout: str = "py", train_size: int = 1000,
                             test_size: int = 500, seed: int = 0) -> Path:
    """CIFAR-100's layout (one train and one test file; fine and coarse labels, fine // 5 as the
    superclass): the colour square encodes fine % 10. Returns the layout dir."""
    import numpy as np

    g = torch.Generator().manual_seed(seed)
    base = Path(root) / ("cifar-100-binary" if layout == "bin" else "cifar-100-python")
    base.mkdir(parents=True, exist_ok=True)
    fine_names = [f"fine_{i:02d}" for i in range(100)]
    coarse_names = [f"coarse_{i:02d}" for i in range(20)]
    for name, n in (("train", train_size), ("test", test_size)):
        fine = torch.randint(0, 100, (n,), generator=g)
        coarse = fine // 5
        images = synthetic_images(fine, g)
        if layout == "bin":
            records = torch.cat([coarse.to(torch.uint8)[:, None], fine.to(torch.uint8)[:, None],
                                 images.view(n, -1)], dim=1)
            _write_bytes(base / f"{name}.bin", records.numpy().tobytes())
        else:
            batch = {b"filenames": [f"{i}.png".encode() for i in range(n)], b"batch_label": name.encode(),
                     b"fine_labels": fine.tolist(), b"coarse_labels": coarse.tolist(),
                     b"data": images.view(n, -1).numpy().astype(np.uint8)}
            _write_bytes(base / name, pickle.dumps(batch, protocol=2))
    if layout == "bin":
        atomic_write_text(base / "fine_label_names.txt", "\n".join(fine_names) + "\n")
        atomic_write_text(base / "coarse_label_names.txt", "\n".join(coarse_names) + "\n")
    else:
        meta = {b"fine_label_names": [c.encode() for c in fine_names],
                b"coarse_label_names": [c.encode() for c in coarse_names]}
        _write_bytes(base / "meta", pickle.dumps(meta, protocol=2))
    return base


def _write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))  # a killed `make smoke` leaves no torn batch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write a small synthetic CIFAR-10 for smoke tests.")
    p.add_argument("root")
    p.add_argument("--layout", choices=["bin", "py"], default="bin")
    p.add_argument("--per-batch", type=positive_int, default=200)
    p.add_argument("--test-size", type=positive_int, default=500)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    def write() -> int:
        try:
            print(shown(write_synthetic_cifar10(a.root, a.layout, a.per_batch, a.test_size, a.seed)))
        except OSError as e:
            raise UserError(f"{a.root}: cannot write the dataset there ({os_reason(e)})") from None
        return 0

    return run_reporting_errors("vggtrain.synthetic", write)


if __name__ == "__main__":
    sys.exit(main())
