"""Waiting on another process's run lock, saying whose it is and for how long at most."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import Timeout

from sae.runs import read_status, run_lock

log = logging.getLogger(__name__)


class RunLocked(RuntimeError):
    """Another process held the run's lock for longer than ``run.lock_timeout_s``."""


def lock_owner(directory: Path) -> str:
    """``host H pid P (SLURM job J) since T``, from the holder's status file."""
    status = read_status(directory) or {}
    slurm = status.get("slurm") or {}
    job = slurm.get("slurm_job_id")
    if slurm.get("slurm_array_job_id"):
        job = f"{slurm['slurm_array_job_id']}_{slurm.get('slurm_array_task_id')}"
    return (f"host {status.get('host', '?')} pid {status.get('pid', '?')}"
            + (f" (SLURM job {job})" if job else "")
            + f" since {status.get('updated', '?')}")


@contextmanager
def hold_run_lock(directory: Path, timeout_s: float | None) -> Iterator[None]:
    """Hold the run's lock; when another process holds it, say so once and wait at most
    ``timeout_s`` seconds (None: without limit)."""
    lock = run_lock(directory)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        owner = lock_owner(directory)
        bound = "without limit" if timeout_s is None else f"at most {timeout_s:g} s"
        log.warning("run %s is locked by %s; waiting %s (run.lock_timeout_s)",
                    directory.name, owner, bound)
        try:
            lock.acquire(timeout=-1 if timeout_s is None else timeout_s)
        except Timeout:
            raise RunLocked(f"run {directory} is still locked by {owner} after {timeout_s:g} s. "
                            "Fix: wait for that process, or end it if it is gone (its lock is "
                            f"{directory}/.lock), or raise run.lock_timeout_s") from None
    try:
        yield
    finally:
        lock.release()
