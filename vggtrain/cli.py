"""Command line: ``vggtrain fit ...``. Exit codes: 0 ok, 2 bad input, 1 unexpected, 74 a write
the filesystem refused (full disk), 130 Ctrl-C, 143 SIGTERM.

Each command is one entry in COMMANDS (at the end): its help texts, the function that declares
its options and the one that runs it. An option several commands take (--config with --set,
--device, --ckpt, and --json from vggtrain.program, which the scripts share) is declared once, by
one helper.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from vggtrain import __version__
from vggtrain.config import DEVICE_RE, DEVICE_RULE, RUN_NAME_RE, RUN_NAME_RULE, TTA_MODES
from vggtrain.errors import UserError, shown, shown_lines
from vggtrain.program import (
    EXIT_OK,
    EXIT_USAGE,
    add_json_option,
    check_output_writable,
    json_only,
    positive_int,
    run_reporting_errors,
    write_output,
)

ALLOCATOR_COMMANDS = {"fit", "eval", "bench", "info", "sweep", "seeds", "lr-find"}  # they train or evaluate
# lr-find's --steps, --min-lr, --max-lr: vggtrain.lr_find's defaults (not imported here: it loads torch)
LR_FIND_STEPS, LR_FIND_MIN_LR, LR_FIND_MAX_LR = 200, 1e-5, 10.0
BENCH_PARTS = ("bare", "data", "reference", "fit", "real", "ops", "eval", "allocator", "policies")
BENCH_DEFAULT_PARTS = BENCH_PARTS[:-1]  # policies: asked for by name (kornia, the augment extra; minutes)
BENCH_JSON = "bench/results.json"  # where bench writes without --json


@dataclass(frozen=True)
class Command:
    help: str  # its line in `vggtrain --help`
    options: Callable[[argparse.ArgumentParser], None]  # declares them
    run: Callable[[argparse.Namespace], int]  # returns the exit code
    description: str  # the top of `vggtrain NAME --help`


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage dump: the usage is one --help away.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


# --- options several commands share ---------------------------------------------------------------

def _config_and_set(p: argparse.ArgumentParser, required: bool = True, default: str | None = None,
                    what: str = "") -> None:
    """--config and --set."""
    where = f" (default: {default})" if default else " (e.g. vgg16_cifar.yaml)"
    p.add_argument("--config", required=required, default=default, metavar="PATH_OR_NAME",
                   help=f"{what or 'YAML file, or a name in configs/'}{where}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=0.1 (repeatable)")


def _device_option(p: argparse.ArgumentParser, default: str | None = "auto",
                   shown_default: str = "auto") -> None:
    p.add_argument("--device", type=_device, default=default,
                   help=f"auto | cpu | cuda | cuda:N | mps (default: {shown_default})")


def _ckpt_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, metavar="PATH",
                   help="a checkpoint (.pt), or a run directory for its best.pt")


def _device(text: str) -> str:
    if not DEVICE_RE.match(text):
        raise argparse.ArgumentTypeError(f"expected {DEVICE_RULE}, got {text!r}")
    return text


def _run_name(text: str) -> str:
    if not RUN_NAME_RE.match(text):
        raise argparse.ArgumentTypeError(f"a run name is {RUN_NAME_RULE}, got {text!r}")
    return text


# --- each command's options -----------------------------------------------------------------------

def _fit_options(p: argparse.ArgumentParser) -> None:
    _config_and_set(p, required=False)
    p.add_argument("--name", type=_run_name,
                   help="run name (default: the config's name, else the file's stem)")
    _device_option(p, None, "train.device")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN_DIR_OR_CKPT",
                   help="continue from last.pt: of the run named by the config, or of the given run "
                        "directory / checkpoint (its stored config is used)")
    p.add_argument("--force", action="store_true",
                   help="delete an existing run directory of the same name and start over")


def _eval_options(p: argparse.ArgumentParser) -> None:
    _ckpt_option(p)
    p.add_argument("--split", choices=["test", "val"], default="test",
                   help="test (default) or the validation images the run held out")
    p.add_argument("--data-root", metavar="DIR", help="default: data.root of the stored config")
    p.add_argument("--batch-size", type=positive_int, metavar="N",
                   help="default: train.eval_batch_size of the stored config")
    _device_option(p)
    add_json_option(p, "the report")
    p.add_argument("--tta", nargs="?", const="flip", default=None, choices=TTA_MODES,
                   help="test-time augmentation (default: the run's train.tta, as its report used): "
                        "flip (when given alone) averages each image with its mirror; multicrop "
                        "adds one-pixel shifts (airbench's level 2); none turns it off")
    _calibrated_option(p, "also measure the probabilities after the checkpoint's temperature for this "
                          "TTA (fitted on its run's validation split: by fit, else now)")
    p.add_argument("--corruptions", nargs="?", const="all", type=_corruptions, metavar="LIST",
                   help="also measure accuracy on CIFAR-10-C corruptions of the split, made on the device: "
                        "all (when given alone) or comma-separated names (docs/evaluation.md)")
    p.add_argument("--severities", type=_severities, metavar="RANGE",
                   help="the corruptions' severities: 1-5 (default), 2-4, 1,3,5")
    p.add_argument("--baseline", metavar="PATH",
                   help="a reference checkpoint for the (relative) mean corruption error")
    p.add_argument("--corruption-seed", type=int, metavar="N", help="seeds the random corruptions (0)")
    p.add_argument("--out", metavar="DIR", help="also write report.json, report.md and the pictures into DIR")


def _calibrated_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--calibrated", action="store_true", help=what)


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)



def _corruptions(text: str) -> tuple[str, ...]:
    from vggtrain.corruptions import parse_corruptions

    return parse_corruptions(text)


def _severities(text: str) -> tuple[int, ...]:
    from vggtrain.corruptions import parse_severities

    return parse_severities(text)


def _predict_options(p: argparse.ArgumentParser) -> None:
    _ckpt_option(p)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--topk", type=positive_int, default=3, metavar="K", help="classes per image (3)")
    _calibrated_option(p, "probabilities after the checkpoint's temperature (softmax(logits / T); "
                          "fitted on its run's validation split: by fit, else now)")
    p.add_argument("--data-root", metavar="DIR",
                   help="with --calibrated and no stored temperature: where the run's validation images are "
                        "(default: data.root of the stored config)")
    add_json_option(p, "the predictions")
    _device_option(p)


def _gradcam_options(p: argparse.ArgumentParser) -> None:
    _ckpt_option(p)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for <image>.gradcam.png")
    p.add_argument("--layer", help="a layer as `vggtrain summary` names it, e.g. conv4_3 "
                                   "(default: the last convolution)")
    p.add_argument("--class", dest="class_name", metavar="NAME",
                   help="explain this class (default: the predicted one)")
    _device_option(p)


def _summary_options(p: argparse.ArgumentParser) -> None:
    _config_and_set(p)


def _bench_options(p: argparse.ArgumentParser) -> None:
    _config_and_set(p, required=False, default="vgg16_cifar.yaml")
    p.add_argument("--steps", type=positive_int, default=20, metavar="N",
                   help="timed steps per measurement (20)")
    p.add_argument("--warmup", type=positive_int, default=3, metavar="N", help="untimed steps first (3)")
    p.add_argument("--data-steps", type=positive_int, default=200, metavar="N",
                   help="timed batches for the data paths (200; the reference uses a quarter)")
    p.add_argument("--parts", default=",".join(BENCH_DEFAULT_PARTS), metavar="LIST",
                   help=f"comma-separated subset of {','.join(BENCH_PARTS)} (default: all but policies)")
    add_json_option(p, "the results", default=BENCH_JSON)
    p.add_argument("--quiet", action="store_true", help="write the JSON only, print nothing")


def _export_options(p: argparse.ArgumentParser) -> None:
    _ckpt_option(p)
    p.add_argument("--format", required=True, choices=["onnx", "exported", "torchscript"],
                   help="onnx (needs vggtrain[export]), exported (a torch.export .pt2), torchscript")
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write (and FILE.json)")
    p.add_argument("--data-root", metavar="DIR",
                   help="the data for the parity check (and int8's calibration and accuracy check; "
                        "default: data.root of the stored config)")
    q = p.add_argument_group("int8 (ONNX Runtime's static quantization; docs/export.md)")
    q.add_argument("--quantize", choices=["int8"], help="write an int8 ONNX model, checked for accuracy")
    q.add_argument("--calibration-images", type=int, metavar="N",
                   help="training images to calibrate on, drawn at random from the seed (1000)")
    q.add_argument("--calibration-seed", type=int, metavar="S", help="which images (0)")
    q.add_argument("--calibration-method", choices=["minmax", "entropy", "percentile"],
                   help="how activation ranges are chosen (minmax)")
    q.add_argument("--max-drop", type=float, metavar="POINTS",
                   help="test-accuracy points int8 may lose against fp32, else nothing is written (1.0)")
    q.add_argument("--eval-images", type=int, metavar="N",
                   help="check accuracy on the first N test images (default: all)")
    _calibrated_option(p, "output logits / T, the checkpoint's temperature inside the exported graph "
                          "(fitted on its run's validation split: by fit, else now)")


def _runs_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", nargs="?", default=None, metavar="DIR", help="default: runs")
    p.add_argument("--sort", default="name", metavar="COLUMN",
                   help="name (default), arch, params, epochs, best_val, test_top1, test_ece, time_s, "
                        "precision, device or status")
    p.add_argument("--reverse", action="store_true", help="largest first")
    add_json_option(p, "the rows")


def _sweep_options(p: argparse.ArgumentParser) -> None:
    _config_and_set(p, what="the base config")
    p.add_argument("--space", required=True, metavar="YAML",
                   help="dotted config keys -> {type: float|int|categorical, low, high, log, step, choices}")
    p.add_argument("--trials", required=True, type=positive_int, metavar="N",
                   help="trials in the study, counted over every process working on it")
    p.add_argument("--study", required=True, type=_run_name, metavar="NAME", help="the study's name")
    p.add_argument("--prune-from", type=positive_int, metavar="EPOCH",
                   help="the first epoch at which a trial below the median may be pruned (default: "
                        "half of train.epochs; the last epoch is never pruned)")
    p.add_argument("--storage", metavar="URL",
                   help="an Optuna storage URL, e.g. postgresql://user:pw@host/db (default: "
                        "sqlite:///<train.out_dir>/<study>/study.db)")


def _seeds_options(p: argparse.ArgumentParser) -> None:
    _config_and_set(p)
    p.add_argument("--seeds", required=True, type=positive_int, metavar="N", help="how many seeds")
    p.add_argument("--first-seed", type=int, default=0, metavar="K", help="the first seed (0)")
    p.add_argument("--target", type=float, metavar="ACC",
                   help="also record the training time to this test accuracy, e.g. 0.9 (the test "
                        "set is then measured after every epoch, outside the training time)")
    add_json_option(p, "the summary")


def _lr_find_options(p: argparse.ArgumentParser) -> None:
    _config_and_set(p)
    _device_option(p, None, "train.device")
    p.add_argument("--steps", type=positive_int, default=LR_FIND_STEPS, metavar="N",
                   help=f"training steps of the ramp ({LR_FIND_STEPS}); it stops early when the loss "
                        f"diverges")
    p.add_argument("--min-lr", type=float, default=LR_FIND_MIN_LR, metavar="A",
                   help=f"optim.lr at the first step ({LR_FIND_MIN_LR:g})")
    p.add_argument("--max-lr", type=float, default=LR_FIND_MAX_LR, metavar="B",
                   help=f"optim.lr at the last step ({LR_FIND_MAX_LR:g})")
    p.add_argument("--out", default="lr_find.png", metavar="PNG",
                   help="the loss-vs-lr picture (default: lr_find.png; needs vggtrain[plots])")
    add_json_option(p, "the rates, losses and suggestion")


def _info_options(p: argparse.ArgumentParser) -> None:
    add_json_option(p, "these facts")


def _config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keys", required=True, nargs="?", const="", metavar="SECTION",
                   help="every key, or those of one section (e.g. optim)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vggtrain", description="Train VGG networks on CIFAR-10.")
    parser.add_argument("--version", action="version", version=f"vggtrain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, command in COMMANDS.items():
        command.options(sub.add_parser(name, help=command.help, description=command.description))
    return parser


# --- the commands ---------------------------------------------------------------------------------

def _cmd_fit(args: argparse.Namespace) -> int:
    from vggtrain.config import check_run_name, load_config
    from vggtrain.fit import fit

    extra = list(args.overrides)
    if args.name is not None:
        extra.append(f"name={json.dumps(args.name)}")
    if args.device is not None:
        extra.append(f"train.device={json.dumps(args.device)}")
    if args.resume is not None and args.force:
        raise UserError("usage error: --resume and --force exclude each other")
    if isinstance(args.resume, str):
        if args.config is not None:
            raise UserError("usage error: --resume RUN_DIR continues with the run's own config; "
                            "drop --config (change what a resume may change with --set)")
        fit(resume=args.resume, overrides=extra)
        return EXIT_OK
    if args.config is None:
        raise UserError("usage error: fit needs --config (or --resume RUN_DIR)")
    cfg = load_config(args.config, extra)
    if not args.resume:
        check_run_name(cfg, args.config)
    fit(cfg, resume=args.resume, force=args.force)  # --resume alone: the run of this name goes on
    return EXIT_OK


def _cmd_eval(args: argparse.Namespace) -> int:
    from vggtrain.eval import evaluate_checkpoint
    from vggtrain.report import format_text, report_json

    report = evaluate_checkpoint(args.ckpt, args.split, args.data_root, args.batch_size, args.device,
                                 args.tta, args.calibrated, _note,
                                 _corruption_request(args), args.out)
    if not json_only(args.json):
        print(shown_lines(format_text(report)), end="")
    if args.json is not None:
        write_output(args.json, report_json(report))
    return EXIT_OK


def _corruption_request(args: argparse.Namespace) -> object:
    """eval's corruption options as a CorruptionRequest (None without --corruptions); checked
    before any model loads."""
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out {args.out}: exists and is not a directory")
    if args.corruptions is None:
        given = [o for o, v in (("--severities", args.severities), ("--baseline", args.baseline),
                                ("--corruption-seed", args.corruption_seed)) if v is not None]
        if given:
            raise UserError(f"usage error: {given[0]} needs --corruptions")
        return None
    from vggtrain.corruptions import SEVERITIES, CorruptionRequest, require_extras

    require_extras(args.corruptions)
    return CorruptionRequest(args.corruptions, args.severities or SEVERITIES, args.corruption_seed or 0,
                             args.baseline)


def _cmd_predict(args: argparse.Namespace) -> int:
    from vggtrain.device import select_device
    from vggtrain.inference import load_model, resolve_checkpoint
    from vggtrain.predict import format_predictions, predict_files, predictions_json

    device = select_device(args.device)
    loaded = load_model(resolve_checkpoint(args.ckpt), device)
    temperature = None
    if args.calibrated:
        from vggtrain.eval import checkpoint_temperature

        # predict runs no TTA: the temperature fitted without it
        temperature = checkpoint_temperature(loaded, "none", args.data_root, note=_note)[0]
    results, errors = predict_files(loaded, args.images, device, args.topk, temperature)
    for e in errors:
        print(f"vggtrain: {shown(e['error'])}", file=sys.stderr)
    if not json_only(args.json):
        print(shown_lines(format_predictions(results)), end="")
    if args.json is not None:
        write_output(args.json, json.dumps(predictions_json(loaded, results, errors, args.topk, temperature),
                                                indent=2)
                     + "\n")
    return EXIT_USAGE if errors else EXIT_OK


def _cmd_gradcam(args: argparse.Namespace) -> int:
    from vggtrain.device import select_device
    from vggtrain.gradcam import explain_files
    from vggtrain.inference import load_model, resolve_checkpoint

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    device = select_device(args.device)
    loaded = load_model(resolve_checkpoint(args.ckpt), device)
    done, errors = explain_files(loaded, args.images, out, args.layer, args.class_name)
    for line in done:
        print(shown(line))
    for e in errors:
        print(f"vggtrain: {shown(e)}", file=sys.stderr)
    return EXIT_USAGE if errors else EXIT_OK


def _cmd_summary(args: argparse.Namespace) -> int:
    from vggtrain.config import load_config
    from vggtrain.summary import format_summary, summarize

    cfg = load_config(args.config, args.overrides)
    print(shown_lines(format_summary(cfg.model, summarize(cfg.model))), end="")
    return EXIT_OK


def _cmd_bench(args: argparse.Namespace) -> int:
    from vggtrain.bench import format_table, run_bench
    from vggtrain.config import load_config

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(BENCH_PARTS))
    if unknown or not parts:
        raise UserError(f"usage error: --parts takes {','.join(BENCH_PARTS)} (got {args.parts!r})")
    cfg = load_config(args.config, args.overrides)
    res = run_bench(cfg, args.config, args.overrides, parts, args.warmup, args.steps, args.data_steps)
    talk = not args.quiet and not json_only(args.json)
    if talk:
        print(shown_lines(format_table(res)))
    write_output(args.json, json.dumps(res, indent=2) + "\n")  # after the table: a failed write loses nothing
    if talk:
        print("\n" + shown(f"wrote {args.json}"))
    return EXIT_OK


INT8_OPTIONS = {"calibration_images": "calibration_images", "calibration_seed": "calibration_seed",
                 "calibration_method": "method", "max_drop": "max_drop", "eval_images": "eval_images"}


def _cmd_export(args: argparse.Namespace) -> int:
    from vggtrain.export import export_checkpoint
    from vggtrain.quantize import Int8Options

    set_args = [arg for arg in INT8_OPTIONS if getattr(args, arg) is not None]
    given = {INT8_OPTIONS[arg]: getattr(args, arg) for arg in set_args}
    if args.quantize is None and given:
        flags = ", ".join(f"--{arg.replace('_', '-')}" for arg in set_args)
        raise UserError(f"usage error: {flags} only apply with --quantize int8")
    int8 = Int8Options(**given) if args.quantize == "int8" else None
    side = export_checkpoint(args.ckpt, args.format, args.out, args.data_root, calibrated=args.calibrated,
                             note=_note, int8=int8)
    p = side["parity"]
    speed = f", {p['exported_images_per_s']:,.0f} images/s" if p["exported_images_per_s"] else ""
    scaled = f"; logits divided by the temperature {side['temperature']:.3f}" if side["temperature"] else ""
    print(shown(f"wrote {args.out} ({args.format}, {side['source']['weights']} weights of epoch "
                f"{side['source']['epoch']}) and {args.out}.json; parity on {p['images_from']}: max |logit "
                f"difference| {p['max_abs_logit_diff']:.1e} (tolerance {p['tolerance']:.1e}), top-1 the "
                f"same on all {p['images']:,}{speed}{scaled}"))
    if int8 is not None:
        a = side["int8"]["accuracy"]
        print(shown(f"int8: test accuracy {a['int8_top1']:.2f}% against fp32 {a['fp32_top1']:.2f}% (the "
                    f"checkpoint's too) on {a['images_from']}: {-a['drop_points']:+.2f} points "
                    f"(--max-drop {a['max_drop']:g})"))
    return EXIT_OK


def _cmd_runs(args: argparse.Namespace) -> int:
    from vggtrain.runs import SORT_KEYS, format_table, list_runs, sort_rows

    if args.sort not in SORT_KEYS:
        raise UserError(f"usage error: --sort takes one of {', '.join(SORT_KEYS)} (got {args.sort!r})")
    if args.dir is None and args.json is not None and Path(args.json).is_dir():
        # `runs --json DIR`, from when --json took no PATH: a directory is no JSON file anyway
        args.dir, args.json = args.json, "-"
    root = Path(args.dir or "runs")
    if not root.is_dir():
        raise UserError(f"{root}: no such directory")
    rows = sort_rows(list_runs(root), args.sort, args.reverse)
    if args.json is None:
        print(shown_lines(format_table(rows)), end="")
    else:
        write_output(args.json, json.dumps(rows, indent=2) + "\n")
    return EXIT_OK


def _cmd_sweep(args: argparse.Namespace) -> int:
    from vggtrain.sweep import run_sweep

    run_sweep(args.config, args.overrides, args.space, args.trials, args.study, args.storage,
              args.prune_from)
    return EXIT_OK


def _cmd_seeds(args: argparse.Namespace) -> int:
    import contextlib

    from vggtrain.sweep import format_seeds, run_seeds

    if args.target is not None and not 0 < args.target <= 1:
        raise UserError(f"usage error: --target is an accuracy in (0, 1], got {args.target}")
    if args.json:
        check_output_writable(args.json)
    # With --json -, stdout is the JSON's alone: the runs' progress goes to stderr.
    quiet = contextlib.redirect_stdout(sys.stderr) if json_only(args.json) else contextlib.nullcontext()
    with quiet:
        summary = run_seeds(args.config, args.overrides, args.seeds, args.first_seed, args.target)
    if not json_only(args.json):
        print(shown_lines(format_seeds(summary)), end="")
    if args.json:
        write_output(args.json, json.dumps(summary, indent=2) + "\n")
    return EXIT_OK


def _cmd_lr_find(args: argparse.Namespace) -> int:
    from vggtrain.config import load_config
    from vggtrain.lr_find import PLOTS_EXTRA, check_range, draw, lr_find, notes

    check_range(args.steps, args.min_lr, args.max_lr)
    cfg = load_config(args.config, args.overrides)
    for out, option in ((args.out, "--out"), (args.json, "--json")):
        if out is not None:
            check_output_writable(out, option)  # before the training steps, not after
    stream = sys.stderr if json_only(args.json) else sys.stdout

    def talk(line: str) -> None:
        print(shown(line), file=stream, flush=True)

    test = lr_find(cfg, args.steps, args.min_lr, args.max_lr, args.device, talk)
    for line in notes(test):
        talk(line)
    drawn = draw(test, Path(args.out), f"{cfg.name}: learning-rate range test")
    talk(f"wrote {args.out}" if drawn else f"note: {PLOTS_EXTRA}")
    talk(f"suggested optim.lr: {test.suggested_lr:g} (--set optim.lr={test.suggested_lr:g})")
    if args.json is not None:
        write_output(args.json, json.dumps(test.to_json(), indent=2) + "\n")
    return EXIT_OK


def _cmd_info(args: argparse.Namespace) -> int:
    import platform

    import torch

    from vggtrain import allocator

    keys = ("LD_PRELOAD", "GLIBC_TUNABLES", "MALLOC_CONF", allocator.SWITCH, allocator.APPLIED)
    info = {"vggtrain": __version__, "torch": str(torch.__version__), "python": platform.python_version(),
            "platform": platform.platform(), "cpu_threads": torch.get_num_threads(),
            "cuda": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "mps": torch.backends.mps.is_available(), "allocator": allocator.in_effect(),
            "allocator_env": {k: os.environ[k] for k in keys if k in os.environ}, "pid": os.getpid()}
    if args.json is not None:
        write_output(args.json, json.dumps(info, indent=2) + "\n")
    else:
        for k, v in info.items():
            print(shown(f"{k + ':':<16}{v}"))
    return EXIT_OK


def _cmd_config(args: argparse.Namespace) -> int:
    from vggtrain.config_reference import render  # docs/config.md's text, from config.py

    text = render(args.keys or None)
    print(text, end="" if text.endswith("\n") else "\n")
    return EXIT_OK


# name -> the command: --help's line and page, the function that declares its options, the one
# that runs it; in --help's order
COMMANDS: dict[str, Command] = {
    "fit": Command(
        "train a model from a YAML config", _fit_options, _cmd_fit,
        "Train from a YAML config; writes runs/<name>/."),
    "eval": Command(
        "measure a checkpoint: top-1/top-5, loss, per class, confusion", _eval_options, _cmd_eval,
        "Evaluate a checkpoint on CIFAR-10's test split (or its run's validation split); needs nothing "
        "but the checkpoint and the data."),
    "predict": Command(
        "top-k classes for image files", _predict_options, _cmd_predict,
        "Classify PNG/JPEG images (converted to RGB, resized to 32x32)."),
    "gradcam": Command(
        "Grad-CAM heat maps: where the model looks", _gradcam_options, _cmd_gradcam,
        "Write a Grad-CAM overlay PNG per image into --out."),
    "summary": Command(
        "per-layer shapes, parameters and multiply-accumulates", _summary_options, _cmd_summary,
        "Summarise the model a config builds (no data, no weights)."),
    "bench": Command(
        "measure training speed: step, data path, loop, eval, allocator", _bench_options, _cmd_bench,
        "Measure where the time goes for one config (random images, no dataset needed) and write JSON."),
    "export": Command(
        "the model for ONNX Runtime, torch.export or TorchScript", _export_options, _cmd_export,
        "Export a checkpoint's eval-mode model (its weight EMA where the run kept one) with the run's "
        "normalisation inside: float RGB images in [0, 1], (N, 3, 32, 32), in; logits out. Written only "
        "after it agrees with the checkpoint on the test set (random images when the data is not at "
        "hand); FILE.json describes it."),
    "runs": Command(
        "one row per run directory: progress, accuracy, time, status", _runs_options, _cmd_runs,
        "List the runs under DIR (and one level of subdirectories, where sweeps put their trials) from "
        "the files they wrote."),
    "sweep": Command(
        "an Optuna study over config keys, each trial a normal fit", _sweep_options, _cmd_sweep,
        "Search config values on the validation split with Optuna (needs vggtrain[sweep]); trials run in "
        "<train.out_dir>/<study>/trial-N, the best trial is tested once at the end. Several processes (or "
        "machines, with --storage) may work on one study."),
    "seeds": Command(
        "one config over several seeds: median, mean and spread", _seeds_options, _cmd_seeds,
        "Run a config with seeds 0..N-1 (each a normal fit in <train.out_dir>/<name>-seeds/seed-K) and "
        "summarise the test accuracy and times; finished seeds are reused."),
    "lr-find": Command(
        "a learning-rate range test: loss vs optim.lr, a suggested rate", _lr_find_options, _cmd_lr_find,
        "Train the config's run for a few hundred steps on its training split while optim.lr rises "
        "exponentially from --min-lr to --max-lr, stopping when the loss diverges; draw the loss "
        "against the rate (--out) and print a suggested optim.lr (the rate at the smoothed loss's "
        "minimum / 4). Writes no run directory and keeps no weights."),
    "info": Command(
        "versions, devices and the memory allocator in effect", _info_options, _cmd_info,
        "What a bug report needs: versions, devices, allocator."),
    "config": Command(
        "the config keys: type, default, range and meaning", _config_options, _cmd_config,
        "Print the reference of the YAML config's keys (docs/config.md): each key's type, default, "
        "allowed values and meaning."),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None and args.command in ALLOCATOR_COMMANDS:
        # Only as the program itself (never inside a caller's process), and before torch loads.
        from vggtrain.allocator import reexec_with_fast_allocator

        reexec_with_fast_allocator()
    command = COMMANDS[args.command].run
    code = run_reporting_errors("vggtrain", lambda: command(args))
    if argv is None and os.environ.get("WORLD_SIZE", "1") != "1":
        _exit_without_finalizing(code)
    return code


def _exit_without_finalizing(code: int) -> NoReturn:
    """End a torchrun rank without Python's interpreter finalization.

    Even after destroy_process_group, the gloo process group can outlive it (DDP leaves references
    behind) and its worker threads may still release a finished collective's tensors; if that
    happens while the interpreter finalizes, the thread dies taking the GIL and the rank aborts
    (SIGABRT, "terminate called without an active exception") after a complete run: measured here
    in 3 of about 50 two-rank jobs on a busy CPU; pytorch/pytorch#190489 tracks it. Every file
    is closed and every checkpoint renamed into place by now, so only the streams need flushing."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
