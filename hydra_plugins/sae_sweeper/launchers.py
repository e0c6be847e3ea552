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
# How often, at most, the launcher asks the scheduler (one sacct for all its jobs) about tasks
# that have no result yet. submitit alone backs off to half a job's age (10 min for a job an hour
# old), so a cancelled or timed-out task would be seen that late.
STATE_REFRESH_S = 5.0
PROGRESS_S = 30.0  # how often, at most, a progress line is printed while nothing ends


class TaskEnded(RuntimeError):
    """A task ended without returning (cancelled, timed out, node failure, killed), or never
    started (``cause``: its extraction job failed)."""

    def __init__(self, state: str, job_id: str, log: str, cause: Optional[str] = None  # noqa: UP045
                 ) -> None:
        super().__init__(f"task ended in state {state} (job {job_id}; log {log})"
                         + (f": {cause}" if cause else ""))
        self.state = state


class ExtractionJob:
    """Stage 1 as a submitit job: build the missing caches of one (backbone, dataset)
    (``sae.grid.stages.build_caches``). On USR2 (the time limit is near) the extraction saves
    its shard and submitit requeues this job through :meth:`checkpoint`; it resumes from its
    shards."""

    def __init__(self, build: Any) -> None:
        self.build = build

    def __call__(self) -> dict:
        from sae.grid.stages import build_caches

        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
        return build_caches(self.build)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self)


class _Tolerant:
    """Mixin over the plugin's BaseSubmititLauncher: stage 1 first, then the same submission,
    tolerant collection.

    The sweeper sets, before :meth:`launch`: ``stage1`` (the cache builds to submit),
    ``job_builds`` (per training job, the build it reads, or None), ``wait`` and ``on_submit``
    (called with ``("extract", build)`` after each extraction job and ``("train", [(position,
    job_id), ...])`` after each array is submitted, so cells.json holds every job id even if
    this process dies)."""

    _EXECUTOR: str
    _DEPENDENCIES = False  # whether the scheduler can start a job after another (afterok)
    _SCHEDULER = False  # whether job states come from a scheduler (sacct) worth refreshing
    params: dict
    config: Any
    job_end_callback: Optional[Callable[[int, JobReturn], None]] = None  # noqa: UP045
    on_submit: Optional[Callable[[str, Any], None]] = None  # noqa: UP045
    stage1: Sequence[Any] = ()
    job_builds: Sequence[Any] = ()
    wait: bool = True
    # How long a task that ended without its result file may take to show one (a filesystem
    # slow to show another node's file): waited once for all such tasks together, where
    # submitit alone waits 15 s for each, one after the other (launcher.result_grace_s).
    result_grace_s: float = 15.0

    def _executor(self, **changes: Any) -> Any:
        """The plugin's executor, built from the same launcher parameters the plugin reads
        (with ``changes`` to them: another job name, resources, a dependency)."""
        import submitit

        params = {**self.params, **changes}
        init_keys = {"max_num_timeout", "submitit_folder"}
        init = {"folder": params["submitit_folder"]}
        if "max_num_timeout" in params:
            init[f"{self._EXECUTOR}_max_num_timeout"] = params["max_num_timeout"]
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init)
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{
            key if key in base else f"{self._EXECUTOR}_{key}": value
            for key, value in params.items() if key not in init_keys})
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
        try:
            extraction = self._submit_extractions()
            jobs, ended = self._submit_training(job_params, extraction)
            if not self.wait:
                return []
            return self._collect(jobs, ended, extraction)
        finally:
            _remove_template_folder(str(self.params["submitit_folder"]))

    def _submit_extractions(self) -> dict[int, Any]:
        """One job per cache build with missing caches, with stage-1 resources; ``{id(build):
        submitit job}``."""
        resources = OmegaConf.to_container(self.config.launcher.extract, resolve=True)
        submitted = {}
        for build in self.stage1:
            executor = self._executor(name=f"{self.params.get('name') or 'sae'}-extract-"
                                      f"{build.name}", **resources)
            job = executor.submit(ExtractionJob(build))
            build.job_id = str(job.job_id)
            submitted[id(build)] = job
            if self.on_submit is not None:
                self.on_submit("extract", build)
            print(f"stage 1: extraction job {job.job_id} builds {build.name} "
                  f"({', '.join(build.missing)})", file=sys.stderr, flush=True)
        return submitted

    def _submit_training(self, job_params: list, extraction: dict[int, Any]
                         ) -> tuple[list, dict[int, JobReturn]]:
        """The training jobs, one array per cache build they wait for (``afterok`` on its
        extraction job; without scheduler dependencies, after waiting for it here)."""
        builds = list(self.job_builds) or [None] * len(job_params)
        groups: dict[Optional[str], list[int]] = {}  # noqa: UP045
        for position, build in enumerate(builds):
            groups.setdefault(build.job_id if build is not None else None, []).append(position)
        jobs: list = [None] * len(job_params)
        ended: dict[int, JobReturn] = {}
        for dependency, positions in groups.items():
            changes = {}
            if dependency is not None and self._DEPENDENCIES:
                extra = dict(self.params.get("additional_parameters") or {})
                changes["additional_parameters"] = {**extra,
                                                    "dependency": f"afterok:{dependency}"}
            elif dependency is not None:
                failure = _wait_for_extraction(_job_of(extraction, builds[positions[0]]))
                if failure is not None:
                    ended.update({p: failure for p in positions})
                    continue
            submitted = self._executor(**changes).map_array(
                self, *zip(*[job_params[p] for p in positions], strict=True))
            for position, job in zip(positions, submitted, strict=True):
                jobs[position] = job
            if self.on_submit is not None:
                self.on_submit("train", [(p, str(j.job_id)) for p, j in
                                         zip(positions, submitted, strict=True)])
        return jobs, ended

    def _collect(self, jobs: list, ended: dict[int, JobReturn], extraction: dict[int, Any]
                 ) -> list[JobReturn]:
        """Wait for every task; a task's end never stops the wait for the others. A failed
        extraction job cancels the training tasks that wait for it. A progress line goes to
        stderr at each end and every ``PROGRESS_S`` while waiting."""
        from sae.grid.sweep import progress_line

        results: dict[int, JobReturn] = {}
        for index, result in ended.items():
            self._record(results, index, result)
        builds = list(self.job_builds) or [None] * len(jobs)
        failed_builds: dict[int, str] = {}
        started = last_shown = last_refresh = time.monotonic()
        ended_without_result: dict[int, float] = {}  # index -> when it was first seen ended
        while len(results) < len(jobs):
            any_ended = False
            if self._SCHEDULER and time.monotonic() - last_refresh >= STATE_REFRESH_S:
                _refresh_states([*extraction.values(), *(j for j in jobs if j is not None)])
                last_refresh = time.monotonic()
            for key, job in extraction.items():
                if key not in failed_builds and job.done() and _failure(job) is not None:
                    failed_builds[key] = (f"its extraction job {job.job_id} failed or "
                                          f"ended ({job.state}; log {job.paths.stderr})")
                    for index, build in enumerate(builds):
                        if build is not None and id(build) == key and jobs[index] is not None:
                            jobs[index].cancel(check=False)
            for index, job in enumerate(jobs):
                if index in results or job is None or not self._ended(
                        index, job, ended_without_result):
                    continue
                build = builds[index]
                cause = failed_builds.get(id(build)) if build is not None else None
                self._record(results, index, task_return(job, cause))
                any_ended = True
            now = time.monotonic()
            if any_ended or now - last_shown >= PROGRESS_S:
                failed = sum(r.status != JobStatus.COMPLETED for r in results.values())
                running = sum(1 for i, job in enumerate(jobs)
                              if i not in results and job is not None and _is_running(job))
                print(progress_line(len(results), failed, running, len(jobs), now - started),
                      file=sys.stderr, flush=True)
                last_shown = now
            if len(results) < len(jobs):
                time.sleep(POLL_S)
        return [results[i] for i in range(len(jobs))]

    def _ended(self, index: int, job: Any, ended_without_result: dict[int, float]) -> bool:
        """The task ended and its result (or how it ended) can be read now: its result file
        is there, or it has been missing for ``result_grace_s`` since the task was seen ended."""
        if job.paths.result_pickle.exists():
            return True
        if index not in ended_without_result:
            if not job.done():
                return False
            ended_without_result[index] = time.monotonic()
        return time.monotonic() - ended_without_result[index] >= self.result_grace_s

    def _record(self, results: dict[int, JobReturn], index: int, result: JobReturn) -> None:
        results[index] = result
        if self.job_end_callback is not None:
            self.job_end_callback(index, result)


