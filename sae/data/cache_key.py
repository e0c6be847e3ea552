"""The embedding cache's key (:mod:`sae.data.cache`): what was read, never where.

``key16`` is the first 16 hex digits of the sha256 of the canonical JSON of :func:`key_fields`:

- the backbone: library, model identifier, pretrained tag, weights (:func:`sae.io.fingerprint.
  weights_id`: the content digest of a local checkpoint file or snapshot directory), embedding,
  model kwargs -- which with the library's version fix the preprocessing (recorded in the
  manifest);
- the dataset: name, layout, split, sampling protocol, subset (size and seed), and what was
  read: the number of images, a digest of their ordered (name, size) list and the names and
  sizes of the metadata files (:func:`sae.io.fingerprint.listing_id`);
- the storage dtype.

Paths, batch size, workers and device are not in it: a copy of a dataset at another path reuses
the cache; a root whose images differ (one added, one resized) never does. The major.minor
versions of torch, open_clip, timm and transformers are recorded in the manifest and checked on
every use (:func:`sae.data.cache.check_cache`): a drift is refused unless
``extract.allow_version_drift``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sae.config import BackboneConfig, ImagesDatasetConfig
from sae.data.errors import CacheError
from sae.data.images import ImageSplit
from sae.data.layout import (
    MANIFEST_FILE,
    SCHEMA_VERSION,
    cache_dir_name,
    complete_caches,
    split_dir_name,
)
from sae.io.fingerprint import listing_id, pretrained_flag, weights_id
from sae.io.plain import plain

log = logging.getLogger(__name__)


def config_fields(backbone: BackboneConfig, dataset: ImagesDatasetConfig, split_name: str
                  ) -> dict[str, Any]:
    """The key's fields that the config decides (no paths): backbone, weights, preprocessing
    (library, model, tag and model kwargs fix it), dataset, sampling protocol, split, dtype."""
    subset = None
    if dataset.max_per_split is not None:
        subset = {"max_per_split": dataset.max_per_split, "seed": dataset.split_seed}
    fields: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "backbone": {"library": backbone.library, "model": backbone.model,
                     "pretrained": str(backbone.pretrained) if pretrained_flag(
                         backbone.pretrained) else None,
                     "weights": weights_id(backbone), "embedding": backbone.embedding,
                     "model_kwargs": plain(backbone.model_kwargs)},
        "dataset": {"name": dataset.name, "layout": dataset.layout, "split": split_name,
                    "sampling": getattr(dataset, "sampling", None), "subset": subset},
        "dtype": backbone.storage_dtype,
    }
    if dataset.layout == "digits_images":  # the generated split depends on these
        fields["dataset"]["generated_split"] = {"eval_fraction": dataset.eval_fraction,
                                                "seed": dataset.split_seed}
    return fields


def key_fields(backbone: BackboneConfig, dataset: ImagesDatasetConfig, images: ImageSplit
               ) -> dict[str, Any]:
    """Everything that determines the cached numbers: :func:`config_fields` and what was read
    (the split's ordered image list with sizes, and the metadata files), never where."""
    fields = config_fields(backbone, dataset, images.split)
    root = Path(str(dataset.root))
    files_dir = None if images.reader is not None else images.image_dir  # rows name no file
    fields["dataset"]["listing"] = listing_id(files_dir, images.ids, images.sources, root)
    return fields


def cache_key(fields: dict[str, Any]) -> str:
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass
class ResolvedCache:
    """Where one split's cache is, and the listed split it is made of (None: images absent)."""

    path: Path
    images: ImageSplit | None
    fields: dict[str, Any]


def resolve_cache(backbone: BackboneConfig, dataset: ImagesDatasetConfig, split: str,
                  cache_root: str | Path, listed: Callable[[str], ImageSplit] | None = None
                  ) -> ResolvedCache:
    """The cache of one split ("train" or "eval"), whether it exists or not, keyed by the
    listing of the dataset root. Where the images are not (a cache copied to another cluster),
    the one complete cache of the same config is used, or the root's error is raised.
    ``listed(split_name)`` lists the split (default ``sae.data.images.open_split``); the sweep
    planner passes one that lists each split of a dataset once for all its backbones."""
    from sae.data.images import open_split

    listed = listed or (lambda name: open_split(dataset, name))
    split_name = split_dir_name(dataset, split)
    if dataset.layout != "digits_images" and not (dataset.root and Path(dataset.root).is_dir()):
        found = _cache_without_images(backbone, dataset, split_name, cache_root)
        if found is None:
            open_split(dataset, split_name)  # raises the root's error, with its fix
            raise AssertionError("open_split accepted a missing root")
        return found
    images = listed(split_name)
    fields = key_fields(backbone, dataset, images)
    name = cache_dir_name(dataset.name, backbone.name, split_name, cache_key(fields))
    return ResolvedCache(Path(cache_root) / name, images, fields)


def cache_path(cache_root: str | Path, backbone: BackboneConfig, dataset: ImagesDatasetConfig,
               split: str) -> Path:
    """The directory of one split's cache ("train" or "eval"), whether it exists or not."""
    return resolve_cache(backbone, dataset, split, cache_root).path


def _cache_without_images(backbone: BackboneConfig, dataset: ImagesDatasetConfig,
                          split_name: str, cache_root: str | Path) -> ResolvedCache | None:
    fields = config_fields(backbone, dataset, split_name)
    wanted = cache_key(fields)
    pattern = cache_dir_name(dataset.name, backbone.name, split_name, "*")
    matches = [p for p in complete_caches(cache_root, pattern)
               if json.loads((p / MANIFEST_FILE).read_text()).get("config_key") == wanted]
    if len(matches) > 1:
        raise CacheError(f"dataset.root {dataset.root} is not readable here, and {len(matches)} "
                         f"caches of this config exist ({', '.join(map(str, matches))}), made "
                         "from different image lists. Fix: set dataset.root to the images, or "
                         "delete the caches that are not wanted")
    if not matches:
        return None
    log.warning("dataset.root %s is not readable: using %s, extracted from a root with the "
                "same config elsewhere", dataset.root, matches[0])
    return ResolvedCache(matches[0], None, fields)
