"""Command line: ``vggtrain fit ...``. Exit codes: 0 ok, 2 bad input, 1 unexpected, 130 Ctrl-C."""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from vggtrain import __version__
from vggtrain.errors import UserError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


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
    fit.add_argument("--name", help="run name (default: the config's name, else the file's stem)")
    fit.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps (default: train.device)")
    fit.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN_DIR_OR_CKPT",
                     help="continue from last.pt: of the run named by the config, or of the "
                          "given run directory / checkpoint (its stored config is used)")
    fit.add_argument("--force", action="store_true",
                     help="delete an existing run directory of the same name and start over")
    return parser


def _cmd_fit(args: argparse.Namespace) -> int:
    from vggtrain.checkpoint import load_checkpoint
    from vggtrain.config import config_with_overrides, load_config
    from vggtrain.train import fit

    extra = list(args.overrides)
    if args.name is not None:
        extra.append(f"name={json.dumps(args.name)}")
    if args.device is not None:
        extra.append(f"train.device={json.dumps(args.device)}")
    if args.resume is not None and args.force:
        raise UserError("usage error: --resume and --force exclude each other")

    state = None
    if isinstance(args.resume, str):
        ckpt = Path(args.resume)
        ckpt = ckpt / "last.pt" if ckpt.is_dir() else ckpt
        state = load_checkpoint(ckpt)
        cfg = config_with_overrides(state["config"], str(ckpt), extra)
        run_dir = ckpt.parent
    else:
        if args.config is None:
            raise UserError("usage error: fit needs --config (or --resume RUN_DIR)")
        cfg = load_config(args.config, extra)
        run_dir = Path(cfg.train.out_dir) / str(cfg.name)
        if args.resume:
            last = run_dir / "last.pt"
            if not last.is_file():
                raise UserError(f"nothing to resume: {last} does not exist")
            state = load_checkpoint(last)
    fit(cfg, run_dir, resume_state=state, force=args.force)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"fit": _cmd_fit}[args.command](args)
    except UserError as e:
        print(f"vggtrain: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\nvggtrain: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:
        traceback.print_exc()
        print("vggtrain: unexpected failure (the traceback above is a bug report)", file=sys.stderr)
        return EXIT_FAILURE
