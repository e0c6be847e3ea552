"""Files written so that a killed job never leaves a half-written file under a final name.

Every write goes to a temporary name in the same directory, is flushed and fsynced, then renamed
(atomic on POSIX): :func:`atomic_write` is the one routine, the others are its uses. Checkpoints
are safetensors files with a JSON sidecar (:func:`save_tensors`, :func:`load_tensors`), whose
metadata carries a schema version, the code version and a digest of the tensors, verified on
load: a damaged file raises :class:`CorruptCheckpointError` naming it.

This module imports no torch at import time (the report and the sweeper write JSON through it);
the checkpoint functions import it when called.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

CHECKPOINT_SCHEMA_VERSION = 1


# -- atomic files ---------------------------------------------------------------------------
def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` fills a temporary file beside ``path``; it is fsynced and renamed onto
    ``path``. On any error the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, to_json(obj))


def to_json(obj: Any) -> str:
    """Indented, key-sorted JSON (tensors, numpy scalars and paths converted), newline ended."""
    return json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"


def _json_default(obj: Any) -> Any:
    torch = sys.modules.get("torch")  # without torch loaded, nothing here is a tensor
    if torch is not None and isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# -- setting files aside --------------------------------------------------------------------
def utc_stamp() -> str:
    """A compact UTC timestamp for names of things set aside (``20261130T054100Z``)."""
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def unused_name(path: Path) -> Path:
    """``path``, or ``path`` with ``-2``, ``-3``, ... appended when it exists."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


# -- content digests of input files --------------------------------------------------------
# A file's sha256 is cached in a sidecar keyed by its size and mtime, so a 5 GB embedding file is
# read once, not at every launch: ``<file>.sha256.json`` beside it, or, where its directory is
# not writable (and for the files inside a directory, such as a Hugging Face snapshot, which is
# left untouched), ``<cache_dir>/digests/``. Without a usable place the digest is recomputed.
DIGEST_SUFFIX = ".sha256.json"
_HASH_CHUNK = 1 << 24  # 16 MiB reads


def writable_dir(directory: Path) -> bool:
    return os.access(directory, os.W_OK)


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


# -- code version ---------------------------------------------------------------------------
@functools.cache
def code_version() -> str:
    """git commit of the project (``+dirty`` with local changes), else the package version."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root,
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        from importlib.metadata import version

        return "sae-grid " + version("sae-grid")


# -- checkpoints ----------------------------------------------------------------------------
class CorruptCheckpointError(ValueError):
    """A checkpoint file that cannot be read or whose tensors do not match their digest."""


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``tensors`` (in name order)."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                 previous: Path | None = None) -> None:
    """safetensors + a JSON sidecar. The sidecar, with the tensors' digest, is also embedded in
    the safetensors header, so the weights file alone is complete and verifiable (the .json copy
    is for people). With ``previous``, the file being replaced is first renamed to it (and its
    sidecar beside it): a kill at any point leaves at least one whole checkpoint."""
    from safetensors.torch import save_file

    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    meta = {"schema_version": CHECKPOINT_SCHEMA_VERSION, "code_version": code_version(),
            "digest": tensor_digest(tensors), **meta}
    sidecar = json.dumps(meta, sort_keys=True, default=_json_default)
    if previous is not None and path.exists():
        os.replace(path, previous)
        if path.with_suffix(".json").exists():
            os.replace(path.with_suffix(".json"), previous.with_suffix(".json"))
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"sidecar": sidecar}))
    atomic_write_text(path.with_suffix(".json"), to_json(meta))


def save_tensor_file(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Plain safetensors (no sidecar), written atomically: arrays for the report."""
    from safetensors.torch import save_file

    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))


def load_meta(path: Path) -> dict[str, Any]:
    """The sidecar embedded in a safetensors file's header (no tensor is read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return json.loads((handle.metadata() or {}).get("sidecar", "{}"))


def load_tensors(path: Path, device: str | torch.device = "cpu"
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata of a file written by :func:`save_tensors`, verified against the
    digest it carries (files written before digests existed carry none and are read as is)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            meta = json.loads((handle.metadata() or {}).get("sidecar", "{}"))
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, json.JSONDecodeError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CorruptCheckpointError(f"{path}: unreadable ({problem})") from exc
    version = meta.get("schema_version")
    if version != CHECKPOINT_SCHEMA_VERSION:
        raise ValueError(f"{path}: checkpoint schema version {version!r}, this code reads "
                         f"{CHECKPOINT_SCHEMA_VERSION}. Fix: re-train, or load it with the code "
                         f"version recorded in its sidecar ({meta.get('code_version')})")
    if "digest" in meta and tensor_digest(tensors) != meta["digest"]:
        raise CorruptCheckpointError(f"{path}: its tensors do not match the digest it carries")
    return tensors, meta


CORRUPT_MARK = ".corrupt-"  # a corrupt file set aside is named <name>.corrupt-<UTC time>


def set_aside_corrupt(path: Path) -> Path:
    """Rename a corrupt file (and its JSON sidecar) out of the way; returns its new path."""
    aside = unused_name(path.with_name(f"{path.name}{CORRUPT_MARK}{utc_stamp()}"))
    os.replace(path, aside)
    sidecar = path.with_suffix(".json")
    if sidecar.exists():
        os.replace(sidecar, unused_name(sidecar.with_name(f"{sidecar.name}{CORRUPT_MARK}"
                                                            f"{utc_stamp()}")))
    return aside
