"""Your own images as a dataset: ``root/train/<class>/*`` and ``root/test/<class>/*``.

Every file whose extension Pillow reads is decoded once (by images.py, as `vggtrain predict` decodes
an image: RGB, EXIF orientation applied, resized as a whole to 32x32 when it is another size) into one uint8
tensor per split, cached beside the data in ``root/.vggtrain-folder-cache.pt``. The cache is
keyed by every image's path, size and modification time, so any change to the files decodes them
again; it is written atomically and read with ``weights_only=True``. Classes are the train
directory's subdirectories in sorted order (torchvision's ImageFolder convention).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch

from vggtrain.atomic import atomic_write
from vggtrain.errors import DataError, os_reason, shown
from vggtrain.images import image_extensions, read_image, to_model_size, walk_images
from vggtrain.safeio import file_kind, quiet_decoding

IMAGE_BYTES = 3 * 32 * 32

CACHE_NAME = ".vggtrain-folder-cache.pt"
CACHE_VERSION = 1


def _scan(root: Path) -> tuple[list[str], dict[str, list[tuple[str, int, str]]]]:
    """(class names, {split: [(file, label, "size mtime")]}) in a stable order; hidden files and
    folders and files of other extensions are left out. One os.walk and one stat per file
    (60,000 files in well under a second; pathlib's rglob took seconds). Every class needs images
    in both splits: one it cannot learn or cannot be measured on is refused, not trained around."""
    train_dir, test_dir = root / "train", root / "test"
    for d in (train_dir, test_dir):
        if not d.is_dir():
            raise DataError(f"{root}: no {d.name}/ directory (data.dataset: folder expects "
                            f"{root}/train/<class>/* and {root}/test/<class>/*)")
    dirs = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    # A class's name goes into reports, checkpoints and the terminal: a directory name's control
    # characters and bytes that are not UTF-8 are escaped (os.listdir gives those as surrogates).
    classes = [shown(name) for name in dirs]
    if len(set(classes)) < len(classes):
        raise DataError(f"{train_dir}: two class directories whose names differ only in characters "
                        f"that cannot be shown; rename one")
    if len(classes) < 2:
        raise DataError(f"{train_dir}: found {len(classes)} class directories, a classifier needs at least 2")
    extensions = image_extensions()
    found: dict[str, list[tuple[str, int, str]]] = {}
    for split, d in (("train", train_dir), ("test", test_dir)):
        extra = sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")
                       and p.name not in dirs)
        if extra:
            raise DataError(f"{d}: class {extra[0]!r} is not one of train/'s {len(classes)} classes")
        files: list[tuple[str, int, str]] = []
        for label, name in enumerate(dirs):
            in_class = []
            for path in walk_images(d / name, extensions):
                st = os.stat(path)
                kind = file_kind(st.st_mode)
                if kind is not None:  # a FIFO would hang the decoder, a device would never end
                    raise DataError(f"{path}: {kind}, not an image file")
                in_class.append((path, label, f"{st.st_size} {st.st_mtime_ns}"))
            if not in_class:
                why = "an empty class cannot be learned" if split == "train" else \
                    "every class needs test images to be measured"
                raise DataError(f"{d / name}: no images of class {classes[label]!r} ({why}; add images or "
                                f"remove the class from train/)")
            files += sorted(in_class)
        found[split] = files
    return classes, found


def _cache_key(root: Path, classes: list[str], found: dict[str, list[tuple[str, int, str]]]) -> str:
    h = hashlib.sha256(f"{CACHE_VERSION}\n{classes}\n".encode())
    skip = len(str(root)) + 1
    for split, files in found.items():
        # As the file system spells the names: a byte that is not UTF-8 came in as a surrogate.
        h.update("".join(f"{split}\t{f[skip:]}\t{label}\t{stamp}\n" for f, label, stamp in files)
                 .encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _decode(files: list[tuple[Path, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.empty((len(files), 3, 32, 32), dtype=torch.uint8)
    bad: list[str] = []
    with quiet_decoding():  # once for all the images (read_image's own is then free)
        for i, (f, _) in enumerate(files):
            try:
                images[i] = to_model_size(read_image(f))
            except DataError as e:
                bad.append(str(e).removeprefix("data error: "))
    if bad:
        more = f" (and {len(bad) - 1} more unreadable images)" if len(bad) > 1 else ""
        raise DataError(f"{bad[0]}{more}")
    return images, torch.tensor([label for _, label in files], dtype=torch.int64)


def _read_cache(path: Path, key: str, classes: list[str], found: dict[str, list[tuple[str, int, str]]]
                ) -> dict | None:
    """The cache if it is exactly what decoding the scanned files would give: the same key and
    classes, uint8 images of each split's size, the labels of its files (anyone may write a file
    with the right key: its labels are checked as the dataset's would be). Anything else (damaged,
    foreign, not a regular file, larger than the images can be) is None: decoded again, replaced."""
    most = sum(len(files) for files in found.values()) * (IMAGE_BYTES + 8) + 4 * len(str(classes)) + (1 << 20)
    try:
        st = os.stat(path)
    except OSError:
        return None
    if file_kind(st.st_mode) is not None or st.st_size > most:  # not read, not even opened
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cached = torch.load(path, weights_only=True, mmap=True)  # read as the split is used
    except Exception:  # a damaged or foreign file: decode again and replace it
        return None
    if not isinstance(cached, dict) or cached.get("key") != key or cached.get("classes") != classes:
        return None
    for split, files in found.items():
        x, y = cached.get(f"{split}_images"), cached.get(f"{split}_labels")
        if not (isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.shape == (len(files), 3, 32, 32)
                and x.is_contiguous() and isinstance(y, torch.Tensor) and y.dtype == torch.int64
                and y.shape == (len(files),)
                and torch.equal(y, torch.tensor([label for _, label, _ in files], dtype=torch.int64))):
            return None
    return cached


Pair = tuple[torch.Tensor, torch.Tensor]  # uint8 images (N, 3, 32, 32), int64 labels (N,)


def load_folder(root: str | Path) -> tuple[Pair, Pair, list[str]]:
    """((train images, labels), (test images, labels), class names) of an image folder, from its
    cache when the files have not changed since it was written."""
    root = Path(root)
    classes, found = _scan(root)
    key = _cache_key(root, classes, found)
    cache = root / CACHE_NAME
    cached = _read_cache(cache, key, classes, found)
    if cached is None:
        cached = {"key": key, "classes": classes}
        for split, files in found.items():
            decoded = _decode([(Path(f), label) for f, label, _ in files])
            cached[f"{split}_images"], cached[f"{split}_labels"] = decoded
        try:
            atomic_write(cache, lambda f: torch.save(cached, f))
        except OSError as e:  # a read-only dataset still trains, decoding each time
            warnings.warn(f"{shown(cache)}: cannot write the decoded-image cache ({os_reason(e)}); "
                          f"the images will be decoded again next time", stacklevel=2)
    return ((cached["train_images"], cached["train_labels"]), (cached["test_images"], cached["test_labels"]),
            classes)
