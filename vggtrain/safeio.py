"""The one boundary for files that someone else may have written: configs and `--set` values,
sweep spaces, a run's status.json, report.json and config.yaml, earlier seeds' reports, label-name
files, images (images.read_image opens them here) and the folder cache (file_kind before
torch.load maps it).

Every reader here opens regular files only, and without blocking: a FIFO would hang the reader
for good and /dev/zero (or a symlink to it) would fill the memory. A size limit is checked before
a byte is read and enforced while reading (a file may grow). YAML goes through PyYAML's safe
loader with limits on nesting, on alias uses and on integers' length (BoundedLoader); JSON
through `json`, with its fields' types checked by `field`. Each failure is the caller's one-line
UserError subclass naming the file. quiet_decoding keeps decoders' chatter off the terminal.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import stat
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import IO, Any

import yaml

from vggtrain.errors import UserError, first_line, os_reason

MiB = 1 << 20
TEXT_LIMIT = 1 * MiB  # a config, a sweep space, status.json: a few KB each
REPORT_LIMIT = 64 * MiB  # report.json: per-class rows and a confusion matrix, 100,000 classes at most
IMAGE_LIMIT = 1 << 30  # an image file; Pillow bounds its pixels (MAX_IMAGE_PIXELS) on top
YAML_MAX_DEPTH = 32  # a config is 3 levels deep
YAML_MAX_ALIASES = 1000  # uses of anchors; a config may use a few
YAML_MAX_INT_CHARS = 100  # the largest integer of ours, a seed below 2**63, has 19 digits
YAML_MAX_NODES = 100_000  # values once every alias is expanded; a config has about a hundred

ErrorType = Callable[[str], UserError]


def file_kind(mode: int) -> str | None:
    """What a file that is not a regular file is, for the message; None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "not a regular file"


def open_regular(path: str | os.PathLike, error: ErrorType = UserError, label: object = None,
                 limit: int | None = None) -> IO[bytes]:
    """A regular file opened for reading (buffered), or error naming it. Devices, FIFOs and
    sockets are refused from a stat before they are opened (opening some devices acts), and
    again from the open file itself, which O_NONBLOCK keeps from waiting on a FIFO's writer.
    limit: refuse a larger file."""
    label = path if label is None else label
    try:
        kind = file_kind(os.stat(path).st_mode)
        if kind is None:
            flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
            fd = os.open(path, flags)
            try:
                st = os.fstat(fd)
                kind = file_kind(st.st_mode)  # swapped for something else since the stat
            except BaseException:
                os.close(fd)
                raise
            if kind is not None:
                os.close(fd)
    except FileNotFoundError:
        raise error(f"{label}: no such file") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise error(f"{label}: cannot read it ({os_reason(e)})") from None
    if kind is not None:
        raise error(f"{label}: {kind}, not a regular file")
    if limit is not None and st.st_size > limit:
        os.close(fd)
        raise error(f"{label}: {st.st_size:,} bytes, more than such a file may hold ({limit:,})")
    return os.fdopen(fd, "rb")


def read_bytes(path: str | os.PathLike, limit: int, error: ErrorType = UserError,
               label: object = None) -> bytes:
    """The whole of a regular file of at most limit bytes."""
    label = path if label is None else label
    with open_regular(path, error, label, limit) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            data = f.read(size + 1)
            if len(data) > size:  # it grew since, or it is one of /proc's files, which say size 0
                data += f.read(limit + 1 - len(data))
        except OSError as e:
            raise error(f"{label}: cannot read it ({os_reason(e)})") from None
    if len(data) > limit:
        raise error(f"{label}: more than {limit:,} bytes, more than such a file may hold")
    return data


def read_text(path: str | os.PathLike, limit: int = TEXT_LIMIT, error: ErrorType = UserError,
              label: object = None) -> str:
    """A regular file of at most limit bytes, as UTF-8 text."""
    label = path if label is None else label
    data = read_bytes(path, limit, error, label)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{label}: not UTF-8 text (bad byte at offset {e.start})") from None


