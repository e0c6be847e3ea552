"""The one job that trains cells: a lone cell is a pack of one.

    run_cells([(cfg, command)])                        # python -m sae.train ...
    run_cells([(cfg_a, command_a), (cfg_b, command_b)])  # a sweep's packed job

Every cell goes through the same steps, whatever the number:

1. its run lock (with the timeout and the holder's message; a pack takes them in a fixed
   order), then ``skip_or_prepare``: a cell already ``done`` is skipped unless ``force``,
   which sets its outputs aside in ``previous-*/`` and retrains from scratch;
2. ``begin_run``: config, identity, ``running`` status, its W&B run under its run id;
3. the data, loaded and moved to the device once; each cell's model; the training loop
   (``sae.training.loop``; members resumed from different steps train as separate groups);
4. per cell, ``evaluate_and_write`` (model file, evaluation, ``metrics.json``, method card),
   then ``done``, or ``failed`` with the reason: a cell that diverges or whose evaluation fails
   fails alone.

A stop signal (SIGTERM, USR2) at any phase -- extraction, training, evaluation -- keeps every
finished cell ``done`` and records the others ``interrupted`` / ``preempted`` with the signal
and step, at their last checkpoint; then the signal acts (``sae.runtime.preemption``: USR2 requeues
under submitit, SIGTERM ends the process) and a relaunch finishes the work.
``metrics.json``'s ``train.seconds`` is the job's training wall time.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import time
from collections.abc import Sequence
from typing import Any

import torch
from omegaconf import DictConfig

from sae.config import RootConfig, to_dict, validate
from sae.data import EmbeddingSet, load_splits
from sae.data.embedding import ExtractionStopped
from sae.grid.packing import member_overrides, pack_conflict
from sae.grid.runs import checkpoint_path, run_dir
from sae.identity import run_id
from sae.io.tensors import CorruptCheckpointError, load_meta
from sae.runtime.device import resolve_device
from sae.runtime.locking import hold_run_lock
from sae.runtime.preemption import Interrupted, StopRequest, redeliver, signal_name, stop_signals
from sae.runtime.threads import set_torch_threads
from sae.training.cell import (
    begin_run,
    build_model,
    check_dims,
    evaluate_and_write,
    evaluation_config,
    fail_run,
    finish_run,
    record_stop,
    skip_or_prepare,
)
from sae.training.loop import MemberResult, TrainingLoop, failure_reason
from sae.training.trainer import Trainer, resume_candidates

log = logging.getLogger(__name__)

Outcome = dict[str, Any]  # {"run_id", "state", "reason", "run_dir"}


class Cell:
    """One cell of a job: its config, command, run id and folder, and (once begun) its
    tracker and Trainer."""

    def __init__(self, cfg: RootConfig, command: str) -> None:
        self.cfg, self.command = cfg, command
        self.rid = run_id(cfg)
        self.directory = run_dir(cfg, self.rid)
        self.tracker: Any = None
        self.trainer: Trainer | None = None

    def fail(self, exc: BaseException) -> Outcome:
        return fail_run(self.rid, self.directory, self.tracker, failure_reason(exc),
                        self.command)


def run_packed_job(entries: Sequence[str]) -> dict[str, Any]:
    """A sweep's packed job (``pack_members`` set by the sweeper): compose each member from its
    overrides, as its lone job would be, and run them. Returns ``{"members": [outcome, ...]}``
    in the order of ``entries``."""
    from hydra import compose

    cells = []
    for entry in entries:
        overrides = member_overrides(entry)
        command = "python -m sae.train " + " ".join(shlex.quote(o) for o in overrides)
        cells.append((compose(config_name="train", overrides=overrides), command))
    return {"members": run_cells(cells)}


def run_cells(configs: Sequence[tuple[DictConfig | RootConfig, str]], *,
              raise_failure: bool = False) -> list[Outcome]:
    """Run the cells that are not done; one outcome per cell, in order. ``raise_failure``: a
    failed cell's exception is raised once every outcome is recorded (a lone run outside a
    sweep: the command exits non-zero with the traceback)."""
    cells = [Cell(validate(node), command) for node, command in configs]
    if (conflict := pack_conflict([c.cfg for c in cells])) is not None:
        raise ValueError(conflict)
    outcomes: dict[str, Outcome] = {}
    with contextlib.ExitStack() as locks:
        for cell in sorted(cells, key=lambda c: str(c.directory)):  # a fixed order: no deadlock
            cell.directory.mkdir(parents=True, exist_ok=True)
            locks.enter_context(hold_run_lock(cell.directory, cell.cfg.run.lock_timeout_s))
        todo = []
        for cell in cells:
            if cell.rid in outcomes:  # a run id twice in a job trains once
                continue
            skipped = skip_or_prepare(cell.cfg, cell.rid, cell.directory)
            outcomes[cell.rid] = skipped or {}
            if skipped is None:
                todo.append(cell)
        if todo:
            outcomes.update(_run(todo, raise_failure))
    return [outcomes[c.rid] for c in cells]


def _run(cells: list[Cell], raise_failure: bool) -> dict[str, Outcome]:
    for cell in cells:
        cell.tracker = begin_run(cell.cfg, cell.rid, cell.directory, cell.command,
                                 concurrent=len(cells) > 1)
    outcomes: dict[str, Outcome] = {}
    failures: list[BaseException] = []
    stopped: Interrupted | None = None
    with stop_signals() as stop:
        try:
            _train_and_evaluate(cells, outcomes, failures, stop)
        except Interrupted as exc:
            stopped = exc
        except ExtractionStopped as exc:  # the cache's shards are kept: a requeue resumes them
            stopped = Interrupted(exc.signum, 0, "extraction")
        except Exception as exc:  # the job as a whole failed (data, device): unfinished cells
            failures.append(exc)
            for cell in cells:
                if cell.rid not in outcomes:
                    outcomes[cell.rid] = cell.fail(exc)
    if stopped is not None:
        for cell in cells:
            if cell.rid not in outcomes:
                record_stop(cell.rid, cell.directory, cell.tracker, cell.command, stopped)
        redeliver(stopped.signum)  # exits: submitit requeues on USR2, SIGTERM ends the process
    if stop.signum is not None:  # arrived while the last outputs were written: all finished
        log.warning("%s finished; stopping on %s received meanwhile", _name(cells),
                    signal_name(stop.signum))
        redeliver(stop.signum)
    if raise_failure and failures:
        raise failures[0]
    return outcomes


def _name(cells: list[Cell]) -> str:
    return f"run {cells[0].rid}" if len(cells) == 1 else f"pack of {len(cells)}"


def _train_and_evaluate(cells: list[Cell], outcomes: dict[str, Outcome],
                        failures: list[BaseException], stop: StopRequest) -> None:
    """Fills ``outcomes`` cell by cell (a cell's entry exists once it is finished)."""
    lead = cells[0].cfg
    # Before training: a missing similarity cache must not cost a whole run.
    eval_cfgs = [evaluation_config(c.cfg) for c in cells]
    device = resolve_device(lead.train.device)
    threads = set_torch_threads()
    started = time.perf_counter()
    train_set, eval_set = load_splits(lead, lead.train.device, lead.train.progress)  # once
    check_dims(train_set, eval_set)
    rng_states = _build_trainers(cells, train_set.x.to(device))
    _log_start(cells, device, train_set, eval_set, threads)
    results = _train(cells, rng_states, stop)
    train_seconds = time.perf_counter() - started
    for index, cell in enumerate(cells):
        result = results[index]
        if result.state is None:
            failures.append(result.failure)
            outcomes[cell.rid] = cell.fail(result.failure)
            continue
        try:
            metrics = evaluate_and_write(cell.cfg, cell.directory, cell.command, cell.trainer,
                                         result.state, train_set, eval_set, eval_cfgs[index],
                                         train_seconds, threads, stop)
        except Interrupted:
            raise
        except Exception as exc:  # one cell's evaluation failing fails that cell only
            failures.append(exc)
            outcomes[cell.rid] = cell.fail(exc)
            continue
        outcomes[cell.rid] = finish_run(cell.rid, cell.directory, cell.tracker, metrics,
                                        cell.command)


def _build_trainers(cells: list[Cell], x: torch.Tensor) -> list[torch.Tensor]:
    """Each cell's model (seeded by its config) and Trainer; returns each cell's torch RNG
    state right after its model was built, which its checkpoints store."""
    rng_states = []
    for cell in cells:
        model = build_model(cell.cfg, x.shape[1], x.device)
        rng_states.append(torch.get_rng_state())
        cell.trainer = Trainer(cell.cfg, model, x, checkpoint_path(cell.directory),
                               cell.tracker, to_dict(cell.cfg))
    return rng_states


def _train(cells: list[Cell], rng_states: list[torch.Tensor], stop: StopRequest
           ) -> dict[int, MemberResult]:
    """The loop, once per group of cells that resume from the same step (a job killed while
    writing its checkpoints resumes with some one checkpoint ahead)."""
    results = {}
    for group in groups_by_resume_step(cells):
        trained = TrainingLoop([cells[i].trainer for i in group],
                               [rng_states[i] for i in group], stop=stop).run()
        results.update({group[row]: result for row, result in trained.items()})
    return results


def _log_start(cells: list[Cell], device: torch.device, train_set: EmbeddingSet,
               eval_set: EmbeddingSet, threads: dict) -> None:
    schedule = cells[0].trainer.schedule
    log.info("%s start: device %s, %d steps of batch %d, data %s (%d train / %d eval, d=%d), "
             "%d CPU threads (%s)", _name(cells), device, schedule.total_steps,
             schedule.batch_size, cells[0].cfg.dataset.name, train_set.n, eval_set.n,
             train_set.dim, threads["count"], threads["source"])


def resume_step(cell: Cell) -> int:
    """The step the cell resumes from: of its newest checkpoint whose header reads (the
    Trainer sets a corrupt one aside and takes the one before, as here), else 0."""
    for path in resume_candidates(checkpoint_path(cell.directory)):
        try:
            return int(load_meta(path).get("step", 0))
        except (FileNotFoundError, CorruptCheckpointError):
            continue
    return 0


def groups_by_resume_step(cells: Sequence[Cell]) -> list[list[int]]:
    """Cell indices grouped by the step they resume from: the loop trains in lockstep."""
    groups: dict[int, list[int]] = {}
    for index, cell in enumerate(cells):
        groups.setdefault(resume_step(cell), []).append(index)
    return list(groups.values())
