"""Content digests of input files, cached in sidecars keyed by size and mtime."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from sae.io.files import atomic_write_json, writable_dir

# A file's sha256 is cached in a sidecar keyed by its size and mtime, so a 5 GB embedding file is
# read once, not at every launch: ``<file>.sha256.json`` beside it, or, where its directory is
# not writable (and for the files inside a directory, such as a Hugging Face snapshot, which is
# left untouched), ``<cache_dir>/digests/``. Without a usable place the digest is recomputed.
DIGEST_SUFFIX = ".sha256.json"
_HASH_CHUNK = 1 << 24  # 16 MiB reads


def stream_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def digest_sidecar(path: Path, cache_dir: str | None, beside: bool = True) -> Path | None:
    """Where the digest of ``path`` is cached (None: nowhere usable)."""
    if beside and writable_dir(path.parent):
        return path.with_name(path.name + DIGEST_SUFFIX)
    if cache_dir is None:
        return None
    key = hashlib.sha256(str(path.absolute()).encode()).hexdigest()[:16]
    return Path(cache_dir) / "digests" / f"{key}-{path.name}{DIGEST_SUFFIX}"


@functools.cache
def file_digest(path: Path, size: int, mtime_ns: int, cache_dir: str | None,
                beside: bool = True) -> str:
    """:func:`sidecar_digest`, remembered for the life of the process."""
    return sidecar_digest(path, size, mtime_ns, cache_dir, beside)


def sidecar_digest(path: Path, size: int, mtime_ns: int, cache_dir: str | None,
                   beside: bool = True) -> str:
    """sha256 of the file ``path`` (whose stat gave ``size`` and ``mtime_ns``), from its
    sidecar when that was written for this size and mtime, else streamed and cached. The one
    digest cache of the project: run identity and the embedding cache key share its sidecars."""
    sidecar = digest_sidecar(path, cache_dir, beside)
    try:
        cached = json.loads(sidecar.read_text()) if sidecar else {}
    except (OSError, json.JSONDecodeError):
        cached = {}
    if cached.get("size") == size and cached.get("mtime_ns") == mtime_ns:
        return cached["sha256"]
    sha256 = stream_sha256(path)
    if sidecar is not None:
        try:
            atomic_write_json(sidecar, {"path": str(path.absolute()), "size": size,
                                        "mtime_ns": mtime_ns, "sha256": sha256})
        except OSError:  # a cache that cannot be written only costs a re-read
            pass
    return sha256
