"""Names on disk of the embedding cache (torch-free: sweep planning looks caches up by name).

A cache directory is ``<dataset>__<backbone>__<split>__<key16>`` under ``paths.cache``; its files
are named below. The layout and the key are documented in :mod:`sae.data.cache`.
"""

from __future__ import annotations

from pathlib import Path

from sae.config import ImagesDatasetConfig

SCHEMA_VERSION = 2  # 2: the key lists the images read; shards; checked library versions
EMBEDDINGS_FILE = "embeddings.npy"
LABELS_FILE = "labels.npy"
IDS_FILE = "ids.txt"
CLASS_NAMES_FILE = "class_names.json"
MANIFEST_FILE = "manifest.json"


def split_dir_name(dataset: ImagesDatasetConfig, split: str) -> str:
    """The dataset's directory name of ``split`` ("train" or "eval")."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    return dataset.train_split if split == "train" else dataset.eval_split


def cache_dir_name(dataset_name: str, backbone_name: str, split_name: str, key: str) -> str:
    """The directory name of one cache (``key="*"``: a glob over every key)."""
    return f"{dataset_name}__{backbone_name}__{split_name}__{key}"


def is_complete(path: Path) -> bool:
    """A cache directory is renamed into place complete, its manifest written last."""
    return (Path(path) / MANIFEST_FILE).is_file()


def complete_caches(cache_root: str | Path, pattern: str) -> list[Path]:
    """Complete cache directories (with a manifest) matching the glob ``pattern``, sorted."""
    return sorted(p for p in Path(cache_root).glob(pattern) if is_complete(p))
