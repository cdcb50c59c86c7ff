#!/usr/bin/env python3
"""Which test-time views help a trained run? Accuracy on its validation split for sets of views.

    python scripts/tta_views.py runs/NAME/best.pt [--data-root DIR] [--split val|test] [--json [PATH]]

Every view (the image and its mirror, each shifted by -2..2 pixels with reflect padding) is run
once over the split; the view sets are then scored from those log-probabilities, averaging
probabilities as `vggtrain eval` does. `multicrop` here is exactly `eval --tta multicrop`. Use the
validation split to choose (the default; the run must have held one out), never the test set.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout, too

SHIFTS = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]


def _both(shifts: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    return [(flip, dy, dx) for dy, dx in shifts for flip in (0, 1)]


def view_sets() -> dict[str, tuple[list[tuple[int, int, int]], list[float]]]:
    """name -> (views as (flip, dy, dx), weights); weights are normalised when scoring."""
    one = [(0, 0)]
    diag = [(0, 0), (-1, -1), (1, 1), (-1, 1), (1, -1)]
    axis = [(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)]
    nine = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    return {
        "none": ([(0, 0, 0)], [1.0]),
        "flip": (_both(one), [1.0, 1.0]),
        "multicrop": (_both([(0, 0), (-1, -1), (1, 1)]), [2, 2, 1, 1, 1, 1]),
        "four diagonal shifts": (_both(diag), [4, 4] + [1] * 8),
        "four axis shifts": (_both(axis), [4, 4] + [1] * 8),
        "all 3x3 positions": (_both(nine), [1.0] * 18),
        "all 5x5 positions": (_both(SHIFTS), [1.0] * 50),
    }


def measure(ckpt: str, data_root: str | None, split: str) -> dict:
    import torch
    from torch import nn

    from vggtrain.data import eval_batches, norm_stats
    from vggtrain.device import autocast
    from vggtrain.eval import checkpoint_split
    from vggtrain.inference import load_model, resolve_checkpoint

    dev = torch.device("cpu")
    loaded = load_model(resolve_checkpoint(ckpt), dev)
    cfg = loaded.cfg
    data, _ = checkpoint_split(loaded, split, data_root)
    parts: dict[tuple[int, int, int], list[torch.Tensor]] = {}
    with torch.no_grad():
        batches = eval_batches(data, cfg.train.eval_batch_size, cfg.train.channels_last, norm_stats(cfg.data))
        for x, _ in batches:
            padded = nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
            for flip in (0, 1):
                source = padded.flip(3) if flip else padded
                for dy, dx in SHIFTS:
                    view = source[..., 2 + dy:2 + dy + x.shape[-2], 2 + dx:2 + dx + x.shape[-1]]
                    with autocast(dev, cfg.train.precision):
                        logits = loaded.model(view)
                    parts.setdefault((flip, dy, dx), []).append(torch.log_softmax(logits.float(), 1))
    logp = {k: torch.cat(v) for k, v in parts.items()}
    rows = []
    for name, (views, weights) in view_sets().items():
        w = torch.tensor(weights, dtype=torch.float32)
        w = (w / w.sum()).log()
        mixed = torch.logsumexp(torch.stack([logp[v] + w[i] for i, v in enumerate(views)]), 0)
        rows.append({"views": name, "count": len(views),
                     "top1": (mixed.argmax(1) == data.labels).float().mean().item()})
    return {"checkpoint": str(loaded.path), "split": split, "images": len(data), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    from vggtrain.errors import UserError
    from vggtrain.program import add_json_option, json_only, write_output

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="a checkpoint, or a run directory (its best.pt)")
    p.add_argument("--data-root", help="where the data is, if not at the run's data.root")
    p.add_argument("--split", choices=("val", "test"), default="val")
    add_json_option(p, "the table")
    args = p.parse_args(argv)
    try:
        result = measure(args.ckpt, args.data_root, args.split)
        if args.json:
            write_output(args.json, json.dumps(result, indent=2) + "\n")
    except (UserError, OSError) as e:
        print(f"tta_views: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)  # 74: the filesystem refused the JSON
    if json_only(args.json):
        return 0
    print(f"{result['checkpoint']}: {result['images']} {result['split']} images")
    for row in result["rows"]:
        print(f"{row['views']:<22} {row['count']:>3} views  {row['top1']:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
