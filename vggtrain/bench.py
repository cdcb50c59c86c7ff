"""`vggtrain bench`: where the time goes, measured on one model, batch size and precision.

bare step       forward + backward + SGD on one fixed device-resident batch: the ceiling
data path       vggtrain's batched sampling + crop/flip + normalisation on the device
reference data  torchvision's RandomCrop/RandomHorizontalFlip/ToTensor/Normalize, DataLoader(2 workers)
fit             the training loop (train.train_one_epoch) over N steps, TensorBoard logging included
real fit        a real `fit` of 3 epochs of N steps on a small synthetic CIFAR-10 written for it:
                validation, checkpoints, status and TensorBoard included (epochs 2-3 timed)
ops             ATen operators and host syncs per training step (stepcount.count_step)
eval            evaluate.evaluate_split() over a few batches
allocator       the bare step in two fresh processes: system allocator vs the configured one
policies        each augmentation policy (data.policy, data.random_erasing) on vggtrain's batched
                data path vs torchvision's per-image transforms in a DataLoader(2 workers), alternated

Images are random uint8 (speed does not depend on content), so no dataset is needed.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vggtrain import allocator
from vggtrain import data as data_path
from vggtrain.config import TrainConfig
from vggtrain.data import CIFAR10_MEAN, CIFAR10_STD, Augmentation, Split, random_split, train_batches
from vggtrain.device import channels_last_for, select_device, set_deterministic, synchronize
from vggtrain.errors import ConfigError
from vggtrain.evaluate import eval_settings, evaluate_split
from vggtrain.fit import fit
from vggtrain.graphs import WARMUP_STEPS
from vggtrain.model import build_model, count_parameters
from vggtrain.policies import PolicySpec, kornia_augmentation
from vggtrain.run import EpochProgress, build_run
from vggtrain.stepcount import count_step
from vggtrain.synthetic import write_synthetic_cifar10
from vggtrain.train import step_function, train_one_epoch


def _rate(fn: Callable[[], int], device: torch.device, warmup: int, steps: int) -> float:
    """Images per second of fn (which returns how many images it did), after warm-up calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    t0, images = time.perf_counter(), 0
    for _ in range(steps):
        images += fn()
    synchronize(device)
    return images / (time.perf_counter() - t0)


def _bench_run(cfg: TrainConfig, run_dir: Path, train_size: int) -> Any:
    if cfg.distill.teachers:  # the bare step below is the network's own; a teacher's forward is not in it
        raise ConfigError("bench measures the network's own step, without distill.teachers; "
                          "set distill.teachers=[] (the epoch line of a fit gives the teachers' share)")
    return build_run(cfg, run_dir, [str(i) for i in range(cfg.model.num_classes)], train_size)


def bench_bare_step(cfg: TrainConfig, run_dir: Path, warmup: int, steps: int) -> float:
    run = _bench_run(cfg, run_dir, cfg.train.batch_size * steps)
    bs = cfg.train.batch_size
    batch = next(train_batches(random_split(bs, run.device), bs, torch.Generator().manual_seed(0),
                               Augmentation.of(cfg.data), run.channels_last))
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    run.model.train()
    train = step_function(run, criterion)  # the captured CUDA graph's under train.cuda_graphs
    if cfg.train.cuda_graphs:  # its eager warm-up and its capture happen before the clock starts
        warmup = max(warmup, WARMUP_STEPS + 2)

    def step() -> int:
        train(*batch)
        return cfg.train.batch_size

    return _rate(step, run.device, warmup, steps)


def bench_data_path(cfg: TrainConfig, split: Split, steps: int) -> float:
    device = split.images.device
    channels_last = channels_last_for(cfg.train.channels_last, device)
    batches = _endless(lambda: train_batches(split, cfg.train.batch_size, torch.Generator().manual_seed(0),
                                             Augmentation.of(cfg.data), channels_last))
    return _rate(lambda: len(next(batches)[1]), device, 2, steps)


