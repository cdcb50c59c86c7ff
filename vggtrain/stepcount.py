"""Counting what one training step asks of the host: ATen operators (on a GPU each is a kernel
launch costing microseconds of host time) and host syncs (a read of a device value, or a copy of
a Python value to the device, each of which stalls the host until the device catches up).

Counted on any device with a `TorchDispatchMode` around the real loop (train_one_epoch): the
steady state is an 8-step epoch minus a 4-step one, divided by 4, so the epoch's own start and
end (its permutation, its final read of the sums) cancel out. Every optimizer runs its foreach
or fused kernels explicitly, so the count on the CPU is the count on a GPU.
"""

from __future__ import annotations

import collections
import copy
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vggtrain.config import TrainConfig
from vggtrain.data import random_split
from vggtrain.distill import open_teachers
from vggtrain.run import EpochProgress, build_run
from vggtrain.train import train_one_epoch

aten = torch.ops.aten

# Reads of a device value into Python (.item(), bool(t), int(t), float(t), .tolist() reach
# _local_scalar_dense; equal answers a Python bool).
_READS = {aten._local_scalar_dense.default, aten.equal.default}
# A Python value made into a tensor (torch.tensor(x), t.new_tensor(x)): on a GPU, a host-to-device copy.
_FROM_PYTHON = {aten.lift_fresh.default, aten.lift_fresh_copy.default}


class OpCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched inside it, and the host syncs among them."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.syncs = 0
        self.by_op: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.ops += 1
        self.by_op[str(func.overloadpacket.__name__)] += 1
        if func in _READS or func in _FROM_PYTHON or _host_to_device(func, args, kwargs or {}):
            self.syncs += 1
        return func(*args, **(kwargs or {}))


def _host_to_device(func: Any, args: tuple, kwargs: dict) -> bool:
    """A copy from the CPU to another device (it waits for the host's memory to be read)."""
    if func in (aten._to_copy.default, aten.copy_.default):
        src = args[1] if func is aten.copy_.default else args[0]
        dst = args[0].device if func is aten.copy_.default else kwargs.get("device")
        return isinstance(src, torch.Tensor) and src.device.type == "cpu" and dst is not None \
            and torch.device(dst).type != "cpu"
    return False


@dataclass
class StepCount:
    ops: float  # ATen operators per training step, steady state
    syncs: float  # host syncs per training step
    by_op: dict[str, float] = field(default_factory=dict)  # the most frequent, per step


def count_step(cfg: TrainConfig, device: str | None = None, top: int = 12) -> StepCount:
    """Operators and host syncs per steady-state training step of cfg's loop (random images;
    the counts do not depend on content), measured on `device` (default: the config's)."""
    cfg = copy.deepcopy(cfg)
    # A far log interval: no mid-epoch log read inside the counted epochs (an interval's read is per
    # interval, not per step). The eager step: what a CUDA graph of train.cuda_graphs would hold.
    cfg.train.log_every, cfg.train.cuda_graphs = 10**9, False
    bs = cfg.train.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        run = build_run(cfg, Path(tmp), [str(i) for i in range(cfg.model.num_classes)], bs * 8,
                        device_spec=device, teachers=open_teachers(cfg))
        counts = []
        for steps in (2, 4, 8):  # the first epoch warms up: the EMA's first copy, momentum buffers
            split = random_split(bs * steps, run.device, seed=steps)
            run.progress = EpochProgress()
            with OpCounter() as counter:
                train_one_epoch(run, split)
            counts.append(counter)
    four, eight = counts[1], counts[2]
    per_op = {k: (eight.by_op[k] - four.by_op.get(k, 0)) / 4 for k in eight.by_op}
    busiest = dict(sorted(((k, v) for k, v in per_op.items() if v), key=lambda kv: -kv[1])[:top])
    return StepCount((eight.ops - four.ops) / 4, (eight.syncs - four.syncs) / 4, busiest)
