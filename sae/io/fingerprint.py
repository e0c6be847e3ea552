"""What a run or an extraction reads, as identities for the run id and the embedding cache key
(no torch).

- :func:`content_identity`: a user's data file or folder (a ``files`` dataset), by its bytes;
- :func:`directory_sha256`: the one digest of a folder's files, used for weights snapshots and
  data folders alike (file digests cached in the one sidecar format of :mod:`sae.io`);
- :func:`weights_id`: the backbone's weights, by the files its loader reads (a checkpoint file,
  a snapshot directory, or the one repository's snapshot in a hub cache), whatever else lies in
  the folder and whatever path leads there; weights named by the library and not stored
  locally by library and tag; random weights by their seed. The run id and the cache key both
  use it.
- :func:`listing_id`: the images of a split, in order, with their sizes, and the metadata files
  read beside them (label CSVs, class mappings) -- a digest of the listing, not of the pixels.
- :func:`library_versions` / :func:`version_drift`: the packages that decide the numbers.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sae.checks import ConfigError
from sae.config import BackboneConfig
from sae.io.digests import DIGEST_SUFFIX, file_digest, sidecar_digest

log = logging.getLogger(__name__)

RANDOM_INIT_SEED = 0  # random-weight variants are seeded: embeddings must not differ per process
# The libraries whose major.minor version is part of a cache's identity (checked on every use).
KEY_PACKAGES = ("torch", "open_clip_torch", "timm", "transformers")
MANIFEST_PACKAGES = ("torch", "torchvision", "open_clip_torch", "timm", "transformers", "numpy",
                     "pillow")
_STAT_THREADS = 16  # parallel stat() calls: a network file system answers them concurrently
_STAT_CHUNK = 4096
_FALSE_STRINGS = ("", "false", "none", "null", "0", "no")


# ---------------------------------------------------------------- weights

def pretrained_flag(value: str | bool | None) -> bool:
    """Whether a ``pretrained`` value asks for pretrained weights (YAML may give a bool)."""
    if value is None or value is False:
        return False
    return str(value).strip().lower() not in _FALSE_STRINGS


def weights_id(cfg: BackboneConfig) -> str:
    """The identity of the weights ``cfg``'s loader reads, path-independent: part of both the
    run id (``sae.identity``) and the embedding cache key.

    - ``checkpoint_path`` a file: ``sha256:`` of its bytes;
    - a transformers snapshot directory (``config.json`` in it): ``sha256:`` over the relative
      names and digests of its files;
    - a download cache (the Hugging Face hub layout of ``$SAE_WEIGHTS_DIR``): the same digest of
      the snapshot of the one repository the library reads, at the revision ``refs/main`` names.
      Other models in the folder, ``.locks/``, READMEs and digest sidecars never count; a cache
      that does not hold the repository yet is ``<library>:<tag> (not downloaded)``;
    - no ``checkpoint_path``: ``<library>:<tag>`` for weights named by the library, else
      ``random:seed0``.

    Files are followed through symlinks (hub snapshots link to blobs), so the same bytes under
    another path or link keep the identity. Digests are cached in the user's digest folder
    (:func:`file_sha256`), never written into a weights folder.
    """
    path = Path(cfg.checkpoint_path) if cfg.checkpoint_path else None
    if path is not None and path.is_file():
        return f"sha256:{file_sha256(path)}"
    if path is not None and (path / "config.json").is_file():  # a transformers snapshot
        return f"sha256:{directory_sha256(path)}"
    named = library_weights(cfg)
    repository = hub_repository(cfg) if path is not None and path.is_dir() else None
    if named is not None and repository is not None:
        snapshot = hub_snapshot(path, repository)
        return (f"sha256:{directory_sha256(snapshot)}" if snapshot is not None
                else f"{named} (not downloaded)")
    if named is not None:  # no local copy, or one outside the hub layout (an open_clip URL)
        return named
    if path is not None:
        raise ConfigError(
            f"backbone.checkpoint_path: {path} is not a file, and a directory is only a download "
            "cache for a pretrained tag. Fix: set backbone.pretrained, or point checkpoint_path "
            "to a weights file or a transformers snapshot directory")
    return f"random:seed{RANDOM_INIT_SEED}"


def library_weights(cfg: BackboneConfig) -> str | None:
    """``<library>:<tag>`` for weights the library names (None: random weights)."""
    if not pretrained_flag(cfg.pretrained):
        return None
    tag = str(cfg.pretrained) if cfg.library == "open_clip" else "default"
    return f"{cfg.library}:{tag}"


def file_sha256(path: Path, digest_dir: str | None = None) -> str:
    """sha256 of a file's bytes (through symlinks), read from its digest record when size and
    mtime still match. The record lives under ``digest_dir`` (default: the user's digest folder,
    ``$SAE_DIGEST_CACHE`` or ``~/.cache/sae-grid``), keyed by the resolved path, so a 1 GB
    checkpoint is hashed once and nothing is written beside the weights."""
    real = Path(path).resolve()  # hub snapshots are symlinks to blobs: key the blob
    stat = real.stat()
    return sidecar_digest(real, stat.st_size, stat.st_mtime_ns, digest_dir or _user_digest_dir(),
                          beside=False)


def directory_sha256(folder: Path, digest_dir: str | None = None) -> str:
    """sha256 over the relative names (POSIX) and contents of the files of a folder, dot files
    and folders (``.locks/``, ``.git/``, ``.DS_Store``) and digest records excluded: the one
    folder digest, of a weights snapshot (:func:`weights_id`) and of a data folder
    (:func:`content_identity`) alike. File digests are cached as :func:`file_sha256` says."""
    return _directory_digest(Path(folder), digest_dir)[1]


def _directory_digest(folder: Path, digest_dir: str | None) -> tuple[int, str]:
    """(the number of files counted, :func:`directory_sha256`)."""
    digest, count = hashlib.sha256(), 0
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = file.relative_to(folder).as_posix()
        if rel.endswith(DIGEST_SUFFIX) or any(part.startswith(".") for part in Path(rel).parts):
            continue
        digest.update(f"{rel}\t{file_sha256(file, digest_dir)}\n".encode())
        count += 1
    return count, digest.hexdigest()


def content_identity(path: str | Path, cache_dir: str | None) -> dict[str, Any]:
    """What identifies the bytes at ``path`` (a file or a directory): its size and sha256 (a
    directory: its file count and :func:`directory_sha256`, its files' digests cached under
    ``cache_dir``, else the user's digest folder). The mtime only keys the digest cache: a copy
    or a ``touch`` of the same bytes names the same run. A missing path is
    ``{"missing": true}`` (reading it fails later, naming it)."""
    path = Path(path)
    if path.is_file():
        stat = path.stat()
        return {"size": stat.st_size,
                "sha256": file_digest(path, stat.st_size, stat.st_mtime_ns, cache_dir)}
    if path.is_dir():
        count, sha256 = _directory_digest(path, cache_dir)
        return {"files": count, "sha256": sha256}
    return {"missing": True}


def hub_snapshot(cache_dir: Path, repo: str) -> Path | None:
    """The snapshot folder a library reads from a Hugging Face hub cache: ``models--org--name/
    snapshots/<the commit refs/main names>`` of ``repo`` (None: not there)."""
    folder = Path(cache_dir) / f"models--{repo.replace('/', '--')}"
    ref = folder / "refs" / "main"
    if not ref.is_file():
        return None
    snapshot = folder / "snapshots" / ref.read_text().strip()
    return snapshot if snapshot.is_dir() else None


@functools.cache
def _hub_repository(library: str, model: str, pretrained: str) -> str | None:
    if library == "transformers":
        return model
    if library == "open_clip":
        import open_clip

        tag = open_clip.get_pretrained_cfg(model, pretrained)
        hub = (tag or {}).get("hf_hub") or ""
        return "/".join(hub.split("/")[:2]) if hub else None
    if library == "timm":
        from timm.models import get_pretrained_cfg

        found = get_pretrained_cfg(model)
        return found.hf_hub_id if found is not None and found.hf_hub_id else None
    return None


def hub_repository(cfg: BackboneConfig) -> str | None:
    """The Hugging Face repository ``cfg``'s library downloads its weights from (open_clip:
    the tag's ``hf_hub``; timm: the model's ``hf_hub_id``; transformers: the model id). None
    for weights from a URL or random weights. open_clip and timm are imported only here, once
    per backbone per process."""
    if not pretrained_flag(cfg.pretrained):
        return None
    return _hub_repository(cfg.library, cfg.model, str(cfg.pretrained))


def _user_digest_dir() -> str:
    """Where digests go when a file's own directory is read-only (per user)."""
    return os.environ.get("SAE_DIGEST_CACHE", str(Path.home() / ".cache" / "sae-grid"))


