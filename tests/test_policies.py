"""data.policy and data.random_erasing: each policy's per-image draws against its definition (a
binomial bound over thousands of images), exact resumes, the missing extra, bad values."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms import v2

from conftest import block_import, tiny_config, write_yaml
from vggtrain import data as data_module
from vggtrain.checkpoint import load_checkpoint
from vggtrain.cli import main
from vggtrain.config import ConfigError, config_from_dict
from vggtrain.data import Augmentation, TrainLoader, random_split
from vggtrain.fit import fit
from vggtrain.policies import ERASING_SCALE, Policy, PolicySpec

N = 3000  # images per frequency test
CPU = torch.device("cpu")
# kornia's operation classes under torchvision's names for them
TORCHVISION_NAME = {"Saturate": "Color"}


def within_binomial(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    """count of n trials is within `sigmas` standard deviations of n*p (exactly n*p when p is 0 or 1)."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1e-9


@pytest.fixture(autouse=True)
def one_thread():
    """kornia runs many small operators; on a shared 2-core machine two OpenMP threads make each
    of them many times slower than one (spinning), so these tests use one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (N, 3, 32, 32), generator=generator, dtype=torch.uint8)


def _op_names(candidate: torch.nn.Module) -> list[str]:
    names = [type(op).__name__ for sub in candidate.children() for op in sub.children()]
    return [TORCHVISION_NAME.get(n, n) for n in names]


def test_autoaugment_is_torchvisions_cifar10_policy_drawn_per_image(images):
    policy = Policy(PolicySpec("autoaugment"), CPU)
    out, mask = policy(images, seed=1)
    draw = policy.last
    table = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)._policies  # the paper's, as torchvision has it
    assert len(policy.candidates) == len(table) == 25 and mask is None and out.dtype == torch.uint8
    assert [_op_names(c) for c in policy.candidates] == [[name for name, _, _ in sub] for sub in table]
    chosen = draw.choices[0]
    assert draw.choices.shape == (1, N)
    for s in range(25):  # each sub-policy chosen uniformly, per image
        assert within_binomial(int((chosen == s).sum()), N, 1 / 25), s
    untouched = torch.ones(N, dtype=torch.bool)
    for step, s, rows, params in draw.applied:
        assert step == 0 and torch.equal(rows.sort().values, (chosen == s).nonzero().flatten())
        for (_, probability, _), op in zip(table[s], params[0].data, strict=True):
            gate = op.data["batch_prob"].bool()
            assert within_binomial(int(gate.sum()), len(rows), probability), (s, table[s])
            untouched[rows[gate]] = False
    # an image whose ops all drew "skip" leaves the policy exactly as it came in
    assert untouched.any() and torch.equal(out[untouched], images[untouched])


def test_randaugment_gives_each_image_n_distinct_operations(images):
    policy = Policy(PolicySpec("randaugment", ops=3, magnitude=12), CPU)
    out, _ = policy(images, seed=2)
    draw, k = policy.last, len(policy.candidates)
    assert k == 15 and draw.choices.shape == (3, N)
    per_image = draw.choices.T.sort(dim=1).values
    assert (per_image[:, 1:] != per_image[:, :-1]).all()  # N distinct operations each
    for op in range(k):  # each operation in an image's N with chance N / 15
        assert within_binomial(int((draw.choices == op).any(0).sum()), N, 3 / k), op
    assert len(draw.applied) == 3 * k
    for step, op, rows, params in draw.applied:
        assert torch.equal(rows.sort().values, (draw.choices[step] == op).nonzero().flatten())
        gates = params[0].data[0].data["batch_prob"]
        assert bool((gates == 1).all())  # RandAugment always applies what it chose
        assert params[0].data[0].data["forward_input_shape"][0] == len(rows)
    assert (out != images).flatten(1).any(1).float().mean() > 0.9


def test_trivialaugment_gives_each_image_one_operation_uniformly(images):
    policy = Policy(PolicySpec("trivialaugment"), CPU)
    policy(images, seed=3)
    draw, k = policy.last, len(policy.candidates)
    assert draw.choices.shape == (1, N) and k == 12
    for op in range(k):
        assert within_binomial(int((draw.choices[0] == op).sum()), N, 1 / k), op


@pytest.mark.parametrize("p", [0.25, 1.0])
def test_random_erasing_erases_each_image_with_its_probability(images, p):
    policy = Policy(PolicySpec("none", erasing=p), CPU)
    out, mask = policy(images, seed=4)
    erased = policy.last.erased
    assert torch.equal(out, images) and mask.shape == (N, 1, 32, 32) and mask.dtype == torch.bool
    assert within_binomial(int(erased.sum()), N, p)
    area = mask.flatten(1).sum(1) / 1024
    assert torch.equal(area > 0, erased)  # a rectangle exactly where the draw said so
    lo, hi = ERASING_SCALE
    assert bool(((area[erased] >= lo * 0.8) & (area[erased] <= hi * 1.2)).all())


def _rounding_after_each_operation(candidates: list[torch.nn.Module], auto) -> None:
    """kornia's own operations (their forward, blend and all) on float images, each rounded back
    to uint8: the reference for Policy's candidates."""
    from vggtrain.policies import kornia_operations

    for operation in kornia_operations(candidates, auto):
        def forward(x, params=None, _kornias=operation.forward):
            return _kornias(x.float() / 255, params).clamp(0, 1).mul(255).round().to(torch.uint8)
        operation.forward = forward


