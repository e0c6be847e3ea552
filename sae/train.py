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

from sae.cli.overrides import main_with_checks
from sae.config import RootConfig, register_configs
from sae.training.job import run_cells, run_packed_job

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
    """Run one cell unless it is done: a job of one (``sae.training.job``). Returns
    ``{"run_id", "state", "reason", "run_dir"}``. Outside a sweep a failure raises (after it is
    recorded); in a sweep it is returned, so the other cells complete."""
    outcome, = run_cells([(cfg_node, command or reproduce_command())],
                         raise_failure=not is_multirun())
    return outcome


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> dict[str, Any]:
    # In a submitit task, submitit's logger has its own handler and also reached Hydra's:
    # every submitit line was printed twice. Its own handler stays.
    logging.getLogger("submitit").propagate = False
    if cfg.get("pack_members"):  # a job of the sweeper's that trains several cells together
        return run_packed_job(list(cfg.pack_members))
    return run_cell(cfg)


def cli() -> None:
    """Console script ``sae-train`` (same arguments as ``python -m sae.train``); the overrides
    are checked against the schema first (``sae.cli.overrides``)."""
    main_with_checks(main, CONF_DIR, RootConfig)


if __name__ == "__main__":
    cli()
