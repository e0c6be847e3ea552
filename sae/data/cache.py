"""The content-addressed embedding cache (DESIGN.md, stage 1): one directory per
(backbone, weights, embedding, preprocessing, dataset, split, dtype, subset).

Layout, under ``paths.cache``::

    <dataset>__<backbone>__<split>__<key16>/     complete caches only (renamed into place)
        embeddings.npy      (N, d) float16|float32, C-contiguous, np.load(mmap_mode="r")-able
        labels.npy          (N,) int64 class ids | (N, C) bool multi-hot   (absent: no labels)
        ids.txt             one image path per line, relative to the split's image directory
        class_names.json    list of C names
        manifest.json       count, dim, dtype, key fields, sha256 of every file, versions, ...
    <dataset>__<backbone>__<split>__<key16>.lock  the file lock of that key
    .tmp-<dirname>-<random>/                      an extraction in progress (never read)

``key16`` is the first 16 hex digits of the sha256 of the canonical JSON of :func:`key_fields`:
everything that changes the numbers (library, model identifier, weights tag, embedding, model
kwargs -- which with the library version fix the preprocessing, recorded in the manifest --
dataset name and layout, split, subset size and seed, storage dtype) and nothing that does not
(paths, batch size, workers, device). A process takes the lock, re-checks, extracts into
``.tmp-*`` and renames it into place when every file and the manifest are written, so a reader
sees a complete cache or none; a killed extraction leaves only a ``.tmp-*`` directory, removed by
the next extraction of that key. The lock is a ``filelock`` flock(2) lock file beside the
directory: put ``paths.cache`` on a file system that honours flock across nodes (Lustre mounted
with ``-o flock``, GPFS, local disk; not every NFS mount does). Every read checks the array against its manifest (shape, dtype,
size, checksum) and fails naming the directory and the fix rather than return wrong embeddings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sae.config import BackboneConfig, ImagesDatasetConfig
from sae.data.embedding import embed_split
from sae.data.errors import CacheError
from sae.data.layout import (
    CLASS_NAMES_FILE,
    EMBEDDINGS_FILE,
    IDS_FILE,
    LABELS_FILE,
    MANIFEST_FILE,
    SCHEMA_VERSION,
    cache_dir_name,
    split_dir_name,
)
from sae.data.types import EmbeddingSet
from sae.io import atomic_write_json
from sae.plain import plain

log = logging.getLogger(__name__)

_HASH_CHUNK = 1 << 24  # 16 MiB reads while hashing

@dataclass
class CachedSplit:
    """A verified cache directory, with the array memory-mapped (not yet in memory)."""

    path: Path
    embeddings: np.ndarray  # (N, d) memmap, storage dtype
    labels: np.ndarray | None
    ids: list[str]
    class_names: list[str]
    manifest: dict[str, Any]


# ---------------------------------------------------------------- identity

def key_fields(backbone: BackboneConfig, dataset: ImagesDatasetConfig, split_name: str
               ) -> dict[str, Any]:
    """Everything that determines the cached numbers, and nothing else (no paths)."""
    from sae.backbones import weights_id

    subset = None
    if dataset.max_per_split is not None:
        subset = {"max_per_split": dataset.max_per_split, "seed": dataset.split_seed}
    fields: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "backbone": {"library": backbone.library, "model": backbone.model,
                     "weights": weights_id(backbone), "embedding": backbone.embedding,
                     "model_kwargs": plain(backbone.model_kwargs)},
        "dataset": {"name": dataset.name, "layout": dataset.layout, "split": split_name,
                    "subset": subset},
        "dtype": backbone.storage_dtype,
    }
    if dataset.layout == "digits_images":  # the generated split depends on these
        fields["dataset"]["generated_split"] = {"eval_fraction": dataset.eval_fraction,
                                                "seed": dataset.split_seed}
    return fields


def cache_key(fields: dict[str, Any]) -> str:
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def cache_path(cache_root: str | Path, backbone: BackboneConfig, dataset: ImagesDatasetConfig,
               split: str) -> Path:
    """The directory of one split's cache ("train" or "eval"), whether it exists or not."""
    split_name = split_dir_name(dataset, split)
    key = cache_key(key_fields(backbone, dataset, split_name))
    return Path(cache_root) / cache_dir_name(dataset.name, backbone.name, split_name, key)


# ---------------------------------------------------------------- extract once, under a lock