@pytest.mark.parametrize("name", ["autoaugment", "randaugment", "trivialaugment"])
def test_each_candidate_returns_what_kornias_own_operations_do_rounded_after_each(images, name):
    """Policy runs each operation on the rows its gate chose, without kornia's blend, on uint8
    images (pointwise operations through a table of the 256 levels, autocontrast through a probe,
    warps through an image of positions, equalize, sharpness and colour written out here): the same
    images, bit for bit, as kornia's policy classes run
    as they come with each operation rounded back to uint8, for every candidate."""
    from vggtrain.policies import _kornia_candidates, _seeded, kornia_augmentation, kornia_operations

    spec = PolicySpec(name, magnitude=12)
    ours = Policy(spec, CPU).candidates
    auto = kornia_augmentation().auto
    theirs = _kornia_candidates(spec, auto)
    _rounding_after_each_operation(theirs, auto)
    x = torch.cat([images[:300], _natural(100)])  # random levels, and images with few levels and a range
    operations = kornia_operations(ours, auto)
    assert operations and all("forward" in vars(op) for op in operations)  # the rows-only forward is in place
    gated = 0
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        with _seeded(i, CPU):
            mine = a(x.clone())
        with _seeded(i, CPU):
            kornias = b(x.clone())
        assert mine.dtype == torch.uint8 and torch.equal(mine, kornias), (name, i)
        assert not torch.equal(mine, x) or name == "autoaugment", (name, i)  # each candidate changes images
        gated += sum(int(item.data["batch_prob"].sum()) < len(x) for item in a._params[0].data)
    assert (gated > 0) == (name == "autoaugment")  # the rows-only path was taken where gates are < 1


@pytest.mark.parametrize("name", ["randaugment", "trivialaugment"])
def test_rotate_shear_and_translate_sample_the_nearest_pixel(images, name):
    """Each geometric candidate's output holds only levels of its own image or the fill (0), as
    torchvision's policies' default nearest interpolation gives; kornia's bilinear default makes
    new levels between neighbours (the reference, to show the check can fail)."""
    from vggtrain.policies import _kornia_policies, kornia_augmentation, kornia_operations

    auto = kornia_augmentation().auto
    spec = PolicySpec(name, magnitude=20)
    x = images[:200] // 64 * 64 + 32  # four levels an image: a blend of neighbours makes others
    geometric = 0
    for ours, bilinear in zip(Policy(spec, CPU).candidates, _kornia_policies(spec, auto), strict=True):
        if "resample" not in kornia_operations([ours], auto)[0].op.flags:
            continue
        geometric += 1
        out = ours(x.clone())
        # per image, a bitmap of the levels it holds: the output's within the input's, plus 0
        held = torch.zeros(len(x), 256, dtype=torch.bool).scatter_(1, x.view(len(x), -1).long(), True)
        held[:, 0] = True
        made = torch.zeros_like(held).scatter_(1, out.view(len(x), -1).long(), True)
        assert not (made & ~held).any() and not torch.equal(out, x)
        smooth = bilinear(x.float() / 255).mul(255).round().to(torch.uint8)
        made = torch.zeros_like(held).scatter_(1, smooth.view(len(x), -1).long(), True)
        assert (made & ~held).any()
    assert geometric == 5  # rotate, shear x and y, translate x and y


