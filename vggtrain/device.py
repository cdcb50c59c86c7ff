"""Where and in which precision a run computes."""

from __future__ import annotations

import contextlib
import os

import torch

from vggtrain.errors import UserError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def select_device(spec: str) -> torch.device:
    """auto picks cuda, then mps, then cpu; an explicit device that is absent is a usage error."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda" and (not torch.cuda.is_available()
                                  or (device.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"device {spec} is not available (CUDA devices: {torch.cuda.device_count()})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("device mps is not available on this machine")
    return device


def autocast(device: torch.device, precision: str, cache: bool = True) -> contextlib.AbstractContextManager:
    """cache False: no cache of the weights' casts (what a CUDA graph capture needs)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)


def set_deterministic(on: bool) -> None:
    """train.deterministic: cuDNN's deterministic convolutions (no autotuning), cuBLAS's fixed
    workspace (set before CUDA starts its cuBLAS handle), and torch's deterministic algorithms,
    with a warning rather than an error for an operator that has none. Off: cuDNN autotunes."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = not on
    torch.use_deterministic_algorithms(on, warn_only=True)


def channels_last_for(setting: bool | None, device: torch.device) -> bool:
    """train.channels_last, with null meaning: where it is faster. On CUDA, convolutions in
    channels_last use tensor cores without layout transposes; on CPUs (oneDNN) it measured the
    same as NCHW for these VGGs (docs/performance.md), so NCHW stays the default there."""
    return (device.type == "cuda") if setting is None else setting


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a host clock measures it (CUDA and MPS are async)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