# --- YAML ------------------------------------------------------------------------------------------

class _Bounds:
    """Limits on top of PyYAML's safe loader (plain data only: no tag builds an object or calls
    anything): a document nested more than YAML_MAX_DEPTH levels (aliases followed), one that uses
    its anchors more than YAML_MAX_ALIASES times or holds an alias inside the value it names, one
    of more than YAML_MAX_NODES values once its aliases are expanded (what any caller that walks
    the data, or writes it out as JSON, would meet: a "billion laughs" stays a few shared lists
    in memory but is a billion values to a walk), and
    an integer of more than YAML_MAX_INT_CHARS characters are refused. A date reads as the text it
    is: YAML 1.2 has no timestamps and no value of ours is a date, so where a number is expected it
    is refused as text, not taken for a datetime."""

    def construct_document(self, node: yaml.Node) -> Any:
        _check_graph(node)  # before anything is built from it
        return super().construct_document(node)  # type: ignore[misc]

    def construct_bounded_int(self, node: yaml.ScalarNode) -> int:
        if len(node.value) > YAML_MAX_INT_CHARS:  # a ValueError, as Python's own digit limit is
            raise ValueError(f"an integer of {len(node.value):,} characters at line "
                             f"{node.start_mark.line + 1}, more than {YAML_MAX_INT_CHARS}")
        return self.construct_yaml_int(node)  # type: ignore[attr-defined]


class BoundedLoader(_Bounds, yaml.SafeLoader):
    """yaml.safe_load's loader, bounded."""


class FastBoundedLoader(_Bounds, getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """The same on libyaml's parser where present (10x faster: `vggtrain runs` reads a hundred
    runs' files), whose own nesting limit answers before Python's recursion limit would."""


for _loader in (BoundedLoader, FastBoundedLoader):
    _loader.add_constructor("tag:yaml.org,2002:int", _Bounds.construct_bounded_int)
    _loader.add_constructor("tag:yaml.org,2002:timestamp", yaml.SafeLoader.construct_yaml_str)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_graph(root: yaml.Node) -> None:
    """The composed document's depth and size (aliases followed, each use counted) and anchor
    uses, each node visited once and without recursion: expanding the aliases of a "billion
    laughs" file (a few hundred bytes) would never end, and PyYAML itself limits none of these."""
    height: dict[int, int] = {}  # id(node) -> levels below and including it
    size: dict[int, int] = {}  # id(node) -> values below and including it, aliases expanded
    on_path: set[int] = set()
    aliases = 0
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            on_path.discard(key)
            height[key] = 1 + max((height[id(c)] for c in _children(node)), default=0)
            if height[key] > YAML_MAX_DEPTH:
                raise yaml.constructor.ConstructorError(
                    None, None, f"nested more than {YAML_MAX_DEPTH} levels deep", node.start_mark)
            size[key] = 1 + sum(size[id(c)] for c in _children(node))
            if size[key] > YAML_MAX_NODES:
                raise yaml.constructor.ConstructorError(
                    None, None, f"more than {YAML_MAX_NODES:,} values once its aliases are expanded",
                    node.start_mark)
        elif key in height:  # met before: an alias
            aliases += 1
            if aliases > YAML_MAX_ALIASES:
                raise yaml.constructor.ConstructorError(
                    None, None, f"more than {YAML_MAX_ALIASES} aliases", node.start_mark)
        elif key in on_path:
            raise yaml.constructor.ConstructorError(
                None, None, "an alias inside the value it names", node.start_mark)
        else:
            on_path.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node))


def yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error's problem and where it is, on one line."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or first_line(e)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def load_yaml(text: str, error: ErrorType = UserError, label: object = "YAML", fast: bool = False) -> Any:
    """Plain data from YAML text, through BoundedLoader (FastBoundedLoader with fast). Aliases
    still share their values: the caller checks each value's type before it walks it."""
    try:
        return yaml.load(text, Loader=FastBoundedLoader if fast else BoundedLoader)  # noqa: S506
    except yaml.YAMLError as e:
        raise error(f"{label}: invalid YAML: {yaml_problem(e)}") from None
    except RecursionError:
        raise error(f"{label}: invalid YAML: nested too deeply") from None
    except (ValueError, OverflowError) as e:  # a bad timestamp or base-60 number, text not UTF-8
        raise error(f"{label}: invalid YAML: a value cannot be read ({first_line(e)})") from None


