"""Files written so that a killed job never leaves a half-written file under a final name.

Every write goes to a temporary name in the same directory, is flushed and fsynced, then renamed
(atomic on POSIX): :func:`atomic_write` is the one routine, the others are its uses. Checkpoints
are safetensors files with a JSON sidecar (:func:`save_tensors`, :func:`load_tensors`), whose
metadata carries a schema version and the code version.

This module imports no torch at import time (the report and the sweeper write JSON through it);
the checkpoint functions import it when called.
"""

from __future__ import annotations

import functools
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
def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """safetensors + a JSON sidecar. The sidecar is also embedded in the safetensors header, so
    the weights file alone is complete and consistent (the .json copy is for people)."""
    from safetensors.torch import save_file

    meta = {"schema_version": CHECKPOINT_SCHEMA_VERSION, "code_version": code_version(), **meta}
    sidecar = json.dumps(meta, sort_keys=True, default=_json_default)
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
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
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as handle:
        meta = json.loads((handle.metadata() or {}).get("sidecar", "{}"))
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    version = meta.get("schema_version")
    if version != CHECKPOINT_SCHEMA_VERSION:
        raise ValueError(f"{path}: checkpoint schema version {version!r}, this code reads "
                         f"{CHECKPOINT_SCHEMA_VERSION}. Fix: re-train, or load it with the code "
                         f"version recorded in its sidecar ({meta.get('code_version')})")
    return tensors, meta
