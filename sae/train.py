"""Entry point of one grid cell: extract-if-missing + train + evaluate.

    python -m sae.train dataset=synthetic regularizer=l1l2 k=32 mask=true
    python -m sae.train -m +sweep=demo              # a grid (see sweeps/ and README)

A cell runs at most once at a time (a lock in its run directory), is skipped when its status
is ``done`` (unless ``force=true``), resumes from its last checkpoint when restarted (SLURM
requeue), and ends ``done`` or ``failed`` with the reason. In a sweep, a failing cell returns
its failure to the sweeper instead of raising, so the other cells complete.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from sae.config import RootConfig, register_configs, to_dict, validate
from sae.data import EmbeddingSet, load_splits
from sae.device import resolve_device
from sae.identity import run_id, semantic_config
from sae.io import atomic_write_json, atomic_write_text, code_version
from sae.method_card import render_markdown, run_card
from sae.model import TopKSAE, save_model
from sae.runs import run_dir, run_lock, run_state, write_status
from sae.tracking import start_tracking
from sae.trainer import Trainer, TrainState

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
    with run_lock(directory):
        if run_state(directory) == "done" and not cfg.force:
            log.info("run %s is already done (%s); skipping", rid, directory)
            return {"run_id": rid, "state": "skipped", "reason": "already done",
                    "run_dir": str(directory)}
        return _execute(cfg, rid, directory, command or reproduce_command())


def _execute(cfg: RootConfig, rid: str, directory: Path, command: str) -> dict[str, Any]:
    tracker = begin_run(cfg, rid, directory, command)
    try:
        metrics = train_and_evaluate(cfg, directory, tracker, command)
    except Exception as exc:
        outcome = fail_run(rid, directory, tracker, f"{type(exc).__name__}: {exc}", command)
        if is_multirun():  # let the sweep go on; the sweeper reports the failure
            return outcome
        raise
    return finish_run(rid, directory, tracker, metrics, command)


def begin_run(cfg: RootConfig, rid: str, directory: Path, command: str, *,
              concurrent: bool = False):
    """Write the run's config, identity and ``running`` status; start its tracker
    (``concurrent``: beside other runs of this process, as in a pack)."""
    atomic_write_text(directory / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    atomic_write_json(directory / "identity.json", semantic_config(cfg))
    write_status(directory, "running", command=command)
    return start_tracking(cfg, rid, directory, concurrent=concurrent)


def fail_run(rid: str, directory: Path, tracker, reason: str, command: str) -> dict[str, Any]:
    write_status(directory, "failed", reason, command=command)
    tracker.finish(failed=True)
    log.error("run %s failed: %s", rid, reason)
    return {"run_id": rid, "state": "failed", "reason": reason, "run_dir": str(directory)}


def finish_run(rid: str, directory: Path, tracker, metrics: dict, command: str
               ) -> dict[str, Any]:
    tracker.summary(metrics)
    tracker.finish()
    write_status(directory, "done", command=command)
    log.info("run %s done: %s", rid, directory)
    return {"run_id": rid, "state": "done", "reason": None, "run_dir": str(directory)}


def build_model(cfg: RootConfig, dim: int, device: torch.device) -> TopKSAE:
    torch.manual_seed(cfg.seed)  # the initial dictionary is a function of the seed
    return TopKSAE(dim, cfg.sae.n_latents, cfg.k, tied=cfg.sae.tied,
                   layernorm=cfg.sae.layernorm).to(device)


def train_and_evaluate(cfg: RootConfig, directory: Path, tracker, command: str) -> dict:
    # Before training: a missing similarity cache must not cost a whole run.
    eval_cfg = evaluation_config(cfg)
    device = resolve_device(cfg.train.device)
    started = time.perf_counter()
    train_set, eval_set = load_splits(cfg, cfg.train.device, cfg.train.progress)
    check_dims(train_set, eval_set)
    model = build_model(cfg, train_set.dim, device)
    trainer = Trainer(cfg, model, train_set.x.to(device), checkpoint_path(directory), tracker,
                      to_dict(cfg))
    state = trainer.run()
    return evaluate_and_write(cfg, directory, command, trainer, state, train_set, eval_set,
                              eval_cfg, time.perf_counter() - started)


def checkpoint_path(directory: Path) -> Path:
    return directory / "checkpoints" / "last.safetensors"


def evaluation_config(cfg: RootConfig):
    from sae.data.similarity import resolve_similarity

    return dataclasses.replace(cfg.eval, similarity=str(resolve_similarity(cfg)))


def evaluate_and_write(cfg: RootConfig, directory: Path, command: str, trainer: Trainer,
                       state: TrainState, train_set: EmbeddingSet, eval_set: EmbeddingSet,
                       eval_cfg, train_seconds: float) -> dict:
    """After training: the model file, the evaluation, metrics.json and the method card."""
    from sae.evaluate import evaluate

    model, config = trainer.model, trainer.config_for_checkpoint
    save_model(model, directory / "model.safetensors", config, step=state.step)
    metrics = evaluate(model, train_set, eval_set, eval_cfg, cfg.k, directory,
                       trainer.device, seed=cfg.seed)
    metrics["train"] = {
        "steps": state.step, "resumed_from_step": trainer.resumed_from,
        "seconds": round(train_seconds, 3), "batch_size": trainer.schedule.batch_size,
        "dead_window_samples": trainer.schedule.dead_window,
        "dead_end": state.history[-1]["dead"] if state.history else None,
        "final_loss": state.history[-1]["loss"] if state.history else None,
        "curve": state.history,
    }
    metrics["run_id"] = directory.name
    atomic_write_json(directory / "metrics.json", metrics)
    write_card(cfg, metrics, train_set, eval_set, directory, command)
    return metrics


def check_dims(train_set: EmbeddingSet, eval_set: EmbeddingSet) -> None:
    if train_set.dim != eval_set.dim:
        raise ValueError(f"train split has dim {train_set.dim}, evaluation split {eval_set.dim}."
                         " Fix: embed both splits with the same backbone")


def write_card(cfg: RootConfig, metrics: dict, train_set: EmbeddingSet, eval_set: EmbeddingSet,
               directory: Path, command: str) -> None:
    sizes = {"train_samples": train_set.n, "eval_samples": eval_set.n, "dim": train_set.dim}
    card = run_card(cfg, metrics, sizes, code_version(), command)
    atomic_write_json(directory / "method_card.json", card)
    atomic_write_text(directory / "method_card.md", render_markdown(card, directory.name))


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> dict[str, Any]:
    return run_cell(cfg)


def cli() -> None:
    """Console script ``sae-train`` (same arguments as ``python -m sae.train``)."""
    main()


if __name__ == "__main__":
    main()
