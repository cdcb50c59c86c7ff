"""Command line: ``vggtrain fit ...``. Exit codes: 0 ok, 2 bad input, 1 unexpected, 74 a write
the filesystem refused (full disk), 130 Ctrl-C, 143 SIGTERM."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from vggtrain import __version__
from vggtrain.config import DEVICE_RE, DEVICE_RULE, RUN_NAME_RE, RUN_NAME_RULE, TTA_MODES
from vggtrain.errors import STORAGE_ERRNOS, RunStopped, UserError, WriteError, shown

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_WRITE = 0, 1, 2, 130, 74
ALLOCATOR_COMMANDS = {"fit", "eval", "bench", "info", "sweep", "seeds"}  # the ones that train or evaluate
BENCH_PARTS = ("bare", "data", "reference", "fit", "real", "ops", "eval", "allocator")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage dump: the usage is one --help away.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vggtrain", description="Train VGG networks on CIFAR-10.")
    parser.add_argument("--version", action="version", version=f"vggtrain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    fit = sub.add_parser("fit", help="train a model from a YAML config",
                         description="Train from a YAML config; writes runs/<name>/.")
    fit.add_argument("--config", help="YAML file, or a name in configs/ (e.g. vgg16_cifar.yaml)")
    fit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set optim.lr=0.1 (repeatable)")
    fit.add_argument("--name", type=_run_name,
                     help="run name (default: the config's name, else the file's stem)")
    fit.add_argument("--device", type=_device,
                     help="auto | cpu | cuda | cuda:N | mps (default: train.device)")
    fit.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN_DIR_OR_CKPT",
                     help="continue from last.pt: of the run named by the config, or of the "
                          "given run directory / checkpoint (its stored config is used)")
    fit.add_argument("--force", action="store_true",
                     help="delete an existing run directory of the same name and start over")

    ckpt_help = "a checkpoint (.pt), or a run directory for its best.pt"
    device_help = "auto | cpu | cuda | cuda:N | mps (default: auto)"
    ev = sub.add_parser("eval", help="measure a checkpoint: top-1/top-5, loss, per class, confusion",
                        description="Evaluate a checkpoint on CIFAR-10's test split (or its run's "
                                    "validation split); needs nothing but the checkpoint and the data.")
    ev.add_argument("--ckpt", required=True, metavar="PATH", help=ckpt_help)
    ev.add_argument("--split", choices=["test", "val"], default="test",
                    help="test (default) or the validation images the run held out")
    ev.add_argument("--data-root", metavar="DIR", help="default: data.root of the stored config")
    ev.add_argument("--batch-size", type=positive_int, metavar="N",
                    help="default: train.eval_batch_size of the stored config")
    ev.add_argument("--device", type=_device, default="auto", help=device_help)
    ev.add_argument("--json", metavar="OUT", help="also write the report as JSON to OUT ('-': print "
                                                  "only the JSON, to stdout)")
    ev.add_argument("--tta", nargs="?", const="flip", default=None, choices=TTA_MODES,
                    help="test-time augmentation (default: the run's train.tta, as its report used): "
                         "flip (when given alone) averages each image with its mirror; multicrop "
                         "adds one-pixel shifts (airbench's level 2); none turns it off")

    pr = sub.add_parser("predict", help="top-k classes for image files",
                        description="Classify PNG/JPEG images (converted to RGB, resized to 32x32).")
    pr.add_argument("--ckpt", required=True, metavar="PATH", help=ckpt_help)
    pr.add_argument("images", nargs="+", metavar="IMAGE")
    pr.add_argument("--topk", type=positive_int, default=3, metavar="K", help="classes per image (3)")
    pr.add_argument("--json", metavar="OUT", help="also write the predictions as JSON to OUT ('-': "
                                                  "print only the JSON, to stdout)")
    pr.add_argument("--device", type=_device, default="auto", help=device_help)

    gc = sub.add_parser("gradcam", help="Grad-CAM heat maps: where the model looks",
                        description="Write a Grad-CAM overlay PNG per image into --out.")
    gc.add_argument("--ckpt", required=True, metavar="PATH", help=ckpt_help)
    gc.add_argument("images", nargs="+", metavar="IMAGE")
    gc.add_argument("--out", required=True, metavar="DIR", help="directory for <image>.gradcam.png")
    gc.add_argument("--layer", help="a layer as `vggtrain summary` names it, e.g. conv4_3 "
                                    "(default: the last convolution)")
    gc.add_argument("--class", dest="class_name", metavar="NAME",
                    help="explain this class (default: the predicted one)")
    gc.add_argument("--device", type=_device, default="auto", help=device_help)

    sm = sub.add_parser("summary", help="per-layer shapes, parameters and multiply-accumulates",
                        description="Summarise the model a config builds (no data, no weights).")
    sm.add_argument("--config", required=True, metavar="PATH_OR_NAME",
                    help="YAML file, or a name in configs/ (e.g. vgg16_cifar)")
    sm.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set model.width=0.5 (repeatable)")

    be = sub.add_parser("bench", help="measure training speed: step, data path, loop, eval, allocator",
                        description="Measure where the time goes for one config (random images, "
                                    "no dataset needed) and write JSON.")
    be.add_argument("--config", default="vgg16_cifar.yaml", metavar="PATH_OR_NAME",
                    help="YAML file or a name in configs/ (default: vgg16_cifar.yaml)")
    be.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set train.precision=bf16 (repeatable)")
    be.add_argument("--steps", type=positive_int, default=20, metavar="N",
                    help="timed steps per measurement (20)")
    be.add_argument("--warmup", type=positive_int, default=3, metavar="N", help="untimed steps first (3)")
    be.add_argument("--data-steps", type=positive_int, default=200, metavar="N",
                    help="timed batches for the data paths (200; the reference uses a quarter)")
    be.add_argument("--parts", default=",".join(BENCH_PARTS), metavar="LIST",
                    help=f"comma-separated subset of {','.join(BENCH_PARTS)}")
    be.add_argument("--json", default="bench/results.json", metavar="OUT",
                    help="where to write the results (default: bench/results.json)")
    be.add_argument("--quiet", action="store_true", help="write the JSON only, print nothing")

    ex = sub.add_parser("export", help="the model for ONNX Runtime, torch.export or TorchScript",
                        description="Export a checkpoint's eval-mode model (its weight EMA where the run "
                                    "kept one) with the run's normalisation inside: float RGB images "
                                    "in [0, 1], (N, 3, 32, 32), in; logits out. Written only after it "
                                    "agrees with the checkpoint on the test set (random images when "
                                    "the data is not at hand); FILE.json describes it.")
    ex.add_argument("--ckpt", required=True, metavar="PATH", help=ckpt_help)
    ex.add_argument("--format", required=True, choices=["onnx", "exported", "torchscript"],
                    help="onnx (needs vggtrain[export]), exported (a torch.export .pt2), torchscript")
    ex.add_argument("--out", required=True, metavar="FILE", help="the file to write (and FILE.json)")
    ex.add_argument("--data-root", metavar="DIR",
                    help="the test data for the parity check (default: data.root of the stored config)")

    rn = sub.add_parser("runs", help="one row per run directory: progress, accuracy, time, status",
                        description="List the runs under DIR (and one level of subdirectories, "
                                    "where sweeps put their trials) from the files they wrote.")
    rn.add_argument("dir", nargs="?", default="runs", metavar="DIR", help="default: runs")
    rn.add_argument("--sort", default="name", metavar="COLUMN",
                    help="name (default), arch, params, epochs, best_val, test_top1, time_s, "
                         "precision, device or status")
    rn.add_argument("--reverse", action="store_true", help="largest first")
    rn.add_argument("--json", action="store_true", help="print the rows as JSON")

    sw = sub.add_parser("sweep", help="an Optuna study over config keys, each trial a normal fit",
                        description="Search config values on the validation split with Optuna (needs "
                                    "vggtrain[sweep]); trials run in <train.out_dir>/<study>/trial-N, the "
                                    "best trial is tested once at the end. Several processes (or "
                                    "machines, with --storage) may work on one study.")
    sw.add_argument("--config", required=True, metavar="PATH_OR_NAME", help="the base config")
    sw.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a base config value (repeatable)")
    sw.add_argument("--space", required=True, metavar="YAML",
                    help="dotted config keys -> {type: float|int|categorical, low, high, log, step, choices}")
    sw.add_argument("--trials", required=True, type=positive_int, metavar="N",
                    help="trials in the study, counted over every process working on it")
    sw.add_argument("--study", required=True, type=_run_name, metavar="NAME", help="the study's name")
    sw.add_argument("--prune-from", type=positive_int, metavar="EPOCH",
                    help="the first epoch at which a trial below the median may be pruned (default: "
                         "half of train.epochs; the last epoch is never pruned)")
    sw.add_argument("--storage", metavar="URL",
                    help="an Optuna storage URL, e.g. postgresql://user:pw@host/db (default: "
                         "sqlite:///<train.out_dir>/<study>/study.db)")

    sd = sub.add_parser("seeds", help="one config over several seeds: median, mean and spread",
                        description="Run a config with seeds 0..N-1 (each a normal fit in "
                                    "<train.out_dir>/<name>-seeds/seed-K) and summarise the test "
                                    "accuracy and times; finished seeds are reused.")
    sd.add_argument("--config", required=True, metavar="PATH_OR_NAME")
    sd.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value (repeatable)")
    sd.add_argument("--seeds", required=True, type=positive_int, metavar="N", help="how many seeds")
    sd.add_argument("--first-seed", type=int, default=0, metavar="K", help="the first seed (0)")
    sd.add_argument("--target", type=float, metavar="ACC",
                    help="also record the training time to this test accuracy, e.g. 0.9 (the test "
                         "set is then measured after every epoch, outside the training time)")
    sd.add_argument("--json", metavar="OUT", help="also write the summary to OUT ('-': only the JSON)")

    inf = sub.add_parser("info", help="versions, devices and the memory allocator in effect",
                         description="What a bug report needs: versions, devices, allocator.")
    inf.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _cmd_bench(args: argparse.Namespace) -> int:
    from vggtrain.bench import format_table, run_bench
    from vggtrain.config import load_config

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(BENCH_PARTS))
    if unknown or not parts:
        raise UserError(f"usage error: --parts takes {','.join(BENCH_PARTS)} (got {args.parts!r})")
    cfg = load_config(args.config, args.overrides)
    res = run_bench(cfg, args.config, args.overrides, parts, args.warmup, args.steps, args.data_steps)
    if not args.quiet:
        print(format_table(res))
    write_output(args.json, json.dumps(res, indent=2) + "\n")  # after the table: a failed write loses nothing
    if not args.quiet and args.json != "-":
        print(f"\nwrote {args.json}")
    return EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    from vggtrain.export import export_checkpoint

    side = export_checkpoint(args.ckpt, args.format, args.out, args.data_root)
    p = side["parity"]
    speed = f", {p['exported_images_per_s']:,.0f} images/s" if p["exported_images_per_s"] else ""
    print(shown(f"wrote {args.out} ({args.format}, {side['source']['weights']} weights of epoch "
                f"{side['source']['epoch']}) and {args.out}.json; parity on {p['images_from']}: max |logit "
                f"difference| {p['max_abs_logit_diff']:.1e} (tolerance {p['tolerance']:.1e}), top-1 the "
                f"same on all {p['images']:,}{speed}"))
    return EXIT_OK


def _cmd_runs(args: argparse.Namespace) -> int:
    from vggtrain.runs import SORT_KEYS, format_table, list_runs, sort_rows

    if args.sort not in SORT_KEYS:
        raise UserError(f"usage error: --sort takes one of {', '.join(SORT_KEYS)} (got {args.sort!r})")
    root = Path(args.dir)
    if not root.is_dir():
        raise UserError(f"{root}: no such directory")
    rows = sort_rows(list_runs(root), args.sort, args.reverse)
    print(json.dumps(rows, indent=2) if args.json else format_table(rows), end="\n" if args.json else "")
    return EXIT_OK


def _cmd_sweep(args: argparse.Namespace) -> int:
    from vggtrain.sweep import run_sweep

    run_sweep(args.config, args.overrides, args.space, args.trials, args.study, args.storage,
              args.prune_from)
    return EXIT_OK


def _cmd_seeds(args: argparse.Namespace) -> int:
    from vggtrain.sweep import format_seeds, run_seeds

    if args.target is not None and not 0 < args.target <= 1:
        raise UserError(f"usage error: --target is an accuracy in (0, 1], got {args.target}")
    if args.json:
        check_output_writable(args.json)
    import contextlib

    # With --json -, stdout is the JSON's alone: the runs' progress goes to stderr.
    quiet = contextlib.redirect_stdout(sys.stderr) if args.json == "-" else contextlib.nullcontext()
    with quiet:
        summary = run_seeds(args.config, args.overrides, args.seeds, args.first_seed, args.target)
    if args.json != "-":
        print(format_seeds(summary), end="")
    if args.json:
        write_output(args.json, json.dumps(summary, indent=2) + "\n")
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
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k + ':':<16}{v}")
    return EXIT_OK


def _cmd_fit(args: argparse.Namespace) -> int:
    from vggtrain.checkpoint import load_checkpoint
    from vggtrain.config import check_resume_changes, check_run_name, config_with_overrides, load_config
    from vggtrain.fit import fit

    extra = list(args.overrides)
    if args.name is not None:
        extra.append(f"name={json.dumps(args.name)}")
    if args.device is not None:
        extra.append(f"train.device={json.dumps(args.device)}")
    if args.resume is not None and args.force:
        raise UserError("usage error: --resume and --force exclude each other")

    resume = None
    if isinstance(args.resume, str):
        if args.config is not None:
            raise UserError("usage error: --resume RUN_DIR continues with the run's own config; "
                            "drop --config (change what a resume may change with --set)")
        ckpt = Path(args.resume)
        ckpt = ckpt / "last.pt" if ckpt.is_dir() else ckpt
        resume = (ckpt, load_checkpoint(ckpt))
        cfg = config_with_overrides(resume[1]["config"], str(ckpt), extra, stored=True)
        run_dir = ckpt.parent
    else:
        if args.config is None:
            raise UserError("usage error: fit needs --config (or --resume RUN_DIR)")
        cfg = load_config(args.config, extra)
        run_dir = Path(cfg.train.out_dir) / str(cfg.name)
        if not args.resume:
            check_run_name(cfg, args.config)
        else:  # --resume with --config: a run that already has this name goes on under it
            last = run_dir / "last.pt"
            if not last.is_file():
                raise UserError(f"nothing to resume: {last} does not exist")
            resume = (last, load_checkpoint(last))
    if resume is not None:
        check_resume_changes(resume[1]["config"], cfg, "--resume")
    fit(cfg, run_dir, resume=resume, force=args.force)
    return EXIT_OK


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _device(text: str) -> str:
    if not DEVICE_RE.match(text):
        raise argparse.ArgumentTypeError(f"expected {DEVICE_RULE}, got {text!r}")
    return text


def _run_name(text: str) -> str:
    if not RUN_NAME_RE.match(text):
        raise argparse.ArgumentTypeError(f"a run name is {RUN_NAME_RULE}, got {text!r}")
    return text


def check_output_writable(out: str) -> None:
    """Refuse an output path write_output would fail on, before hours of work and without
    touching a file already there ('-' is stdout)."""
    import tempfile

    if out == "-":
        return
    path = Path(out)
    try:
        if path.is_dir():
            raise IsADirectoryError(21, "Is a directory")
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as e:
        raise UserError(f"--json {out}: cannot write it ({e.strerror or e})") from None


def write_output(out: str, text: str) -> None:
    """Write a command's --json file atomically ('-' means stdout); a failure is a UserError."""
    from vggtrain.checkpoint import atomic_write_text

    if out == "-":
        sys.stdout.write(text)
        return
    try:
        atomic_write_text(Path(out), text)
    except OSError as e:
        if e.errno in STORAGE_ERRNOS:
            raise WriteError.of(e, out) from None
        raise UserError(f"--json {out}: cannot write it ({e.strerror or e})") from None


