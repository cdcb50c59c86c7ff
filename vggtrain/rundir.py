"""The run directory: never trained into by accident, deleted only on --force and only if it is a
run, and trained in by one process at a time. `RunDir` holds the order; the functions below it
are the steps. The run's status.json (its progress, for `vggtrain runs`) is written here too."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from vggtrain.atomic import atomic_write_text
from vggtrain.config import config_from_dict
from vggtrain.errors import STORAGE_ERRNOS, UserError, WriteError, os_reason, shown
from vggtrain.safeio import file_kind, read_yaml

if TYPE_CHECKING:
    from vggtrain.run import Run

# Torch is imported only inside the functions that need it: `vggtrain runs` imports this module
# for STATUS_FILE, and listing a hundred runs must not wait for torch to load.
STATUS_FILE = "status.json"  # the run's progress, rewritten at every checkpoint; runs.py reads it
# The files a resumed run rewrites (renamed over): each must be a file, or absent.
RUN_FILES = ("config.yaml", STATUS_FILE, "metrics.csv", "last.pt", "best.pt", "report.json", "report.md",
             "curves.png", "confusion_matrix.png", "misclassified.png", "reliability_diagram.png",
             "corruptions.png")


class RunDir:
    """A run's directory for the lifetime of its process (rank 0's): `claim` before any work
    (checked, locked, the resume point confirmed), `prepare` once data, config and device have
    checked out (--force deletes only now; created, locked, cleared of stale temp files,
    config.yaml written). The lock is released when the `with` block ends."""

    def __init__(self, path: Path, resume: tuple[Path, dict] | None = None, force: bool = False) -> None:
        self.path, self.resume, self.force = path, resume, force
        self.locked = False
        self._held = ExitStack()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self._held.close()

    def claim(self) -> None:
        check_run_dir(self.path, self.resume is not None, self.force)
        if self.resume is not None:
            check_run_files(self.path)
        if self.path.is_dir():
            self.locked = lock_run_dir(self.path, self._held)
            if self.locked and self.resume is not None:
                check_resume_point_unchanged(*self.resume)

    def prepare(self, config_yaml: str) -> None:
        try:
            if not self.locked and self.path.exists():
                self.claim()  # it appeared while the data loaded (the same name started twice)
            if self.force and self.resume is None and self.path.exists():
                delete_run_dir(self.path)
                self.locked = False  # the lock went with the old directory
            self.path.mkdir(parents=True, exist_ok=True)
            if not self.locked:
                self.locked = lock_run_dir(self.path, self._held)
            if self.locked:
                remove_stale_temp_files(self.path)
            atomic_write_text(self.path / "config.yaml", config_yaml)
        except OSError as e:
            if e.errno in STORAGE_ERRNOS:
                raise write_error(e, self.path) from None
            raise UserError(f"run directory {self.path}: cannot write it ({os_reason(e)})") from None


def write_error(e: OSError, run_dir: Path) -> WriteError:
    """A run's file the filesystem refused (a full disk), as one line that says how to go on."""
    then = f"vggtrain fit --resume {run_dir}" if (run_dir / "last.pt").is_file() \
        else "start it again with --force (it has no last.pt to resume from)"
    return WriteError.of(e, run_dir, f"; the files written before it are whole: free space, then {then}")


def check_run_dir(run_dir: Path, resume: bool, force: bool) -> None:
    """Refuse, before any work, to train into a used run directory by accident, or to let --force
    delete a directory that is not a run (a dataset, a home directory)."""
    try:
        str(run_dir).encode("utf-8")
    except UnicodeEncodeError:  # a byte that is not UTF-8, from argv: TensorBoard names files in UTF-8
        raise UserError(f"run directory {run_dir}: its path holds a byte that is not UTF-8, which "
                        f"TensorBoard's writer cannot name; pick another --name or train.out_dir") from None
    if resume or not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} is a file; pick another --name or train.out_dir")
    try:
        used = any(run_dir.iterdir())
    except OSError as e:
        raise UserError(f"run directory {run_dir}: cannot read it ({os_reason(e)})") from None
    if used and not force:
        raise UserError(f"run directory {run_dir} already exists: pass --resume to continue it "
                        f"or --force to delete it and start over")
    if used and not _is_run_dir(run_dir):
        raise UserError(f"--force refuses to delete {run_dir}: it holds no last.pt, best.pt or "
                        f"vggtrain config.yaml, so it is not a run directory")


def check_run_files(run_dir: Path) -> None:
    """Refuse to resume, before any work, a run whose files vggtrain rewrites are not files (a
    directory or a FIFO put in the place of metrics.csv or status.json): the first rename over it
    would fail hours later, or, for a FIFO, replace it."""
    for name in RUN_FILES:
        try:
            kind = file_kind(os.stat(run_dir / name).st_mode)
        except FileNotFoundError:
            continue  # absent (or a dangling link): written anew
        except OSError as e:
            raise UserError(f"run directory {run_dir}: cannot read {name} ({os_reason(e)})") from None
        if kind is not None:
            raise UserError(f"run directory {run_dir}: {name} is {kind}, not a file this run can rewrite; "
                            f"move it away to resume")


