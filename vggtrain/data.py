"""CIFAR-10 and CIFAR-100 on the training device: read, validate, split, augment in batches.

The whole split is one uint8 tensor (N, 3, 32, 32) on the device, as in Keller Jordan's
airbench: no DataLoader workers, no per-image Python. A batch is cropped and flipped with one
gather from the padded split and its mirror image, then normalised in place on the device.
"""

from __future__ import annotations

import io
import os
import pickle
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from vggtrain.config import DataConfig
from vggtrain.errors import ConfigError, DataError, ShownStream, first_line, os_reason, shown
from vggtrain.policies import PolicySpec, chunk_seed, policy_for
from vggtrain.safeio import TEXT_LIMIT, read_bytes

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
Stats = tuple[tuple[float, ...], tuple[float, ...]]  # (mean, std) per channel, fractions of 255
CIFAR10_STATS: Stats = (CIFAR10_MEAN, CIFAR10_STD)
PY_DIR, BIN_DIR = "cifar-10-batches-py", "cifar-10-batches-bin"
C100_PY_DIR, C100_BIN_DIR = "cifar-100-python", "cifar-100-binary"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCHES = ["test_batch"]
IMAGE_BYTES = 3 * 32 * 32
MAX_PER_BATCH = 10_000  # the published batch size; larger files are refused before being read
C100_TRAIN, C100_TEST = 50_000, 10_000  # CIFAR-100 keeps each split in one file
PAD = 4  # the default crop padding (data.crop_padding)
AUGMENT_CHUNK_IMAGES = 8192  # images train_batches augments at once (~25 MB of uint8)
# Under data.policy (and random erasing, which shares its path): each of a policy's kornia calls
# (12 to 30 a chunk) has a fixed cost, which a chunk twice as large halves per image; AutoAugment's
# batched path ran 1.10-1.15x as fast on the CPU (docs/performance.md).
POLICY_CHUNK_IMAGES = 16384


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, 3, 32, 32)
    labels: torch.Tensor  # int64 (N,)
    _crop_sources: dict[tuple[bool, int], torch.Tensor] = field(default_factory=dict, repr=False,
                                                                compare=False)

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> Split:
        """The split on device; to a GPU through pinned memory with asynchronous copies."""
        if device.type == "cuda" and self.images.device.type == "cpu":
            return Split(self.images.pin_memory().to(device, non_blocking=True),
                         self.labels.pin_memory().to(device, non_blocking=True))
        return Split(self.images.to(device), self.labels.to(device))

    def crop_source(self, channels_last: bool = False, pad: int = PAD, pad_mode: str = "zeros"
                    ) -> torch.Tensor:
        """The padded images (zeros, or reflected at the border) followed by their mirror images,
        (2N, 3, 32+2pad, 32+2pad) uint8 in the asked memory layout, made once: a flipped crop is
        then a plain crop of the mirror, so crop and flip are one gather, and the gather reads and
        writes memory in order."""
        key = (channels_last, pad, pad_mode)
        if key not in self._crop_sources:
            mode = "reflect" if pad_mode == "reflect" and pad else "constant"
            padded = F.pad(self.images, (pad, pad, pad, pad), mode=mode)
            both = torch.cat([padded, padded.flip(3)])
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            self._crop_sources = {key: both.contiguous(memory_format=fmt)}
        return self._crop_sources[key]


# --- reading -------------------------------------------------------------------------------