def read_yaml(path: str | os.PathLike, limit: int = TEXT_LIMIT, error: ErrorType = UserError,
              label: object = None, fast: bool = False) -> Any:
    label = path if label is None else label
    return load_yaml(read_text(path, limit, error, label), error, label, fast)


# --- JSON ------------------------------------------------------------------------------------------

def read_json(path: str | os.PathLike, limit: int = TEXT_LIMIT, error: ErrorType = UserError,
              label: object = None) -> Any:
    """Plain data from a JSON file; take its values with `field`."""
    label = path if label is None else label
    text = read_text(path, limit, error, label)
    try:
        return json.loads(text)
    except RecursionError:
        raise error(f"{label}: not valid JSON (nested too deeply)") from None
    except ValueError as e:  # bad JSON, an integer past Python's digit limit
        raise error(f"{label}: not valid JSON ({first_line(e)})") from None


def finite_number(v: Any) -> bool:
    """An int or float (not a bool) that is finite as a float."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:  # an integer of thousands of digits
        return False


_KINDS: dict[str, Callable[[Any], bool]] = {
    "number": finite_number,
    "fraction": lambda v: _KINDS["number"](v) and 0 <= v <= 1,
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "mapping": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}


def field(data: Any, key: str, kinds: str, error: ErrorType = UserError, label: object = "JSON") -> Any:
    """data's value at a dotted key, which must be one of kinds ("number", "fraction", "integer",
    "string", "mapping", "null", joined by "|"); a missing key reads as null. A handful of typed
    fields per file: jsonschema would be a dependency for what these few lines do."""
    value = data
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    wanted = kinds.split("|")
    if not any(_KINDS[k](value) for k in wanted):
        what = " or ".join("null" if k == "null" else f"a {k}" if k != "integer" else "an integer"
                           for k in wanted)
        raise error(f"{label}: {key} must be {what}")
    return value


# --- decoders --------------------------------------------------------------------------------------

_quiet = threading.local()  # how deep in quiet_decoding this thread is


@contextlib.contextmanager
def quiet_decoding() -> Iterator[None]:
    """Keep a decoder's own chatter off the terminal while files decode: Python warnings
    (Pillow's DecompressionBombWarning, "Corrupt EXIF data", ...), Pillow's log records, and what
    C libraries (libtiff) write straight to file descriptor 2, which only a redirection of that
    descriptor reaches. What goes wrong is the exception, which the caller turns into one line.
    Nested, it costs nothing: a dataset's decode is quieted once for all its images."""
    depth = getattr(_quiet, "depth", 0)
    if depth:
        _quiet.depth = depth + 1
        try:
            yield
        finally:
            _quiet.depth = depth
        return
    pil_log = logging.getLogger("PIL")
    level = pil_log.level
    saved = null = None
    with contextlib.suppress(OSError, ValueError, AttributeError):  # no fd 2, no sys.stderr
        sys.stderr.flush()
    try:
        try:
            saved = os.dup(2)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 2)
        except OSError:
            pass  # then the chatter shows, nothing worse
        pil_log.setLevel(logging.CRITICAL + 1)
        _quiet.depth = 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        _quiet.depth = 0
        pil_log.setLevel(level)
        if saved is not None:
            os.dup2(saved, 2)
            os.close(saved)
        if null is not None:
            os.close(null)


__all__ = ["open_regular", "read_bytes", "read_text", "read_yaml", "load_yaml", "read_json", "field",
           "quiet_decoding", "file_kind", "finite_number", "yaml_problem", "BoundedLoader",
           "FastBoundedLoader"]


def sha256_of(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB blocks (OSError as open raises it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
