"""submitit launchers that survive any task outcome.

The plugin's own launchers (``hydra_submitit_launcher``) end with
``[job.results()[0] for job in jobs]``: the first task that ends without a result (``scancel``,
a time limit past ``max_num_timeout``, a node failure, an out-of-memory kill) raises
``UncompletedJobError`` in the blocking launcher, which then forgets every other task. These
subclasses wait for every task instead and turn a task that ended without a result into a
failed :class:`JobReturn` holding a :class:`TaskEnded` (the scheduler's state), so the sweeper
can record each end and print a summary. ``job_end_callback`` is called as each task ends.
Selected by ``_target_`` in conf/launcher/slurm.yaml and conf/launcher/submitit_local.yaml.
"""

# No `from __future__ import annotations`: Hydra's plugin scan executes this module outside
# sys.modules (see sae_sweeper.py).
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
    LocalLauncher,
    SlurmLauncher,
)
from omegaconf import OmegaConf

log = logging.getLogger(__name__)
POLL_S = 1.0  # how often the launcher looks at its pending tasks
PROGRESS_S = 30.0  # how often, at most, a progress line is printed while nothing ends


class TaskEnded(RuntimeError):
    """A task ended without returning (cancelled, timed out, node failure, killed)."""

    def __init__(self, state: str, job_id: str, log: str) -> None:
        super().__init__(f"task ended in state {state} (job {job_id}; log {log})")
        self.state = state


class _Tolerant:
    """Mixin over the plugin's BaseSubmititLauncher: same submission, tolerant collection."""

    _EXECUTOR: str
    params: dict
    config: Any
    job_end_callback: Optional[Callable[[int, JobReturn], None]] = None  # noqa: UP045

    def _executor(self) -> Any:
        """The plugin's executor, built from the same launcher parameters the plugin reads."""
        import submitit

        init_keys = {"max_num_timeout", "submitit_folder"}
        init = {"folder": self.params["submitit_folder"]}
        if "max_num_timeout" in self.params:
            init[f"{self._EXECUTOR}_max_num_timeout"] = self.params["max_num_timeout"]
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init)
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{
            key if key in base else f"{self._EXECUTOR}_{key}": value
            for key, value in self.params.items() if key not in init_keys})
        return executor

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        job_params = []
        for offset, overrides in enumerate(job_overrides):
            idx = initial_job_idx + offset
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}",
                               Singleton.get_state()))
        jobs = self._executor().map_array(self, *zip(*job_params, strict=True))
        try:
            return self._collect(jobs)
        finally:
            _remove_template_folder(str(self.params["submitit_folder"]))

    def _collect(self, jobs: list) -> list[JobReturn]:
        """Wait for every task; a task's end never stops the wait for the others. A progress
        line goes to stderr at each end and every ``PROGRESS_S`` while waiting."""
        from sae.sweep import progress_line

        results: dict[int, JobReturn] = {}
        started = last_shown = time.monotonic()
        while len(results) < len(jobs):
            ended = False
            for index, job in enumerate(jobs):
                if index not in results and job.done():
                    results[index] = task_return(job)
                    ended = True
                    if self.job_end_callback is not None:
                        self.job_end_callback(index, results[index])
            now = time.monotonic()
            if ended or now - last_shown >= PROGRESS_S:
                failed = sum(r.status != JobStatus.COMPLETED for r in results.values())
                running = sum(1 for i, job in enumerate(jobs)
                              if i not in results and _is_running(job))
                print(progress_line(len(results), failed, running, len(jobs), now - started),
                      file=sys.stderr, flush=True)
                last_shown = now
            if len(results) < len(jobs):
                time.sleep(POLL_S)
        return [results[i] for i in range(len(jobs))]


def _remove_template_folder(folder: str) -> None:
    """submitit makes its folder as written, ``%j`` included, before any job has an id; each
    job then writes to its own ``.submitit/<job id>/``. The literal ``%j`` folder stays empty:
    remove it (only when empty)."""
    if "%" in folder:
        try:
            Path(folder).rmdir()
        except OSError:  # not there, or not empty: leave it
            pass


def _is_running(job: Any) -> bool:
    try:
        return str(job.state).upper() in ("RUNNING", "COMPLETING")
    except Exception:  # noqa: BLE001 -- a scheduler query that fails: count it pending
        return False


def task_return(job: Any) -> JobReturn:
    """What the task returned, or a failed JobReturn holding how it ended."""
    from submitit.core.utils import UncompletedJobError

    try:
        return job.results()[0]
    except UncompletedJobError:  # FailedJobError included
        ended = JobReturn()
        ended.status = JobStatus.FAILED
        ended._return_value = TaskEnded(str(job.state), str(job.job_id), str(job.paths.stderr))
        return ended


class SaeSlurmLauncher(_Tolerant, SlurmLauncher):
    pass


class SaeLocalLauncher(_Tolerant, LocalLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        # Every cell starts at once on this machine: each takes its share of the cores
        # (sae.threads; the LocalExecutor's processes inherit this environment).
        from sae.threads import PARALLEL_TASKS_ENV

        os.environ[PARALLEL_TASKS_ENV] = str(len(job_overrides))
        return super().launch(job_overrides, initial_job_idx)
