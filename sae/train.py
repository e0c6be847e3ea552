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
from sae.locking import hold_run_lock
from sae.method_card import render_markdown, run_card
from sae.model import TopKSAE, save_model
from sae.preemption import Interrupted, StopRequest, redeliver, stop_signals
from sae.runs import is_own_requeue, run_dir, run_state, set_aside_outputs, write_status
from sae.threads import set_torch_threads
from sae.tracking import start_tracking
from sae.trainer import Trainer

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
    atomic_write_text(directory / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    atomic_write_json(directory / "identity.json", semantic_config(cfg))
    write_status(directory, "running", command=command)
    tracker = start_tracking(cfg, rid, directory)
    stopped: Interrupted | None = None
    with stop_signals() as stop:
        try:
            metrics = train_and_evaluate(cfg, directory, tracker, command, stop)
        except Interrupted as exc:
            stopped = exc
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            write_status(directory, "failed", reason, command=command)
            tracker.finish(failed=True)
            log.error("run %s failed: %s", rid, reason)
            if is_multirun():  # let the sweep go on; the sweeper reports the failure
                return {"run_id": rid, "state": "failed", "reason": reason,
                        "run_dir": str(directory)}
            raise
    if stopped is not None:
        _record_stop(directory, rid, tracker, command, stopped)
        redeliver(stopped.signum)  # exits: submitit requeues on USR2, SIGTERM ends the process
    tracker.summary(metrics)
    tracker.finish()
    write_status(directory, "done", command=command)
    log.info("run %s done: %s", rid, directory)
    return {"run_id": rid, "state": "done", "reason": None, "run_dir": str(directory)}


def _record_stop(directory: Path, rid: str, tracker, command: str, stop: Interrupted) -> None:
    write_status(directory, stop.state, str(stop), command=command, signal=stop.signal_name,
                 step=stop.step)
    tracker.finish(failed=True)
    log.warning("run %s %s: %s; a re-launch resumes from step %d", rid, stop.state, stop,
                stop.step)


def build_model(cfg: RootConfig, dim: int, device: torch.device) -> TopKSAE:
    torch.manual_seed(cfg.seed)  # the initial dictionary is a function of the seed
    return TopKSAE(dim, cfg.sae.n_latents, cfg.k, tied=cfg.sae.tied,
                   layernorm=cfg.sae.layernorm).to(device)


def train_and_evaluate(cfg: RootConfig, directory: Path, tracker, command: str,
                       stop: StopRequest | None = None) -> dict:
    from sae.data.similarity import resolve_similarity
    from sae.evaluate import evaluate
    from sae.probe_store import STORE_DIR_NAME as PROBE_STORE_DIR

    # Before training: a missing similarity cache must not cost a whole run.
    eval_cfg = dataclasses.replace(cfg.eval, similarity=str(resolve_similarity(cfg)))
    device = resolve_device(cfg.train.device)
    threads = set_torch_threads()
    started = time.perf_counter()
    train_set, eval_set = load_splits(cfg, cfg.train.device, cfg.train.progress)
    check_dims(train_set, eval_set)
    model = build_model(cfg, train_set.dim, device)
    config = to_dict(cfg)
    trainer = Trainer(cfg, model, train_set.x.to(device),
                      directory / "checkpoints" / "last.safetensors", tracker, config, stop)
    log.info("run %s start: device %s, %d steps of batch %d, data %s (%d train / %d eval, d=%d), "
             "%d CPU threads (%s)", directory.name, device, trainer.schedule.total_steps,
             trainer.schedule.batch_size, cfg.dataset.name, train_set.n, eval_set.n,
             train_set.dim, threads["count"], threads["source"])
    state = trainer.run()
    train_seconds = time.perf_counter() - started
    save_model(model, directory / "model.safetensors", config, step=state.step)
    metrics = evaluate(model, train_set, eval_set, eval_cfg, cfg.k, directory, device,
                       seed=cfg.seed, probe_store=Path(cfg.paths.cache) / PROBE_STORE_DIR)
    metrics["train"] = {
        "steps": state.step, "resumed_from_step": trainer.resumed_from,
        "seconds": round(train_seconds, 3), "batch_size": trainer.schedule.batch_size,
        "dead_window_samples": trainer.schedule.dead_window,
        "dead_end": state.history[-1]["dead"] if state.history else None,
        "final_loss": state.history[-1]["loss"] if state.history else None,
        "curve": state.history,
    }
    metrics["run_id"] = directory.name
    metrics["threads"] = threads
    atomic_write_json(directory / "metrics.json", metrics)
    log.info("run %s final metrics: %s", directory.name, final_metrics_line(metrics))
    write_card(cfg, metrics, train_set, eval_set, directory, command)
    return metrics


FINAL_METRICS = ("r2", "nmse", "l0", "dead_count", "mono_dead0", "mono_live", "purity_binary",
                 "probe_raw")


def final_metrics_line(metrics: dict[str, Any]) -> str:
    """The headline numbers for the log (all of them are in metrics.json)."""
    def show(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    parts = [f"{key} {show(metrics[key])}" for key in FINAL_METRICS if key in metrics]
    return ", ".join(parts + [f"steps {metrics['train']['steps']}",
                              f"{metrics['train']['seconds']:.1f} s training"])


def check_dims(train_set: EmbeddingSet, eval_set: EmbeddingSet) -> None:
    if train_set.dim != eval_set.dim:
        raise ValueError(f"train split has dim {train_set.dim}, evaluation split {eval_set.dim}."
                         " Fix: embed both splits with the same backbone")


def split_sizes(train_set: EmbeddingSet, eval_set: EmbeddingSet) -> dict[str, int | None]:
    """Samples per split, and how many carry no label (None: the split has no labels)."""
    return {"train_samples": train_set.n, "eval_samples": eval_set.n, "dim": train_set.dim,
            "train_unlabelled": unlabelled_count(train_set.labels),
            "eval_unlabelled": unlabelled_count(eval_set.labels)}


def unlabelled_count(labels: torch.Tensor | None) -> int | None:
    """Rows with a negative class id, or an all-false multi-hot row."""
    if labels is None:
        return None
    return int((labels < 0).sum()) if labels.ndim == 1 else int((~labels.any(dim=1)).sum())


def write_card(cfg: RootConfig, metrics: dict, train_set: EmbeddingSet, eval_set: EmbeddingSet,
               directory: Path, command: str) -> None:
    caches = {split: data.info["cache_key_inputs"] for split, data in
              (("train", train_set), ("eval", eval_set)) if "cache_key_inputs" in data.info}
    card = run_card(cfg, metrics, split_sizes(train_set, eval_set), code_version(), command,
                    caches or None)
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