class _CifarUnpickler(pickle.Unpickler):
    """Admits only what CIFAR's python batches hold: dicts, lists, bytes and uint8 arrays.

    Written by hand because neither torchvision (plain pickle.load) nor numpy offers a
    restricted loader; pickle's documented way is exactly this find_class override.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3's protocol 2 spells a bytes object
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def max_py_batch_bytes(protocol: int, images: int = MAX_PER_BATCH) -> int:
    """The largest a CIFAR python batch of `images` images can be in a pickle protocol.

    From protocol 3 on, the pixels are one bytes object: 1 byte each. Python 3 writes bytes in
    protocols 0-2 as _codecs.encode(str, "latin1"): in 1 and 2 that str is UTF-8 (2 bytes for
    each byte >= 0x80), in 0 raw-unicode-escape text, where a backslash or a newline takes 6.
    Labels and file names get a generous 256 bytes per image, the rest 1 MB."""
    per_pixel_byte = 1 if protocol >= 3 else 2 if protocol == 2 else 6
    return images * (per_pixel_byte * IMAGE_BYTES + 256) + 1_000_000


def _unpickle(path: Path, images: int = MAX_PER_BATCH) -> dict:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(2)
    # Protocol 2 and later open with PROTO and the version; 0 and 1 have no header.
    protocol = head[1] if len(head) == 2 and head[0] == 0x80 else 0
    if size > max_py_batch_bytes(protocol, images):
        raise DataError(f"{path}: {size} bytes is larger than a CIFAR python batch of "
                        f"{images} images can be (pickle protocol {protocol})")
    try:
        obj = _CifarUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, MemoryError, OverflowError) as e:
        raise DataError(f"{path}: not a CIFAR python batch ({e or type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a CIFAR python batch (expected a dict, got {type(obj).__name__})")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_py_batch(path: Path, label_key: str = "labels", max_images: int = MAX_PER_BATCH
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np  # numpy arrives with torchvision; only this layout needs it

    d = _unpickle(path, max_images)
    # A CIFAR-10 batch's "labels" may be spelt "fine_labels"; CIFAR-100's coarse ones never fall back
    data = d.get("data")
    labels = d.get(label_key, d.get("fine_labels")) if label_key == "labels" else d.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != IMAGE_BYTES:
        raise DataError(f"{path}: expected 'data' as a uint8 array of shape (N, {IMAGE_BYTES})")
    if not isinstance(labels, list) or len(labels) != len(data) \
            or not all(isinstance(x, int) and 0 <= x < 2**31 for x in labels):
        raise DataError(f"{path}: expected '{label_key}' as a list of {len(data)} class indices")
    if len(data) > max_images:
        raise DataError(f"{path}: {len(data)} images, more than a CIFAR batch holds ({max_images})")
    images = torch.from_numpy(data.copy()).view(-1, 3, 32, 32)
    return images, torch.tensor(labels, dtype=torch.int64)


def _read_bin_batch(path: Path, label_bytes: int = 1, label_index: int = 0,
                    max_images: int = MAX_PER_BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """Records of label_bytes label bytes (CIFAR-10: 1; CIFAR-100: coarse, fine), then the pixels."""
    record = label_bytes + IMAGE_BYTES
    what = "CIFAR-10" if label_bytes == 1 else "CIFAR-100"
    size = path.stat().st_size
    if size > max_images * record:
        raise DataError(f"{path}: {size} bytes is more than a {what} binary batch of "
                        f"{max_images} records ({max_images * record} bytes)")
    raw = path.read_bytes()
    if not raw or len(raw) % record:
        raise DataError(f"{path}: {len(raw)} bytes is not a whole number of {record}-byte "
                        f"{what} records (truncated or not a {what} binary batch)")
    rows = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(-1, record)
    return rows[:, label_bytes:].reshape(-1, 3, 32, 32).clone(), rows[:, label_index].to(torch.int64)


def _label_text(path: Path) -> str:
    """A label-names file (one name a line, a few KB), bounded: no FIFO, no device, no huge file."""
    return read_bytes(path, TEXT_LIMIT, DataError).decode("utf-8", "replace")


@dataclass(frozen=True)
class Cifar:
    """What tells one published CIFAR dataset's files from the other's: one reader reads both.

    A "{labels}" in a name stands for the label set read (CIFAR-100's fine or coarse labels;
    CIFAR-10 has one set, and no name of its needs it)."""

    name: str  # as messages say it
    py_dir: str  # the python layout's directory
    bin_dir: str  # the binary layout's
    py_meta: str  # the python layout's pickled metadata: its presence says which layout this is
    bin_meta: str  # a file only the binary layout has
    meta_images: int  # the pickled metadata is bounded as a python batch of this many images
    names_key: str  # the class names' key in the pickled metadata
    names_file: str  # the binary layout's class names, one a line
    no_names: str  # what the message says of metadata without class names
    splits: tuple[tuple[tuple[str, ...], int], ...]  # (train, test): (file names, most images a file holds)
    label_key: str  # the labels' key in a python batch
    label_order: tuple[str, ...]  # the label sets whose bytes start each binary record, in order

    def find(self, root: Path) -> Path | None:
        """The dataset's directory under root (python layout first), or root itself if it is one."""
        for base in (root / self.py_dir, root / self.bin_dir, root):
            if (base / self.py_meta).is_file() or (base / self.bin_meta).is_file():
                return base
        return None


