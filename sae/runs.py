"""The run directory: where a run lives, its status file and its lock.

Run directory (``<paths.runs>/<run_id>/``, the id from :func:`sae.identity.run_id`)::

    config.yaml           resolved config           identity.json   what run_id hashed
    status.json           {"state": running|done|failed, "reason", "updated", "slurm", ...}
    checkpoints/last.safetensors (+ last.json)     model.safetensors (+ model.json)
    metrics.json          method_card.md / .json    inspect/ (contact sheets)   wandb/

Every file is written atomically (:mod:`sae.io`), so a killed job never leaves a half-written
file under a final name. ``done`` is written last. This module imports no torch.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from sae.config import RootConfig
from sae.identity import run_id
from sae.io import atomic_write_json

STATES = ("running", "done", "failed")


def run_dir(cfg: RootConfig, rid: str | None = None) -> Path:
    """The run's directory (``rid``: its run id when already computed)."""
    return Path(cfg.paths.runs).absolute() / (rid or run_id(cfg))


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
