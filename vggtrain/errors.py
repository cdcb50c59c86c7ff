"""Errors that are the user's to fix: the CLI prints them as one line and exits 2 (74 when the
filesystem refused a write)."""

import errno
from typing import IO


def _escapes() -> dict[int, str]:
    table = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}  # C0, DEL, C1 controls
    table.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})
    # Bidirectional overrides and isolates reorder what a terminal shows ("Trojan Source").
    table.update({c: f"\\u{c:04x}" for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))})
    # Lone surrogates: os.fsdecode's surrogateescape spells an undecodable byte 0xNN as U+DCNN.
    table.update({c: f"\\u{c:04x}" for c in range(0xD800, 0xE000)})
    table.update({c: f"\\x{c - 0xDC00:02x}" for c in range(0xDC80, 0xDD00)})
    return table


_ESCAPES = _escapes()


def shown(text: object) -> str:
    """text as it may reach a terminal: one line, control characters (escape sequences among them)
    and bidirectional overrides escaped, an undecodable byte of a file name as \\xNN. It also
    encodes as UTF-8, which a lone surrogate would not."""
    return str(text).translate(_ESCAPES)


def shown_lines(text: object) -> str:
    """Text of several lines (a table, a report) as it may reach a terminal: each line as shown
    makes it, the line breaks kept."""
    return "\n".join(shown(line) for line in str(text).split("\n"))


class ShownStream:
    """A text stream that passes what a library prints (torchvision's "Downloading URL to PATH")
    on to target through shown_lines."""

    def __init__(self, target: "IO[str]") -> None:
        self.target = target

    def write(self, text: str) -> int:
        self.target.write(shown_lines(text))
        return len(text)

    def flush(self) -> None:
        self.target.flush()


def _one_line(message: str) -> str:
    # The contract is one line, safe for a terminal: what a key, a value or a path smuggled in
    # (a newline, an escape sequence, a byte that is not UTF-8) is escaped.
    return shown(message)


def os_reason(e: BaseException) -> str:
    """Why an OSError failed, for a one-line message that names the file itself: its strerror
    ("Permission denied") without the "[Errno 13]" and the path str(e) adds; str(e) when it has
    none (an OSError raised with a message only)."""
    return getattr(e, "strerror", None) or str(e)


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
        return cls(f"cannot write {where}: {os_reason(e)}{hint}")
