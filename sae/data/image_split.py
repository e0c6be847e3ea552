"""One split of an image dataset as a list of samples (:class:`ImageSplit`), and how a sample
is decoded. A leaf of the data layer: the layouts (``sae.data.images``, ``sae.data.images_hf``)
build splits, the embedding stage reads them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image


class RowReader(Protocol):
    """Images stored inside a dataset file rather than one file each (picklable)."""

    def load(self, row: int) -> Image.Image: ...

    def describe(self, row: int) -> str: ...


@dataclass
class ImageSplit:
    """The samples of one split of one dataset, and their labels; no pixels are loaded."""

    dataset: str  # dataset config name
    split: str  # split directory name (train, val, validation, ...)
    image_dir: Path  # file ids are relative to it (imagenet_hf: the dataset's location)
    ids: list[str]  # e.g. "n01440764/n01440764_10026.JPEG", "000026e7ee790996.jpg" or a row "17"
    labels: np.ndarray | None  # (N,) int64 class ids or (N, C) bool multi-hot
    class_names: list[str]
    info: dict[str, Any] = field(default_factory=dict)  # counts for the manifest
    sources: list[Path] = field(default_factory=list)  # metadata files read (labels, class names): part of the cache key
    reader: RowReader | None = None  # set when the ids are rows of a dataset file, not files

    def __len__(self) -> int:
        return len(self.ids)

    def path(self, i: int) -> Path:
        return self.image_dir / self.ids[i]

    def load(self, i: int) -> Image.Image:
        """Sample i decoded fully as RGB (raises OSError / ValueError when it cannot be)."""
        if self.reader is not None:
            return self.reader.load(int(self.ids[i]))
        return load_rgb(self.path(i))

    def describe(self, i: int) -> str:
        """Where sample i comes from, for error messages."""
        if self.reader is not None:
            return self.reader.describe(int(self.ids[i]))
        return str(self.path(i))


def load_rgb(path: Path) -> Image.Image:
    """Decode an image fully (truncated files fail here, not later) as RGB."""
    with Image.open(path) as image:
        return image.convert("RGB")
