"""Every data source, behind one call: ``load_splits(cfg) -> (train, eval)`` EmbeddingSets.

Importing the package loads no torch (sweep planning uses :mod:`sae.data.similarity`); each data
source is imported when it is loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sae.config import RootConfig
from sae.data.errors import DataError

if TYPE_CHECKING:
    from sae.data.types import EmbeddingSet

__all__ = ["DataError", "EmbeddingSet", "load_splits"]


def load_splits(cfg: RootConfig, device: str = "auto", progress: bool = True
                ) -> tuple[EmbeddingSet, EmbeddingSet]:
    """The train and evaluation splits of ``cfg.dataset`` (image embeddings are extracted first,
    on ``device`` with a progress bar when ``progress``, when their cache is missing)."""
    kind = cfg.dataset.kind
    if kind == "synthetic":
        from sae.data.synthetic import load_synthetic

        return load_synthetic(cfg.dataset)
    if kind == "digits":
        from sae.data.embedded import load_digits

        return load_digits(cfg.dataset)
    if kind == "files":
        from sae.data.embedded import load_files

        return load_files(cfg.dataset)
    if kind == "images":
        from sae.data.cache import load_image_split

        def load(split: str) -> EmbeddingSet:
            return load_image_split(cfg.backbone, cfg.dataset, cfg.paths.cache, split,
                                    device=device, progress=progress)

        return load("train"), load("eval")
    raise DataError(f"dataset.kind: unknown kind {kind!r}")


def __getattr__(name: str) -> Any:
    if name == "EmbeddingSet":  # imported lazily: it holds torch tensors
        from sae.data.types import EmbeddingSet

        return EmbeddingSet
    raise AttributeError(f"module 'sae.data' has no attribute {name!r}")
