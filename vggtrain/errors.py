"""Errors that are the user's to fix: the CLI prints them as one line and exits 2 (74 when the
filesystem refused a write)."""

import errno


def _one_line(message: str) -> str:
    # The contract is one line: a newline smuggled in through a key, a value or a path is escaped.
    return message.replace("\r", "\\r").replace("\n", "\\n")


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (or its type's name), for a one-line report."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


class UserError(Exception):
    """Bad input (usage, config, data, checkpoint). Its message is the whole report."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(_one_line(message))


class ConfigError(UserError):
    def __init__(self, message: str) -> None:
        super().__init__(f"config error: {message}")


class DataError(UserError):
    def __init__(self, message: str) -> None:
        super().__init__(f"data error: {message}")


class CheckpointError(UserError):
    def __init__(self, message: str) -> None:
        super().__init__(f"checkpoint error: {message}")


class RunStopped(Exception):
    """A run that ended early on purpose (a signal, a diverged loss): one line, its own exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# A full disk, a quota, a read-only or failing filesystem: the machine's to fix, not a bug.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO})


class WriteError(UserError):
    """The filesystem refused a write (sysexits' EX_IOERR): one line naming the file and the cause;
    everything written before it stays whole (every file is written to a temp file and renamed)."""

    exit_code = 74

    @classmethod
    def of(cls, e: OSError, fallback: object, hint: str = "") -> "WriteError":
        where = e.filename if e.filename is not None else fallback
        return cls(f"cannot write {where}: {e.strerror or e}{hint}")
