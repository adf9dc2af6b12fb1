"""Which torch device to run on: `auto` (CUDA when there is one), `cpu` or `cuda`."""

from __future__ import annotations

import torch


class DeviceError(RuntimeError):
    """A device that was asked for and is not there."""


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)