@pytest.mark.parametrize("shape", [(40, 3, 32, 32), (40, 3, 5, 5)])
def test_copying_rows_back_is_index_copy_as_words_or_bytes(shape):
    """_copy_rows writes the rows in place as int64 words (3,072 bytes a row) or bytes (75),
    what index_copy_ writes, into contiguous images and into a strided view of them."""
    from vggtrain.policies import _copy_rows

    generator = torch.Generator().manual_seed(2)
    into = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    rows = torch.tensor([0, 3, 17, 39])
    source = torch.randint(0, 256, (4, *shape[1:]), dtype=torch.uint8, generator=generator)
    expected = into.clone().index_copy_(0, rows, source)
    assert _copy_rows(into, rows, source) is into and torch.equal(into, expected)
    wide = torch.zeros(shape[0], shape[1] + 1, *shape[2:], dtype=torch.uint8)
    strided = wide[:, 1:]  # not contiguous: bytes, through the view
    _copy_rows(strided, rows, source)
    assert torch.equal(wide[rows, 1:], source) and not wide[:, 0].any()


@pytest.mark.parametrize("shape", [(32, 32), (20, 24)])
def test_equalize_is_torchvisions(images, shape):
    """_equalize gives torchvision's equalize (PIL's) of uint8 images, written into them: random,
    smooth, four-level and flat channels, and images of another size."""
    from torchvision.transforms.v2.functional import equalize

    from vggtrain.policies import _equalize

    x = torch.cat([images[:100], _natural(100)])[:, :, :shape[0], :shape[1]].contiguous()
    x[:5, 1] = 255  # a channel all at the top level
    expected = equalize(x)
    out = x.clone()
    assert _equalize(out).data_ptr() == out.data_ptr() and torch.equal(out, expected)
    assert not torch.equal(expected, x)


@pytest.mark.parametrize("name, most", [("randaugment", 2), ("trivialaugment", None)])
def test_rows_with_the_same_parameters_share_one_warp(images, monkeypatch, name, most):
    """RandAugment's fixed magnitude leaves each warp one or two parameter sets (a sign): only
    those are warped, and every row indexed to its own (the per-candidate test holds the images
    the same); TrivialAugment's magnitudes differ per row, so every row is warped."""
    from vggtrain import policies

    warped: list[int] = []
    transform = policies._transform

    def recording(op, images, params):
        if images.shape[1] == 1 and images.shape[2] > 1:  # a probe of positions (levels' are 1 x 256)
            warped.append(len(images))
        return transform(op, images, params)

    monkeypatch.setattr(policies, "_transform", recording)
    x = images[:400]
    for candidate in Policy(PolicySpec(name), CPU).candidates:
        candidate(x.clone())
    assert len(warped) == 5
    assert all(w <= most for w in warped) if most else all(w == len(x) for w in warped)


