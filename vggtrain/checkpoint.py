"""Checkpoints: one dict (model, optimizer, scheduler, epoch, config, ...) written atomically
(atomic.py) and read back with ``weights_only=True``, so a checkpoint can never run code."""

from __future__ import annotations

import os
import pickle
import threading
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vggtrain.atomic import atomic_write
from vggtrain.config import ModelConfig
from vggtrain.errors import CheckpointError, first_line, os_reason
from vggtrain.model import build_model
from vggtrain.safeio import file_kind


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


class CheckpointWriter:
    """Saves checkpoints off the training loop's critical path, as torch.save's files written
    by a background thread: save() snapshots the state (every tensor copied: a GPU's into
    reusable pinned host buffers, asynchronously, behind the step that produced them; a CPU's
    cloned) and returns; the thread then writes the files in the order given, each atomically.
    At most one save is in flight: the next save(), and wait(), first wait for it and raise what
    it raised (a full disk), so a failure is never lost, only reported one save later."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._pinned: list[torch.Tensor] = []  # reused by the next snapshot: one save in flight

    def save(self, paths: list[Path], state: dict[str, Any],
             write: Callable[[Path, dict[str, Any]], None] = save_checkpoint,
             then: Callable[[], None] | None = None) -> None:
        """then: called on the writer's thread once the files are written (status.json)."""
        self.wait()
        snapshot, copied = self._snapshot(state)
        self._thread = threading.Thread(target=self._write, args=(paths, snapshot, copied, write, then),
                                        name="vggtrain-checkpoint", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Until the save in flight (if any) is on disk; re-raises its failure."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def _write(self, paths: list[Path], snapshot: dict[str, Any], copied: Any,
               write: Callable[[Path, dict[str, Any]], None], then: Callable[[], None] | None) -> None:
        try:
            if copied is not None:
                copied.synchronize()  # the device-to-host copies have landed
            for path in paths:
                write(path, snapshot)
            if then is not None:
                then()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread by wait()
            self._failure = e

    def _snapshot(self, state: Any) -> tuple[Any, Any]:
        gpu: list[torch.Tensor] = []

        def copy(t: torch.Tensor) -> torch.Tensor:
            if t.device.type != "cuda":
                return t.detach().to("cpu", copy=True)
            i = len(gpu)
            if i >= len(self._pinned) or self._pinned[i].shape != t.shape or self._pinned[i].dtype != t.dtype:
                del self._pinned[i:]
                self._pinned.append(torch.empty(t.shape, dtype=t.dtype, pin_memory=True))
            gpu.append(self._pinned[i].copy_(t.detach(), non_blocking=True))
            return gpu[-1]

        snapshot = _map_tensors(state, copy)
        copied = None
        if gpu:
            copied = torch.cuda.Event()
            copied.record()
        return snapshot, copied


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


