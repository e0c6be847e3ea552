"""The state of every run of a sweep, from its ``cells.json``, each run's ``status.json`` and
what SLURM says of the recorded jobs (``sae-status SWEEP_DIR``).

A run is ``done`` when its own status says so (with its metrics). Otherwise the scheduler's view
of its job wins while it has one: ``pending`` (with SLURM's reason, e.g. waiting for its
extraction job), ``running``, or how it ended (``cancelled``, ``timeout``, ``node_fail``,
``failed``). Without a job state, the run's own status stands: ``failed``, ``interrupted``,
``running``, or ``new`` (never started).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sae.data.layout import is_complete
from sae.grid.runs import read_status, run_state
from sae.grid.scheduler import NEVER_STARTS, SchedulerUnavailable, is_live, job_states

# The order of the summary line.
ORDER = ("done", "running", "pending", "failed", "cancelled", "timeout", "node_fail",
         "interrupted", "new")


@dataclass
class RunStatus:
    run_id: str
    state: str
    job_id: str | None
    detail: str  # why (a failure's reason, SLURM's pending reason), or ""


@dataclass
class SweepStatus:
    name: str
    runs: list[RunStatus]
    caches: list[tuple[str, str, str | None]]  # (build name, state, job id)
    note: str  # what could not be asked ("" when SLURM answered)

    def summary(self) -> str:
        counts = Counter(r.state for r in self.runs)
        parts = [f"{counts[s]} {s}" for s in ORDER if counts[s]]
        return f"{len(self.runs)} runs: " + (", ".join(parts) or "none")

    @property
    def finished(self) -> bool:
        return not any(r.state in ("running", "pending") for r in self.runs) and not any(
            state in ("running", "pending") for _, state, _ in self.caches)

    def table(self) -> str:
        width = max((len(r.run_id) for r in self.runs), default=10)
        lines = [f"sweep {self.name}"]
        lines += [f"  cache {name:<{width - 6}}  {state:<10}  job {job or '-'}"
                  for name, state, job in self.caches]
        lines += [(f"  {r.run_id:<{width}}  {r.state:<10}  job {r.job_id or '-':<12}"
                   + (f"  {r.detail}" if r.detail else "")).rstrip() for r in self.runs]
        if self.note:
            lines.append(f"  ({self.note})")
        lines.append(self.summary())
        return "\n".join(lines)


def sweep_status(sweep_dir: Path | str) -> SweepStatus:
    """Every unique run of the sweep with its merged state (module docstring)."""
    sweep_dir = Path(sweep_dir)
    record_file = sweep_dir / "cells.json"
    if not record_file.is_file():
        raise FileNotFoundError(
            f"{record_file} does not exist: {sweep_dir} is not a launched sweep. Fix: pass the "
            "sweep directory (paths.sweeps/<sweep_name>, printed at launch)")
    record = json.loads(record_file.read_text())
    cells = [c for c in record["cells"] if c.get("duplicate_of") is None]
    caches = record.get("caches", [])
    states, note = {}, ""
    if record.get("scheduler") == "slurm":
        try:
            states = job_states([c.get("job_id") for c in cells]
                                + [b.get("job_id") for b in caches])
        except SchedulerUnavailable as exc:
            note = f"SLURM did not answer ({exc}): states from the runs' status files only"
    runs = [_run_status(c, states.get(c.get("job_id") or "")) for c in cells]
    return SweepStatus(record.get("sweep", sweep_dir.name), runs,
                       [_cache_status(b, states.get(b.get("job_id") or "")) for b in caches],
                       note)


def _run_status(cell: dict[str, Any], slurm: str | None) -> RunStatus:
    directory = Path(cell["run_dir"])
    own = run_state(directory)
    job = cell.get("job_id")
    if own == "done":
        return RunStatus(cell["run_id"], "done", job, "")
    if slurm:
        word = slurm.split()[0].upper()
        if NEVER_STARTS in slurm:
            return RunStatus(cell["run_id"], "failed", job, "its extraction job failed (SLURM: "
                             f"{NEVER_STARTS}); re-launch the sweep")
        if word == "PENDING":
            return RunStatus(cell["run_id"], "pending", job, slurm[len("PENDING"):].strip(" ()"))
        if is_live(slurm):
            return RunStatus(cell["run_id"], "running", job, "")
        if word != "COMPLETED":
            from sae.grid.sweep import scheduler_end

            return RunStatus(cell["run_id"], scheduler_end(slurm), job, slurm)
    status = read_status(directory) or {}
    return RunStatus(cell["run_id"], own, job, str(status.get("reason") or "")[:120])


def _cache_status(build: dict[str, Any], slurm: str | None) -> tuple[str, str, str | None]:
    if all(is_complete(Path(p)) for p in build.get("paths", {}).values()):
        state = "done"
    elif slurm and slurm.split()[0].upper() == "PENDING":
        state = "pending"
    elif is_live(slurm):
        state = "running"
    elif slurm:
        from sae.grid.sweep import scheduler_end

        state = scheduler_end(slurm)
    else:
        state = "missing"
    return build["name"], state, build.get("job_id")
