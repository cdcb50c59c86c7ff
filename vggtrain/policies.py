"""Augmentation policies (AutoAugment's CIFAR-10 policy, RandAugment, TrivialAugment) and random
erasing, drawn per image and applied to a batched uint8 tensor on the training device, with
kornia's operations (the `augment` extra).

kornia picks one sub-policy (AutoAugment, TrivialAugment) or one set of N operations
(RandAugment) per call, for the whole batch; only magnitudes and probability gates are drawn per
row. These policies are per image, so the choice is drawn here, per image, and each candidate
runs once on the rows that chose it: kornia's own policy class wrapped around that one candidate,
so its magnitudes, signs and gates are kornia's. A chunk of 16,384 images costs one kornia call
per candidate (and per RandAugment step), not one per image. Images stay uint8 from operation to
operation, each operation run the cheapest exact way its kind allows (_kind).

All draws (the choices here, kornia's inside) come from torch's global generators, forked and
seeded from the caller's key, so a chunk augments the same way whenever it is made (a resumed
epoch), and the generators' state outside (MixUp's, dropout's) is left as it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch

from vggtrain.errors import UserError

AUGMENT_EXTRA = "data.policy and data.random_erasing need kornia: pip install 'vggtrain[augment]'"
ERASING_SCALE, ERASING_RATIO = (0.02, 0.33), (0.3, 3.3)  # torchvision's and timm's RandomErasing defaults


def kornia_augmentation() -> Any:
    """kornia.augmentation, or the one-line error that names the extra."""
    try:
        import kornia.augmentation
        import kornia.augmentation.auto  # noqa: F401  (the policies live in a subpackage)
    except ImportError:
        raise UserError(AUGMENT_EXTRA) from None
    return kornia.augmentation


def require_policy_extra(data: Any) -> None:
    """The one-line error now, where the config (a DataConfig) asks for a policy or random erasing
    and kornia is missing, rather than at the first training batch."""
    if data.augment and (data.policy != "none" or data.random_erasing > 0):
        kornia_augmentation()


@dataclass(frozen=True)
class PolicySpec:
    """What a run asks for: a policy (none: only erasing), RandAugment's N and M, erasing's P."""

    name: str = "none"
    ops: int = 2  # RandAugment's N (torchvision's num_ops)
    magnitude: int = 9  # RandAugment's M of 30 (torchvision's magnitude, of its 31 bins)
    erasing: float = 0.0  # the chance each image gets a rectangle erased

    @property
    def active(self) -> bool:
        return self.name != "none" or self.erasing > 0


@dataclass
class Draw:
    """What one call drew, kept for tests and inspection: choices[step, image] is the candidate
    each image took at each step; applied holds (step, candidate, rows, kornia's parameters) for
    each kornia call; erased (n,) bool: the images random erasing touched."""

    choices: torch.Tensor
    applied: list[tuple[int, int, torch.Tensor, Any]] = field(default_factory=list)
    erased: torch.Tensor | None = None


class Policy:
    """A policy's candidates (each one kornia policy over a single candidate) and how each image
    chooses among them; call it on uint8 images with a seed."""

    def __init__(self, spec: PolicySpec, device: torch.device) -> None:
        K = kornia_augmentation()
        self.spec = spec
        self.candidates = [c.to(device) for c in _candidates(spec, K)]
        self.steps = spec.ops if spec.name == "randaugment" else (1 if self.candidates else 0)
        self.eraser = K.RandomErasing(scale=ERASING_SCALE, ratio=ERASING_RATIO, value=0.0,
                                      p=spec.erasing).to(device) if spec.erasing > 0 else None
        self.last: Draw | None = None

    def choose(self, n: int) -> torch.Tensor:
        """(steps, n) candidate indices on the CPU: one uniformly for AutoAugment's sub-policies and
        TrivialAugment's operations; RandAugment's N distinct operations in a random order (as
        kornia's RandAugment draws them: without replacement)."""
        k = len(self.candidates)
        if not k:
            return torch.zeros(0, n, dtype=torch.int64)
        if self.spec.name == "randaugment":
            return torch.rand(n, k).argsort(dim=1)[:, :self.steps].T.contiguous()
        return torch.randint(0, k, (self.steps, n))

    def __call__(self, images: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(images after the policy, uint8 like the input; the (n, 1, h, w) bool mask random
        erasing drew, or None). Each operation takes and hands back uint8 images, rounded to the
        nearest level, as torchvision's policies on PIL or uint8 images round after every operation."""
        with _seeded(seed, images.device), torch.no_grad():
            draw = Draw(self.choose(len(images)))
            if self.candidates:
                images = self._apply(images, draw)
            mask = self._erase(images, draw) if self.eraser is not None else None
        self.last = draw
        return images, mask

    def _apply(self, images: torch.Tensor, draw: Draw) -> torch.Tensor:
        # Image i is grouped[where[i]] (where None: grouped[i]). images is never written.
        grouped, where = images, None
        for step, chosen in enumerate(draw.choices):
            # Sorted on the CPU (no device sync): one gather puts each candidate's rows in one slice,
            # straight from the previous step's order (RandAugment's N steps: N + 1 gathers, not 2N).
            order = chosen.argsort(stable=True)
            counts = torch.bincount(chosen, minlength=len(self.candidates)).tolist()
            source = order if where is None else where[order]
            first, grouped = 0, grouped.index_select(0, source.to(images.device, non_blocking=True))
            for candidate, count in enumerate(counts):
                if count:
                    module = self.candidates[candidate]
                    # uint8 in and out: each operation rounds back to uint8 (_on_every_row).
                    rows = grouped[first:first + count]
                    result = module(rows)
                    if result.data_ptr() != rows.data_ptr():
                        rows.copy_(result)
                    draw.applied.append((step, candidate, order[first:first + count], module._params))
                first += count
            where = order.argsort()
        if where is None:
            return grouped
        # Back in place by the inverse permutation: a gather, several times faster than a uint8 scatter.
        return grouped.index_select(0, where.to(images.device, non_blocking=True))

    def _erase(self, images: torch.Tensor, draw: Draw) -> torch.Tensor:
        """Where kornia's RandomErasing erases, as a mask: the data path fills it with 0 after
        normalising (the mean colour, as cutout and torchvision's RandomErasing after Normalize)."""
        n, _, h, w = images.shape
        erased = self.eraser(torch.ones(n, 1, h, w, device=images.device)) == 0  # type: ignore[misc]
        draw.erased = self.eraser._params["batch_prob"].bool()  # type: ignore[union-attr]  # no host copy
        return erased


def _candidates(spec: PolicySpec, K: Any) -> list[torch.nn.Module]:
    """kornia's policy classes around each of its own candidates, one at a time, on uint8 rows:
    each operation runs on the rows its gate chose (_gated_rows_only), the way its kind allows
    (_kind)."""
    candidates = _kornia_candidates(spec, K.auto)
    for operation in kornia_operations(candidates, K.auto):
        operation.forward = _gated_rows_only(operation, _kind(operation.op, K))
    return candidates


def kornia_operations(candidates: list[torch.nn.Module], auto: Any) -> list[Any]:
    """The kornia policy operations (OperationBase, each around one augmentation, its .op) inside
    the candidates."""
    return [m for c in candidates for m in c.modules() if isinstance(m, auto.operations.OperationBase)]


def _kind(op: Any, K: Any) -> str:
    """How _on_every_row runs kornia's augmentation op on uint8 images:
    levels: each pixel's output is a function of its own level and the row's parameters
        (posterize, solarize, brightness, contrast, invert), so kornia's op runs on the 256 levels
        once per row and the images go through that table;
    min_max: also a function of each channel's minimum and maximum (autocontrast): the 256 levels
        clamped to them make a probe with the same minimum and maximum;
    equalize: PIL's algorithm, as kornia's and torchvision's, on uint8 images (_equalize);
    positions: a warp sampling the nearest pixel (rotate, shear, translate here) moves pixels, so
        kornia's op runs on one float image of pixel positions and each image's pixels are
        gathered from where it says;
    sharpness, saturation (colour): kornia's arithmetic, with fewer passes (_sharpness, _saturation);
    float: any other, kornia's op on float rows."""
    if isinstance(op, (K.RandomPosterize, K.RandomSolarize, K.RandomBrightness, K.RandomContrast,
                       K.RandomInvert)):
        return "levels"
    if isinstance(op, K.RandomAutoContrast):
        return "min_max"
    if isinstance(op, K.RandomEqualize):
        return "equalize"
    from kornia.constants import Resample, SamplePadding

    flags = getattr(op, "flags", {})
    # Zero fill only (rotation's always is: it has no padding_mode flag).
    zero_fill = flags.get("padding_mode", SamplePadding.ZEROS) == SamplePadding.ZEROS
    if flags.get("resample") == Resample.NEAREST and zero_fill:
        return "positions"
    if isinstance(op, K.RandomSaturation):
        return "saturation"
    return "sharpness" if isinstance(op, K.RandomSharpness) else "float"


def _gated_rows_only(operation: Any, kind: str) -> Any:
    """kornia's OperationBase.forward for a policy's hard gates, on uint8 images; on the CPU on the
    gated rows only.

    kornia runs an operation with p < 1 on every row and then keeps the gated ones (torch.where),
    and its OperationBase blends that with the input, batch_prob * op(x) + (1 - batch_prob) * x, for
    differentiable policy search where a gate may be fractional. The gates its sampling draws are 0
    or 1 (drawn here as kornia draws them, in forward_parameters), so on the CPU this runs the op on
    the rows whose gate is 1, with those rows' parameters, and leaves the others as they were: what
    kornia returns (a test holds it), without transforming rows it throws away (AutoAugment's gates
    are 0.1-0.9) or three more passes over the batch. On a GPU kornia's own forward runs on float
    images: finding the gated rows there would wait for the device at every operation, and the GPU
    has the throughput to spare."""

    kornias = operation.forward

    def forward(input: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        if params is None:
            params = operation.forward_parameters(input.shape)
        if input.device.type != "cpu":
            return _rounded(kornias(torch.div(input, 255), params)).to(torch.uint8)
        gate = params["batch_prob"] > 0
        n, rows = len(gate), gate.nonzero().flatten()
        if len(rows) == n:
            every = dict(params, batch_prob=torch.ones_like(params["batch_prob"]))
            return _on_every_row(operation.op, kind, input, every)
        if not len(rows):
            return input
        # Per row: every parameter whose first dimension is the batch's (all of kornia 0.9.0's for
        # these operations; the test against kornia's forward covers each candidate); the gate and
        # the input's shape are then set for the chosen rows.
        chosen = {key: value[rows] if value.shape[:1] == (n,) else value for key, value in params.items()}
        chosen["batch_prob"] = torch.ones(len(rows), dtype=params["batch_prob"].dtype)
        chosen["forward_input_shape"] = torch.tensor((len(rows), *input.shape[1:]))
        # In place: input is _apply's gathered rows or the previous operation's output, held nowhere else.
        return _copy_rows(input, rows, _on_every_row(operation.op, kind, input.index_select(0, rows), chosen))

    return forward


def _copy_rows(into: torch.Tensor, rows: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """into[rows] = source for uint8 images, in place, as int64 words where the layout allows it:
    torch's index_copy_ goes element by element, and 8 bytes at a time it took 27 microseconds
    against 154 for 200 rows of 3,072 bytes (2 threads, an AVX-512 AMD EPYC)."""
    n, m = len(into), len(source)
    if into.is_contiguous() and source.is_contiguous() and into[0].numel() % 8 == 0 \
            and into.storage_offset() % 8 == 0 and source.storage_offset() % 8 == 0:
        into.view(n, -1).view(torch.int64).index_copy_(0, rows, source.view(m, -1).view(torch.int64))
        return into
    return into.index_copy_(0, rows, source)


def _on_every_row(op: Any, kind: str, input: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """kornia's augmentation op on uint8 input with params whose gates are all 1, rounded back to
    uint8 (as torchvision's policies round after every operation on uint8 images), in place where
    input is contiguous, as kornia runs an op of p = 1 (_transform): with p < 1 it also blends the
    output with the input by the gates (a torch.where over every row) and gates the matrices,
    which all-1 gates leave as they are.

    Why the kinds (_kind): kornia's operations work on float images, several passes of 4 bytes an
    element each. Run on 256 levels a row instead of 3,072 pixels, with the uint8 images then read
    through the table by one gather, TrivialAugment's posterize took 2.0 microseconds an image
    against 8.2 and solarize 1.6 against 5.5 (682 images, 2 threads, on an AVX-512 AMD EPYC), the
    same uint8 images (the per-candidate test against kornia's forward holds it)."""
    # Every kind writes its result into input (no uint8 copy back in Policy._apply).
    input = input.contiguous()
    if kind == "equalize":
        return _equalize(input)
    if kind in ("levels", "min_max"):
        return _through_levels(op, kind, input, params)
    if kind == "positions":
        return _through_positions(op, input, params)
    if kind == "sharpness":
        return _sharpness(input, params["sharpness"])
    if kind == "saturation" and input.shape[1] == 3:  # kornia refuses other channel counts
        return _saturation(input, params["saturation_factor"])
    return input.copy_(_rounded(_transform(op, torch.div(input, 255), params)))


def _through_levels(op: Any, kind: str, input: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """input (n, c, h, w) uint8 through the table kornia's op makes of the 256 levels, per row
    (levels) or per row and channel (min_max: the levels clamped to each channel's minimum and
    maximum, the only statistics autocontrast reads, which the probe then shares with the image)."""
    n, c = input.shape[:2]
    levels = torch.arange(256, device=input.device, dtype=torch.uint8)
    if kind == "levels":
        probe = levels.expand(n, 1, 1, 256)
    else:
        flat = input.view(n, c, -1)
        low, high = flat.amin(2, keepdim=True), flat.amax(2, keepdim=True)
        probe = torch.minimum(torch.maximum(levels.expand(n, c, 256), low), high).unsqueeze(2)
    probe_params = dict(params, forward_input_shape=torch.tensor(probe.shape))
    table = _rounded(_transform(op, torch.div(probe, 255), probe_params)).to(torch.uint8).view(n, -1, 256)
    index = input.reshape(n, table.shape[1], -1).long()
    return torch.gather(table, 2, index, out=input.view(index.shape)).view(input.shape)


def _equalize(images: torch.Tensor) -> torch.Tensor:
    """torchvision's equalize of contiguous uint8 images (n, c, h, w) (PIL's ImageOps.equalize,
    channel by channel: kornia's too), written into them: the same table from the same counts,
    its arithmetic on float32 (exact: the counts stay below 2**24), the count at the highest
    level read at the image's maximum (torchvision takes an argmax of the running sums), and a
    channel PIL leaves as it is (step 0) given the identity table rather than a torch.where over
    the images. 3.0 microseconds an image against torchvision's 4.7 (1,100 images, 2 threads, an
    AVX-512 AMD EPYC); a test holds the images the same."""
    n, c = images.shape[:2]
    flat = images.view(n, c, -1)
    index = flat.long()
    hist = torch.zeros(n, c, 256, dtype=torch.int32, device=images.device)
    hist.scatter_add_(2, index, hist.new_ones(1).expand_as(index))
    top = hist.gather(2, flat.amax(2, keepdim=True).long())  # the pixels at the highest level held
    step = (flat.shape[2] - top).div_(255, rounding_mode="floor").float()
    table = torch.zeros(n, c, 256, device=images.device)
    running = hist[..., :-1].cumsum(2, dtype=torch.float32).add_(step.div(2).floor_())
    torch.div(running, step.clamp(min=1), out=table[..., 1:]).floor_().clamp_(0, 255)
    levels = torch.arange(256, device=images.device, dtype=table.dtype)
    table = torch.where(step == 0, levels, table).to(torch.uint8)
    return torch.gather(table, 2, index, out=flat).view(images.shape)


def _saturation(input: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """kornia.enhance.adjust_saturation of contiguous uint8 RGB images (n, 3, h, w), clamped and
    rounded back into them: each pixel's distance from its smallest channel scaled so that its
    HSV saturation is multiplied by the factor, in kornia's arithmetic, so the same floats (the
    per-candidate test against kornia's forward holds it). Written out here to take each pixel's
    largest and smallest channel from the uint8 images (exact: the levels are in the order of
    their floats) and to skip kornia's clamps of images already in [0, 1]: 4.0-4.8 microseconds
    an image against 6.9-7.0 through kornia's op, conversions included (1,100 images, 2 threads,
    an AVX-512 AMD EPYC)."""
    x = torch.div(input, 255)
    top = input.amax(1, keepdim=True).div(255)
    low = input.amin(1, keepdim=True).div(255)
    delta = top - low
    weight = factor.to(x.device, x.dtype).view(-1, 1, 1, 1)
    saturation = torch.clamp(delta / torch.where(top == 0, torch.ones_like(top), top + 1e-8) * weight, 0, 1)
    adjusted = top * saturation
    ratio = adjusted / torch.where(delta == 0, torch.ones_like(delta), delta)
    return input.copy_(_rounded(x.sub_(low).mul_(ratio).add_(top - adjusted)))


def _sharpness(input: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """kornia.enhance.sharpness of uint8 images (n, c, h, w), rounded back to uint8: each image
    blended by its factor with a 3x3-smoothed copy of itself whose border is the image's own,
    result + (image - result) * factor, clamped, in kornia's arithmetic, so the same floats (the
    per-candidate test against kornia's forward holds it). Written out here because kornia pads
    the smoothed copy, builds a mask and a torch.where and blends every pixel, the border (which
    blends to itself) included: 12.9 microseconds an image against 4.4 (1,100 images, 2 threads,
    an AVX-512 AMD EPYC). On channels_last floats: on NCHW input oneDNN reorders the 3 channels
    to a blocked layout padded to 8 or 16 and back around the convolution (9 ms against 1.5 for
    1,000 images there)."""
    x = torch.empty(input.shape, device=input.device, memory_format=torch.channels_last)
    torch.div(input, 255, out=x)
    c = input.shape[1]
    kernel = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]], device=input.device).view(1, 1, 3, 3)
    smooth = torch.nn.functional.conv2d(x, kernel.repeat(c, 1, 1, 1) / 13, groups=c).clamp_(0, 1)
    inner = x[:, :, 1:-1, 1:-1]
    weight = factor.to(x.device, x.dtype).view(-1, 1, 1, 1)
    inner.copy_((inner - smooth).mul_(weight).add_(smooth).clamp_(0, 1))
    return input.copy_(_rounded(x))


def _through_positions(op: Any, input: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """input (n, c, h, w) uint8 moved as kornia's nearest-pixel warp moves one image of positions
    (1 to h*w, exact in float32) per row: each output pixel takes the position it was sampled from,
    or 0 where the warp sampled outside the image (the zero fill). Rows with the same parameters
    share one warp (_distinct_rows)."""
    n, c, h, w = input.shape
    params, row_of = _distinct_rows(params, n)
    m = n if row_of is None else int(row_of.max()) + 1
    positions = torch.arange(1, h * w + 1, device=input.device, dtype=torch.float32)
    probe = positions.view(1, 1, h, w).expand(m, 1, h, w).contiguous()
    moved = _transform(op, probe, dict(params, forward_input_shape=torch.tensor(probe.shape)))
    moved = moved.view(m, 1, h * w)
    source = (moved if row_of is None else moved.index_select(0, row_of)).long().expand(n, c, h * w)
    # Position 0 is the fill: a zero pixel put in front of each channel's.
    filled = torch.cat([input.new_zeros(n, c, 1), input.view(n, c, h * w)], dim=2)
    return torch.gather(filled, 2, source, out=input.view(n, c, h * w)).view(input.shape)


def _distinct_rows(params: dict[str, torch.Tensor], n: int
                   ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """(the parameters of the distinct rows, each row's index among them), or (params, None) where
    most rows differ. RandAugment's magnitude is fixed, so each of its warps has one or two
    parameter sets (a sign) among ~1,000 rows: warping those few and indexing is the same per row,
    as nothing in a warp mixes rows (the per-candidate test holds it), and saves kornia's grid of
    every output pixel of every row, most of a warp's cost."""
    keys = [key for key, value in params.items()
            if value.shape[:1] == (n,) and key not in ("batch_prob", "forward_input_shape")]
    if not keys or n < 2:
        return params, None
    table = torch.cat([params[key].reshape(n, -1).double() for key in keys], dim=1)
    distinct, row_of = torch.unique(table, dim=0, return_inverse=True)
    if len(distinct) > n // 2:
        return params, None
    first = torch.zeros(len(distinct), dtype=torch.long).scatter_(0, row_of, torch.arange(n))
    shared = {key: value.index_select(0, first) if value.shape[:1] == (n,) else value
              for key, value in params.items()}
    return shared, row_of


def _transform(op: Any, images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """What kornia's op(images, params=params) computes for p = 1, by the two methods a kornia
    augmentation defines (compute_transformation, for a geometric one's matrices, and
    apply_transform), without its forward's bookkeeping around them (its p, matrices kept for
    boxes and keypoints, parameter and state records): AutoAugment's 50 operations a chunk
    cost 9.7 ms on 8 images each against 12.4 through kornia's forward."""
    transform = op.compute_transformation(images, params, op.flags) if _geometric(op) else None
    return op.apply_transform(images, params, op.flags, transform=transform)


def _geometric(op: Any) -> bool:
    from kornia.augmentation import GeometricAugmentationBase2D

    return isinstance(op, GeometricAugmentationBase2D)


def _rounded(images: torch.Tensor) -> torch.Tensor:
    """float [0, 1] images, in place, as the uint8 levels they round to (still float: copy_ into
    uint8 images or .to(torch.uint8) makes them uint8)."""
    return images.clamp_(0, 1).mul_(255).round_()


def _kornia_candidates(spec: PolicySpec, auto: Any) -> list[torch.nn.Module]:
    """kornia's policy classes, one per candidate, their rotate, shear and translate sampling the
    nearest pixel. transformation_matrix_mode "skip": the chained geometric matrices are for boxes
    and keypoints, which a policy here never sees (and the rows-only forward would give kornia a
    matrix per gated row, not per row)."""
    from kornia.constants import Resample

    candidates = _kornia_policies(spec, auto)
    for operation in kornia_operations(candidates, auto):
        if "resample" in operation.op.flags:
            # Nearest, as torchvision's policies by default (and the AutoAugment paper's code): each
            # pixel keeps a level of the image or the fill, and it costs less than kornia's bilinear
            # default (docs/performance.md).
            operation.op.flags["resample"] = Resample.NEAREST
    return candidates


def _kornia_policies(spec: PolicySpec, auto: Any) -> list[torch.nn.Module]:
    """kornia's policy classes as they come, one per candidate."""
    if spec.name == "autoaugment":
        from kornia.augmentation.auto.autoaugment.autoaugment import cifar10_policy

        return [auto.AutoAugment(policy=[sub], transformation_matrix_mode="skip") for sub in cifar10_policy]
    if spec.name == "randaugment":
        from kornia.augmentation.auto.rand_augment.rand_augment import default_policy

        return [auto.RandAugment(n=1, m=spec.magnitude, policy=[op], transformation_matrix_mode="skip")
                for op in default_policy]
    if spec.name == "trivialaugment":
        from kornia.augmentation.auto.trivial_augment.trivial_augment import default_policy as trivial

        return [auto.TrivialAugment(policy=[op], transformation_matrix_mode="skip") for op in trivial]
    return []


@lru_cache(maxsize=4)
def policy_for(spec: PolicySpec, device: torch.device) -> Policy:
    """The spec's Policy on device, built once per process."""
    return Policy(spec, device)


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """torch's CPU generator (and the device's, on CUDA) forked and seeded: what kornia draws."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.random.default_generator.manual_seed(seed)
        if devices:
            torch.cuda.manual_seed(seed)
        yield


def chunk_seed(base: int, rank: int, chunk: int) -> int:
    """The seed of one rank's chunk of an epoch, from the epoch's base draw."""
    return (base * 1_000_003 + rank * 65_537 + chunk) % 2**63

