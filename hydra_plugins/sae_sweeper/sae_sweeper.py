"""The project's Hydra sweeper: Hydra's basic grid expansion, plus what a grid of SAEs needs.

Before the launcher sees any job, every cell is composed and validated (one bad cell stops the
launch, naming the cell and the field), cells with the same run id are collapsed, cells already
``done`` are skipped, and the plan is written to ``<sweep dir>/cells.json``. With
``dry_run=true`` it prints the plan and launches nothing. A lock in the sweep directory keeps
two launches of the same sweep from interleaving. With ``pack`` > 1 or ``auto``, compatible
cells to launch are grouped into packs (``sae.grid.packing``) and each pack is one job (one SLURM
array task) that trains its members together; each member's result is recorded per cell.
Selected in conf/train.yaml with ``override hydra/sweeper: sae``; the planning logic itself
lives in ``sae.grid.sweep`` and ``sae.grid.packing``.
"""

# No `from __future__ import annotations`: Hydra's plugin scan executes this module outside
# sys.modules, where dataclasses cannot resolve string annotations.
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from filelock import FileLock, Timeout
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobStatus
from omegaconf import OmegaConf

log = logging.getLogger(__name__)


@dataclass
class SaeSweeperConf:
    _target_: str = "hydra_plugins.sae_sweeper.sae_sweeper.SaeSweeper"
    # (typing.Optional, not `X | None`: OmegaConf reads these annotations at runtime)
    # cells per launcher call; null = the whole grid at once
    max_batch_size: Optional[int] = None  # noqa: UP045
    # the grid: {key: "v1,v2,..."} (set by sweeps/*.yaml)
    params: Optional[dict[str, str]] = None  # noqa: UP045


ConfigStore.instance().store(group="hydra/sweeper", name="sae", node=SaeSweeperConf,
                             provider="sae-grid")


