"""Entry point of one grid cell: extract-if-missing + train + evaluate.

    python -m sae.train dataset=synthetic regularizer=l1l2 k=32 mask=true
    python -m sae.train -m +sweep=demo              # a grid (see sweeps/ and README)

A cell runs at most once at a time (a lock in its run directory), is skipped when its status
is ``done`` (unless ``force=true``), resumes from its last checkpoint when restarted (SLURM
requeue), and ends ``done`` or ``failed`` with the reason. In a sweep, a failing cell returns
its failure to the sweeper instead of raising, so the other cells complete.
"""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from sae.cell import begin_run, fail_run, finish_run, train_and_evaluate
from sae.config import RootConfig, register_configs, validate
from sae.identity import run_id
from sae.locking import hold_run_lock
from sae.preemption import Interrupted, redeliver, stop_signals
from sae.runs import is_own_requeue, run_dir, run_state, set_aside_outputs, write_status

log = logging.getLogger(__name__)
# Absolute, so the console scripts find the config tree as `python -m` does.
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
register_configs()


def reproduce_command() -> str:
    """The exact command that re-runs this cell (its overrides, sweep axes included)."""
    try:
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # called outside a Hydra app (tests, notebooks)
        overrides = sys.argv[1:]
    return "python -m sae.train " + " ".join(shlex.quote(o) for o in overrides)


def is_multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def run_cell(cfg_node: DictConfig | RootConfig, command: str | None = None) -> dict[str, Any]:
    """Run one cell unless it is done. Returns ``{"run_id", "state", "reason", "run_dir"}``."""
    cfg = validate(cfg_node)
    rid, directory = run_id(cfg), run_dir(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    # One process per cell at a time: a second launch of the same cell waits here, then skips.
    with hold_run_lock(directory, cfg.run.lock_timeout_s):
        # force=true retrains from scratch, except in the requeued job that already began it.
        fresh_start = cfg.force and not is_own_requeue(directory)
        if run_state(directory) == "done" and not fresh_start:
            log.info("run %s is already done (%s); skipping", rid, directory)
            return {"run_id": rid, "state": "skipped", "reason": "already done",
                    "run_dir": str(directory)}
        if fresh_start and (previous := set_aside_outputs(directory)) is not None:
            log.info("force=true: the previous outputs of run %s are set aside in %s (sae-clean "
                     "removes them); training from scratch", rid, previous)
        return _execute(cfg, rid, directory, command or reproduce_command())


def _execute(cfg: RootConfig, rid: str, directory: Path, command: str) -> dict[str, Any]:
    tracker = begin_run(cfg, rid, directory, command)
    stopped: Interrupted | None = None
    with stop_signals() as stop:
        try:
            metrics = train_and_evaluate(cfg, directory, tracker, command, stop)
        except Interrupted as exc:
            stopped = exc
        except Exception as exc:
            outcome = fail_run(rid, directory, tracker, f"{type(exc).__name__}: {exc}", command)
            if is_multirun():  # let the sweep go on; the sweeper reports the failure
                return outcome
            raise
    if stopped is not None:
        _record_stop(directory, rid, tracker, command, stopped)
        redeliver(stopped.signum)  # exits: submitit requeues on USR2, SIGTERM ends the process
    return finish_run(rid, directory, tracker, metrics, command)


def _record_stop(directory: Path, rid: str, tracker, command: str, stop: Interrupted) -> None:
    write_status(directory, stop.state, str(stop), command=command, signal=stop.signal_name,
                 step=stop.step)
    tracker.finish(failed=True)
    log.warning("run %s %s: %s; a re-launch resumes from step %d", rid, stop.state, stop,
                stop.step)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> dict[str, Any]:
    if cfg.get("pack_members"):  # a job of the sweeper's that trains several cells together
        from sae.packed_run import run_packed_job

        return run_packed_job(list(cfg.pack_members))
    return run_cell(cfg)


def cli() -> None:
    """Console script ``sae-train`` (same arguments as ``python -m sae.train``)."""
    main()


if __name__ == "__main__":
    main()
