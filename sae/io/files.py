"""Files written so that a killed job never leaves a half-written file under a final name.

Every write goes to a temporary name in the same directory, is flushed and fsynced, then renamed
(atomic on POSIX): :func:`atomic_write` is the one routine, the others are its uses. Also the
names of things set aside (:func:`utc_stamp`, :func:`unused_name`)."""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


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
    return json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n"


def json_default(obj: Any) -> Any:
    torch = sys.modules.get("torch")  # without torch loaded, nothing here is a tensor
    if torch is not None and isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


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


def writable_dir(directory: Path) -> bool:
    return os.access(directory, os.W_OK)