def _check_container(path: Path) -> None:
    """Name plainly a file that is not a torch.save archive at all, or one cut short: torch's own
    errors for these read "invalid load key" or "[Errno 22] Invalid argument"."""
    size = path.stat().st_size
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":  # torch.save writes a zip archive
        what = "an empty file" if size == 0 else "not a zip archive, as torch.save writes"
        raise CheckpointError(f"{path}: not a checkpoint ({what})")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: truncated or damaged checkpoint (the end of its zip archive is "
                              f"missing; {size:,} bytes)")
    # torch.save stores its entries as they are. A compressed one could declare any size (a few KB
    # that inflate to terabytes), and torch.load allocates what an entry declares before reading it.
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError) as e:
        raise CheckpointError(f"{path}: damaged checkpoint ({first_line(e)})") from None
    for entry in entries:
        if entry.compress_type != zipfile.ZIP_STORED or entry.file_size > size:
            raise CheckpointError(f"{path}: not a checkpoint as torch.save writes one (its entry "
                                  f"{entry.filename[:100]!r} is compressed or larger than the file)")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint written by save_checkpoint. Raises CheckpointError on anything else.

    mmap: map the tensors from the file instead of reading them (a look at a few keys)."""
    path = Path(path)
    if not path.is_file():  # a FIFO would hang torch.load, a device would never end
        kind = file_kind(os.stat(path).st_mode) if path.exists() else None
        raise CheckpointError(f"{path}: {kind}, not a checkpoint file" if kind else f"{path}: no such file")
    try:
        _check_container(path)
    except OSError as e:  # unreadable: permissions, an I/O error
        raise CheckpointError(f"{path}: cannot read it ({os_reason(e)})") from None
    try:
        with warnings.catch_warnings():  # a refused file gets one line from us, not torch's noise
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # weights_only refuses any global it does not know, before calling it.
        lines = [ln.strip() for ln in str(e).splitlines() if "WeightsUnpickler error" in ln]
        why = lines[0].split(":", 1)[1].strip() if lines else "content other than tensors and plain data"
        raise CheckpointError(f"{path}: refused to load, it is not plain tensors and data ({why[:200]})"
                              ) from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a readable vggtrain checkpoint ({first_line(e)})") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict) \
            or not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{path}: not a vggtrain checkpoint (no model/config entries)")
    return state


def load_model_state(model: torch.nn.Module, weights: Any, path: str | Path, *, scan: bool = True) -> None:
    """load_state_dict, with a mismatch (another architecture or class count) as one clear line.
    scan=False: weights already scanned for NaN and infinity (check_weights_fit's were the same
    tensors), not read through a second time."""
    check_weight_values(model, weights, path, scan=scan)
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as e:
        # torch's message is a header line, then one line per mismatched or missing key.
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(e).__name__)
        raise CheckpointError(f"{path}: weights do not fit this model, it was saved from another "
                              f"architecture or class count ({detail[:200]})") from None


def check_weight_values(model: torch.nn.Module, weights: Any, path: str | Path, *, scan: bool = True) -> None:
    """Refuse weights that load_state_dict would quietly cast or keep: integers, booleans or
    complex numbers where the model has floats (a cast drops what they mean; complex ones warn
    and lose their imaginary part), and NaN or infinity (the model would answer NaN for every
    image). Checked only where the shapes match: a mismatch is load_state_dict's to report, and
    a tensor of absurd shape (a stride-0 view of a trillion values) is never scanned. scan=False:
    the dtypes only (a scan reads every value; the caller scanned these already)."""
    if not isinstance(weights, dict):
        return
    own = model.state_dict()
    for key, value in weights.items():
        mine = own.get(key)
        if not isinstance(value, torch.Tensor) or mine is None or value.shape != mine.shape:
            continue
        if mine.is_floating_point() and not value.is_floating_point():
            raise CheckpointError(f"{path}: {key} holds {value.dtype} values where the model has "
                                  f"{mine.dtype} weights; not a checkpoint vggtrain wrote")
        scanned = scan and value.is_floating_point() and value.device.type != "meta"
        if scanned and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{path}: {key} holds NaN or infinite values; these weights cannot "
                                  f"classify anything")


def check_weights_fit(model_cfg: ModelConfig, weights: Any, path: str | Path) -> None:
    """Refuse, before anything is allocated, a stored config whose model the checkpoint's weights
    do not fit: the model is built on the meta device (shapes only, no memory), so a config that
    declares a giant network costs nothing to check."""
    try:
        with torch.device("meta"):
            shell = build_model(model_cfg)
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: its stored config builds no model ({first_line(e)})") from None
    with warnings.catch_warnings():  # torch warns that a copy into a meta tensor does nothing: the point
        warnings.simplefilter("ignore", UserWarning)
        load_model_state(shell, weights, path)  # compares keys and shapes, copies nothing


def model_weights(state: dict[str, Any]) -> tuple[Any, str]:
    """(weights, "ema" or "raw"): what a checkpoint's model is tested and used with, the weight
    EMA's (under module.*, AveragedModel's layout, which WeightEMA keeps) where the run kept one,
    else its own."""
    ema = state.get("ema")
    if isinstance(ema, dict):
        return {k.removeprefix("module."): v for k, v in ema.items() if k.startswith("module.")}, "ema"
    return state["model"], "raw"


def stored_temperatures(state: dict[str, Any], path: str | Path) -> dict[str, float]:
    """The temperatures a checkpoint holds, one per TTA mode it was fitted under (fit stores them
    when its run has a validation split; calibration.py); {} for a checkpoint without any."""
    stored = state.get("temperature")
    if stored is None:
        return {}
    if not isinstance(stored, dict) or not all(
            isinstance(k, str) and isinstance(v, float) and 0 < v < float("inf") for k, v in stored.items()):
        raise CheckpointError(f"{path}: temperature is not a map of TTA modes to positive numbers")
    return dict(stored)


def add_temperatures(path: Path, temperatures: dict[str, float]) -> dict[str, Any]:
    """Write temperatures into the checkpoint at path (atomically, the file whole either way).
    Returns the state written, so that a caller that wants more of it need not read it again."""
    state = load_checkpoint(path)
    state["temperature"] = {mode: float(t) for mode, t in temperatures.items()}
    save_checkpoint(path, state)
    return state


def save_of(state: dict[str, Any]) -> tuple[Any, Any]:
    """(epoch, global_step): the save that wrote a checkpoint; two checkpoints of the same save
    hold the same weights."""
    return state.get("epoch"), state.get("global_step")