CIFAR10 = Cifar(name="CIFAR-10", py_dir=PY_DIR, bin_dir=BIN_DIR, py_meta="batches.meta",
                bin_meta="batches.meta.txt", meta_images=MAX_PER_BATCH, names_key="label_names",
                names_file="batches.meta.txt", no_names="batches.meta holds no class names",
                splits=((tuple(TRAIN_BATCHES), MAX_PER_BATCH), (tuple(TEST_BATCHES), MAX_PER_BATCH)),
                label_key="labels", label_order=("fine",))
CIFAR100 = Cifar(name="CIFAR-100", py_dir=C100_PY_DIR, bin_dir=C100_BIN_DIR, py_meta="meta",
                 bin_meta="fine_label_names.txt", meta_images=1, names_key="{labels}_label_names",
                 names_file="{labels}_label_names.txt", no_names="its meta holds no {labels} class names",
                 splits=((("train",), C100_TRAIN), (("test",), C100_TEST)),
                 label_key="{labels}_labels", label_order=("coarse", "fine"))


def download_cifar10(root: Path, cifar100: bool = False) -> None:
    """Fetch and verify the python layout with torchvision's utilities, then move it into place
    in one rename, so an interrupted download never leaves a half-written dataset behind."""
    # torchvision's dataset classes under other names: CIFAR10/CIFAR100 here are our layouts
    from torchvision.datasets import CIFAR10 as TorchvisionCIFAR10
    from torchvision.datasets import CIFAR100 as TorchvisionCIFAR100
    from torchvision.datasets.utils import check_integrity, download_and_extract_archive

    layout = CIFAR100 if cifar100 else CIFAR10
    spec, name = (TorchvisionCIFAR100 if cifar100 else TorchvisionCIFAR10), layout.name
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
        try:
            with redirect_stdout(ShownStream(sys.stdout)):  # its lines name paths under root
                download_and_extract_archive(spec.url, download_root=tmp,
                                             filename=spec.filename, md5=spec.tgz_md5)
        except Exception as e:  # urllib, socket and tarfile all raise their own types
            raise DataError(f"could not download {name} from {spec.url} into {root}: "
                            f"{first_line(e)}") from None
        base = Path(tmp) / spec.base_folder
        files = spec.train_list + spec.test_list + [[spec.meta["filename"], spec.meta["md5"]]]
        for file, md5 in files:
            if not check_integrity(str(base / file), md5):
                raise DataError(f"downloaded {name} failed its integrity check: {file}")
        try:
            os.replace(base, root / spec.base_folder)
        except OSError:
            if layout.find(root) is None:  # not another process's
                raise DataError(f"could not move the downloaded {name} into {root}") from None


def load_dataset(data: DataConfig) -> tuple[Split, Split, list[str]]:
    """(train, test, class names) of the config's dataset: data.classes of them, where it names some."""
    train, test, names = _load_every_class(data)
    if data.classes is None:
        return train, test, names
    keep = resolve_classes(data.classes, names)
    return (select_classes(train, keep, len(names)), select_classes(test, keep, len(names)),
            [names[i] for i in keep])


def _load_every_class(data: DataConfig) -> tuple[Split, Split, list[str]]:
    if data.dataset == "cifar100":
        return load_cifar100(data.root, data.download, data.labels)
    if data.dataset == "folder":
        from vggtrain.folder import load_folder  # Pillow and its plugins: loaded for a folder only

        with _os_errors(data.root):
            train, test, names = load_folder(data.root)
        return Split(*train), Split(*test), names
    return load_cifar10(data.root, data.download)