def test_an_operation_of_no_other_kind_runs_as_kornias_on_float_images(images):
    """The fallback for an operation none of the kinds covers (none in these three policies with
    kornia 0.9.0; hue here) is kornia's op on float images, rounded back into the uint8 ones; a
    bilinear rotation is not taken for a move of pixels, nor saturation of one channel for RGB."""
    from vggtrain.policies import _kind, _on_every_row, kornia_augmentation

    K = kornia_augmentation()
    hue = K.RandomHue((-0.3, 0.3), p=1.0)
    x = images[:50]
    params = hue.forward_parameters(x.shape)
    expected = hue(x.float() / 255, params=params).clamp(0, 1).mul(255).round().to(torch.uint8)
    assert _kind(hue, K) == "float" and torch.equal(_on_every_row(hue, "float", x.clone(), params), expected)
    assert not torch.equal(expected, x)
    assert _kind(K.RandomRotation(30.0, resample="bilinear"), K) == "float"
    assert _kind(K.RandomRotation(30.0, resample="nearest"), K) == "positions"
    assert _kind(K.RandomShear(10.0, resample="nearest", padding_mode="border"), K) == "float"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["autoaugment", "randaugment", "trivialaugment"])
def test_on_a_gpu_each_candidate_gives_the_cpus_images_but_on_few_pixels(images, name):
    """On a GPU kornia's own forward runs on float images, rounded after each operation; the CPU's
    kinds give the same images bit for bit on the CPU. Across devices the float kernels differ,
    so a pixel may round the other way (one level) or a warp sample the neighbour: few pixels."""
    from vggtrain.policies import _seeded

    spec = PolicySpec(name, magnitude=12)
    cuda = torch.device("cuda")
    x = torch.cat([images[:300], _natural(100)])
    for i, (a, b) in enumerate(zip(Policy(spec, CPU).candidates, Policy(spec, cuda).candidates, strict=True)):
        with _seeded(i, CPU):
            on_cpu = a(x.clone())
        on_gpu = b(x.to(cuda), params=a._params).cpu()  # the parameters the CPU drew
        # A nearest warp near a tie may take the neighbouring pixel (any level), so: few pixels.
        differ = (on_cpu.int() - on_gpu.int()).abs()
        assert (differ > 1).float().mean() < 1e-3 and (differ > 0).float().mean() < 1e-2, (name, i)


