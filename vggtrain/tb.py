"""TensorBoard writers: rank 0's SummaryWriter, ordered after a killed run's files, and the no-op
writer of every other rank (and of loops run without logging); and metrics.csv, the epochs'
TensorBoard scalars as a table."""

from __future__ import annotations

import csv
import io
import sys
import threading
import time
from pathlib import Path
from typing import Any

from vggtrain.atomic import atomic_write_text
from vggtrain.errors import UserError, shown
from vggtrain.safeio import REPORT_LIMIT, read_text

METRICS_FILE = "metrics.csv"
# metrics.csv's columns, in this order in every run (a cell is empty where the run has no such
# scalar: val/* with val_size 0, val/raw_* without a weight EMA); a scalar not named here gets a
# column after them, in name order.
METRICS_COLUMNS = ("step", "train/epoch", "train/loss", "train/acc", "train/lr", "train/images_per_s",
                   "val/loss", "val/acc", "val/raw_loss", "val/raw_acc")


class NullWriter:
    """A SummaryWriter whose every call does nothing."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def open_summary_writer(tb_dir: Path, purge_step: int | None) -> Any:
    """A SummaryWriter whose event file TensorBoard reads after every file already in tb_dir.

    TensorBoard reads a run's event files in name order, and a name starts with the second the
    writer opened, then the pid. A resumed writer opened within the same second as the killed
    run's (or on a machine whose clock is a little behind) can sort first: its purge is then read
    before the events it was meant to purge, and the killed run's steps land after the resumed
    ones. Waiting out that second is the only ordering the file name offers."""
    from torch.utils.tensorboard import SummaryWriter  # slow import, only needed here

    seconds = []
    for path in tb_dir.glob("events.out.tfevents.*"):
        try:
            seconds.append(int(path.name.split(".")[3]))
        except (IndexError, ValueError):
            pass  # not a name TensorBoard's writers make: it does not take part in the order
    wait = max(seconds, default=0) + 1 - time.time()
    if wait > 5:
        print(shown(f"warning: {tb_dir} has event files dated {wait:.0f} s ahead of this machine's "
                    f"clock; TensorBoard will read this run's new curves before them"), file=sys.stderr)
    elif wait > 0:
        time.sleep(wait)
    _quiet_writer_thread_errors()
    # purge_step drops events a killed run wrote after its last checkpoint: no duplicated steps.
    return NamedFileErrors(SummaryWriter(str(tb_dir), purge_step=purge_step), tb_dir)


class NamedFileErrors:
    """A SummaryWriter whose OSErrors name its event file. Its writer thread's failure (a full disk)
    surfaces at a later call as an OSError with no file name: this fills it in."""

    def __init__(self, writer: Any, tb_dir: Path) -> None:
        self._writer = writer
        # tensorboard's EventFileWriter keeps its path in a private attribute: the directory else.
        self._file = getattr(getattr(writer.file_writer, "event_writer", None), "_file_name", str(tb_dir))

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._writer, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            except OSError as e:
                if e.filename is None:
                    e.filename = self._file
                raise

        return call


def _quiet_writer_thread_errors() -> None:
    """Keep threading's traceback of a failed event-file write off stderr: the writer raises the
    same error again at its next call in the main thread, which reports it in one line."""
    previous = threading.excepthook
    if getattr(previous, "vggtrain", False):
        return

    def hook(args: Any) -> None:
        # tensorboard's writer thread class is private: matched by name
        if type(args.thread).__name__ == "_AsyncWriterThread" and issubclass(args.exc_type, OSError):
            return
        previous(args)

    hook.vggtrain = True  # type: ignore[attr-defined]
    threading.excepthook = hook


class EpochMetrics:
    """metrics.csv: one row per epoch, the scalars the epoch wrote to TensorBoard at the step it
    wrote them (rank 0's). The rows live here and the whole file is rewritten atomically at each
    epoch end, so it is never torn. A resumed run keeps the rows of the epochs its checkpoint
    holds and drops later ones (written by a run killed before that epoch's checkpoint landed):
    the epoch it redoes replaces its row, as TensorBoard's purge replaces its scalars."""

    def __init__(self, path: Path, epochs_done: int) -> None:
        self.path = path
        self.rows: list[dict[str, str]] = _read_rows(path, epochs_done) if epochs_done else []

    def add(self, step: int, scalars: dict[str, float]) -> None:
        epoch = float(scalars["train/epoch"])
        self.rows = [r for r in self.rows if float(r["train/epoch"]) < epoch]
        self.rows.append({"step": str(step), **{k: _cell(v) for k, v in scalars.items()}})
        atomic_write_text(self.path, self.text())

    def text(self) -> str:
        extra = sorted({k for r in self.rows for k in r} - set(METRICS_COLUMNS))
        out = io.StringIO()
        table = csv.DictWriter(out, [*METRICS_COLUMNS, *extra], restval="", lineterminator="\n")
        table.writeheader()
        table.writerows(self.rows)
        return out.getvalue()


def _cell(value: float) -> str:
    """A scalar as the CSV holds it: an integral one (train/epoch) as an integer, else repr's
    shortest text that reads back as the same float."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 2**53 else repr(float(value))


def _read_rows(path: Path, epochs_done: int) -> list[dict[str, str]]:
    """The rows of epochs 1..epochs_done of an earlier metrics.csv; none where there is none
    (a run from before metrics.csv existed gets rows from its resume on) or it cannot be read."""
    if not path.exists():
        return []
    try:
        rows = list(csv.DictReader(io.StringIO(read_text(path, REPORT_LIMIT))))
    except (UserError, csv.Error) as e:
        print(shown(f"warning: {e}; it restarts from this epoch"), file=sys.stderr)
        return []
    kept = []
    for row in rows:
        try:
            if float(row.get("train/epoch") or "nan") <= epochs_done:
                kept.append({k: v for k, v in row.items() if k is not None and v})
        except ValueError:
            continue  # a row the file's own writer did not write: left out
    return kept