def load_cifar10(root: str | Path, download: bool = False) -> tuple[Split, Split, list[str]]:
    """(train, test, class names) from either published layout under root."""
    with _os_errors(root):
        return _load_cifar(CIFAR10, Path(root), download)


def load_cifar100(root: str | Path, download: bool = False, labels: str = "fine"
                  ) -> tuple[Split, Split, list[str]]:
    """(train, test, class names) of CIFAR-100 from either published layout under root: its 100
    fine classes, or its 20 superclasses with labels="coarse"."""
    with _os_errors(root):
        return _load_cifar(CIFAR100, Path(root), download, labels)


@contextmanager
def _os_errors(root: str | Path) -> Iterator[None]:
    """Unreadable or unwritable files and folders, as the user's to fix: one line naming the file."""
    try:
        yield
    except OSError as e:
        raise DataError(f"{e.filename or root}: {os_reason(e)}") from None


def _load_cifar(spec: Cifar, root: Path, download: bool, labels: str = "fine"
                ) -> tuple[Split, Split, list[str]]:
    base = spec.find(root)
    if base is None and download:
        download_cifar10(root, cifar100=spec is CIFAR100)
        base = spec.find(root)
    if base is None:
        raise DataError(f"{root}: no {spec.name} found (expected {spec.py_dir}/ or {spec.bin_dir}/ inside "
                        f"it; set data.root, or data.download: true to fetch it)")
    python = (base / spec.py_meta).is_file()
    names = _cifar_names(spec, base, python, labels)
    suffix = "" if python else ".bin"

    def read(files: tuple[str, ...], most: int) -> Split:
        parts = []
        for file in files:
            path = base / (file + suffix)
            if not path.is_file():
                expected = path.name if len(files) == 1 else \
                    f"{len(files)} batch files {', '.join(f + suffix for f in files)}"
                raise DataError(f"{path}: missing (expected {expected} in {base})")
            images, y = _read_py_batch(path, spec.label_key.format(labels=labels), most) if python else \
                _read_bin_batch(path, len(spec.label_order), spec.label_order.index(labels), most)
            _check_labels(path, y, len(names))
            parts.append((images, y))
        if len(parts) == 1:
            return Split(*parts[0])
        return Split(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))

    train, test = (read(files, most) for files, most in spec.splits)
    return train, test, names


def _cifar_names(spec: Cifar, base: Path, python: bool, labels: str) -> list[str]:
    if python:
        meta = _unpickle(base / spec.py_meta, spec.meta_images).get(spec.names_key.format(labels=labels))
        names = [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in meta] \
            if isinstance(meta, list) else None
    else:
        text = _label_text(base / spec.names_file.format(labels=labels))
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names or not all(isinstance(n, str) for n in names):
        raise DataError(f"{base}: {spec.no_names.format(labels=labels)}")
    return [shown(n) for n in names]  # as checkpoints' are read (inference.load_model)


def _check_labels(path: Path, labels: torch.Tensor, classes: int) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise DataError(f"{path}: label {int(labels.max())} out of range for {classes} classes")


def run_split(train: Split, data: DataConfig, run_seed: int) -> tuple[Split, Split]:
    """(training, validation) images of a run, as fit made them and eval, export and calibration
    rebuild them from its stored config: data.val_size images drawn by data.val_seed, else by the
    run's seed."""
    return split_train_val(train, data.val_size, validation_seed(data, run_seed))


def validation_seed(data: DataConfig, run_seed: int) -> int:
    """The seed that draws a run's validation images: data.val_seed, else the run's own."""
    return run_seed if data.val_seed is None else data.val_seed


