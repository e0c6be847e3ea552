"""Run identity, the run directory, its status file, atomic writes and checkpoints.

Identity: :func:`run_id` is the one function that names a run. It hashes the *semantic* part
of the resolved config -- what changes the numbers -- and nothing about where or how the run
executes (device, paths, logging, launcher, progress bars). Settings with no effect are
normalised away first: without a regularizer, ``mask``, ``strength`` and ``eps`` are dropped,
so the two mask twins of a baseline cell are one run. The W&B run id, the run directory name
and the "already done" check all use it.

Run directory (``<paths.runs>/<run_id>/``)::

    config.yaml           resolved config           identity.json   what run_id hashed
    status.json           {"state": running|done|failed, "reason", "updated", "slurm", ...}
    checkpoints/last.safetensors (+ last.json)     model.safetensors (+ model.json)
    metrics.json          method_card.md / .json    inspect/ (contact sheets)   wandb/

Every file is written to a temporary name in the same directory and renamed (atomic on POSIX),
so a killed job never leaves a half-written file under a final name. ``done`` is written last.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import os
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from safetensors import safe_open
from safetensors.torch import save_file

from sae.config import RootConfig, to_dict
from sae.model import TopKSAE

CHECKPOINT_SCHEMA_VERSION = 1
# Keys that never change a run's numbers: how and where it runs, and how it is logged.
NON_SEMANTIC_KEYS = {
    "paths", "logger", "sweep_name", "dry_run", "force", "run",
    "train.device", "train.progress", "train.log_every", "train.checkpoint_every",
    "train.checkpoint_every_s",
    "train.compile", "train.fast_path",
    "backbone.batch_size", "backbone.num_workers", "backbone.checkpoint_path",
    "dataset.root", "dataset.on_unreadable",
}
# preempted / interrupted: stopped by a signal after a checkpoint (sae.preemption), resumable.
STATES = ("running", "done", "failed", "preempted", "interrupted")


# -- identity -----------------------------------------------------------------------------------
def semantic_config(cfg: RootConfig) -> dict[str, Any]:
    """The part of the config that determines the results, with no-effect settings removed."""
    config = to_dict(cfg)
    for dotted in NON_SEMANTIC_KEYS:
        *parents, leaf = dotted.split(".")
        node = config
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    if cfg.regularizer.name == "none":
        config.pop("mask")
        config["regularizer"] = {"name": "none"}
    if cfg.backbone.library == "none":
        config["backbone"] = {"name": "none"}
    return _drop_unused_dataset_fields(config, cfg)


def _drop_unused_dataset_fields(config: dict[str, Any], cfg: RootConfig) -> dict[str, Any]:
    """Fields of the flat dataset schema that the dataset's kind ignores do not name a run."""
    used = {
        "synthetic": {"dim", "n_atoms", "atoms_per_sample", "n_classes", "class_affinity",
                      "noise", "n_train", "n_eval", "data_seed"},
        "digits": {"eval_fraction", "split_seed", "min_pixel_coverage"},
        "files": {"train_path", "eval_path", "train_labels", "eval_labels", "eval_fraction",
                  "split_seed"},
        "images": {"train_split", "eval_split", "max_per_split"},
    }[cfg.dataset.kind]
    always = {"name", "kind", "multi_label", "normalize"}
    config["dataset"] = {k: v for k, v in config["dataset"].items() if k in used | always}
    return config