def ensure_cache(backbone: BackboneConfig, dataset: ImagesDatasetConfig, split: str,
                 cache_root: str | Path, device: str = "auto", progress: bool = True) -> Path:
    """The verified cache directory of one split, extracting it first when it is missing.

    Concurrent callers (array tasks of one sweep) extract once: the first takes the lock, the
    others wait on it and then find the finished directory.
    """
    from filelock import FileLock, Timeout

    path = cache_path(cache_root, backbone, dataset, split)
    if path.exists():
        open_cache(path)  # verify before handing it out
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another process extracting %s (lock %s)", path.name, lock.lock_file)
        lock.acquire()
    try:
        if not path.exists():  # nobody finished it while we waited
            _extract(path, backbone, dataset, split, device, progress)
        open_cache(path)
    finally:
        lock.release()
    return path


def _extract(path: Path, backbone: BackboneConfig, dataset: ImagesDatasetConfig, split: str,
             device: str, progress: bool) -> None:
    from sae.data.images import open_split

    for stale in path.parent.glob(f".tmp-{path.name}-*"):  # left by a killed extraction
        shutil.rmtree(stale, ignore_errors=True)
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        split_name = split_dir_name(dataset, split)
        images = open_split(dataset, split_name)
        log.info("extracting %s: %d images of %s/%s with %s", path.name, len(images),
                 dataset.name, split_name, backbone.name)
        result = embed_split(backbone, images, tmp / EMBEDDINGS_FILE, on_unreadable=
                             dataset.on_unreadable, device=device, progress=progress)
        kept = result.kept
        labels = None if images.labels is None else images.labels[kept]
        ids = [images.ids[i] for i in kept]
        if labels is not None:
            np.save(tmp / LABELS_FILE, labels)
        (tmp / IDS_FILE).write_text("".join(f"{i}\n" for i in ids))
        (tmp / CLASS_NAMES_FILE).write_text(json.dumps(images.class_names))
        manifest = _manifest(tmp, backbone, dataset, split_name, images, result, labels, ids)
        atomic_write_json(tmp / MANIFEST_FILE, manifest)  # last: it vouches for the files above
        os.rename(tmp, path)
        log.info("cache complete: %s (%d x %d %s)", path, manifest["count"], manifest["dim"],
                 manifest["dtype"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only still there when something failed


def _manifest(tmp: Path, backbone: BackboneConfig, dataset: ImagesDatasetConfig, split_name: str,
              images: Any, result: Any, labels: np.ndarray | None, ids: list[str]
              ) -> dict[str, Any]:
    from sae.backbones import library_versions

    fields = key_fields(backbone, dataset, split_name)
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(tmp.iterdir()) if p.is_file()}
    label_kind = "none" if labels is None else ("multi_hot" if labels.ndim == 2 else "class_ids")
    return {
        "schema": SCHEMA_VERSION,
        "key": cache_key(fields),
        "key_fields": fields,
        "count": len(ids),
        "dim": result.dim,
        "dtype": backbone.storage_dtype,
        "labels": {"kind": label_kind, "n_classes": len(images.class_names)},
        "files": files,
        "backbone": {"name": backbone.name, "pretrained": backbone.pretrained,
                     **result.backbone_info},
        "dataset": {"name": dataset.name, "layout": dataset.layout, "split": split_name,
                    "root": str(dataset.root), "n_images": len(images),
                    "n_skipped": len(result.skipped),
                    "skipped": [images.ids[i] for i in result.skipped[:100]], **images.info},
        "extraction": result.stats,
        "versions": library_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------- verified reads

def open_cache(path: str | Path, verify_checksums: bool = True) -> CachedSplit:
    """Read and verify a cache directory. Raises :class:`CacheError` on any mismatch."""
    path = Path(path)

    def fail(problem: str) -> CacheError:
        return CacheError(f"{path}: {problem}. Fix: delete the directory (rm -r {path}) and run "
                          "again; it is re-extracted (python -m sae.extract ...)")

    manifest_file = path / MANIFEST_FILE
    if not manifest_file.is_file():
        raise fail("has no manifest.json, so it is not a complete cache")
    try:
        manifest = json.loads(manifest_file.read_text())
        count, dim, dtype = int(manifest["count"]), int(manifest["dim"]), str(manifest["dtype"])
        files = dict(manifest["files"])
    except (ValueError, KeyError, TypeError) as exc:
        raise fail(f"manifest.json is unreadable ({exc})") from exc
    if manifest.get("schema") != SCHEMA_VERSION:
        raise fail(f"cache schema {manifest.get('schema')} is not {SCHEMA_VERSION}")
    expected_key = path.name.rsplit("__", 1)[-1]
    if manifest.get("key") != expected_key:
        raise fail(f"manifest key {manifest.get('key')} does not match the directory name")
    for name, entry in files.items():
        _check_file(path / name, entry, verify_checksums, fail)
    embeddings = _open_array(path / EMBEDDINGS_FILE, fail)
    if embeddings.shape != (count, dim) or embeddings.dtype != np.dtype(dtype):
        raise fail(f"{EMBEDDINGS_FILE} is {embeddings.shape} {embeddings.dtype}, the manifest "
                   f"says ({count}, {dim}) {dtype}")
    labels = _open_array(path / LABELS_FILE, fail) if (path / LABELS_FILE).exists() else None
    if labels is not None and labels.shape[0] != count:
        raise fail(f"{LABELS_FILE} has {labels.shape[0]} rows for {count} embeddings")
    ids = (path / IDS_FILE).read_text().splitlines()
    if len(ids) != count:
        raise fail(f"{IDS_FILE} lists {len(ids)} images for {count} embeddings")
    class_names = json.loads((path / CLASS_NAMES_FILE).read_text())
    return CachedSplit(path, embeddings, labels, ids, class_names, manifest)


def _check_file(file: Path, entry: dict[str, Any], verify_checksum: bool, fail: Any) -> None:
    if not file.is_file():
        raise fail(f"{file.name} is missing")
    size = file.stat().st_size
    if size != entry["bytes"]:
        raise fail(f"{file.name} has {size} bytes, the manifest says {entry['bytes']} "
                   "(truncated or overwritten)")
    if verify_checksum and _sha256(file) != entry["sha256"]:
        raise fail(f"{file.name} does not match its sha256 in the manifest (corrupted)")


def _open_array(file: Path, fail: Any) -> np.ndarray:
    try:
        return np.load(file, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise fail(f"{file.name} cannot be read as a .npy array ({exc})") from exc


# ---------------------------------------------------------------- the trainer's entry

def load_image_split(backbone: BackboneConfig, dataset: ImagesDatasetConfig, cache_root: str | Path,
                     split: str, device: str = "auto", progress: bool = True) -> EmbeddingSet:
    """The "train" or "eval" split of an image dataset as embeddings, extracted on a miss
    (on ``device``, with a progress bar when ``progress``).

    ``x`` is float32, unit-normalised when ``dataset.normalize``; images are reopened from the
    dataset root of *this* config, so a cache moved to another cluster still shows its images.
    """
    path = ensure_cache(backbone, dataset, split, cache_root, device=device, progress=progress)
    cached = open_cache(path, verify_checksums=False)  # ensure_cache verified it just now
    x = torch.from_numpy(np.array(cached.embeddings, dtype=np.float32))  # a copy in memory
    if not torch.isfinite(x).all():
        raise CacheError(f"{path}: embeddings hold NaN or inf. Fix: delete the directory and "
                         "re-extract with backbone.storage_dtype=float32")
    if dataset.normalize:
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    labels = None
    if cached.labels is not None:
        labels = torch.from_numpy(np.array(cached.labels))
    split_name = split_dir_name(dataset, split)
    return EmbeddingSet(
        name=f"{dataset.name}/{split}", x=x, labels=labels, class_names=cached.class_names,
        ids=cached.ids, image_getter=_image_getter(dataset, split_name, cached.ids, path),
        info={"source": f"{backbone.name} embeddings of {dataset.name}/{split_name}",
              "cache": str(path), "embedding": backbone.embedding,
              "backbone_model": backbone.model, "weights": cached.manifest["backbone"]
              .get("weights"), "n_skipped": cached.manifest["dataset"].get("n_skipped", 0)},
    )


def _image_getter(dataset: ImagesDatasetConfig, split_name: str, ids: list[str], path: Path
                  ) -> ImageGetter | None:
    """The cached images, from this config's dataset root (None where they are not)."""
    from sae.data.images import image_dir, materialize_digits_images

    if dataset.layout == "digits_images":  # a cache copied here without its images
        materialize_digits_images(Path(str(dataset.root)), dataset.eval_fraction,
                                  dataset.split_seed)
    folder = image_dir(dataset, split_name) if dataset.root else None
    if folder is not None and folder.is_dir():
        return ImageGetter(folder, ids)
    # a cache used where its images are not: train, but show no images
    log.warning("images of %s are not at %s: contact sheets will have no images", path, folder)
    return None


class ImageGetter:
    """i -> the i-th cached image as RGB (picklable, for contact sheets)."""

    def __init__(self, folder: Path, ids: list[str]) -> None:
        self.folder = folder
        self.ids = ids

    def __call__(self, i: int) -> Image.Image:
        from sae.data.images import load_rgb

        return load_rgb(self.folder / self.ids[i])