def _is_run_dir(path: Path) -> bool:
    """A checkpoint, or a config.yaml that is a vggtrain config (what fit writes first)."""
    if (path / "last.pt").is_file() or (path / "best.pt").is_file():
        return True
    try:  # bounded: a FIFO or a device named config.yaml is no run's
        config_from_dict(read_yaml(path / "config.yaml"), "config.yaml", stored=True)
    except UserError:
        return False
    return True


def delete_run_dir(run_dir: Path) -> None:
    """--force: move the run aside in one rename, then delete it. A delete that fails halfway
    (a signal, a file it may not remove) then cannot leave a run directory without its
    checkpoints, which neither --resume nor --force would accept."""
    aside = None
    try:
        aside = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.deleting-", dir=run_dir.parent))
        os.replace(run_dir, aside / run_dir.name)
    except OSError as e:
        if aside is not None:
            aside.rmdir()
        raise UserError(f"--force: cannot delete {run_dir} ({os_reason(e)})") from None
    try:
        shutil.rmtree(aside)
    except OSError as e:
        warnings.warn(shown(f"--force: {run_dir} is gone, but deleting its files in {aside} failed "
                            f"({os_reason(e)}); remove that directory by hand"), stacklevel=2)


def lock_run_dir(run_dir: Path, held: ExitStack) -> bool:
    """Lock run_dir until held closes (True), or refuse: a second process training in the same
    directory (a resume started while the stopped run is still saving, one name launched twice)
    would overwrite the other's checkpoints and curves. An flock on the directory itself: the
    kernel drops it when its process ends however it ends (SIGKILL too), so a lock never outlives
    its run and leaves no file behind. Where directories cannot be flocked (Windows, some network
    file systems) training goes on unguarded (False)."""
    try:
        import fcntl
    except ImportError:
        return False
    try:
        fd = os.open(run_dir, os.O_RDONLY)
    except OSError as e:
        raise UserError(f"run directory {run_dir}: cannot read it ({os_reason(e)})") from None
    try:
        for wait in (0.05, 0.2, 0):  # `vggtrain runs` probes the lock for an instant: outwait it
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not wait:
                    raise
                time.sleep(wait)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"run directory {run_dir} is in use by another vggtrain process; wait for "
                        f"it to end, or stop it, then run this again") from None
    except OSError:
        os.close(fd)
        return False
    held.callback(os.close, fd)
    return True


def check_resume_point_unchanged(path: Path, state: dict) -> None:
    """Refuse a resume whose checkpoint was saved again after it was read: the run's previous
    process was still finishing its last save when this one started, and training on from the
    older state would overwrite the newer one."""
    from vggtrain.checkpoint import load_checkpoint

    now = load_checkpoint(path, mmap=True)  # its counters only: no need to read the tensors
    if (now.get("epoch"), now.get("global_step")) != (state.get("epoch"), state.get("global_step")):
        raise UserError(f"{path} was saved again while this resume read it (its previous process "
                        f"was still ending); run this again to continue from the newer state")


def remove_stale_temp_files(run_dir: Path) -> None:
    """Delete the temp files of atomic writes that a SIGKILL cut short (a checkpoint's can be
    hundreds of MB). Call it only under the run's lock: no other process is writing one."""
    for name in ("last.pt", "best.pt"):  # only fit's own: the directory may hold others' temp files
        for path in run_dir.glob(f".{name}.*.tmp"):
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass  # only a cleanup: a file it may not delete does not stop the run


def write_status(run: Run, state: str) -> None:
    """The run's progress beside its checkpoints, for `vggtrain runs` (rank 0 only); state:
    running, stopped, diverged or finished."""
    write_status_text(run.dir, status_text(run, state))


def write_status_text(run_dir: Path, text: str) -> None:
    """status.json with text made earlier (status_text): the loop takes it at the epoch's end
    and the checkpoint thread writes it after the checkpoints."""
    atomic_write_text(run_dir / STATUS_FILE, text)


def status_text(run: Run, state: str) -> str:
    """status.json's content for the run as it is now."""
    from vggtrain.model import count_parameters

    cfg = run.cfg
    status = {"name": cfg.name, "arch": cfg.model.arch, "params": count_parameters(run.model),
              "epoch": run.epoch, "epochs": cfg.train.epochs, "global_step": run.global_step,
              "best_val_acc": run.best_acc if cfg.data.val_size and run.best_acc >= 0 else None,
              "best_epoch": run.best_epoch, "train_time_s": round(run.train_time_s, 1),
              "precision": cfg.train.precision, "device": str(run.device),
              "world_size": run.dist.world, "state": state, "pid": os.getpid(),
              "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if run.tracking:  # log.mlflow's run, to find it in the MLflow UI
        status["mlflow_run_id"] = run.tracking.get("mlflow_run_id")
    return json.dumps(status, indent=1) + "\n"