@dataclass(frozen=True)
class ValidationDraw:
    """What decides which images run_split holds out: the images (the dataset; a folder's are its
    root's), which of them are kept (data.classes as written, in the labels they index; None:
    all), the seed and the count. The order of data.classes does not matter: the kept images stay
    in the data's order."""

    data: tuple
    labels: str
    classes: frozenset | None
    seed: int
    size: int

    @classmethod
    def of(cls, data: DataConfig, run_seed: int) -> ValidationDraw:
        folder = data.root if data.dataset == "folder" else None
        classes = None if data.classes is None else frozenset(data.classes)
        return cls((data.dataset, folder), data.labels, classes, validation_seed(data, run_seed),
                   data.val_size)

    def keeps_the_same_images(self, other: ValidationDraw) -> bool:
        """All the images of the same data (CIFAR-100's fine and coarse labels alike), or the same
        classes of the same labels."""
        if self.data != other.data:
            return False
        if self.classes is None or other.classes is None:
            return self.classes is other.classes
        return (self.labels, self.classes) == (other.labels, other.classes)

    def holds_out(self, other: ValidationDraw) -> bool:
        """Whether this run held out every image of other's validation split: the same images and
        seed, and at least as many (a split is the seed's permutation's first `size` images)."""
        return self.keeps_the_same_images(other) and self.seed == other.seed and self.size >= other.size

    def may_have_trained_on(self, other: ValidationDraw) -> bool:
        """Whether this run may have trained on some of other's validation images: other validates,
        this run did not hold them all out, and it trained on the same data with some of other's
        classes (as written: a class named here and indexed there is not seen as the same; classes
        of other labels, CIFAR-100's fine against coarse, may be)."""
        if other.size == 0 or self.data != other.data or self.holds_out(other):
            return False
        if self.classes is None or other.classes is None or self.labels != other.labels:
            return True
        return bool(self.classes & other.classes)


def held_out_note(who: str) -> str:
    """The one line said where a run's source or teacher (who) may have trained on the run's
    validation images (ValidationDraw.may_have_trained_on): said, not refused."""
    return (f"{who} did not hold out all this run's validation images, so this run's validation "
            f"accuracy may read high (give both runs one data.val_seed and the same data.classes, and "
            f"it a data.val_size at least this run's)")


def split_train_val(train: Split, val_size: int, seed: int) -> tuple[Split, Split]:
    """A seeded, fixed validation split carved out of the training set."""
    if val_size >= len(train):
        raise DataError(f"data.val_size {val_size} leaves no training images "
                        f"(the training set has {len(train)})")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    val, rest = perm[:val_size], perm[val_size:]
    return Split(train.images[rest], train.labels[rest]), Split(train.images[val], train.labels[val])


def resolve_classes(classes: list[int | str], names: list[str]) -> list[int]:
    """data.classes as indices into the data's classes: a name must be one of names, an index below
    their count; anything else is the config's error, in one line listing the data's classes."""
    indices = []
    for c in classes:
        index = names.index(c) if isinstance(c, str) and c in names else \
            c if isinstance(c, int) and c < len(names) else None
        if index is None:
            what = f"{c!r} is not a class of the data" if isinstance(c, str) else \
                f"index {c} is out of range for the data's {len(names)} classes"
            raise ConfigError(f"data.classes: {what} (its classes: {', '.join(names)})")
        indices.append(index)
    if len(set(indices)) != len(indices):
        raise ConfigError("data.classes: names a class twice (by its name and its index)")
    return indices


def select_classes(split: Split, keep: list[int], total: int) -> Split:
    """The split's images of the classes keep lists (indices below total, the data's class count),
    relabelled 0..k-1 in keep's order; the images stay in their order, not grouped by class."""
    relabel = torch.full((total,), -1, dtype=torch.int64)
    relabel[keep] = torch.arange(len(keep))
    labels = relabel[split.labels]
    kept = labels >= 0
    return Split(split.images[kept], labels[kept])


def cap_per_class(train: Split, per_class: int, seed: int, classes: list[str]) -> Split:
    """per_class images of each class, drawn at random from the seed (its own stream, not the
    validation split's), in their order in the split; a class with fewer is refused in one line."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + 424_242) % 2**63)
    picked = []
    for label, name in enumerate(classes):
        of_class = (train.labels == label).nonzero().flatten()
        if len(of_class) < per_class:
            raise DataError(f"data.train_per_class {per_class}: class {name!r} has {len(of_class)} "
                            f"training images (after the validation split)")
        picked.append(of_class[torch.randperm(len(of_class), generator=generator)[:per_class]])
    keep = torch.cat(picked).sort().values
    return Split(train.images[keep], train.labels[keep])


def random_split(n: int, device: torch.device, seed: int = 0) -> Split:
    """n random images (uint8 noise, labels 0-9) on device, the same for a seed: for benchmarks
    and step counts, whose timings and operator counts do not depend on what the images show."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    return Split(images, torch.randint(0, 10, (n,), generator=g)).to(device)