def run_id(cfg: RootConfig) -> str:
    """``<readable slug>-<10 hex of the semantic hash>``: stable, W&B-safe, < 64 characters."""
    payload = json.dumps(semantic_config(cfg), sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(payload.encode()).hexdigest()[:10]
    reg = cfg.regularizer.name
    mask = "" if reg == "none" else ("-mask" if cfg.mask else "-nomask")
    parts = [cfg.dataset.name, cfg.backbone.name if cfg.backbone.library != "none" else None,
             f"k{cfg.k}", f"{reg}{mask}", f"s{cfg.seed}"]
    slug = "-".join(p for p in parts if p)[:48]
    return f"{slug}-{digest}"


def run_dir(cfg: RootConfig, rid: str | None = None) -> Path:
    """The run's directory (``rid``: its run id when already computed)."""
    return Path(cfg.paths.runs).absolute() / (rid or run_id(cfg))


# -- atomic files ---------------------------------------------------------------------------
def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# -- status ---------------------------------------------------------------------------------
def slurm_facts() -> dict[str, str]:
    """The SLURM job this process runs in (empty outside SLURM); recorded in the status."""
    keys = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT")
    return {k.lower(): os.environ[k] for k in keys if k in os.environ}


def write_status(directory: Path, state: str, reason: str | None = None, **extra: Any) -> None:
    assert state in STATES, state
    status = {"state": state, "reason": reason, "updated": dt.datetime.now(dt.UTC).isoformat(),
              "host": socket.gethostname(), "pid": os.getpid(), "slurm": slurm_facts(), **extra}
    atomic_write_json(directory / "status.json", status)


def read_status(directory: Path) -> dict[str, Any] | None:
    """The run's status, or None when it never started (or its status file is unreadable)."""
    try:
        return json.loads((directory / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def run_state(directory: Path) -> str:
    """``new``, ``running``, ``interrupted``, ``done`` or ``failed``.

    A ``done`` without metrics is not done. A ``running`` status whose lock nobody holds
    belongs to a process that was killed (``scancel``, SIGKILL, node failure): interrupted,
    to be resumed from its checkpoint.
    """
    status = read_status(directory)
    if status is None:
        return "new"
    state = status.get("state", "new")
    if state == "done" and not (directory / "metrics.json").exists():
        return "failed"
    if state == "running" and not run_lock_held(directory):
        return "interrupted"
    if state == "preempted":
        return "interrupted"
    return state


def run_lock(directory: Path, timeout: float = -1) -> FileLock:
    """The lock a process holds while it executes the run in ``directory``."""
    return FileLock(str(directory / ".lock"), timeout=timeout)


def run_lock_held(directory: Path) -> bool:
    lock = run_lock(directory, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return True
    lock.release()
    return False


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
    meta = {"schema_version": CHECKPOINT_SCHEMA_VERSION, "code_version": code_version(), **meta}
    sidecar = json.dumps(meta, sort_keys=True, default=_json_default)
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"sidecar": sidecar})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=2, sort_keys=True,
                                                            default=_json_default) + "\n")


def load_tensors(path: Path, device: str | torch.device = "cpu"
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    with safe_open(str(path), framework="pt", device=str(device)) as handle:
        meta = json.loads((handle.metadata() or {}).get("sidecar", "{}"))
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    version = meta.get("schema_version")
    if version != CHECKPOINT_SCHEMA_VERSION:
        raise ValueError(f"{path}: checkpoint schema version {version!r}, this code reads "
                         f"{CHECKPOINT_SCHEMA_VERSION}. Fix: re-train, or load it with the code "
                         f"version recorded in its sidecar ({meta.get('code_version')})")
    return tensors, meta


def save_model(model: TopKSAE, path: Path, config: dict[str, Any] | None = None,
               **meta: Any) -> None:
    """The SAE alone: weights, its spec (incl. LayerNorm), the run config, the code version."""
    save_tensors(path, dict(model.state_dict()), {"spec": model.spec(), "config": config, **meta})


def load_model(path: Path, device: str | torch.device = "cpu") -> TopKSAE:
    """Rebuild a saved SAE; it reconstructs exactly as it did in training."""
    tensors, meta = load_tensors(path, device)
    spec = meta["spec"]
    model = TopKSAE(spec["d"], spec["n_latents"], spec["k"], tied=spec["tied"],
                    layernorm=spec["layernorm"]).to(device)
    model.load_state_dict(tensors)
    return model