def _refresh_states(jobs: list) -> None:
    """One scheduler query for every job of the launch (submitit's watcher is shared by the jobs
    of one executor kind)."""
    watchers = {id(w): w for w in (getattr(job, "watcher", None) for job in jobs) if w}
    for watcher in watchers.values():
        watcher.update()


def _job_of(extraction: dict[int, Any], build: Any) -> Any:
    """This launch's extraction job of ``build`` (None: a live job of an earlier launch)."""
    return extraction.get(id(build))


def _failure(job: Any) -> Optional[str]:  # noqa: UP045
    """The last line of an ended job's error, or None when it left its result (the result
    file is the proof of success: the scheduler's accounting may still say RUNNING for a few
    seconds)."""
    try:
        job.result()
        return None
    except Exception as exc:  # noqa: BLE001 -- the job's own error, or no result at all
        return (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]


def _wait_for_extraction(job: Any) -> Optional[JobReturn]:  # noqa: UP045
    """Without scheduler dependencies (the local executor): wait here for the extraction job;
    a failed JobReturn for its training jobs when it failed."""
    if job is None:
        return None
    while not job.done():
        time.sleep(POLL_S)
    failure = _failure(job)
    if failure is None:
        return None
    ended = JobReturn()
    ended.status = JobStatus.FAILED
    ended._return_value = TaskEnded("NOT_STARTED", "-", str(job.paths.stderr),
                                    f"its extraction job {job.job_id} failed: {failure}")
    return ended


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


def task_return(job: Any, cause: Optional[str] = None) -> JobReturn:  # noqa: UP045
    """What the task returned, or a failed JobReturn holding how it ended (and why, when its
    extraction job failed)."""
    from submitit.core.utils import UncompletedJobError

    try:
        if job.paths.result_pickle.exists():  # else submitit would wait for it once more
            return job.results()[0]
    except UncompletedJobError:  # FailedJobError included
        pass
    ended = JobReturn()
    ended.status = JobStatus.FAILED
    ended._return_value = TaskEnded(str(job.state), str(job.job_id), str(job.paths.stderr), cause)
    return ended


class SaeSlurmLauncher(_Tolerant, SlurmLauncher):
    _DEPENDENCIES = True
    _SCHEDULER = True


class SaeLocalLauncher(_Tolerant, LocalLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        # Every cell starts at once on this machine: each takes its share of the cores
        # (sae.runtime.threads; the LocalExecutor's processes inherit this environment).
        from sae.runtime.threads import PARALLEL_TASKS_ENV

        os.environ[PARALLEL_TASKS_ENV] = str(len(job_overrides))
        return super().launch(job_overrides, initial_job_idx)