def _cmd_eval(args: argparse.Namespace) -> int:
    from vggtrain.evaluate import evaluate_checkpoint
    from vggtrain.report import format_text, report_json

    report = evaluate_checkpoint(args.ckpt, args.split, args.data_root, args.batch_size, args.device,
                                 args.tta)
    if args.json != "-":
        print(format_text(report), end="")
    if args.json is not None:
        write_output(args.json, report_json(report))
    return EXIT_OK


def _cmd_predict(args: argparse.Namespace) -> int:
    from vggtrain.device import select_device
    from vggtrain.inference import load_model, resolve_checkpoint
    from vggtrain.predict import format_predictions, predict_files, predictions_json

    device = select_device(args.device)
    loaded = load_model(resolve_checkpoint(args.ckpt), device)
    results, errors = predict_files(loaded, args.images, device, args.topk)
    for e in errors:
        print(f"vggtrain: {shown(e['error'])}", file=sys.stderr)
    if args.json != "-":
        print(format_predictions(results), end="")
    if args.json is not None:
        write_output(args.json, json.dumps(predictions_json(loaded, results, errors, args.topk), indent=2)
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
        print(line)
    for e in errors:
        print(f"vggtrain: {shown(e)}", file=sys.stderr)
    return EXIT_USAGE if errors else EXIT_OK


def _cmd_summary(args: argparse.Namespace) -> int:
    from vggtrain.config import load_config
    from vggtrain.summary import format_summary, summarize

    cfg = load_config(args.config, args.overrides)
    print(format_summary(cfg.model, summarize(cfg.model)), end="")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None and args.command in ALLOCATOR_COMMANDS:
        # Only as the program itself (never inside a caller's process), and before torch loads.
        from vggtrain.allocator import reexec_with_fast_allocator

        reexec_with_fast_allocator()
    command = {"fit": _cmd_fit, "eval": _cmd_eval, "predict": _cmd_predict, "gradcam": _cmd_gradcam,
               "summary": _cmd_summary, "bench": _cmd_bench, "info": _cmd_info,
               "export": _cmd_export, "runs": _cmd_runs, "sweep": _cmd_sweep,
               "seeds": _cmd_seeds}[args.command]
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


def run_reporting_errors(prog: str, command: Callable[[], int]) -> int:
    """Run a command; turn this project's errors into one line on stderr and the exit code
    (2 usage/config/data, 74 a write the filesystem refused, 128 + the signal's number for a stop:
    130 Ctrl-C, 143 SIGTERM; 1 with a traceback for a bug)."""
    try:
        return command()
    except UserError as e:
        rank = os.environ.get("RANK", "0")
        print(f"{prog}{'' if rank == '0' else f' [rank {rank}]'}: {e}", file=sys.stderr)
        return e.exit_code
    except RunStopped as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank stops; one says so
            print(f"{prog}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:
        traceback.print_exc()
        print(f"{prog}: unexpected failure (the traceback above is a bug report)", file=sys.stderr)
        return EXIT_FAILURE
