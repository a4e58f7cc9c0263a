"""Device choice and mixed precision, shared by training, evaluation and chat."""

from __future__ import annotations

import contextlib

import torch


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when available, else CPU; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    """bf16 autocast for `precision == "bf16"` (CPU and CUDA alike), else a no-op context."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batch_to(batch: dict, device: torch.device, non_blocking: bool = False) -> dict:
    """A batch's tensors, and lists of tensors (images of several sizes), moved to `device`."""
    def move(value):
        if torch.is_tensor(value):
            return value.to(device, non_blocking=non_blocking)
        if isinstance(value, list) and value and all(torch.is_tensor(x) for x in value):
            return [x.to(device, non_blocking=non_blocking) for x in value]
        return value

    return {key: move(value) for key, value in batch.items()}
