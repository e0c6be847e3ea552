"""What every backbone library's loader returns (:class:`Backbone`), and the one measurement
they share. Its own module so that the loaders (``sae.backbones`` for open_clip and timm,
``sae.backbones.hf`` for transformers) depend on it, not on each other."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image


@dataclass
class Backbone:
    """A loaded backbone, ready to embed preprocessed image batches."""

    model: torch.nn.Module
    # PIL image -> (3, H, W) uint8 (the geometric part, in the DataLoader workers), or float32
    # where the library's preprocessing cannot be split exactly (sae/backbones/inputs.py)
    preprocess: Callable[[Image.Image], torch.Tensor]
    embed: Callable[[torch.Tensor], torch.Tensor]  # (B, 3, H, W) preprocess output -> (B, d) float32
    dim: int  # embedding dimension d
    info: dict[str, Any] = field(default_factory=dict)  # preprocessing and weights, for the manifest


def output_dim(embed: Callable[[torch.Tensor], torch.Tensor], preprocess: Callable) -> int:
    """The embedding dimension, from one forward pass of a blank image."""
    image = Image.new("RGB", (32, 32))
    with torch.inference_mode():
        out = embed(preprocess(image).unsqueeze(0))
    if out.ndim != 2:
        raise RuntimeError(f"the backbone returned shape {tuple(out.shape)}, expected (1, d)")
    return int(out.shape[1])