# --- batches on the device -----------------------------------------------------------------

def norm_stats(data: DataConfig) -> Stats:
    """The mean and std a run's images are normalised with: the config's own (a folder run's,
    measured on its training split), else CIFAR's published constants."""
    if data.mean is not None and data.std is not None:
        return tuple(float(x) for x in data.mean), tuple(float(x) for x in data.std)
    if data.dataset == "cifar100":
        return CIFAR100_MEAN, CIFAR100_STD
    return CIFAR10_STATS


def measure_stats(images: torch.Tensor) -> Stats:
    """Per-channel mean and std of uint8 (N, 3, H, W) images, as fractions of 255 (6 decimals),
    summed in float64 over chunks of 5,000 images."""
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    for chunk in images.split(5000):
        x = chunk.to(torch.float64).div_(255)
        total += x.sum((0, 2, 3))
        squares += x.square().sum((0, 2, 3))
    n = images.numel() // 3
    mean = total / n
    std = (squares / n - mean.square()).clamp(min=1e-12).sqrt()
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


@lru_cache(maxsize=8)
def _normalization(device: torch.device, stats: Stats) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(stats[0], device=device).view(1, 3, 1, 1)
    std = torch.tensor(stats[1], device=device).view(1, 3, 1, 1)
    return 1.0 / (255.0 * std), mean / std


def normalize(images: torch.Tensor, channels_last: bool = False, stats: Stats = CIFAR10_STATS
              ) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> normalised float32 ((x / 255 - mean) / std), laid out as asked: one
    converting copy, then in place. From NCHW into channels_last (a policy's chunk; a converting
    copy that also transposes is slow) one multiply from the uint8 images instead, the same floats:
    on the CPU torch converts them to a float temporary and transposes in the multiply: 1.9-2.1
    microseconds an image against 2.5 with vggtrain's allocator, 4.7-4.8 against 5.5-5.9 with
    glibc's defaults (batches of 512, 2 threads, an AVX-512 AMD EPYC, alternated in one process).
    Other layouts keep the copy: there the multiply's temporary made it slower."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    scale, shift = _normalization(images.device, stats)
    out = torch.empty_like(images, dtype=torch.float32, memory_format=fmt)
    if channels_last and images.is_contiguous() and images.shape[1] > 1:
        return torch.mul(images, scale, out=out).sub_(shift)
    return out.copy_(images).mul_(scale).sub_(shift)


def crop_flip(split: Split, idx: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor,
              channels_last: bool = False, pad: int = PAD, pad_mode: str = "zeros") -> torch.Tensor:
    """Images idx of the split, each cropped from its padded self at its own offset and
    mirrored where flips says: uint8 (B, 3, 32, 32) from a single gather.

    shifts: (B, 2) int row/column offsets in [0, 2*pad]; flips: (B,) bool. The crops are a view
    (unfold) of every 32x32 window of split.crop_source(), indexed per image.
    """
    source = split.crop_source(channels_last, pad, pad_mode)
    size = source.shape[-1] - 2 * pad
    windows = source.unfold(2, size, 1).unfold(3, size, 1)  # (2N, 3, 9, 9, 32, 32), no copy
    if channels_last:  # gather into (B, 32, 32, 3): NHWC memory, viewed back as NCHW
        windows = windows.permute(0, 2, 3, 4, 5, 1)
    # crop(mirror(p), dy, 2*pad - dx) == mirror(crop(p, dy, dx))
    cols = torch.where(flips, 2 * pad - shifts[:, 1], shifts[:, 1])
    out = windows[idx + flips * len(split), shifts[:, 0], cols] if channels_last else \
        windows[idx + flips * len(split), :, shifts[:, 0], cols]
    return out.permute(0, 3, 1, 2) if channels_last else out