def _natural(n: int) -> torch.Tensor:
    """n smooth uint8 images with a narrower range per channel than uniform noise, some of one
    level (autocontrast's and equalize's edge cases: a flat channel, a few levels)."""
    generator = torch.Generator().manual_seed(1)
    coarse = torch.rand(n, 3, 4, 4, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)
    low = torch.rand(n, 3, 1, 1, generator=generator) * 0.5
    spread = torch.rand(n, 3, 1, 1, generator=generator) * 0.5
    images = (low + smooth * spread).mul(255).round().to(torch.uint8)
    images[: n // 10] = images[: n // 10, :, :1, :1]  # flat images
    images[n // 10: n // 5] //= 64  # four levels
    return images


def test_kornias_blend_is_skipped_and_the_probabilities_kept(images, monkeypatch):
    """On the CPU the rows-only forward runs each op as kornia runs p = 1: kornia's blend of output
    and input by the gates is never called (though AutoAugment's ops have p < 1), and p is left
    as it was."""
    import kornia.augmentation.base as kornia_base

    blends = []
    blend = kornia_base._AugmentationBase._blend_by_prob
    monkeypatch.setattr(kornia_base._AugmentationBase, "_blend_by_prob",
                        staticmethod(lambda *args: blends.append(1) or blend(*args)))
    from vggtrain.policies import kornia_augmentation, kornia_operations

    policy = Policy(PolicySpec("autoaugment"), CPU)
    ops = [operation.op for operation in kornia_operations(policy.candidates, kornia_augmentation().auto)]
    before = [op.p for op in ops]
    policy(images[:500], seed=3)
    assert [op.p for op in ops] == before and min(before) < 1.0
    assert not blends
    # kornia's own p < 1 path does blend: the counter counts
    next(op for op in ops if op.p < 1)(images[:8].float() / 255)
    assert blends


@pytest.mark.parametrize("name", ["trivialaugment", "autoaugment"])
def test_sharpness_convolves_channels_last_floats_and_every_candidate_hands_back_nchw_uint8(
        images, monkeypatch, name):
    """Sharpness's convolution (faster in oneDNN on channels_last) gets channels_last floats, on
    every row (TrivialAugment's p = 1) and on the gated rows (AutoAugment's p < 1); every
    candidate hands back NCHW uint8 images."""
    layouts: list[bool] = []
    rows: list[int] = []
    conv = torch.nn.functional.conv2d

    def recording(input, *args, **kwargs):
        layouts.append(input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous())
        rows.append(len(input))
        return conv(input, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv2d", recording)
    x = images[:600]
    for candidate in Policy(PolicySpec(name), CPU).candidates:
        out = candidate(x.clone())
        assert out.is_contiguous() and out.dtype == torch.uint8
    assert layouts and all(layouts)
    assert (min(rows) < len(x)) == (name == "autoaugment")  # the gated-rows path was taken there


class _AddLevels(torch.nn.Module):
    """A stand-in candidate that adds k grey levels: which candidates an image went through, in
    which steps, reads off its pixels."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k, self._params = k, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.k  # uint8 in and out, as a candidate


def test_each_image_gets_back_the_result_of_its_own_candidates(images):
    policy = Policy(PolicySpec("randaugment", ops=2), CPU)
    policy.candidates = [_AddLevels(k) for k in range(len(policy.candidates))]
    small = images[:1000] // 2  # 0-127: two steps of at most 14 levels stay below 255
    out, _ = policy(small, seed=11)
    steps = policy.last.choices  # (2, n): the candidate of each image at each step
    assert torch.equal(out.int(), small.int() + steps.sum(0)[:, None, None, None].int())


def test_a_policy_draws_the_same_for_the_same_seed_and_leaves_torchs_generator_alone(images):
    policy = Policy(PolicySpec("trivialaugment", erasing=0.5), CPU)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, ma = policy(images[:500], seed=9)
    assert torch.equal(torch.random.get_rng_state(), before)  # MixUp's and dropout's draws unchanged
    b, mb = policy(images[:500], seed=9)
    c, _ = policy(images[:500], seed=10)
    assert torch.equal(a, b) and torch.equal(ma, mb) and not torch.equal(a, c)


def _batches(loader: TrainLoader, epoch: int, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(loader.epoch(epoch, start=start))


@pytest.mark.parametrize("name", ["trivialaugment", "none"])
def test_a_policy_gets_nchw_chunks_and_channels_last_runs_get_the_same_batches_laid_out_channels_last(
        monkeypatch, name):
    """Under a policy the chunk is cropped NCHW (kornia's layout; gathering rows of a channels_last
    chunk transposes it); random erasing alone keeps a channels_last run's chunk channels_last.
    Either way a channels_last run's batches are channels_last, the same values."""
    monkeypatch.setattr(data_module, "AUGMENT_CHUNK_IMAGES", 96)
    monkeypatch.setattr(data_module, "POLICY_CHUNK_IMAGES", 96)
    seen: list[bool] = []
    call = Policy.__call__
    monkeypatch.setattr(Policy, "__call__", lambda self, images, seed: seen.append(images.is_contiguous())
                        or call(self, images, seed))
    aug = Augmentation(policy=PolicySpec(name, erasing=0.5), cutout=8)
    split = random_split(300, CPU, seed=5)
    nchw, last = (_batches(TrainLoader(split, 32, seed=7, aug=aug, channels_last=layout), 0)
                  for layout in (False, True))
    assert len(seen) == 6 and all(seen[:3])  # 3 chunks a run: the NCHW run's, then the channels_last run's
    assert all(seen[3:]) == (name != "none") and any(seen[3:]) == (name != "none")
    assert all(x.is_contiguous(memory_format=torch.channels_last) for x, _ in last)
    assert all(torch.equal(a, b) and torch.equal(ya, yb) for (a, ya), (b, yb) in zip(nchw, last, strict=True))


@pytest.mark.parametrize("name", ["autoaugment", "randaugment"])
def test_a_resumed_epoch_gets_the_same_batches_bit_for_bit(monkeypatch, name):
    # chunks of 3 batches, so a resume lands inside a chunk and in later ones
    monkeypatch.setattr(data_module, "AUGMENT_CHUNK_IMAGES", 96)
    monkeypatch.setattr(data_module, "POLICY_CHUNK_IMAGES", 96)
    aug = Augmentation(policy=PolicySpec(name, erasing=0.5), cutout=8)
    loader = TrainLoader(random_split(400, CPU, seed=5), 32, seed=7, aug=aug)
    whole = _batches(loader, 1)
    assert len(whole) == 12
    for start in (1, 4, 8):
        resumed = _batches(loader, 1, start)
        assert len(resumed) == len(whole) - start
        assert all(torch.equal(x, y) and torch.equal(a, b)
                   for (x, a), (y, b) in zip(resumed, whole[start:], strict=True))
    assert not torch.equal(whole[0][0], _batches(loader, 2)[0][0])  # another epoch, other draws
    plain = _batches(TrainLoader(loader.split, 32, seed=7, aug=Augmentation(cutout=8)), 1)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(plain, whole, strict=True))  # same order
    assert not torch.equal(plain[0][0], whole[0][0])


def test_no_policy_is_the_data_path_as_before():
    split = random_split(300, CPU, seed=6)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    old = list(data_module.train_batches(split, 50, g1, Augmentation(cutout=4)))
    new = list(data_module.train_batches(split, 50, g2, Augmentation(cutout=4, policy=PolicySpec())))
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(old, new, strict=True))
    assert torch.equal(g1.get_state(), g2.get_state())  # nothing more drawn


def _policy_run(root, tmp_path, name, **train):
    raw = tiny_config(root, tmp_path / "runs", name=name,
                      data={"policy": "randaugment", "policy_ops": 1, "random_erasing": 0.5},
                      train={"epochs": 2, **train})
    return config_from_dict(raw, "test")


def test_a_policy_run_killed_mid_epoch_resumes_bit_for_bit(cifar_bin, tmp_path, monkeypatch):
    from conftest import die_after_mid_epoch_checkpoint

    fit(_policy_run(cifar_bin, tmp_path, "straight"), test=False)
    die_after_mid_epoch_checkpoint(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        fit(_policy_run(cifar_bin, tmp_path, "killed", checkpoint_every_steps=5), test=False)
    assert load_checkpoint(tmp_path / "runs" / "killed" / "last.pt")["progress"]["step"] == 5
    monkeypatch.undo()
    fit(resume=tmp_path / "runs" / "killed", test=False)
    a, b = (load_checkpoint(tmp_path / "runs" / n / "last.pt") for n in ("straight", "killed"))
    assert a["global_step"] == b["global_step"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_policy_without_kornia_is_one_line_and_exit_2(cifar_bin, tmp_path, monkeypatch, capsys):
    path = write_yaml(tmp_path / "c.yaml", tiny_config(cifar_bin, tmp_path / "runs",
                                                       data={"policy": "trivialaugment"}))
    block_import(monkeypatch, "kornia")
    assert main(["fit", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "vggtrain: data.policy and data.random_erasing need kornia: pip install 'vggtrain[augment]'"
    assert not (tmp_path / "runs" / "tiny").exists()


@pytest.mark.parametrize("setting, message", [
    ("data.policy=autoaugment_imagenet", "data.policy must be one of none, autoaugment, randaugment, "
                                         "trivialaugment"),
    ("data.policy_magnitude=30", "data.policy_magnitude must be <= 29"),
    ("data.policy_ops=16", "data.policy_ops must be <= 15"),
    ("data.random_erasing=1.5", "data.random_erasing must be in [0, 1]"),
])
def test_bad_values_are_refused_in_one_line(cifar_bin, tmp_path, capsys, setting, message):
    path = write_yaml(tmp_path / "c.yaml", tiny_config(cifar_bin, tmp_path / "runs",
                                                       data={"policy": "randaugment"}))
    assert main(["fit", "--config", str(path), "--set", setting]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    with pytest.raises(ConfigError):
        config_from_dict(tiny_config(cifar_bin, tmp_path, data={"augment": False, "random_erasing": 0.1}),
                         "t")
