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

from sae.cell import (
    begin_run,
    fail_run,
    finish_run,
    record_stop,
    skip_or_prepare,
    train_and_evaluate,
)
from sae.cli_overrides import main_with_checks
from sae.config import RootConfig, register_configs, validate
from sae.data.embedding import ExtractionStopped
from sae.identity import run_id
from sae.locking import hold_run_lock
from sae.preemption import Interrupted, redeliver, signal_name, stop_signals
from sae.runs import run_dir

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
        skipped = skip_or_prepare(cfg, rid, directory)
        if skipped is not None:
            return skipped
        return _execute(cfg, rid, directory, command or reproduce_command())


def _execute(cfg: RootConfig, rid: str, directory: Path, command: str) -> dict[str, Any]:
    tracker = begin_run(cfg, rid, directory, command)
    stopped: Interrupted | None = None
    with stop_signals() as stop:
        try:
            metrics = train_and_evaluate(cfg, directory, tracker, command, stop)
        except Interrupted as exc:
            stopped = exc
        except ExtractionStopped as exc:  # the cache's shards are kept: a requeue resumes them
            stopped = Interrupted(exc.signum, 0, "extraction")
        except Exception as exc:
            outcome = fail_run(rid, directory, tracker, f"{type(exc).__name__}: {exc}", command)
            if is_multirun():  # let the sweep go on; the sweeper reports the failure
                return outcome
            raise
        if stopped is None:
            outcome = finish_run(rid, directory, tracker, metrics, command)
    if stopped is not None:
        record_stop(rid, directory, tracker, command, stopped)
        redeliver(stopped.signum)  # exits: submitit requeues on USR2, SIGTERM ends the process
    if stop.signum is not None:  # arrived while the outputs were written: the run is done
        log.warning("run %s done; stopping on %s received meanwhile", rid,
                    signal_name(stop.signum))
        redeliver(stop.signum)
    return outcome


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> dict[str, Any]:
    # In a submitit task, submitit's logger has its own handler and also reached Hydra's:
    # every submitit line was printed twice. Its own handler stays.
    logging.getLogger("submitit").propagate = False
    if cfg.get("pack_members"):  # a job of the sweeper's that trains several cells together
        from sae.packed_run import run_packed_job

        return run_packed_job(list(cfg.pack_members))
    return run_cell(cfg)


def cli() -> None:
    """Console script ``sae-train`` (same arguments as ``python -m sae.train``); the overrides
    are checked against the schema first (``sae.cli_overrides``)."""
    main_with_checks(main, CONF_DIR, RootConfig)


if __name__ == "__main__":
    cli()
