"""The container every data source returns: embeddings on which an SAE trains or is evaluated."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image


@dataclass
class EmbeddingSet:
    """One split of one dataset, as embeddings.

    ``x`` is float32 and unit-normalised when the dataset config says so (METHOD.md s1).
    ``labels`` are (N,) int64 class ids, or (N, C) bool multi-hot for multi-label datasets.
    """

    name: str
    x: torch.Tensor  # (N, d) float32
    labels: torch.Tensor | None = None  # (N,) int64 or (N, C) bool
    class_names: list[str] | None = None
    ids: list[str] | None = None  # sample ids (image file names) where the source has them
    image_getter: Callable[[int], Image.Image] | None = None  # i -> image, for contact sheets
    planted_atoms: torch.Tensor | None = None  # (n_atoms, d) unit atoms (synthetic only)
    info: dict = field(default_factory=dict)  # provenance for the method card (source, sizes, ...)

    def __post_init__(self) -> None:
        if self.x.ndim != 2:
            raise ValueError(f"{self.name}: embeddings must be (N, d), got shape {tuple(self.x.shape)}")
        if self.labels is not None and self.labels.shape[0] != self.x.shape[0]:
            raise ValueError(
                f"{self.name}: {self.labels.shape[0]} labels for {self.x.shape[0]} embeddings. "
                "Fix: give one label (row) per embedding"
            )

    @property
    def n(self) -> int:
        return self.x.shape[0]

    @property
    def dim(self) -> int:
        return self.x.shape[1]

    @property
    def multi_label(self) -> bool:
        return self.labels is not None and self.labels.ndim == 2
