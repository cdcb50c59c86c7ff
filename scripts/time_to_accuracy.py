#!/usr/bin/env python3
"""Time-to-accuracy: train a config and report when its test accuracy first reached a target.

    python scripts/time_to_accuracy.py --config fast_cpu.yaml --target 0.90 --budget-min 30 \\
        --json bench/tta_fast_cpu.json [--set seed=1] [--full]

It runs `vggtrain fit` in this process and measures the test set after every epoch (the probe;
--probe-every and --probe-from thin it out), with the config's own test-time augmentation.
Wall-clock times count from this script's start (data loading, model building and the fit's
validation included) and leave out the probes' own time, so they are what the same
`vggtrain fit` takes alone. Training stops at the first epoch that reaches the target (unless
--full) or ends past the budget; fit then writes its usual report. The JSON holds the curve
(epoch, wall-clock, training time, test accuracy), the result and the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

T0 = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout, too

SCHEMA = "vggtrain.time_to_accuracy/1"


def _parser() -> argparse.ArgumentParser:
    from vggtrain.program import add_json_option

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a YAML config (path, or a name in configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a config value (repeatable), as in vggtrain fit")
    p.add_argument("--target", type=float, default=0.90, help="test accuracy to reach, in (0, 1]")
    p.add_argument("--budget-min", type=float, default=30.0,
                   help="stop after the first epoch that ends past this many minutes")
    p.add_argument("--full", action="store_true", help="keep training after the target is reached")
    p.add_argument("--probe-every", type=int, default=1, metavar="N",
                   help="measure the test set every N epochs (1), and at every epoch from --probe-from")
    p.add_argument("--probe-from", type=int, default=None, metavar="E",
                   help="also measure every epoch from epoch E on; the last epoch is always measured")
    add_json_option(p, "the result")
    p.add_argument("--force", action="store_true", help="replace an existing run directory")
    return p


def run(args: argparse.Namespace) -> dict:
    from vggtrain.config import check_run_name, load_config
    from vggtrain.errors import RunStopped, UserError
    from vggtrain.fit import fit
    from vggtrain.program import check_output_writable, write_output

    if not 0 < args.target <= 1 or not (math.isfinite(args.budget_min) and args.budget_min > 0) \
            or args.probe_every < 1 or (args.probe_from is not None and args.probe_from < 1):
        raise UserError("usage error: --target must be in (0, 1], --budget-min a positive number, "
                        "--probe-every and --probe-from at least 1")
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise UserError("usage error: time_to_accuracy.py runs in one process, not under torchrun")
    cfg = load_config(args.config, args.overrides)
    check_run_name(cfg, args.config)
    if args.json:
        check_output_writable(args.json)  # now, not after the whole run
    run_dir = Path(cfg.train.out_dir) / str(cfg.name)
    measured: dict = {"curve": [], "probe_s": 0.0}
    try:
        report = fit(cfg, run_dir, force=args.force, on_epoch_end=_probe(args, cfg, measured))
    except (RunStopped, KeyboardInterrupt) as e:
        if args.json and measured["curve"]:  # keep what was measured before the stop
            write_output(args.json, _to_json(_result(args, cfg, run_dir, measured, None,
                                                     str(e) or "interrupted")))
        raise
    return _result(args, cfg, run_dir, measured, report, None)


def _probe(args: argparse.Namespace, cfg: Any, measured: dict) -> Callable[[Any], bool]:
    """fit's epoch hook: the test accuracy into measured["curve"] (its own time into
    measured["probe_s"], left out of the wall-clock); True stops the run."""
    from vggtrain.data import Split, load_dataset
    from vggtrain.evaluate import eval_settings, evaluate_split

    budget_s = args.budget_min * 60
    on_device: dict[str, Split] = {}

    def probe(r: Any) -> bool:
        wall = time.perf_counter() - T0 - measured["probe_s"]
        last = r.epoch >= cfg.train.epochs or wall >= budget_s
        dense = args.probe_from is not None and r.epoch >= args.probe_from
        if not (last or dense or r.epoch % args.probe_every == 0):
            return False
        start = time.perf_counter()
        if "test" not in on_device:  # read once, inside the probe's own time (fit reads it too)
            on_device["test"] = load_dataset(replace(cfg.data, download=False))[1].to(r.device)
        split = on_device["test"]
        ev = evaluate_split(r.measured, split, eval_settings(cfg, r.device))  # as validation does
        measured["probe_s"] += time.perf_counter() - start
        measured["curve"].append({"epoch": r.epoch, "wall_s": round(wall, 2),
                                  "train_s": round(r.train_time_s, 2), "test_acc": ev.top1})
        print(f"time_to_accuracy: epoch {r.epoch} at {wall:.0f} s: test accuracy {ev.top1:.2%}",
              flush=True)
        reached = ev.top1 >= args.target
        return (reached and not args.full) or wall >= budget_s

    return probe


def _result(args: argparse.Namespace, cfg: Any, run_dir: Path, measured: dict, report: dict | None,
            stopped: str | None) -> dict:
    from vggtrain import allocator
    from vggtrain.bench import machine_description

    curve, probe_s = measured["curve"], measured["probe_s"]
    budget_s = args.budget_min * 60
    first = next((c for c in curve if c["test_acc"] >= args.target), None)
    return {
        "schema": SCHEMA,
        "config": str(args.config), "name": cfg.name, "overrides": args.overrides, "seed": cfg.seed,
        "target": args.target, "budget_s": budget_s,
        "reached": first is not None and first["wall_s"] <= budget_s,
        "stopped": stopped,  # why the run ended early (a signal), else None
        "time_to_target_s": first["wall_s"] if first else None,
        "epochs_to_target": first["epoch"] if first else None,
        "best_test_acc": max((c["test_acc"] for c in curve), default=None),
        "final_test_acc": report["test"]["acc"] if report else None,
        "epochs": curve[-1]["epoch"] if curve else 0,
        "total_wall_s": round(time.perf_counter() - T0 - probe_s, 2),
        "probe_s": round(probe_s, 2),
        "curve": curve,
        "run_dir": str(run_dir),
        "allocator": allocator.in_effect(),
        "machine": machine_description(),
        "config_values": cfg.to_dict(),
    }


def _to_json(result: dict) -> str:
    return json.dumps(result, indent=2, allow_nan=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if argv is None:  # as the program itself: the same allocator setting as `vggtrain fit`
        from vggtrain.allocator import reexec_with_fast_allocator

        reexec_with_fast_allocator()
    from vggtrain.program import json_only, run_reporting_errors

    # With --json -, stdout is the JSON's alone: the run's progress goes to stderr.
    talk = contextlib.redirect_stdout(sys.stderr) if json_only(args.json) else contextlib.nullcontext()

    def command() -> int:
        with talk:
            result = run(args)
        return _report(result, args)

    return run_reporting_errors("time_to_accuracy", command)


def _report(result: dict, args: argparse.Namespace) -> int:
    t, target = result["time_to_target_s"], result["target"]
    if result["reached"]:
        verdict = f"reached {target:.1%} at {t:.0f} s (epoch {result['epochs_to_target']})"
    elif t is not None:
        verdict = (f"reached {target:.1%} only at {t:.0f} s (epoch {result['epochs_to_target']}), "
                   f"past the budget of {result['budget_s']:.0f} s")
    else:
        verdict = f"did not reach {target:.1%}"
    from vggtrain.program import json_only, write_output

    print(f"time_to_accuracy: {verdict}; best test accuracy {result['best_test_acc']:.2%} "
          f"in {result['total_wall_s']:.0f} s", file=sys.stderr if json_only(args.json) else sys.stdout)
    if args.json:
        write_output(args.json, _to_json(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
