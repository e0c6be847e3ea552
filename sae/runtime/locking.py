"""Waiting on another process's lock: never deaf to stop signals, saying whose it is and for
how long at most."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import BaseFileLock, Timeout

from sae.grid.runs import read_status, run_lock
from sae.runtime.preemption import redeliver, signal_name, stop_signals

log = logging.getLogger(__name__)
LOCK_POLL_S = 1.0  # how often a waiting process looks for a stop signal


class WaitStopped(Exception):  # noqa: N818 (a stop, not an error)
    """SIGTERM or USR2 arrived while waiting for a lock (which is not held)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal_name(signum)} while waiting for a lock")
        self.signum = signum


def acquire_listening(lock: BaseFileLock, timeout_s: float | None = None) -> None:
    """Acquire ``lock``, held by another process, polling every ``LOCK_POLL_S``: a SIGTERM or
    USR2 meanwhile raises :class:`WaitStopped` (with the handlers of before restored, for the
    caller to hand the signal on); more than ``timeout_s`` (None: no limit) raises Timeout. A
    task waiting under SLURM is then requeued or ended within a second, never holding its
    allocation through a preemption."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with stop_signals() as stop:
        while True:
            left = LOCK_POLL_S if deadline is None else deadline - time.monotonic()
            try:
                lock.acquire(timeout=max(0.0, min(LOCK_POLL_S, left)))
                return
            except Timeout:
                if stop.signum is not None:
                    raise WaitStopped(stop.signum) from None
                if deadline is not None and time.monotonic() >= deadline:
                    raise


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
    ``timeout_s`` seconds (None: without limit). A stop signal during the wait ends the
    process as the signal asks (USR2 under submitit: requeued); the run belongs to the holder,
    so nothing is recorded in it."""
    lock = run_lock(directory)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        owner = lock_owner(directory)
        bound = "without limit" if timeout_s is None else f"at most {timeout_s:g} s"
        log.warning("run %s is locked by %s; waiting %s (run.lock_timeout_s)",
                    directory.name, owner, bound)
        try:
            acquire_listening(lock, timeout_s)
        except WaitStopped as stop:
            log.warning("stopped by %s while waiting for %s's lock; leaving it to its holder",
                        signal_name(stop.signum), directory.name)
            redeliver(stop.signum)
        except Timeout:
            raise RunLocked(f"run {directory} is still locked by {owner} after {timeout_s:g} s. "
                            "Fix: wait for that process, or end it if it is gone (its lock is "
                            f"{directory}/.lock), or raise run.lock_timeout_s") from None
    try:
        yield
    finally:
        lock.release()
