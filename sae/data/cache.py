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
    .partial-<dirname>/                           shards of an extraction in progress (never read)
    .tmp-<dirname>-<random>/                      the cache being assembled from its shards

The key (:mod:`sae.data.cache_key`) is a digest of what was read: backbone, weights (content
digest of a local checkpoint), preprocessing, dataset, sampling protocol, the split's ordered
image list with sizes, dtype; never paths, batch size, workers or device. A process takes the
lock, re-checks, embeds in shards into ``.partial-*`` (:mod:`sae.data.shards`: a killed or
preempted extraction resumes from the last complete shard), assembles the cache in ``.tmp-*``
and renames it into place when every file and the manifest are written, so a reader sees a
complete cache or none. The lock is a ``filelock`` flock(2) lock file beside the directory: put
``paths.cache`` on a file system that honours flock across nodes (Lustre mounted with
``-o flock``, GPFS, local disk; not every NFS mount does; a SLURM sweep checks before it
submits, ``sae.grid.slurm_checks.check_flock``). Every checksum is verified once, when the cache is
built; every use checks the files against the manifest (shape, dtype, size; every checksum
again with ``extract.verify=checksums``) and the library versions against the installed ones,
and fails naming the directory and the fix rather than return wrong embeddings. In a SLURM
sweep, extraction jobs build the caches first and training tasks open the directory the planner
resolved (``extract.train_cache``), never listing the image tree (:func:`training_cache`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sae.config import BackboneConfig, ExtractOptions, ImagesDatasetConfig
from sae.data.cache_key import (  # noqa: F401 -- cache_path and key_fields re-exported
    ResolvedCache,
    cache_key,
    cache_path,
    config_fields,
    key_fields,
    resolve_cache,
)
from sae.data.embedding import ExtractionStopped, embed_split
from sae.data.errors import CacheError
from sae.data.images import ImageSplit
from sae.data.layout import (
    CLASS_NAMES_FILE,
    EMBEDDINGS_FILE,
    IDS_FILE,
    LABELS_FILE,
    MANIFEST_FILE,
    SCHEMA_VERSION,
    cache_dir_name,
    is_complete,
    split_dir_name,
)
from sae.data.shards import ShardLog, partial_dir
from sae.data.types import EmbeddingSet
from sae.io.digests import stream_sha256
from sae.io.files import atomic_write_json
from sae.io.fingerprint import key_versions, library_versions, version_drift

log = logging.getLogger(__name__)


@dataclass
class CachedSplit:
    """A verified cache directory, with the array memory-mapped (not yet in memory)."""

    path: Path
    embeddings: np.ndarray  # (N, d) memmap, storage dtype
    labels: np.ndarray | None
    ids: list[str]
    class_names: list[str]
    manifest: dict[str, Any]


# ---------------------------------------------------------------- extract once, under a lock

def ensure_cache(backbone: BackboneConfig, dataset: ImagesDatasetConfig, split: str,
                 cache_root: str | Path, device: str = "auto", progress: bool = True,
                 options: ExtractOptions | None = None) -> Path:
    """The verified cache directory of one split, extracting it first when it is missing.

    Concurrent callers (array tasks of one sweep) extract once: the first takes the lock, the
    others wait on it and then find the finished directory. An extraction killed earlier
    resumes from its last complete shard.
    """
    from filelock import FileLock, Timeout

    options = options or ExtractOptions()
    resolved = resolve_cache(backbone, dataset, split, cache_root)
    path = resolved.path
    if path.exists():
        check_cache(path, options.allow_version_drift, options.verify == "checksums")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another process extracting %s (lock %s)", path.name, lock.lock_file)
        _wait_for(lock, path.name)
    try:
        if not path.exists():  # nobody finished it while we waited
            assert resolved.images is not None  # a missing cache was resolved from its images
            _extract(path, resolved, backbone, dataset, device, progress, options.shard_size)
            check_cache(path, options.allow_version_drift)  # built: every checksum, once
        else:
            check_cache(path, options.allow_version_drift, options.verify == "checksums")
    finally:
        lock.release()
    return path


def training_cache(backbone: BackboneConfig, dataset: ImagesDatasetConfig, split: str,
                   cache_root: str | Path, device: str = "auto", progress: bool = True,
                   options: ExtractOptions | None = None) -> Path:
    """The verified cache a training run reads for one split.

    - ``extract.train_cache`` / ``eval_cache`` set (a SLURM sweep's planner resolved them): that
      directory, checked by sizes and manifest, without listing the image tree;
    - ``extract.inline=false`` otherwise: the resolved cache, which must exist (no extraction,
      no wait on another's extraction lock);
    - else :func:`ensure_cache`: extracted here when missing (a lone run on a workstation).
    """
    options = options or ExtractOptions()
    given = options.train_cache if split == "train" else options.eval_cache
    path = Path(given) if given else None
    if path is None and not options.inline:
        path = resolve_cache(backbone, dataset, split, cache_root).path
    if path is None:
        return ensure_cache(backbone, dataset, split, cache_root, device, progress, options)
    if not is_complete(path):
        raise CacheError(
            f"the {split} embedding cache {path} is missing or incomplete, and this task does "
            "not extract (extract.inline=false: a SLURM sweep builds its caches in extraction "
            "jobs first). Fix: re-launch the sweep, whose extraction job builds it (its log: "
            f"sae-status SWEEP_DIR), or build it with python -m sae.extract "
            f"backbone={backbone.name} dataset={dataset.name}")
    check_cache(path, options.allow_version_drift, options.verify == "checksums")
    return path


def _wait_for(lock, name: str) -> None:
    """Acquire ``lock``, held by another process's extraction, without being deaf to stop
    signals: SIGTERM or USR2 while waiting is handed to the handler that was there before
    (under SLURM, submitit's requeue; in a training run, its stop request) and ends the wait
    with :class:`ExtractionStopped`, so a task never holds a GPU through a preemption waiting
    on a lock."""
    import signal

    from sae.runtime.locking import WaitStopped, acquire_listening

    try:
        acquire_listening(lock)
    except WaitStopped as stop:
        signal.raise_signal(stop.signum)
        raise ExtractionStopped(f"stopped by signal {stop.signum} while waiting for another "
                                f"process extracting {name}", stop.signum) from None


def check_cache(path: Path, allow_version_drift: bool = False, verify_checksums: bool = True
                ) -> CachedSplit:
    """Open and verify a cache (sizes and manifest; checksums too unless told not to), and
    refuse one built by other library versions (unless allowed): the same config could give
    other numbers there."""
    cached = open_cache(path, verify_checksums)
    drift = version_drift(cached.manifest.get("key_versions", {}),
                          key_versions(library_versions()))
    if drift and not allow_version_drift:
        raise CacheError(
            f"{path}: built with other library versions: {'; '.join(drift)}. Fix: delete it "
            f"(rm -r {path}) to re-extract with the installed versions, or set "
            "extract.allow_version_drift=true to use it as it is")
    if drift:
        log.warning("%s: using a cache built with other versions (%s)", path, "; ".join(drift))
    return cached


def _extract(path: Path, resolved: ResolvedCache, backbone: BackboneConfig,
             dataset: ImagesDatasetConfig, device: str, progress: bool, shard_size: int) -> None:
    images = resolved.images
    assert images is not None
    for stale in path.parent.glob(f".tmp-{path.name}-*"):  # left by a killed assembly
        shutil.rmtree(stale, ignore_errors=True)
    _warn_other_partials(path, dataset, backbone, images.split)
    shards = ShardLog(partial_dir(path), {"key": path.name, "fields": resolved.fields})
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        log.info("extracting %s: %d images of %s/%s with %s", path.name, len(images),
                 dataset.name, images.split, backbone.name)
        result = embed_split(backbone, images, tmp / EMBEDDINGS_FILE, dataset.on_unreadable,
                             device, progress, shards=shards, shard_size=shard_size)
        kept = result.kept
        labels = None if images.labels is None else images.labels[kept]
        ids = [images.ids[i] for i in kept]
        if labels is not None:
            np.save(tmp / LABELS_FILE, labels)
        (tmp / IDS_FILE).write_text("".join(f"{i}\n" for i in ids))
        (tmp / CLASS_NAMES_FILE).write_text(json.dumps(images.class_names))
        manifest = _manifest(tmp, resolved.fields, backbone, dataset, images, result, labels,
                             ids)
        atomic_write_json(tmp / MANIFEST_FILE, manifest)  # last: it vouches for the files above
        os.rename(tmp, path)
        shutil.rmtree(shards.folder, ignore_errors=True)  # the shards are in the cache now
        log.info("cache complete: %s (%d x %d %s)", path, manifest["count"], manifest["dim"],
                 manifest["dtype"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only still there when something failed


def _warn_other_partials(path: Path, dataset: ImagesDatasetConfig, backbone: BackboneConfig,
                         split_name: str) -> None:
    """Unfinished extractions of this split under other keys (other images or settings) are
    kept for their own resume; say so, as they can hold gigabytes."""
    pattern = partial_dir(path.parent / cache_dir_name(dataset.name, backbone.name, split_name,
                                                       "*")).name
    others = [p for p in path.parent.glob(pattern) if p != partial_dir(path)]
    if others:
        log.warning("unfinished extractions of other keys are kept for their resume (delete "
                    "them if unwanted): %s", ", ".join(map(str, others)))


def _manifest(tmp: Path, fields: dict[str, Any], backbone: BackboneConfig,
              dataset: ImagesDatasetConfig, images: ImageSplit, result: Any,
              labels: np.ndarray | None, ids: list[str]) -> dict[str, Any]:
    files = {p.name: {"bytes": p.stat().st_size, "sha256": stream_sha256(p)}
             for p in sorted(tmp.iterdir()) if p.is_file()}
    label_kind = "none" if labels is None else ("multi_hot" if labels.ndim == 2 else "class_ids")
    versions = library_versions()
    return {
        "schema": SCHEMA_VERSION,
        "key": cache_key(fields),
        "key_fields": fields,
        "config_key": cache_key(config_fields(backbone, dataset, images.split)),
        "count": len(ids),
        "dim": result.dim,
        "dtype": backbone.storage_dtype,
        "labels": {"kind": label_kind, "n_classes": len(images.class_names)},
        "files": files,
        "backbone": {"name": backbone.name, "pretrained": backbone.pretrained,
                     **result.backbone_info},
        "dataset": {"name": dataset.name, "layout": dataset.layout, "split": images.split,
                    "root": str(dataset.root), "n_images": len(images),
                    "sampling": getattr(dataset, "sampling", None),
                    "n_skipped": len(result.skipped),
                    "skipped": [images.ids[i] for i in result.skipped[:100]], **images.info},
        "extraction": result.stats,
        "versions": versions,
        "key_versions": key_versions(versions),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


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
    if verify_checksum and stream_sha256(file) != entry["sha256"]:
        raise fail(f"{file.name} does not match its sha256 in the manifest (corrupted)")


def _open_array(file: Path, fail: Any) -> np.ndarray:
    try:
        return np.load(file, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise fail(f"{file.name} cannot be read as a .npy array ({exc})") from exc


# ---------------------------------------------------------------- the trainer's entry

def load_image_split(backbone: BackboneConfig, dataset: ImagesDatasetConfig, cache_root: str | Path,
                     split: str, device: str = "auto", progress: bool = True,
                     options: ExtractOptions | None = None) -> EmbeddingSet:
    """The "train" or "eval" split of an image dataset as embeddings, extracted on a miss
    (on ``device``, with a progress bar when ``progress``).

    ``x`` is float32, unit-normalised when ``dataset.normalize``; images are reopened from the
    dataset root of *this* config, so a cache moved to another cluster still shows its images.
    """
    path = training_cache(backbone, dataset, split, cache_root, device=device,
                          progress=progress, options=options)
    cached = open_cache(path, verify_checksums=False)  # training_cache verified it just now
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
              .get("weights"), "n_skipped": cached.manifest["dataset"].get("n_skipped", 0),
              "cache_key_inputs": key_inputs(cached.manifest)},
    )


def key_inputs(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a cache's key covers, readably (the method card shows it)."""
    fields = manifest["key_fields"]
    backbone, dataset = fields["backbone"], fields["dataset"]
    listing = dataset["listing"]
    return {"key": manifest["key"], "library": backbone["library"], "model": backbone["model"],
            "pretrained": backbone["pretrained"], "weights": backbone["weights"],
            "preprocessing": " ".join(str(manifest["backbone"].get("transform")).split()),
            "model_kwargs": backbone["model_kwargs"],
            "dataset": f"{dataset['name']} ({dataset['layout']} layout), split {dataset['split']}",
            "sampling": dataset["sampling"], "subset": dataset["subset"],
            "n_images": listing["n_images"], "image_list_sha256": listing["files_sha256"],
            "metadata_files": listing["sources"], "dtype": fields["dtype"],
            "library_versions": manifest.get("key_versions")}


def _image_getter(dataset: ImagesDatasetConfig, split_name: str, ids: list[str], path: Path
                  ) -> Callable[[int], Image.Image] | None:
    """The cached images, from this config's dataset root (None where they are not)."""
    from sae.data.images import cached_images

    getter = cached_images(dataset, split_name, ids)
    if getter is None:  # a cache used where its images are not: train, but show no images
        log.warning("images of %s are not under %s: contact sheets will have no images", path,
                    dataset.root)
    return getter
