"""One cell's life, the steps ``sae.training.job`` takes for every cell it runs.

``begin_run`` (config, identity, ``running`` status, the W&B run) -> training ->
``evaluate_and_write`` (model file, evaluation, ``metrics.json``, method card) -> ``finish_run``
(``done``) or ``fail_run`` (``failed`` with the reason). Every file is written atomically.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from sae.config import RootConfig
from sae.data import EmbeddingSet
from sae.evaluation.method_card import render_markdown, run_card
from sae.grid.runs import (
    CONFIG_FILE,
    IDENTITY_FILE,
    METHOD_CARD_JSON,
    METHOD_CARD_MD,
    METRICS_FILE,
    MODEL_FILE,
    NOTES_FILE,
    is_own_requeue,
    link_task_log,
    run_state,
    set_aside_outputs,
    task_logs,
    write_status,
)
from sae.identity import semantic_config
from sae.io.files import atomic_write_json, atomic_write_text
from sae.io.version import code_version
from sae.model import TopKSAE, save_model
from sae.runtime.preemption import Interrupted, StopRequest
from sae.tracking import start_tracking
from sae.training.trainer import Trainer, TrainState

log = logging.getLogger(__name__)


def begin_run(cfg: RootConfig, rid: str, directory: Path, command: str, *,
              concurrent: bool = False):
    """Write the run's config, identity and ``running`` status; start its tracker
    (``concurrent``: beside other runs of this process, as in a pack)."""
    atomic_write_text(directory / CONFIG_FILE, OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    atomic_write_json(directory / IDENTITY_FILE, semantic_config(cfg))
    write_status(directory, "running", command=command)
    link_task_log(directory)
    return start_tracking(cfg, rid, directory, concurrent=concurrent)


def skip_or_prepare(cfg: RootConfig, rid: str, directory: Path) -> dict[str, Any] | None:
    """Under the run's lock, before it executes: the ``skipped`` outcome of a run already done,
    or None when it is to run. ``force=true`` retrains from scratch (its previous outputs set
    aside in ``previous-*/``), except in the requeued job that already began it."""
    fresh_start = cfg.force and not is_own_requeue(directory)
    if run_state(directory) == "done" and not fresh_start:
        log.info("run %s is already done (%s); skipping", rid, directory)
        return {"run_id": rid, "state": "skipped", "reason": "already done",
                "run_dir": str(directory)}
    if fresh_start and (previous := set_aside_outputs(directory)) is not None:
        log.info("force=true: the previous outputs of run %s are set aside in %s (sae-clean "
                 "removes them); training from scratch", rid, previous)
    return None


def record_stop(rid: str, directory: Path, tracker, command: str, stop: Interrupted
                ) -> dict[str, Any]:
    """The run stopped on a signal: ``interrupted`` / ``preempted`` with the signal and step."""
    write_status(directory, stop.state, str(stop), command=command, signal=stop.signal_name,
                 step=stop.step)
    tracker.finish(failed=True)
    log.warning("run %s %s: %s; a re-launch resumes from step %d", rid, stop.state, stop,
                stop.step)
    return {"run_id": rid, "state": stop.state, "reason": str(stop), "run_dir": str(directory)}


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
    logs = task_logs()
    log.info("run %s done: %s%s", rid, directory,
             f" (task log {logs['stdout']})" if logs else "")
    return {"run_id": rid, "state": "done", "reason": None, "run_dir": str(directory)}


def build_model(cfg: RootConfig, dim: int, device: torch.device) -> TopKSAE:
    torch.manual_seed(cfg.seed)  # the initial dictionary is a function of the seed
    return TopKSAE(dim, cfg.sae.n_latents, cfg.k, tied=cfg.sae.tied,
                   layernorm=cfg.sae.layernorm).to(device)




def evaluation_config(cfg: RootConfig):
    from sae.data.similarity import resolve_similarity

    return dataclasses.replace(cfg.eval, similarity=str(resolve_similarity(cfg)))


def evaluate_and_write(cfg: RootConfig, directory: Path, command: str, trainer: Trainer,
                       state: TrainState, train_set: EmbeddingSet, eval_set: EmbeddingSet,
                       eval_cfg, train_seconds: float, threads: dict | None = None,
                       stop: StopRequest | None = None) -> dict:
    """After training: the model file, the evaluation, metrics.json and the method card.
    ``stop``: a stop signal raises :class:`Interrupted` before the evaluation or between its
    metric families (the training's last checkpoint is kept; a re-launch evaluates again)."""
    from sae.evaluation.evaluate import evaluate
    from sae.evaluation.probe_store import STORE_DIR_NAME as PROBE_STORE_DIR

    def check_stop() -> None:
        if stop is not None:
            stop.check(state.step, "evaluation")

    check_stop()
    model, config = trainer.model, trainer.config_for_checkpoint
    save_model(model, directory / MODEL_FILE, config, step=state.step)
    metrics = evaluate(model, train_set, eval_set, eval_cfg, cfg.k, directory, trainer.device,
                       seed=cfg.seed, probe_store=Path(cfg.paths.cache) / PROBE_STORE_DIR,
                       check_stop=check_stop)
    metrics["train"] = {
        "steps": state.step, "resumed_from_step": trainer.resumed_from,
        "seconds": round(train_seconds, 3), "batch_size": trainer.schedule.batch_size,
        "dead_window_samples": trainer.schedule.dead_window,
        "dead_end": state.history[-1]["dead"] if state.history else None,
        "final_loss": state.history[-1]["loss"] if state.history else None,
        "curve": state.history,
    }
    metrics["run_id"] = directory.name
    if threads is not None:
        metrics["threads"] = threads
    metrics["warnings"] = input_warnings(train_set, eval_set, cfg.train.batch_size,
                                         metrics)
    for line in metrics["warnings"]:
        log.warning("run %s: %s", directory.name, line)
    if metrics["warnings"]:
        atomic_write_text(directory / NOTES_FILE, "# Notes\n\n" + "".join(
            f"- {line}\n" for line in metrics["warnings"]))
    atomic_write_json(directory / METRICS_FILE, metrics)
    log.info("run %s final metrics: %s", directory.name, final_metrics_line(metrics))
    write_card(cfg, metrics, train_set, eval_set, directory, command)
    return metrics


FINAL_METRICS = ("r2", "r2_variance_weighted", "nmse", "l0", "dead_count", "mono_dead0", "mono_live", "purity_binary",
                 "probe_raw")


def final_metrics_line(metrics: dict[str, Any]) -> str:
    """The headline numbers for the log (all of them are in metrics.json)."""
    def show(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    parts = [f"{key} {show(metrics[key])}" for key in FINAL_METRICS if key in metrics]
    return ", ".join(parts + [f"steps {metrics['train']['steps']}",
                              f"{metrics['train']['seconds']:.1f} s training"])


def input_warnings(train_set: EmbeddingSet, eval_set: EmbeddingSet, batch_size: int,
                   metrics: dict) -> list[str]:
    """Inputs a run could train on but whose numbers mean less: one line each (logged, kept in
    metrics.json, the method card and the run's notes.md)."""
    lines = []
    if train_set.n < batch_size:
        lines.append(f"the training split has {train_set.n} rows, fewer than one batch "
                     f"({batch_size}): every step sees the same rows, the SAE memorises them")
    if train_set.labels is not None and eval_set.labels is not None and \
            train_set.labels.ndim == 1 and eval_set.labels.ndim == 1:
        unseen = set(eval_set.labels[eval_set.labels >= 0].tolist()) - set(
            train_set.labels[train_set.labels >= 0].tolist())
        if unseen:
            lines.append(f"{len(unseen)} classes appear only in the evaluation split (e.g. "
                         f"{sorted(unseen)[:5]}): the probes cannot predict them")
    probe = (metrics.get("protocols") or {}).get("probe", "")
    if isinstance(probe, str) and probe.startswith("skipped"):
        lines.append(f"no probe metrics: {probe.removeprefix('skipped: ')}")
    return lines


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
    atomic_write_json(directory / METHOD_CARD_JSON, card)
    atomic_write_text(directory / METHOD_CARD_MD, render_markdown(card, directory.name))
