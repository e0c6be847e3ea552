"""Checks that run before Hydra creates any directory, and their one-line errors.

A Hydra callback (``hydra.callbacks.early_checks`` in conf/train.yaml):

* the output root (``paths.root`` and the runs / sweeps / cache directories under it) must be
  a directory this process can write in, or creatable: a read-only mount, a file or ``/proc``
  stops the command with one line naming the path, before anything runs;
* a single run is validated before its Hydra folder (``sweeps/single/<time>``) exists, so a
  config error (an unreadable embeddings file included) leaves no folder behind and prints one
  line naming the field and the fix;
* ``dry_run=true`` without ``-m`` lists the one cell and runs nothing;
* a single run that fails removes its Hydra folder (its reason is in the run's status.json).

Errors print as one line; ``HYDRA_FULL_ERROR=1`` raises them with their traceback instead.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from sae.config import ConfigError, validate

CONFIG_ERROR_EXIT = 2


class OutputRootError(ConfigError):
    """The output root cannot hold runs."""


def full_error() -> bool:
    """Hydra's switch for complete tracebacks."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


@contextmanager
def one_line_errors(*also: type[Exception]) -> Iterator[None]:
    """A ConfigError (field + fix), or one of ``also``, ends the command with one line and exit
    status 2."""
    try:
        yield
    except (ConfigError, *also) as exc:
        if full_error():
            raise
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
        sys.exit(CONFIG_ERROR_EXIT)


def unusable_reason(path: Path) -> str | None:
    """Why ``path`` cannot be (or become) a writable directory; None when it can. Creates
    nothing: probes the nearest existing ancestor with a temporary file."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        return f"cannot write in {existing} ({exc.strerror})"
    return None


def check_output_root(config: DictConfig) -> None:
    paths = config.paths
    for key in ("root", "runs", "sweeps", "cache"):
        path = Path(str(paths[key])).absolute()
        reason = unusable_reason(path)
        if reason:
            raise OutputRootError(
                f"paths.{key}: {path} cannot hold outputs: {reason}. Fix: set SAE_OUTPUT_ROOT "
                f"(or paths.root=...) to a writable directory")


class EarlyChecks(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        with one_line_errors():
            check_output_root(config)
            cfg = validate(config)
            if cfg.dataset.kind == "files":  # an unreadable file: refused before a run folder
                from sae.grid.sweep import check_files

                check_files(cfg.dataset)
        if cfg.dry_run:
            print_single_dry_run(config)
            sys.exit(0)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        with one_line_errors():
            check_output_root(config)

    def on_run_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        if job_return is None or job_return.status != JobStatus.FAILED:
            return
        folder = OmegaConf.select(job_return.hydra_cfg, "hydra.runtime.output_dir")
        if folder and Path(folder).parent.name == "single":
            shutil.rmtree(folder, ignore_errors=True)


def print_single_dry_run(config: DictConfig) -> None:
    """The dry run of a single cell: the same plan and listing as a sweep's."""
    from sae.grid import sweep as planning

    overrides = list(OmegaConf.select(config, "hydra.overrides.task", default=[]) or [])
    cells = planning.plan_cells([overrides], lambda _overrides: config, dry_run=True)
    print(planning.summary_line(str(config.sweep_name), cells))
    print(planning.table(cells))
    print(planning.problem_summary(cells))
