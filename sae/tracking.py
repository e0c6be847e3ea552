"""Experiment tracking: the only module that imports wandb.

One W&B run per grid cell: ``id`` = the run id (so a requeued or re-launched cell continues the
same W&B run), ``group`` = the sweep, ``job_type`` = the stage, ``tags`` = every axis,
``config`` = the resolved config, explicit ``step=`` on every log (an offline resume starts a
new run directory at step 0, see PITFALLS.md), final metrics in the summary.

Tracking never fails training: every W&B call is guarded, and a failure turns the tracker into
a no-op with one warning.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from sae.config import RootConfig, to_dict

log = logging.getLogger(__name__)


class NullTracker:
    """logger=none, or W&B unavailable."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def summary(self, metrics: dict[str, Any]) -> None:
        pass

    def finish(self, failed: bool = False) -> None:
        pass


def axis_tags(cfg: RootConfig) -> list[str]:
    return [f"backbone:{cfg.backbone.name}", f"dataset:{cfg.dataset.name}", f"k:{cfg.k}",
            f"regularizer:{cfg.regularizer.name}", f"mask:{cfg.mask}", f"seed:{cfg.seed}",
            f"sweep:{cfg.sweep_name}"]


def wandb_mode(cfg_mode: str) -> str:
    """auto -> online with an API key (or an explicit WANDB_MODE), otherwise offline."""
    if cfg_mode != "auto":
        return cfg_mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class WandbTracker:
    def __init__(self, run: Any) -> None:
        self.run = run

    def _guard(self, what: str, fn, *args, **kwargs) -> None:
        if self.run is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 -- tracking must never fail training
            log.warning("W&B %s failed (%s); tracking is off for the rest of this run", what, exc)
            self.run = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._guard("log", lambda: self.run.log(metrics, step=step))

    def summary(self, metrics: dict[str, Any]) -> None:
        self._guard("summary", lambda: self.run.summary.update(flatten(metrics)))

    def finish(self, failed: bool = False) -> None:
        self._guard("finish", lambda: self.run.finish(exit_code=1 if failed else 0))
        self.run = None


def flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested curves become ``curves/k_robustness/32``-style keys in the W&B summary."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}/"))
        else:
            flat[name] = value
    return flat


def start_tracking(cfg: RootConfig, run_id: str, run_dir: Path, job_type: str = "train", *,
                   concurrent: bool = False):
    """A tracker for this cell: W&B (online or offline) or a no-op. ``concurrent``: the run
    lives beside other open runs of this process (the members of a pack)."""
    if cfg.logger.name == "none":
        return NullTracker()
    try:
        import wandb

        run = wandb.init(
            project=cfg.logger.project, entity=cfg.logger.entity, id=run_id, name=run_id,
            group=cfg.sweep_name, job_type=job_type, tags=axis_tags(cfg), config=to_dict(cfg),
            dir=str(run_dir), mode=wandb_mode(cfg.logger.mode), resume="allow",
            reinit="create_new" if concurrent else "finish_previous", settings=wandb.Settings(console="off", silent=True),
        )
        return WandbTracker(run)
    except Exception as exc:  # noqa: BLE001 -- W&B unreachable, bad key, ...: train anyway
        log.warning("W&B could not start (%s); continuing without tracking", exc)
        return NullTracker()
