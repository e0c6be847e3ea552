"""The run directory: where a run lives, its status file and its lock.

Run directory (``<paths.runs>/<run_id>/``, the id from :func:`sae.identity.run_id`)::

    config.yaml           resolved config           identity.json   what run_id hashed
    status.json           {"state": running|done|failed, "reason", "updated", "slurm", ...}
    checkpoints/last.safetensors (+ last.json)     model.safetensors (+ model.json)
    checkpoints/prev.safetensors (+ prev.json)     the checkpoint before last (a fallback)
    previous-<UTC time>/  the outputs a force=true launch set aside (sae-clean removes them)
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
from sae.io import atomic_write_json, unused_name, utc_stamp

# preempted / interrupted: stopped by a signal after a checkpoint (sae.preemption), resumable.
STATES = ("running", "done", "failed", "preempted", "interrupted")


def run_dir(cfg: RootConfig, rid: str | None = None) -> Path:
    """The run's directory (``rid``: its run id when already computed)."""
    return Path(cfg.paths.runs).absolute() / (rid or run_id(cfg))


# -- status ---------------------------------------------------------------------------------
def slurm_facts() -> dict[str, str]:
    """The SLURM job this process runs in (empty outside SLURM); recorded in the status."""
    keys = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT")
    return {k.lower(): os.environ[k] for k in keys if k in os.environ}


TASK_LOG_LINK = "slurm.out"  # in a run folder: the latest task log of the job that ran it


def task_logs() -> dict[str, str]:
    """The stdout and stderr files of the submitit task this process runs in (empty outside
    one), as submitit names them: ``<folder>/<job id>_<task id>_log.out|err``, the folder's
    ``%j`` / ``%A`` / ``%a`` filled in. Read from the environment: this layer imports no
    submitit."""
    folder = os.environ.get("SUBMITIT_FOLDER")
    if not folder:
        return {}
    array_job, array_task = (os.environ.get("SLURM_ARRAY_JOB_ID"),
                             os.environ.get("SLURM_ARRAY_TASK_ID"))
    job = (f"{array_job}_{array_task}" if array_job else
           os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID"))
    if not job:
        return {}
    task = os.environ.get("SLURM_PROCID") or os.environ.get("SUBMITIT_LOCAL_GLOBALRANK") or "0"
    base = folder.replace("%j", job).replace("%t", task)
    base = base.replace("%A", job.split("_")[0]).replace("%a", job.split("_", 1)[-1])
    stem = str(Path(base).expanduser().absolute() / f"{job}_{task}_log")
    return {"stdout": f"{stem}.out", "stderr": f"{stem}.err"}


def link_task_log(directory: Path) -> str | None:
    """``<run>/slurm.out`` -> this task's log (replaced by each new task); returns the log."""
    logs = task_logs()
    if not logs:
        return None
    link = directory / TASK_LOG_LINK
    temporary = directory / f".{TASK_LOG_LINK}.{os.getpid()}"
    try:
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(logs["stdout"])
        os.replace(temporary, link)
    except OSError:  # a file system without symlinks: the status still names the logs
        temporary.unlink(missing_ok=True)
    return logs["stdout"]


def write_status(directory: Path, state: str, reason: str | None = None, **extra: Any) -> None:
    assert state in STATES, state
    status = {"state": state, "reason": reason, "updated": dt.datetime.now(dt.UTC).isoformat(),
              "host": socket.gethostname(), "pid": os.getpid(), "slurm": slurm_facts(), **extra}
    if logs := task_logs():
        status["logs"] = logs
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


# -- force=true --------------------------------------------------------------------------------
PREVIOUS_PREFIX = "previous-"  # outputs set aside by force=true, never trained from


def set_aside_outputs(directory: Path) -> Path | None:
    """Move everything of the run (checkpoints, model, metrics, status, ...) except its lock into
    ``previous-<UTC time>/``, so a forced run starts from nothing. Returns that directory, or
    None when there was nothing to move."""
    entries = [p for p in directory.iterdir()
               if p.name != ".lock" and not p.name.startswith(PREVIOUS_PREFIX)]
    if not entries:
        return None
    target = unused_name(directory / f"{PREVIOUS_PREFIX}{utc_stamp()}")
    target.mkdir()
    for entry in entries:
        os.replace(entry, target / entry.name)
    return target


def is_own_requeue(directory: Path) -> bool:
    """Whether this process is the same SLURM job (requeued: same job or array task id) as the
    one that last ran the cell. A requeued job re-runs its command, ``force=true`` included; it
    must resume its own checkpoint, not set it aside again at every preemption."""
    status = read_status(directory) or {}
    here = {k: v for k, v in slurm_facts().items() if k != "slurm_restart_count"}
    there = {k: v for k, v in (status.get("slurm") or {}).items() if k != "slurm_restart_count"}
    return bool(here) and here == there