# ---------------------------------------------------------------- image listings

def listing_id(image_dir: Path | None, ids: Sequence[str], sources: Sequence[Path], root: Path
               ) -> dict[str, object]:
    """The number of images, a digest of their ordered (id, size) list, and the names and sizes
    of the metadata files read (relative to ``root``): what a changed root changes. Without an
    ``image_dir`` the ids are rows of data files (a Hugging Face copy), which ``sources`` name:
    the ids are listed with size 0."""
    sizes = (file_sizes([Path(image_dir) / i for i in ids]) if image_dir is not None
             else [0] * len(ids))
    digest = hashlib.sha256()
    for image_id, size in zip(ids, sizes, strict=True):
        digest.update(f"{image_id}\t{size}\n".encode())
    read = {}
    for source in sorted(Path(s) for s in sources):
        name = source.relative_to(root).as_posix() if source.is_relative_to(root) else source.name
        read[name] = source.stat().st_size
    return {"n_images": len(ids), "files_sha256": digest.hexdigest(), "sources": read}


def file_sizes(paths: Sequence[Path]) -> list[int]:
    """Sizes of many files, stat'ed by a thread pool in chunks (ImageNet train: 1.28 M files)."""
    chunks = [paths[i:i + _STAT_CHUNK] for i in range(0, len(paths), _STAT_CHUNK)]

    def sizes(chunk: Sequence[Path]) -> list[int]:
        return [os.stat(p).st_size for p in chunk]

    if len(chunks) <= 1:
        return sizes(paths)
    with ThreadPoolExecutor(_STAT_THREADS) as pool:
        return [size for chunk_sizes in pool.map(sizes, chunks) for size in chunk_sizes]


# ---------------------------------------------------------------- library versions

def library_versions() -> dict[str, str]:
    """Versions of the packages that decide the embeddings, for the cache manifest (read from
    the installed metadata: importing open_clip only for its version costs seconds)."""
    import sys
    from importlib import metadata

    versions = {"python": ".".join(map(str, sys.version_info[:3]))}
    for package in MANIFEST_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:  # not installed: it took no part
            continue
    return versions


def key_versions(versions: dict[str, str]) -> dict[str, str]:
    """The major.minor versions of ``KEY_PACKAGES`` (a patch release changes no numbers)."""
    return {p: ".".join(versions[p].split(".")[:2]) for p in KEY_PACKAGES if p in versions}


def version_drift(recorded: dict[str, str], installed: dict[str, str]) -> list[str]:
    """``["torch 2.13 (cache) != 2.14 (installed)", ...]``; empty when they agree."""
    return [f"{p} {recorded.get(p, 'absent')} (cache) != {installed.get(p, 'absent')} (installed)"
            for p in sorted(set(recorded) | set(installed)) if recorded.get(p) != installed.get(p)]
