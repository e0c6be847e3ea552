"""Device selection, shared by every stage that runs tensors."""

from __future__ import annotations

import torch

from sae.config import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the GPU when one is visible, else the CPU; an unavailable GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name} but no CUDA device is visible. Fix: use device=auto "
                          "or cpu, or request a GPU from the launcher")
    return device
