"""Where MonoScore's similarity embeddings come from (``eval.similarity``), resolved to data.

``eval.similarity`` names its kind explicitly (no guessing from the string's shape):

    input            the SAE's own input embeddings (MonoLoss's default)
    backbone:NAME    the same evaluation images embedded by the conf/backbone option NAME, found
                     in ``paths.cache`` (``python -m sae.extract backbone=NAME ... split=eval``)
    cache:DIR        a cache directory of the same evaluation split
    file:PATH        a .npy or .safetensors (N_eval, d) array aligned with the evaluation split

:func:`resolve_similarity` turns ``backbone:NAME`` into ``cache:DIR`` before any training, so a
missing cache fails the sweep's preflight, not a run at its end. The forms are parsed by
:func:`sae.config.parse_similarity` (the schema checks them at compose time). Imports no torch.
"""

from __future__ import annotations

from pathlib import Path

from sae.config import DatasetConfig, ImagesDatasetConfig, RootConfig, Similarity, parse_similarity
from sae.data.errors import CacheError
from sae.data.layout import cache_dir_name, complete_caches, split_dir_name


def resolve_similarity(cfg: RootConfig) -> Similarity:
    """``eval.similarity`` with ``backbone:NAME`` replaced by ``cache:<its cache directory>``
    (found under ``paths.cache`` for this run's dataset); other kinds unchanged."""
    similarity = parse_similarity(cfg.eval.similarity)
    if similarity.kind != "backbone":
        return similarity
    return Similarity("cache", str(find_eval_cache(cfg.paths.cache, cfg.dataset,
                                                   similarity.target)))


def find_eval_cache(cache_root: str | Path, dataset: DatasetConfig, backbone_name: str) -> Path:
    """The cache of ``dataset``'s evaluation split embedded by the backbone called
    ``backbone_name`` (a conf/backbone option), found by name. Exactly one must exist."""
    what = f"eval.similarity=backbone:{backbone_name}"
    if not isinstance(dataset, ImagesDatasetConfig):
        raise CacheError(f"{what}: the dataset {dataset.name!r} holds no images to embed with "
                         f"another backbone. Fix: use input or file:PATH")
    split_name = split_dir_name(dataset, "eval")
    matches = complete_caches(cache_root, cache_dir_name(dataset.name, backbone_name,
                                                         split_name, "*"))
    if not matches:
        raise CacheError(
            f"{what}: no cache of {dataset.name}/{split_name} embedded by {backbone_name} under "
            f"{cache_root}. Fix: python -m sae.extract backbone={backbone_name} "
            f"dataset={dataset.name} split=eval (same paths.root), or set eval.similarity to "
            "file:PATH")
    if len(matches) > 1:
        listing = ", ".join(str(p) for p in matches)
        raise CacheError(
            f"{what}: {len(matches)} caches of {dataset.name}/{split_name} embedded by "
            f"{backbone_name} (different weights or settings): {listing}. Fix: set "
            "eval.similarity to cache:DIR with one of these directories")
    return matches[0]
