"""TensorBoard writers: rank 0's SummaryWriter, ordered after a killed run's files, and the no-op
writer of every other rank (and of loops run without logging)."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any


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
        print(f"warning: {tb_dir} has event files dated {wait:.0f} s ahead of this machine's "
              f"clock; TensorBoard will read this run's new curves before them", file=sys.stderr)
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
