"""What SLURM says about a sweep's jobs: ``squeue`` for the jobs it still holds (pending,
running), ``sacct`` (the accounting database) for the ones that ended. No submitit here: the
status command and the re-attaching launcher read job ids from ``cells.json``."""

from __future__ import annotations

import subprocess
from collections.abc import Iterable

# States in which a job still holds, or will hold, an allocation: a re-launch leaves its cells
# alone. (sacct and squeue spell them the same way.)
LIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
               "COMPLETING", "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"}
QUERY_TIMEOUT_S = 60


class SchedulerUnavailable(RuntimeError):
    """squeue / sacct cannot be run or did not answer."""


# A pending job whose dependency failed never starts (unless the cluster kills such jobs).
NEVER_STARTS = "DependencyNeverSatisfied"


def is_live(state: str | None) -> bool:
    """Whether a job in ``state`` holds or will hold an allocation (a pending job whose
    extraction job failed never will)."""
    return (bool(state) and state.split()[0].upper() in LIVE_STATES
            and NEVER_STARTS not in state)


def job_states(job_ids: Iterable[str]) -> dict[str, str]:
    """The SLURM state of each job or array task (``123`` or ``123_4``), e.g. ``PENDING
    (Dependency)``, ``RUNNING``, ``COMPLETED``, ``CANCELLED by 0``. Jobs SLURM no longer knows
    are absent. Raises :class:`SchedulerUnavailable` when neither command answers."""
    wanted = sorted({str(j) for j in job_ids if j})
    if not wanted:
        return {}
    states: dict[str, str] = {}
    errors = []
    for query in (_sacct, _squeue):  # the live view last: it wins (accounting may lag)
        try:
            states.update(query(wanted))
        except SchedulerUnavailable as exc:
            errors.append(str(exc))
    if len(errors) == 2:
        raise SchedulerUnavailable("; ".join(errors))
    return {job: states[job] for job in wanted if job in states}


def _run(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SchedulerUnavailable(f"{command[0]}: {exc}") from None
    if done.returncode != 0:
        raise SchedulerUnavailable(f"{' '.join(command[:2])}: {done.stderr.strip()[:300]}")
    return done.stdout


def _base_ids(job_ids: list[str]) -> str:
    return ",".join(sorted({j.split("_")[0] for j in job_ids}))


def _squeue(job_ids: list[str]) -> dict[str, str]:
    """Pending and running jobs, array tasks one per line (``-r``), with the pending reason."""
    try:
        out = _run(["squeue", "-h", "-r", "--states=all", "-j", _base_ids(job_ids),
                    "-o", "%i|%T|%r"])
    except SchedulerUnavailable as exc:
        if "Invalid job id" in str(exc):  # every job has left the controller's table
            return {}
        raise
    states = {}
    for line in out.splitlines():
        job, state, reason = (line.split("|") + ["", ""])[:3]
        if state == "PENDING" and reason and reason != "None":
            state = f"PENDING ({reason})"
        states[job.strip()] = state.strip()
    return states


def _sacct(job_ids: list[str]) -> dict[str, str]:
    out = _run(["sacct", "-n", "-P", "-X", "-j", _base_ids(job_ids), "-o", "JobID,State"])
    states = {}
    for line in out.splitlines():
        job, _, state = line.partition("|")
        states[job.strip()] = state.strip()
    return states
