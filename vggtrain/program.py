"""What every vggtrain program shares (the `vggtrain` command, `python -m vggtrain.synthetic`, the
scripts): the exit codes, the one-line error wrapper, argparse's types and the one `--json`.

Exit codes: 0 ok, 2 bad input, 1 unexpected, 74 a write the filesystem refused (full disk),
130 Ctrl-C, 143 SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from vggtrain.atomic import atomic_write_text
from vggtrain.errors import STORAGE_ERRNOS, RunStopped, UserError, WriteError, os_reason, shown

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_WRITE = 0, 1, 2, 130, 74
STDOUT = "-"  # --json's PATH for standard output


def run_reporting_errors(prog: str, command: Callable[[], int]) -> int:
    """Run a command; turn this project's errors into one line on stderr and the exit code
    (2 usage/config/data, 74 a write the filesystem refused, 128 + the signal's number for a stop:
    130 Ctrl-C, 143 SIGTERM; 1 with a traceback for a bug)."""
    try:
        with shown_warnings():
            return command()
    except UserError as e:
        rank = os.environ.get("RANK", "0")
        print(f"{prog}{'' if rank == '0' else f' [rank {rank}]'}: {e}", file=sys.stderr)
        return e.exit_code
    except RunStopped as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank stops; one says so
            print(f"{prog}: {shown(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:
        traceback.print_exc()
        print(f"{prog}: unexpected failure (the traceback above is a bug report)", file=sys.stderr)
        return EXIT_FAILURE


@contextlib.contextmanager
def shown_warnings() -> Iterator[None]:
    """Python warnings, shown escaped while a command runs: a warning's text often names a path
    (a run directory, a cache file) that may hold a terminal's escape sequences. Python's own
    format, the message part through errors.shown."""
    plain = warnings.formatwarning

    def escaped(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                line: str | None = None) -> str:
        return plain(shown(message), category, filename, lineno, line)

    warnings.formatwarning = escaped  # type: ignore[assignment]
    try:
        yield
    finally:
        warnings.formatwarning = plain


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_json_option(parser: argparse.ArgumentParser, what: str, default: str | None = None) -> None:
    """--json [PATH], the one meaning it has in every command: write `what` as JSON to PATH; '-',
    or the flag alone, prints only the JSON to stdout (the text output is then left out)."""
    where = f" (default: {default})" if default else ""
    parser.add_argument("--json", nargs="?", const=STDOUT, default=default, metavar="PATH",
                        help=f"write {what} as JSON to PATH{where}; '-' or no PATH: print only the "
                             f"JSON, to stdout")


def json_only(out: str | None) -> bool:
    """Whether --json took stdout, which the JSON then has to itself."""
    return out == STDOUT


def check_output_writable(out: str, option: str = "--json") -> None:
    """Refuse an output path write_output would fail on, before hours of work and without
    touching a file already there ('-' is stdout); option: the one that named it, for the message."""
    import tempfile

    if json_only(out):
        return
    path = Path(out)
    try:
        if path.is_dir():
            raise IsADirectoryError(21, "Is a directory")
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as e:
        raise UserError(f"{option} {out}: cannot write it ({os_reason(e)})") from None


def write_output(out: str, text: str) -> None:
    """Write a command's --json file atomically ('-' means stdout); a failure is a UserError."""
    if json_only(out):
        sys.stdout.write(text)
        return
    try:
        atomic_write_text(Path(out), text)
    except OSError as e:
        if e.errno in STORAGE_ERRNOS:
            raise WriteError.of(e, out) from None
        raise UserError(f"--json {out}: cannot write it ({os_reason(e)})") from None