def _endless(epoch: Callable[[], Iterator[Any]]) -> Iterator[Any]:
    """Batches of epoch() after epoch(), for as long as a measurement wants them."""
    while True:
        yield from epoch()


class _PILDataset(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 does per item: a PIL image, then the transform."""

    def __init__(self, images_hwc: Any, labels: list[int], transform: Callable | None) -> None:
        self.images, self.labels, self.transform = images_hwc, labels, transform

    @classmethod
    def of(cls, split: Split, transform: Callable | None) -> _PILDataset:
        """split's images as the (N, H, W, C) uint8 array PIL reads, and its labels."""
        return cls(split.images.cpu().permute(0, 2, 3, 1).contiguous().numpy(), split.labels.cpu().tolist(),
                   transform)

    def with_transform(self, transform: Callable) -> _PILDataset:
        """The same images and labels (not copied) under another transform."""
        return _PILDataset(self.images, self.labels, transform)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def bench_reference_data_path(cfg: TrainConfig, split: Split, steps: int, workers: int = 2) -> float:
    from torchvision import transforms as T

    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(CIFAR10_MEAN, CIFAR10_STD)])
    loader = _reference_loader(_PILDataset.of(split, transform), cfg.train.batch_size, workers,
                               persistent=True)
    return _reference_rate(loader, steps)


def _reference_loader(ds: _PILDataset, batch_size: int, workers: int,
                      persistent: bool = False) -> torch.utils.data.DataLoader:
    """torchvision's usual training loader over ds: shuffled, workers, last partial batch dropped."""
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                                       drop_last=True, persistent_workers=persistent)


def _reference_rate(loader: torch.utils.data.DataLoader, steps: int) -> float:
    """Images/s of loader's batches over `steps` batches, after 3 (the workers' start-up)."""
    batches = _endless(lambda: iter(loader))
    return _rate(lambda: len(next(batches)[1]), torch.device("cpu"), 3, steps)


# "crop, flip only" is the data path's and the reference data path's work, measured beside the
# policies: it shows how busy the machine was against the data/reference rows of other runs.
POLICY_BENCH = (("crop, flip only", PolicySpec()), ("autoaugment", PolicySpec("autoaugment")),
                ("randaugment", PolicySpec("randaugment")), ("trivialaugment", PolicySpec("trivialaugment")),
                ("random erasing 0.25", PolicySpec(erasing=0.25)))


def torchvision_policy(spec: PolicySpec, stats: tuple = (CIFAR10_MEAN, CIFAR10_STD)) -> Callable:
    """The same augmentation as torchvision's per-image transforms on a PIL image: crop and flip,
    the policy (TrivialAugmentWide: torchvision's TrivialAugment), to float, normalise, erase."""
    from torchvision.transforms import v2

    policy = {"autoaugment": [v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)],
              "randaugment": [v2.RandAugment(spec.ops, spec.magnitude)],
              "trivialaugment": [v2.TrivialAugmentWide()], "none": []}[spec.name]
    erase = [v2.RandomErasing(spec.erasing)] if spec.erasing else []
    return v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(), *policy, v2.PILToTensor(),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(*stats), *erase])


def bench_policies(cfg: TrainConfig, split: Split, rounds: int = 2, workers: int = 2) -> dict[str, Any]:
    """Images/s of each policy on the batched data path and through torchvision in a DataLoader,
    alternated policy by policy for `rounds` rounds in this process; the best round of each counts
    (the least disturbed by the rest of the machine)."""
    kornia_augmentation()  # the one-line error before any measurement
    pil = _PILDataset.of(split, transform=None)  # converted once, for every policy and round
    results: dict[str, Any] = {}
    for _ in range(rounds):
        for name, spec in POLICY_BENCH:
            batched, reference = _policy_rates(cfg, split, pil.with_transform(torchvision_policy(spec)),
                                               spec, workers)
            best = results.setdefault(name, {"batched": 0.0, "reference": 0.0})
            best["batched"] = max(best["batched"], batched)
            best["reference"] = max(best["reference"], reference)
    for r in results.values():
        r["ratio"] = r["batched"] / r["reference"]
    return {"rounds": rounds, "workers": workers, "torch_threads": torch.get_num_threads(),
            "images": len(split), "by_policy": results}


