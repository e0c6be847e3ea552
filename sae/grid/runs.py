"""The run directory: its layout, its status vocabulary, its status file and its lock.

This module is the one place that names what a run directory holds; tracking, the report, the
method card, sync, clean, ``sae.load`` and ``sae-status`` read the names from here.

Run directory (``<paths.runs>/<run_id>/``, the id from :func:`sae.identity.run_id`)::

    config.yaml           resolved config           identity.json   what run_id hashed
    status.json           {"state": running|done|failed|preempted|interrupted, "reason",
                           "updated", "slurm", ...}  (none yet: the run is ``new``)
    checkpoints/last.safetensors (+ last.json)     model.safetensors (+ model.json)
    checkpoints/prev.safetensors (+ prev.json)     the checkpoint before last (a fallback)
    previous-<UTC time>/  the outputs a force=true launch set aside (sae-clean removes them)
    metrics.json          latent_metrics.safetensors (per-latent arrays)    notes.md
    method_card.md / .json    inspect/ (contact sheets, index.html)    wandb/ (offline runs)
    .lock                 held while a process executes the run        slurm.out (task log)

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
from sae.io.files import atomic_write_json, unused_name, utc_stamp

# -- the layout -------------------------------------------------------------------------------
RUNS_DIR = "runs"  # the run directories under an output root (paths.runs's default)
CONFIG_FILE = "config.yaml"
IDENTITY_FILE = "identity.json"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.json"
NOTES_FILE = "notes.md"  # the input warnings of metrics.json, for people
MODEL_FILE = "model.safetensors"  # the trained SAE (sae.load); its sidecar is MODEL_SIDECAR
MODEL_SIDECAR = "model.json"
CHECKPOINTS_DIR = "checkpoints"
LAST_CHECKPOINT = "last.safetensors"  # the training checkpoint a restart resumes from
PREV_CHECKPOINT = "prev.safetensors"  # the one before it, kept until the next is whole
PER_LATENT_FILE = "latent_metrics.safetensors"  # the evaluation's per-latent arrays
METHOD_CARD_JSON = "method_card.json"
METHOD_CARD_MD = "method_card.md"
INSPECT_DIR = "inspect"  # contact sheets, and INSPECT_PAGE over them
INSPECT_PAGE = "index.html"
WANDB_DIR = "wandb"  # W&B's own folder (offline runs: wandb/offline-run-*)
LOCK_FILE = ".lock"
TASK_LOG_LINK = "slurm.out"  # the latest task log of the job that ran it
PREVIOUS_PREFIX = "previous-"  # outputs set aside by force=true, never trained from


def checkpoint_path(directory: Path) -> Path:
    """The training checkpoint of the run in ``directory``."""
    return directory / CHECKPOINTS_DIR / LAST_CHECKPOINT


def inspect_page(directory: Path) -> Path:
    """The feature browser of a run (written when its dataset has images)."""
    return directory / INSPECT_DIR / INSPECT_PAGE


def wandb_offline_runs(directory: Path) -> list[Path]:
    """The W&B offline runs of ``directory`` (a run's, or the report's), oldest first."""
    return sorted((directory / WANDB_DIR).glob("offline-run-*"))


def is_synced(offline_run: Path) -> bool:
    """Whether ``wandb sync`` uploaded the offline run (it leaves ``<run>.wandb.synced``)."""
    return any(offline_run.glob("*.wandb.synced"))


# -- the status vocabulary ------------------------------------------------------------------------
# What a status file says. preempted / interrupted: stopped by a signal after a checkpoint
# (sae.runtime.preemption), resumable.
STATES = ("running", "done", "failed", "preempted", "interrupted")
NEW = "new"  # no status file: the run never started
# What run_state reads a run directory as: a preempted run, or a running one whose process is
# gone, is interrupted; a done one without metrics failed. The report and sae-status show these.
RUN_STATES = (NEW, "running", "interrupted", "done", "failed")
# What sae-status adds from the scheduler's view of a run's job (sae.grid.status): waiting in
# the queue, or how the scheduler ended a task that wrote no final status (sae.grid.sweep).
SCHEDULER_STATES = ("pending", "cancelled", "timeout", "node_fail")


def run_dir(cfg: RootConfig, rid: str | None = None) -> Path:
    """The run's directory (``rid``: its run id when already computed)."""
    return Path(cfg.paths.runs).absolute() / (rid or run_id(cfg))


# -- status ---------------------------------------------------------------------------------
def slurm_facts() -> dict[str, str]:
    """The SLURM job this process runs in (empty outside SLURM); recorded in the status."""
    keys = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT")
    return {k.lower(): os.environ[k] for k in keys if k in os.environ}


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
    atomic_write_json(directory / STATUS_FILE, status)


def read_status(directory: Path) -> dict[str, Any] | None:
    """The run's status, or None when it never started (or its status file is unreadable)."""
    try:
        status = json.loads((directory / STATUS_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return status if isinstance(status, dict) else None


def run_state(directory: Path) -> str:
    """One of :data:`RUN_STATES` (:func:`state_and_reason`)."""
    return state_and_reason(directory)[0]


def state_and_reason(directory: Path) -> tuple[str, str | None]:
    """The run's state, one of :data:`RUN_STATES`, and why (the status file's reason, or what
    the state was read from).

    A ``done`` without metrics is not done. A ``running`` status whose lock nobody holds
    belongs to a process that was killed (``scancel``, SIGKILL, node failure): interrupted,
    to be resumed from its checkpoint, as a preempted one is.
    """
    status = read_status(directory)
    if status is None:
        return NEW, f"the run never started (no {STATUS_FILE})"
    state, reason = str(status.get("state", NEW)), status.get("reason")
    if state == "done" and not (directory / METRICS_FILE).exists():
        return "failed", f"status says done but {METRICS_FILE} is missing"
    if state == "running" and not run_lock_held(directory):
        return "interrupted", reason or ("its process ended without writing a final status "
                                         "(killed?); a re-launch resumes from its checkpoint")
    if state == "preempted":
        return "interrupted", reason
    return state, reason


def run_lock(directory: Path, timeout: float = -1) -> FileLock:
    """The lock a process holds while it executes the run in ``directory``."""
    return FileLock(str(directory / LOCK_FILE), timeout=timeout)


def run_lock_held(directory: Path) -> bool:
    lock = run_lock(directory, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return True
    lock.release()
    return False


# -- force=true --------------------------------------------------------------------------------
def set_aside_outputs(directory: Path) -> Path | None:
    """Move everything of the run (checkpoints, model, metrics, status, ...) except its lock into
    ``previous-<UTC time>/``, so a forced run starts from nothing. Returns that directory, or
    None when there was nothing to move."""
    entries = [p for p in directory.iterdir()
               if p.name != LOCK_FILE and not p.name.startswith(PREVIOUS_PREFIX)]
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
