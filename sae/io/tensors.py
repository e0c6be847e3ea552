"""Tensor files: safetensors with a JSON sidecar (:func:`save_tensors`, :func:`load_tensors`)
whose metadata carries a schema version, the code version and a digest of the tensors,
verified on load: a damaged file raises :class:`CorruptCheckpointError` naming it.

Imports no torch at import time (the report and the sweeper read metadata through it); the
functions that need it import it when called."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sae.io.files import (
    atomic_write,
    atomic_write_text,
    json_default,
    to_json,
    unused_name,
    utc_stamp,
)
from sae.io.version import code_version

if TYPE_CHECKING:
    import torch

CHECKPOINT_SCHEMA_VERSION = 1


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
    sidecar = json.dumps(meta, sort_keys=True, default=json_default)
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
    """The sidecar embedded in a safetensors file's header (no tensor is read); an unreadable
    header raises :class:`CorruptCheckpointError`."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return json.loads((handle.metadata() or {}).get("sidecar", "{}"))
    except (SafetensorError, json.JSONDecodeError, OSError) as exc:
        raise unreadable(path, exc) from exc


def unreadable(path: Path, exc: Exception) -> Exception:
    """The error for a file that cannot be read: itself when missing, else corrupt."""
    if isinstance(exc, FileNotFoundError):
        return exc
    problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return CorruptCheckpointError(f"{path}: unreadable ({problem})")


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
        raise unreadable(path, exc) from exc
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
