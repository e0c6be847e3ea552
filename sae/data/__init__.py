"""Every data source, behind one call: ``load_splits(cfg) -> (train, eval)`` EmbeddingSets."""

from __future__ import annotations

from sae.config import RootConfig
from sae.data.embedded import DataError, load_digits, load_files
from sae.data.synthetic import load_synthetic
from sae.data.types import EmbeddingSet

__all__ = ["DataError", "EmbeddingSet", "load_splits"]


def load_splits(cfg: RootConfig) -> tuple[EmbeddingSet, EmbeddingSet]:
    """The train and evaluation splits of ``cfg.dataset`` (extracting image embeddings first
    when their cache is missing)."""
    kind = cfg.dataset.kind
    if kind == "synthetic":
        return load_synthetic(cfg.dataset)
    if kind == "digits":
        return load_digits(cfg.dataset)
    if kind == "files":
        return load_files(cfg.dataset)
    if kind == "images":
        from sae.data.cache import load_image_split

        return load_image_split(cfg, "train"), load_image_split(cfg, "eval")
    raise DataError(f"dataset.kind: unknown kind {kind!r}")