@dataclass(frozen=True)
class Augmentation:
    """How train_batches augments: a random crop from the image padded by `padding` pixels
    (zeros or reflected), and flips: random, or alternating (TrainLoader's alternating_flips)."""

    padding: int = PAD
    pad_mode: str = "zeros"
    flip: str = "random"
    cutout: int = 0  # the side of the square cut out of each image; 0: none
    policy: PolicySpec = PolicySpec()  # AutoAugment, RandAugment, TrivialAugment; random erasing

    @classmethod
    def of(cls, data: DataConfig) -> Augmentation | None:
        """The config's augmentation; None when data.augment is off."""
        if not data.augment:
            return None
        policy = PolicySpec(data.policy, data.policy_ops, data.policy_magnitude, data.random_erasing)
        return cls(data.crop_padding, data.crop_pad_mode, data.flip, data.cutout, policy)


def batch_mixer(data: DataConfig, num_classes: int) -> Callable[[torch.Tensor, torch.Tensor],
                                                                 tuple[torch.Tensor, torch.Tensor]] | None:
    """MixUp and/or CutMix as the config asks (None: neither), from torchvision.transforms.v2:
    they take the normalised batch and its labels as they are on the device and return the mixed
    batch with (B, classes) target probabilities (or the labels unchanged for an unmixed batch,
    with mix_prob < 1). Their draws come from torch's global generator, which checkpoints hold."""
    from torchvision.transforms import v2

    mixes = ([v2.MixUp(alpha=data.mixup_alpha, num_classes=num_classes)] if data.mixup_alpha else []) + \
        ([v2.CutMix(alpha=data.cutmix_alpha, num_classes=num_classes)] if data.cutmix_alpha else [])
    if not mixes:
        return None
    mix = mixes[0] if len(mixes) == 1 else \
        v2.RandomChoice(mixes, p=[1 - data.mix_switch_prob, data.mix_switch_prob])
    return v2.RandomApply([mix], p=data.mix_prob) if data.mix_prob < 1 else mix


def alternating_flips(n: int, seed: int, epoch: int) -> torch.Tensor:
    """airbench's flips: each image mirrored or not at random once (from the seed), then the whole
    set mirrored on every other epoch (epoch 0-based: odd epochs). Every image is seen both ways
    in any two consecutive epochs, which random flips only do half the time."""
    generator = torch.Generator().manual_seed((seed * 7919 + 17) % 2**63)  # any seed, not the epochs'
    base = torch.randint(0, 2, (n,), generator=generator).bool()
    return base ^ bool(epoch % 2)


def cutout_mask(corners: torch.Tensor, size: int, h: int = 32, w: int = 32) -> torch.Tensor:
    """(B, 1, h, w) bool: True inside each image's size x size square, whose top-left row/column
    corners (B, 2) gives, in [0, 32 - size]. One broadcast for the whole batch."""
    rows = torch.arange(h, device=corners.device).view(1, h) - corners[:, :1]
    cols = torch.arange(w, device=corners.device).view(1, w) - corners[:, 1:]
    return ((rows >= 0) & (rows < size)).view(-1, 1, h, 1) & ((cols >= 0) & (cols < size)).view(-1, 1, 1, w)