def _policy_rates(cfg: TrainConfig, split: Split, reference_ds: _PILDataset, spec: PolicySpec,
                  workers: int) -> tuple[float, float]:
    """(batched, torchvision) images/s of one policy: spec on split's tensor, reference_ds (the
    same images under torchvision_policy(spec)) in a DataLoader. The batched path is timed over
    whole chunks of 16,384 images (data.POLICY_CHUNK_IMAGES, the policy's unit of work) after one
    untimed chunk, crop, flip and normalisation included; torchvision's over as many images, after
    3 batches."""
    bs, device = cfg.train.batch_size, split.images.device
    channels_last = channels_last_for(cfg.train.channels_last, device)
    chunk_steps = max(1, data_path.POLICY_CHUNK_IMAGES // bs)
    aug = Augmentation(policy=spec)
    batches = _endless(lambda: train_batches(split, bs, torch.Generator().manual_seed(0), aug, channels_last))
    batched = _rate(lambda: len(next(batches)[1]), device, chunk_steps, 2 * chunk_steps)
    # bench's split of 3 chunks outlasts the measurement: no worker restart inside it. The
    # iterator, and with it its workers, ends as this function returns, before the next measurement.
    reference = _reference_rate(_reference_loader(reference_ds, bs, workers), 2 * chunk_steps)
    return batched, reference


def bench_fit(cfg: TrainConfig, run_dir: Path, steps: int, warmup: int) -> float:
    """The real loop over `steps` steps, after a short warm-up epoch (first-call costs excluded)."""
    from torch.utils.tensorboard import SummaryWriter

    bs = cfg.train.batch_size
    run = _bench_run(cfg, run_dir, bs * steps)
    # No stop signals: Ctrl-C interrupts at once, with no checkpoint to resume in a directory that
    # is deleted as bench exits.
    with SummaryWriter(str(run_dir / "tb")) as writer:
        train_one_epoch(run, random_split(bs * max(warmup, 1), run.device, seed=1), writer)
        run.progress = EpochProgress()
        split = random_split(bs * steps, run.device, seed=2)
        synchronize(run.device)
        t0 = time.perf_counter()
        train_one_epoch(run, split, writer)  # ends with a host read of its sums
        return bs * steps / (time.perf_counter() - t0)


def bench_real_fit(cfg: TrainConfig, tmp: Path, steps: int, epochs: int = 3) -> float:
    """Images per second of a real fit's epochs after the first (which pays for warm-up), from
    epoch end to epoch end: the step, validation, checkpoints and logging, as a user's run has them."""
    import contextlib
    import copy
    import io

    bs = cfg.train.batch_size
    val = min(2 * bs, 5000)
    root = tmp / "real_fit_data"
    write_synthetic_cifar10(root, "bin", per_batch=-(-(bs * steps + val) // 5), test_size=bs, seed=0)
    c = copy.deepcopy(cfg)
    c.name, c.train.out_dir, c.train.epochs = "bench", str(tmp / "real_fit_runs"), epochs
    c.data.root, c.data.download, c.data.val_size, c.data.dataset = str(root), False, val, "cifar10"
    c.model.num_classes = 10
    ends: list[float] = []

    def mark(run: Any) -> bool:
        synchronize(run.device)
        ends.append(time.perf_counter())
        return False

    with contextlib.redirect_stdout(io.StringIO()):
        fit(c, tmp / "real_fit_runs" / "bench", on_epoch_end=mark, test=False)
    return bs * steps * (epochs - 1) / (ends[-1] - ends[0])


def bench_eval(cfg: TrainConfig, run_dir: Path, split: Split) -> float:
    run = _bench_run(cfg, run_dir, len(split))
    settings = eval_settings(cfg, run.device, tta="none")
    evaluate_split(run.model, split, settings)  # warm-up
    return evaluate_split(run.model, split, settings).images_per_s  # timed inside, to its final host read


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's peak at fork.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def bench_allocators(config: str, overrides: list[str], warmup: int, steps: int, rounds: int = 2
                     ) -> dict[str, Any]:
    """The bare step and the fit loop in fresh processes, with the system allocator and the
    configured one, alternating for `rounds` rounds; the best round of each counts (the least
    disturbed by the rest of the machine)."""
    results: dict[str, Any] = {}
    configured = os.environ.get(allocator.SWITCH, "auto")
    for _ in range(rounds):
        for label, switch in (("system", "system"), ("configured", configured)):
            env = {k: v for k, v in os.environ.items()
                   if k not in (allocator.APPLIED, "LD_PRELOAD", "GLIBC_TUNABLES", "MALLOC_CONF")}
            if label == "configured":
                env.update(_users_settings())  # a user's own settings are what they configured
            env[allocator.SWITCH] = switch
            r = _bench_child(config, overrides, warmup, steps, env)
            best = results.setdefault(label, {"allocator": r["allocator"], "bare_step_images_per_s": 0.0,
                                              "fit_images_per_s": 0.0, "peak_rss_mib": 0.0})
            best["bare_step_images_per_s"] = max(best["bare_step_images_per_s"], r["bare_step"])
            best["fit_images_per_s"] = max(best["fit_images_per_s"], r["fit"])
            best["peak_rss_mib"] = max(best["peak_rss_mib"], r["peak_memory_mib"])
    s, c = results["system"], results["configured"]
    results["ratio"] = c["bare_step_images_per_s"] / s["bare_step_images_per_s"]
    results["fit_ratio"] = c["fit_images_per_s"] / s["fit_images_per_s"]
    results["rss_ratio"] = c["peak_rss_mib"] / s["peak_rss_mib"]
    results["rounds"] = rounds
    return results


def _bench_child(config: str, overrides: list[str], warmup: int, steps: int, env: dict[str, str]
                 ) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, "-m", "vggtrain", "bench", "--config", config, "--parts", "bare,fit",
               "--warmup", str(warmup), "--steps", str(steps), "--json", str(out), "--quiet"]
        for o in overrides:
            cmd += ["--set", o]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"allocator bench failed: {proc.stderr.strip()[-500:]}")
        return json.loads(out.read_text())


