"""`vggtrain runs`: one row per run directory, from the small files runs write (status.json at
every checkpoint, by rundir.write_status; report.json at the end; config.yaml for runs older than
status.json); no checkpoint is opened, so a hundred runs list in well under a second. A directory
that is not a run is passed over; a run whose files are half-written or foreign shows what could
be read."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from vggtrain.errors import UserError, shown
from vggtrain.rundir import STATUS_FILE
from vggtrain.safeio import REPORT_LIMIT, TEXT_LIMIT, read_json, read_yaml

COLUMNS = ("name", "arch", "params", "epochs", "best_val", "test_top1", "test_ece", "time_s",
           "precision", "device", "status")
OPTIONAL_COLUMNS = ("corr_acc",)  # shown only when a run has one: eval --corruptions --out RUN_DIR
SORT_KEYS = COLUMNS + OPTIONAL_COLUMNS
STATES = ("finished", "stopped", "running", "diverged")


def _read_json(path: Path, limit: int) -> dict[str, Any] | None:
    if not os.path.lexists(path):
        return None
    try:
        data = read_json(path, limit)  # a FIFO, /dev/zero or a huge file is passed over, not read
    except UserError:
        return None
    return data if isinstance(data, dict) else None


def _read_config(path: Path) -> dict[str, Any] | None:
    if not os.path.lexists(path):
        return None
    try:
        data = read_yaml(path, fast=True)  # libyaml's parser where present: 10x faster
    except UserError:
        return None
    return data if isinstance(data, dict) else None


def is_locked(path: Path) -> bool:
    """Whether a live fit holds the run directory's lock (rundir.lock_run_dir). A shared probe that
    lets go at once, so it never holds a starting run off for longer than the call."""
    try:
        import fcntl
    except ImportError:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing drops the probe's own lock
    return False


def _get(d: dict[str, Any] | None, *keys: str) -> Any:
    for key in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def _number(value: Any) -> float | None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        number = float(value)  # an integer of thousands of digits overflows
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _text(value: Any) -> str | None:
    """A string column's value: what a run wrote, as text. A foreign file may hold anything: only a
    scalar is shown (a YAML alias may stand for billions of values, which str() would write out)."""
    if isinstance(value, str):
        return value[:40]
    return str(value)[:40] if isinstance(value, (int, float)) and abs(value) < 1e40 else None


def run_row(path: Path, name: str) -> dict[str, Any] | None:
    """The table row of one run directory, or None when it is not one."""
    status = _read_json(path / STATUS_FILE, TEXT_LIMIT)
    report = _read_json(path / "report.json", REPORT_LIMIT)
    if (_text(_get(report, "schema")) or "").startswith("vggtrain.sweep"):
        report = None  # a study's report: its trials are the runs, one level down
    config = None
    if status is None or report is None:
        config = _read_config(path / "config.yaml")
    if status is None and report is None and config is None and not (path / "last.pt").is_file():
        return None
    config = config or _get(report, "config") or {}
    done = _number(_get(status, "epoch")) if status else _number(_get(report, "epochs"))
    planned = _number(_get(status, "epochs")) or _number(_get(config, "train", "epochs"))
    if report is not None and _get(report, "metrics", "top1") is not None:
        state = "finished"
    elif _get(status, "state") == "finished":  # a sweep's trial: its epochs ended, no test pass
        state = "finished"
    elif is_locked(path):
        state = "running"
    elif _get(status, "state") == "diverged":
        state = "diverged"
    else:
        state = "stopped"  # by a signal, or killed (its status still said running)
    row = {
        "name": name, "path": str(path),
        "arch": _text(_get(status, "arch") or _get(config, "model", "arch")),
        "params": _number(_get(status, "params")) or _number(_get(report, "parameters")),
        "epochs": [done, planned],
        "best_val": _number(_get(status, "best_val_acc")) if status else _number(_get(report, "val_acc")),
        "test_top1": _number(_get(report, "metrics", "top1")),
        "test_ece": _number(_get(report, "calibration", "ece")),  # as measured (no temperature)
        "time_s": _number(_get(report, "train_time_s")) or _number(_get(status, "train_time_s")),
        "precision": _text(_get(status, "precision") or _get(report, "precision")
                           or _get(config, "train", "precision")),
        "device": _text(_get(report, "device") or _get(status, "device") or _get(config, "train", "device")),
        "status": state,
    }
    corr_acc = _number(_get(report, "corruptions", "mean_acc"))  # a field only where a run has one
    if corr_acc is not None:
        row["corr_acc"] = corr_acc
    return row


def list_runs(root: Path, depth: int = 2) -> list[dict[str, Any]]:
    """Rows of the run directories under root, looking `depth` levels down (a sweep's trials sit
    in <out_dir>/<study>/trial-N). Hidden directories (--force's and atomic writes' temp names)
    are passed over."""
    rows: list[dict[str, Any]] = []

    def visit(path: Path, name: str, level: int) -> None:
        try:
            children = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return
        for child in children:
            label = f"{name}/{child.name}" if name else child.name
            row = run_row(child, label)
            if row is not None:
                rows.append(row)
            elif level < depth:
                visit(child, label, level + 1)

    visit(root, "", 1)
    return rows


def sort_rows(rows: list[dict[str, Any]], key: str, reverse: bool = False) -> list[dict[str, Any]]:
    """Sorted by a column; rows without a value go last either way."""
    def value(row: dict[str, Any]) -> Any:
        v = row.get(key)
        return v[0] if key == "epochs" else v

    have = [r for r in rows if value(r) is not None]
    missing = [r for r in rows if value(r) is None]
    return sorted(have, key=lambda r: (value(r), r["name"]), reverse=reverse) + missing


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "epochs":
        done, planned = value
        return f"{'-' if done is None else f'{done:g}'}/{'-' if planned is None else f'{planned:g}'}"
    if key in ("best_val", "test_top1", "test_ece", "corr_acc"):
        return f"{value:.2%}"
    if key == "params":
        return f"{value / 1e6:.2f}M"
    if key == "time_s":
        m, s = divmod(int(value), 60)
        return f"{m // 60}:{m % 60:02d}:{s:02d}"
    return str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no runs\n"
    columns = COLUMNS + tuple(c for c in OPTIONAL_COLUMNS if any(r.get(c) is not None for r in rows))
    # What a run's files and its directory's name say reaches the terminal escaped.
    cells = [list(columns)] + [[shown(_cell(k, r.get(k))) for k in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines) + "\n"