def train_batches(split: Split, batch_size: int, generator: torch.Generator,
                  aug: Augmentation | None = Augmentation(), channels_last: bool = False, start: int = 0,
                  rank: int = 0, world: int = 1, flips: torch.Tensor | None = None,
                  stats: Stats = CIFAR10_STATS, stop: int | None = None
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled, augmented, normalised batches; the last partial batch is dropped
    (a BN net with a batch of one fails, and a ragged batch would recompile compiled models).

    All randomness is drawn up front on the CPU generator, so the epoch is the same on any device,
    and a resumed epoch skips its first ``start`` batches without changing the rest (``stop``:
    the batches from the stop-th on are left out, and never augmented). With
    ``world`` ranks, every rank draws the same permutation and takes every world-th image of it
    from the rank-th on: disjoint shards of equal size (the last n % world images sit out).
    aug None: the images as they are. flips: (N,) bool per image (alternating_flips); None draws
    them at random for this epoch. aug.cutout: a square of each image set to the mean colour,
    its place drawn from the generator after the shifts and flips. aug.policy: the policy and random
    erasing (policies.py), seeded per chunk from one more draw of the generator.
    """
    n = len(split)
    device = split.images.device
    perm = torch.randperm(n, generator=generator)[rank:n - n % world:world].to(device)
    pad = aug.padding if aug else PAD  # drawn even without augmentation: the same order either way
    shifts = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator).to(device)
    if flips is None:
        flips = torch.randint(0, 2, (n,), generator=generator).bool()
    flips = flips.to(device)
    cut = aug.cutout if aug else 0
    # Drawn only when used, so a run without cutout draws (and trains) exactly as before it existed.
    corners = torch.randint(0, 32 - cut + 1, (n, 2), generator=generator).to(device) if cut else None
    # Drawn only with a policy, so a run without one draws exactly as before policies existed.
    policy = policy_for(aug.policy, device) if aug and aug.policy.active else None
    policy_base = int(torch.randint(0, 2**62, (1,), generator=generator)) if policy else 0
    # The augmentation runs on a chunk of batches at a time (airbench augments the epoch at once):
    # a step then costs a few operator launches, not thirty, and a chunk's memory stays bounded.
    per_chunk = max(1, (POLICY_CHUNK_IMAGES if policy else AUGMENT_CHUNK_IMAGES) // batch_size) * batch_size
    end = len(perm) - len(perm) % batch_size
    if stop is not None:
        end = min(end, max(stop, 0) * batch_size)
    first_image = start * batch_size
    # A policy's draws are seeded per chunk, so its chunks stay where an uninterrupted epoch has
    # them: a resumed epoch augments the chunk it resumes in whole and yields from its batch on.
    begin = first_image - first_image % per_chunk if policy else first_image
    # A policy's chunk is cropped NCHW (its row gathers would transpose a channels_last one; normalize
    # lays each batch out channels_last); erasing alone gathers no rows and stays channels_last.
    crop_channels_last = channels_last and (policy is None or not policy.candidates)
    for chunk_start in range(begin, end if first_image < end else begin, per_chunk):
        idx = perm[chunk_start:min(chunk_start + per_chunk, end)]
        images = crop_flip(split, idx, shifts[idx], flips[idx], crop_channels_last, pad, aug.pad_mode) \
            if aug else split.images[idx]
        erased = None
        if policy is not None:
            images, erased = policy(images, chunk_seed(policy_base, rank, chunk_start // per_chunk))
        cutout = cutout_mask(corners[idx], cut) if corners is not None else None
        labels = split.labels[idx]
        for first in range(max(first_image - chunk_start, 0), len(idx), batch_size):
            x = normalize(images[first:first + batch_size], channels_last, stats)
            for mask in (cutout, erased):  # the mean colour, 0 once normalised
                if mask is not None:
                    x.masked_fill_(mask[first:first + batch_size], 0.0)
            yield x, labels[first:first + batch_size]


@dataclass(frozen=True)
class TrainLoader:
    """A run's training batches, epoch by epoch, as airbench's loader makes them: whatever changes
    from one epoch to the next (the order, the crops, the flips, alternating ones mirrored on odd
    epochs, cutout) follows from (seed, epoch) here rather than from state carried along, so a
    resumed epoch draws the same batches as one that was never interrupted."""

    split: Split
    batch_size: int
    seed: int
    aug: Augmentation | None = Augmentation()
    stats: Stats = CIFAR10_STATS
    channels_last: bool = False
    rank: int = 0
    world: int = 1

    def epoch(self, epoch: int, start: int = 0, stop: int | None = None
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's batches start..stop (default: to the end) of epoch (0-based), augmented
        and normalised (train_batches)."""
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch + 1) % 2**63)
        alternating = self.aug is not None and self.aug.flip == "alternating"
        flips = alternating_flips(len(self.split), self.seed, epoch) if alternating else None
        return train_batches(self.split, self.batch_size, generator, self.aug, self.channels_last, start,
                             self.rank, self.world, flips, self.stats, stop)


def eval_batches(split: Split, batch_size: int, channels_last: bool = False, stats: Stats = CIFAR10_STATS
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(split), batch_size):
        sl = slice(start, start + batch_size)
        yield normalize(split.images[sl], channels_last, stats), split.labels[sl]