class SaeSweeper(BasicSweeper):
    def __init__(self, max_batch_size: int | None = None,
                 params: dict[str, str] | None = None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params or {})
        # name -> record of a cache build whose extraction job of an earlier launch still runs
        self._live_caches: dict[str, dict] = {}

    def _expand(self, arguments: list[str]) -> list[list[str]]:
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides([*self._parse_config(), *arguments])
        return self.split_arguments(overrides, None)[0]

    def _compose(self, overrides: list[str]):
        return self.hydra_context.config_loader.load_sweep_config(
            master_config=self.config, sweep_overrides=overrides)

    def sweep(self, arguments: list[str]) -> Any:
        from sae.cli.checks import one_line_errors
        from sae.grid.slurm_checks import SlurmNotReady

        # A bad cell, a locked sweep, an unreachable cluster: one line, no traceback.
        with one_line_errors(SlurmNotReady):
            return self._sweep(arguments)

    def _sweep(self, arguments: list[str]) -> Any:
        from sae.grid import sweep as planning
        from sae.io.files import atomic_write_json

        name = self.config.sweep_name
        sweep_dir = Path(self.config.hydra.sweep.dir)
        cells = planning.plan_cells(self._expand(arguments), self._compose,
                                    force=bool(self.config.force),
                                    dry_run=bool(self.config.dry_run), progress=_to_stderr)
        if not self.config.dry_run:
            self._check_launcher(sweep_dir)
            self._reattach(cells, sweep_dir, planning)
        packs = self._packs(cells, planning)
        print(planning.summary_line(name, cells), flush=True)
        print(planning.checkpoints_line(cells), flush=True)
        if self.config.dry_run:
            print(planning.table(cells), flush=True)
            if any(len(p) > 1 for p in packs):
                from sae.grid.packing import packs_table

                print(packs_table(packs), flush=True)
            print(planning.problem_summary(cells), flush=True)
            if planning.has_problems(cells):  # scripts can tell a plan that would not run
                from sae.cli.checks import CONFIG_ERROR_EXIT

                sys.exit(CONFIG_ERROR_EXIT)
            return []
        sweep_dir.mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(str(sweep_dir / ".launch.lock"), timeout=0):
                return self._launch(name, sweep_dir, cells, packs, planning,
                                    atomic_write_json)
        except Timeout:
            raise planning.SweepError(
                f"sweep {name!r} is being launched by another process (lock {sweep_dir}/"
                ".launch.lock). Fix: wait for it, or give this launch another sweep_name=...") \
                from None

    def _packs(self, cells, planning) -> list:
        """One list of cells per job: the packs of ``pack`` (every cell alone for pack=1)."""
        from sae.grid.packing import assign_packs

        try:
            return assign_packs(cells, self.config.pack, float(self.config.launcher.gpu_mem_gb))
        except ValueError as exc:
            raise planning.SweepError(f"pack={self.config.pack}: {exc}") from None

    def _on_slurm(self) -> bool:
        target = str(OmegaConf.select(self.config, "hydra.launcher._target_", default=""))
        return "SlurmLauncher" in target

    def _check_launcher(self, sweep_dir: Path) -> None:
        """Fail before submission when the SLURM launcher cannot reach a cluster, or when the
        output folders do not honour flock across processes (caches and run locks rely on it);
        and ``launcher.wait=false`` anywhere else than SLURM (local jobs end with the launcher)."""
        if not OmegaConf.select(self.config, "launcher.wait", default=True) and not self._on_slurm():
            from sae.grid.sweep import SweepError

            raise SweepError("launcher.wait=false: only a SLURM sweep can be left (local jobs end "
                             "with the launcher). Fix: add launcher=slurm, or drop "
                             "launcher.wait=false")
        if self._on_slurm():
            from sae.grid.slurm_checks import check_flock, check_slurm_ready

            check_slurm_ready(OmegaConf.select(self.config, "hydra.launcher.partition",
                                               default=None))
            for key in ("paths.cache", "paths.runs"):
                check_flock(str(OmegaConf.select(self.config, key)), key)

    def _reattach(self, cells, sweep_dir: Path, planning) -> None:
        """A re-launch on SLURM never submits a cell whose job from an earlier launch (recorded
        in cells.json) is still pending or running: it asks SLURM, and says how many it left
        alone. (The earlier launcher may have died, or returned at once with wait=false.)"""
        record_file = sweep_dir / "cells.json"
        if not self._on_slurm() or not record_file.is_file():
            return
        import json

        from sae.grid.scheduler import NEVER_STARTS, is_live, job_states

        runs, caches = planning.earlier_jobs(json.loads(record_file.read_text()))
        states = job_states([*runs.values(), *(b["job_id"] for b in caches.values())])
        stuck = sorted({job for job, state in states.items() if NEVER_STARTS in state})
        if stuck:  # their extraction job failed: they would wait forever; launched anew
            import subprocess

            subprocess.run(["scancel", *stuck], check=False, timeout=60)
            print(f"cancelled {len(stuck)} tasks whose extraction job failed (pending forever): "
                  f"{', '.join(stuck)}", file=sys.stderr, flush=True)
        left = planning.leave_live_jobs(cells, runs, states)
        self._live_caches = {name: build for name, build in caches.items()
                             if is_live(states.get(build["job_id"]))}
        if left:
            print(f"re-attached: {left} cells left alone, their jobs of an earlier launch are "
                  f"still pending or running (follow them: sae-status {sweep_dir})",
                  file=sys.stderr, flush=True)

    def _stage1(self, packs) -> tuple[list, list]:
        """The cache build each job reads (None for embedding datasets) and the builds stage 1
        submits: those with a missing cache and no live extraction job of an earlier launch.
        Only for the submitit launchers; launcher=local extracts inline, one cell at a time."""
        if not hasattr(self.launcher, "stage1") or not packs:
            return [None] * len(packs), []
        from sae.grid.stages import plan_caches

        of_cell = plan_caches([members[0] for members in packs])
        job_builds = [of_cell.get(members[0].index) for members in packs]
        submit = []
        for build in dict.fromkeys(b for b in job_builds if b is not None):
            earlier = self._live_caches.get(build.name)
            if earlier is not None and earlier["paths"] == build.paths:
                build.job_id = earlier["job_id"]  # still extracting: wait for that job
            elif build.missing:
                submit.append(build)
        for members, build in zip(packs, job_builds, strict=True):
            for cell in members:
                cell.cache = build.name if build is not None else None
        return job_builds, submit

    def _launch(self, name, sweep_dir, cells, packs, planning, atomic_write_json) -> Any:
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        job_builds, stage1 = self._stage1(packs)
        caches = list(dict.fromkeys(b for b in job_builds if b is not None))

        def save() -> None:
            atomic_write_json(sweep_dir / "cells.json", planning.cells_record(
                name, cells, caches, "slurm" if self._on_slurm() else "local"))

        save()
        todo = [c for c in cells if c.to_launch]
        batch = [_job_overrides(members, build) for members, build in
                 zip(packs, job_builds, strict=True)]

        def record_end(position: int, result) -> None:
            """cells.json learns of each job's end as it happens (the launch may be killed); a
            pack's job ends each of its members."""
            members = packs[position]
            for cell, (state, reason) in zip(members, _outcomes(result, len(members)),
                                             strict=True):
                cell.result, cell.reason = state, reason
            save()

        def record_submission(stage: str, submitted) -> None:
            """cells.json holds every job id as soon as it exists: sae-status and a re-launch
            read them, even when this process is gone."""
            if stage == "train":
                for position, job_id in submitted:
                    for cell in packs[position]:
                        cell.job_id = job_id
            save()

        wait = bool(OmegaConf.select(self.config, "launcher.wait", default=True))
        if hasattr(self.launcher, "job_end_callback"):  # the submitit launchers of launchers.py
            self.launcher.job_end_callback = record_end
            self.launcher.on_submit = record_submission
            self.launcher.stage1, self.launcher.job_builds = stage1, job_builds
            self.launcher.wait = wait
            self.launcher.result_grace_s = float(OmegaConf.select(
                self.config, "launcher.result_grace_s", default=self.launcher.result_grace_s))
        results = self.launcher.launch(batch, initial_job_idx=0) if batch else []
        if not wait and batch:
            return self._submitted(name, sweep_dir, todo, stage1, save)
        for position, result in enumerate(results):
            record_end(position, result)
        for cell in cells:
            if cell.result is None:
                cell.result = "queued" if cell.state == "queued" else "skipped"
        save()
        print(planning.outcome_summary(name, cells, sweep_dir), flush=True)
        unfinished = [c for c in todo if c.result != "done"]
        if unfinished:
            # A summary, not a crash: no traceback (Hydra would print one for an exception).
            print(f"{len(unfinished)} of {len(todo)} launched cells failed or did not finish "
                  "(their run directories hold the reason); re-launch the same command to run "
                  "exactly those:\n  " + "\n  ".join(
                      f"cell {c.index} ({c.describe()}): {c.result}: {c.reason}"
                      for c in unfinished), file=sys.stderr, flush=True)
            sys.exit(1)
        return [results]


    def _submitted(self, name, sweep_dir, todo, stage1, save) -> Any:
        """launcher.wait=false: every job is submitted; say where to follow them, and return."""
        for cell in todo:
            cell.result = "submitted"
        save()
        jobs = len({c.job_id for c in todo})
        print(f"sweep {name}: submitted {len(stage1)} extraction jobs and {jobs} training jobs "
              f"for {len(todo)} runs; the launcher returns now (launcher.wait=false). Follow "
              f"them: sae-status {sweep_dir} --watch; a re-launch re-attaches", flush=True)
        return []


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _job_overrides(members, build=None) -> list:
    """A job's overrides: a lone cell's own; a pack's lead member's plus ``pack_members``; and,
    after stage 1, the caches it reads (each member's too: a pack composes every member).
    Each job's Hydra directory is named after its (lead) run id, not its grid position."""
    stage = build.training_overrides() if build is not None else []
    lead = members[0]
    if len(members) == 1:
        return [*lead.overrides, *stage, f"hydra.sweep.subdir={lead.run_id}"]
    from sae.grid.packing import members_override

    return [*lead.overrides, *stage, members_override(members, stage),
            f"hydra.sweep.subdir=pack-{lead.pack}-{lead.run_id}"]


def _outcomes(result, count: int) -> list:
    """Each member's end state: what run_cell (or run_packed_job, one per member) returned,
    or the exception the job raised (then every member failed)."""
    if result.status != JobStatus.COMPLETED:
        return [_failure(result._return_value)] * count
    value = result.return_value
    values = value["members"] if isinstance(value, dict) and "members" in value else [value]
    return [_state(v) for v in values]


def _failure(error) -> tuple[str, str]:
    """The exception a job raised, or how the scheduler ended a task that returned nothing
    (see launchers.TaskEnded)."""
    from hydra_plugins.sae_sweeper.launchers import TaskEnded
    from sae.grid.sweep import scheduler_end

    if isinstance(error, TaskEnded):
        return scheduler_end(error.state), str(error)
    return "failed", f"{type(error).__name__}: {error}"


def _state(value) -> tuple:
    if isinstance(value, dict):
        return ("done" if value.get("state") in ("done", "skipped") else "failed",
                value.get("reason"))
    return "done", None
