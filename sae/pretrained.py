"""A trained SAE for a notebook: ``sae.load(path_or_run_id)``.

    import sae
    model = sae.load("outputs/runs/digits-k8-l1l2-mask-s0-1a2b3c4d5e")  # or the run id alone
    code = model.encode(raw_embeddings)          # the training's preprocessing included
    x_hat = model(raw_embeddings).x_hat          # back in the raw embeddings' space
    model.run_id, model.config["k"], model.metrics["r2"]

What a run trained on is not always what a user holds: with ``dataset.normalize=true`` (the
default of every image dataset and of ``files``) the SAE saw unit-norm rows. The module returned
here applies that preprocessing itself, so raw rows give the codes the evaluation computed, and
its reconstruction is scaled back to each row's own norm. The centring (``b_pre``) and the
optional LayerNorm are the SAE's own, as in training.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sae.grid.runs import (
    CHECKPOINTS_DIR,
    IDENTITY_FILE,
    LAST_CHECKPOINT,
    METRICS_FILE,
    MODEL_FILE,
    RUNS_DIR,
)
from sae.io.tensors import load_tensors
from sae.model import InputStats, TopKSAE

CHECKPOINT_FILE = Path(CHECKPOINTS_DIR) / LAST_CHECKPOINT
EXPECTED = ("a run directory, its model.safetensors, a training checkpoint "
            "(checkpoints/last.safetensors), or a run id under ROOT/runs")


class TrainedSAE(TopKSAE):
    """A ``TopKSAE`` that takes raw embeddings: ``normalize_inputs`` unit-normalises each row
    before the SAE (as ``dataset.normalize`` did in training) and ``decode(code, stats)`` with
    the statistics of ``encode_pre`` / ``forward`` returns to the row's own norm.

    Attributes: ``config`` (the run's resolved config), ``run_id``, ``metrics`` (the flat final
    numbers of its metrics.json, empty when there is none) and ``source`` (the file loaded)."""

    normalize_inputs: bool = False
    config: dict[str, Any]
    run_id: str | None
    metrics: dict[str, float]
    source: Path

    def standardize(self, x: torch.Tensor) -> tuple[torch.Tensor, InputStats | None]:
        if not self.normalize_inputs:
            return super().standardize(x)
        norms = x.norm(dim=1, keepdim=True)
        x_in, stats = super().standardize(F.normalize(x, dim=1))
        if stats is None:
            return x_in, InputStats(torch.zeros_like(norms), norms)
        # Undo LayerNorm, then the unit norm: x = (x_ln std + mean) |x|.
        return x_in, InputStats(stats.mean * norms, stats.std * norms)


def load(path_or_run_id: str | os.PathLike, root: str | os.PathLike | None = None,
         device: str | torch.device = "cpu") -> TrainedSAE:
    """The trained SAE of a run directory, a ``model.safetensors``, a training checkpoint, or a
    run id (or a unique prefix of one) under ``root/runs`` (default ``$SAE_OUTPUT_ROOT``, else
    ``outputs``)."""
    file = _resolve(path_or_run_id, root)
    tensors, meta = load_tensors(file, device)
    if "spec" not in meta:
        raise ValueError(f"{file} holds no SAE (no model spec in its metadata); expected "
                         f"{EXPECTED}")
    if meta.get("kind") == "training_checkpoint":
        tensors = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    spec = meta["spec"]
    model = TrainedSAE(spec["d"], spec["n_latents"], spec["k"], tied=spec["tied"],
                       layernorm=spec["layernorm"])
    model.load_state_dict(tensors)
    config = meta.get("config") or {}
    model.normalize_inputs = bool((config.get("dataset") or {}).get("normalize", False))
    model.config = config
    model.source = file
    run_dir = file.parent.parent if file.parent.name == CHECKPOINTS_DIR else file.parent
    model.run_id = run_dir.name if (run_dir / IDENTITY_FILE).exists() else None
    model.metrics = _flat_metrics(run_dir / METRICS_FILE)
    # For analysis: no autograd graph behind the codes (requires_grad_(True) to fine-tune).
    return model.requires_grad_(False).to(device).eval()


def _resolve(given: str | os.PathLike, root: str | os.PathLike | None) -> Path:
    path = Path(given).expanduser()
    if path.is_dir():
        for candidate in (path / MODEL_FILE, path / CHECKPOINT_FILE):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"{path} is a directory without {MODEL_FILE} or "
                                f"{CHECKPOINT_FILE} (has the run trained?); expected {EXPECTED}")
    if path.is_file():
        return path
    if path.suffix or os.sep in str(given):
        raise FileNotFoundError(f"{given}: no such file or directory; expected {EXPECTED}")
    runs = Path(root or os.environ.get("SAE_OUTPUT_ROOT") or "outputs") / RUNS_DIR
    matches = sorted(runs.glob(f"{given}*")) if runs.is_dir() else []
    exact = [m for m in matches if m.name == str(given)]
    if len(exact) == 1 or len(matches) == 1:
        return _resolve((exact or matches)[0], root)
    if not matches:
        raise FileNotFoundError(f"{given}: not a path, and no run id starting with it under "
                                f"{runs}; expected {EXPECTED} (root= or $SAE_OUTPUT_ROOT)")
    names = ", ".join(m.name for m in matches[:5])
    raise ValueError(f"{given}: {len(matches)} runs under {runs} start with it ({names}"
                     f"{', ...' if len(matches) > 5 else ''}); give more of the run id")


def _flat_metrics(path: Path) -> dict[str, float]:
    if not path.is_file():
        return {}
    metrics = json.loads(path.read_text())
    return {k: v for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)}
