"""The raw-embedding probe (the reference line of the code probes), computed once per embedding source.

Every cell that trains and evaluates on the same embeddings fits the same probe on the same
rows: it does not depend on the SAE. The score is stored as a small JSON file in a store
directory (``<paths.cache>/probe_raw/``, beside the embedding caches) under a key that
digests everything that determines it:

- the probe's inputs themselves: the probe-train and evaluation rows of the embeddings (after
  the dataset's normalisation, and after the seeded row subsample) and their labels, as
  BLAKE2b digests of their bytes, dtypes and shapes. A content digest serves every data kind
  alike (image caches, the embedded datasets, user files) and cannot go stale: any change of
  data, normalisation, subsample seed or label set changes it;
- the probe settings (classes, L2 penalty, iterations, chunk rows) and the solver's fixed
  settings (``sae.metrics.probe.LBFGS_SETTINGS``);
- what changes the float arithmetic: the device type and the torch version.

Digesting costs one read of the rows (about 0.5 s per 460 MB, the paper's 150k x 768 float32),
against about 80 s for the probe on 2 CPU cores. A missing, unreadable or mismatching file is
(re)computed and written atomically, under a file lock: cells of one sweep that start together
compute it once, the others wait for it and read it.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock

from sae.grid.runs import atomic_write_json
from sae.metrics.probe import LBFGS_SETTINGS, linear_probe, probe_metric

SCHEMA_VERSION = 1
STORE_DIR_NAME = "probe_raw"


def tensor_digest(tensor: torch.Tensor) -> str:
    """BLAKE2b of a tensor's dtype, shape and bytes (row-major)."""
    array = np.ascontiguousarray(tensor.detach().cpu().numpy())
    hasher = hashlib.blake2b(digest_size=16)
    hasher.update(f"{array.dtype.str}{array.shape}".encode())
    hasher.update(memoryview(array).cast("B"))
    return hasher.hexdigest()


def probe_key_fields(x_train: torch.Tensor, y_train: torch.Tensor, x_eval: torch.Tensor,
                     y_eval: torch.Tensor, settings: dict[str, Any]) -> dict[str, Any]:
    """Everything that determines the raw-embedding probe's score, as plain JSON values."""
    return {
        "schema": SCHEMA_VERSION,
        "inputs": {name: {"digest": tensor_digest(t), "shape": list(t.shape)}
                   for name, t in (("x_train", x_train), ("y_train", y_train),
                                   ("x_eval", x_eval), ("y_eval", y_eval))},
        "settings": settings,
        "solver": {"name": "L-BFGS", **LBFGS_SETTINGS},
        "torch": torch.__version__.split("+")[0],
    }


def _key(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def _read(path: Path, key: str) -> float | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key or "value" not in record:
        return None
    return math.nan if record["value"] is None else float(record["value"])


def stored_linear_probe(store_dir: Path | None, x_train: torch.Tensor, y_train: torch.Tensor,
                        x_eval: torch.Tensor, y_eval: torch.Tensor, *, n_classes: int,
                        weight_decay: float, max_iter: int, chunk_size: int,
                        device: torch.device | str | None = None) -> tuple[float, bool]:
    """``linear_probe``'s score and whether it was read from the store (None: no store).

    The arguments are ``linear_probe``'s; a stored score is reused only under the same key.
    """
    kwargs = {"n_classes": n_classes, "weight_decay": weight_decay, "max_iter": max_iter,
              "chunk_size": chunk_size, "device": device}
    if store_dir is None:
        return linear_probe(x_train, y_train, x_eval, y_eval, **kwargs), False
    run_device = torch.device(device) if device is not None else x_train.device
    settings = {"n_classes": n_classes, "weight_decay": weight_decay, "max_iter": max_iter,
                "chunk_size": chunk_size, "device_type": run_device.type}
    fields = probe_key_fields(x_train, y_train, x_eval, y_eval, settings)
    key = _key(fields)
    path = Path(store_dir) / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        stored = _read(path, key)
        if stored is not None:
            return stored, True
        started = time.perf_counter()
        value = linear_probe(x_train, y_train, x_eval, y_eval, **kwargs)
        atomic_write_json(path, {"key": key, "metric": probe_metric(y_eval),
                                 "value": value if math.isfinite(value) else None,
                                 "seconds": round(time.perf_counter() - started, 3), **fields})
    return value, False
