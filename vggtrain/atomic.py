"""Files written whole or not at all: each is written to a temp file beside its place, flushed to
disk, then renamed over it, so a crash or a full disk at any instant leaves the old file or the
new one, never a torn one. Every file vggtrain writes (checkpoints, reports, status.json, the
folder cache, exported models) goes through here; it needs nothing but the standard library, so
`vggtrain runs` and the config code can use it without loading torch."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)
NEW_FILE_MODE = 0o666 & ~_UMASK  # what open() would give a new file: mkstemp's 0600 is set to this


def atomic_write(path: Path, write: Any) -> None:
    """Call write(file) on a temp file beside path, fsync it, then rename it over path.

    A crash at any instant leaves either the old file or the new one, never a torn one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, NEW_FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        os_error = _os_error_in(e)
        if os_error is None:
            raise
        if os_error.filename is None and os_error.errno is not None:
            os_error.filename = str(path)  # a failed write() names no file: name the one being written
        if os_error is e:
            raise
        # torch.save's zip writer turns a full disk into "RuntimeError: unexpected pos" while it
        # closes the archive: the OSError underneath is the cause to report.
        raise os_error from None
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def replace_together(paths: list[Path]) -> Iterator[list[Path]]:
    """Temp files beside paths (named like them, ending in the same suffix) for the block to
    write; renamed over paths, in order, only once the whole block has succeeded, else deleted.

    Files that belong together (an exported model and its description) are then never half
    written. Between the renames, each file about to be replaced but the last is first kept
    under a hard link (a backup name beside it): when a later rename fails, the ones already done
    are put back, so the old files are all there again, unchanged. Only a kill between two
    renames, moments apart, leaves the first new beside the last old, with the replaced file
    still on disk under its backup name (.NAME.*.old): put the last path, the one the others
    describe, last, and let them record its digest, and such a mix is detectable and nothing lost."""
    temps: list[Path] = []
    try:
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
            os.close(fd)
            temps.append(Path(name))
        yield list(temps)
        for tmp in temps:
            os.chmod(tmp, NEW_FILE_MODE)
            with tmp.open("rb+") as f:
                os.fsync(f.fileno())
        _rename_all(temps, paths)
        for parent in {path.parent for path in paths}:
            dir_fd = os.open(parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # make the renames themselves durable
            finally:
                os.close(dir_fd)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


def _rename_all(temps: list[Path], paths: list[Path]) -> None:
    """Rename each temp over its path; if one rename fails, the paths renamed before it get their
    old files back from the hard links taken beforehand (paths that did not exist are removed)."""
    backups: list[Path | None] = []
    try:
        for path in paths[:-1]:  # the last one's rename is the commit: nothing after it to undo
            backups.append(_hard_link_aside(path))
        done = 0
        try:
            for tmp, path in zip(temps, paths, strict=True):
                os.replace(tmp, path)
                done += 1
        except BaseException:
            for i in reversed(range(min(done, len(backups)))):
                if not _put_back(backups[i], paths[i]):
                    backups[i] = None  # not put back: it stays on disk, the old file under its name
            raise
    finally:
        for backup in backups:
            if backup is not None:
                backup.unlink(missing_ok=True)  # gone already where it was put back


def _hard_link_aside(path: Path) -> Path | None:
    """A second name for path's file beside it (None when there is no file): the rename over path
    leaves the old file reachable there. A hard link costs no copy; a filesystem without them
    gets a copy."""
    if not path.is_file():
        return None
    while True:
        backup = path.with_name(f".{path.name}.{secrets.token_hex(4)}.old")
        try:
            os.link(path, backup)
            return backup
        except FileExistsError:
            continue
        except OSError:
            fd = os.open(backup, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as dst, path.open("rb") as src:
                shutil.copyfileobj(src, dst)
            return backup


def _put_back(backup: Path | None, path: Path) -> bool:
    """Undo a rename over path: its old file back from backup, or path removed if it was new.
    False if that failed too (the rename's own error is the one reported)."""
    try:
        if backup is None:
            path.unlink(missing_ok=True)
        else:
            os.replace(backup, path)
    except OSError:
        return False
    return True


def _os_error_in(e: BaseException) -> OSError | None:
    """e itself if it is an OSError, else the first OSError it was raised while handling."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