def _users_settings() -> dict[str, str]:
    applied = os.environ.get(allocator.APPLIED, "")
    if not applied.startswith("user's own"):
        return {}
    return {k: os.environ[k] for k in ("LD_PRELOAD", "GLIBC_TUNABLES", "MALLOC_CONF") if k in os.environ}


def machine_description() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": str(torch.__version__), "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def run_bench(cfg: TrainConfig, config_arg: str, overrides: list[str], parts: list[str], warmup: int,
              steps: int, data_steps: int) -> dict[str, Any]:
    device = select_device(cfg.train.device)
    set_deterministic(cfg.train.deterministic)
    res: dict[str, Any] = {
        "config": config_arg, "overrides": overrides, "model": cfg.model.arch,
        "parameters": count_parameters(build_model(cfg.model)),
        "batch_size": cfg.train.batch_size, "precision": cfg.train.precision,
        "channels_last": channels_last_for(cfg.train.channels_last, device), "device": str(device),
        "allocator": allocator.in_effect(), "machine": machine_description(), "steps": steps,
    }
    data_split = random_split(cfg.train.batch_size * min(data_steps, 100), device, seed=3)
    with tempfile.TemporaryDirectory() as tmp:
        if "bare" in parts:
            res["bare_step"] = bench_bare_step(cfg, Path(tmp), warmup, steps)
        if "data" in parts:
            res["data_path"] = bench_data_path(cfg, data_split, data_steps)
        if "reference" in parts:
            res["reference_data_path"] = bench_reference_data_path(cfg, data_split.to(torch.device("cpu")),
                                                                   max(data_steps // 4, 10))
        if "fit" in parts:
            res["fit"] = bench_fit(cfg, Path(tmp), steps, warmup)
        if "real" in parts:
            res["real_fit"] = bench_real_fit(cfg, Path(tmp), steps)
        if "ops" in parts:
            counted = count_step(cfg)
            res["ops_per_step"], res["syncs_per_step"] = counted.ops, counted.syncs
        if "policies" in parts:
            res["policies"] = bench_policies(cfg, random_split(3 * data_path.POLICY_CHUNK_IMAGES, device, 5))
        if "eval" in parts:
            res["eval"] = bench_eval(cfg, Path(tmp), random_split(cfg.train.eval_batch_size * 4, device, 4))
    res["peak_memory_mib"] = peak_memory_mib(device)
    if "allocator" in parts and device.type == "cpu":
        res["allocators"] = bench_allocators(config_arg, overrides, warmup, steps)
    if "fit" in res and "bare_step" in res:
        res["fit_over_bare_step"] = res["fit"] / res["bare_step"]
    if "real_fit" in res and "bare_step" in res:
        res["real_fit_over_bare_step"] = res["real_fit"] / res["bare_step"]
    if "data_path" in res and "reference_data_path" in res:
        res["data_over_reference"] = res["data_path"] / res["reference_data_path"]
    return res


def _policy_lines(p: dict[str, Any] | None) -> list[str]:
    if not p:
        return []
    lines = ["", f"  policies, img/s (best of {p['rounds']} alternated rounds; batched: {p['torch_threads']} "
             f"torch threads; torchvision: DataLoader, {p['workers']} workers):",
             f"    {'':<21}{'batched':>10}{'torchvision':>13}{'ratio':>8}"]
    for name, r in p["by_policy"].items():
        lines.append(f"    {name:<21}{r['batched']:>10,.0f}{r['reference']:>13,.0f}{r['ratio']:>7.2f}x")
    return lines


def format_table(res: dict[str, Any]) -> str:
    rows = [("bare step", res.get("bare_step"), "img/s"), ("data path", res.get("data_path"), "img/s"),
            ("reference data path", res.get("reference_data_path"), "img/s"),
            ("fit (loop, logging)", res.get("fit"), "img/s"),
            ("real fit (3 epochs)", res.get("real_fit"), "img/s"), ("eval", res.get("eval"), "img/s"),
            ("fit / bare step", res.get("fit_over_bare_step"), "x"),
            ("real fit / bare step", res.get("real_fit_over_bare_step"), "x"),
            ("ATen ops per step", res.get("ops_per_step"), ""),
            ("host syncs per step", res.get("syncs_per_step"), ""),
            ("data / reference", res.get("data_over_reference"), "x"),
            ("peak memory", res.get("peak_memory_mib"), "MiB")]
    m = res["machine"]
    lines = [f"{res['model']} ({res['parameters']:,} params), batch {res['batch_size']}, {res['precision']}"
             f"{', channels_last' if res['channels_last'] else ''} on {res['device']} "
             f"({m['cuda'] or m['cpu']}, {m['cores']} cores, torch {m['torch']})",
             f"allocator: {res['allocator']}", ""]
    lines += [f"  {name:<22}{value:>12,.2f} {unit}" for name, value, unit in rows if value is not None]
    lines += _policy_lines(res.get("policies"))
    a = res.get("allocators")
    if a:
        lines += ["", f"  by allocator (fresh processes, best of {a['rounds']} alternating rounds):",
                  f"    {'':<11}{'bare step':>10}{'fit':>10}  {'peak RSS':>9}"]
        for label in ("system", "configured"):
            r = a[label]
            lines.append(f"    {label:<11}{r['bare_step_images_per_s']:>10,.1f}"
                         f"{r['fit_images_per_s']:>10,.1f}  {r['peak_rss_mib']:>5,.0f} MiB  {r['allocator']}")
        lines.append(f"    ratio: bare step {a['ratio']:.3f}x, fit {a['fit_ratio']:.3f}x, "
                     f"peak RSS {a['rss_ratio']:.3f}x")
    return "\n".join(lines)
