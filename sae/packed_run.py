"""A pack of grid cells as one job: each member writes exactly the run a lone cell writes.

    run_pack([(cfg_a, command_a), (cfg_b, command_b), ...])

The members share the backbone, dataset, ``sae`` and ``train`` presets (checked), so the
embeddings are loaded and moved to the device once; they train in lockstep
(``sae.packed_trainer.PackedTrainer``), and each member then goes through the lone cell's own
steps of ``sae.cell``: config, identity and ``running`` status and its W&B run under its run id
(``begin_run``), the model file, evaluation, ``metrics.json`` and method card
(``evaluate_and_write``), and ``done`` or ``failed`` with the reason (``finish_run`` /
``fail_run``). A member already ``done`` is skipped (unless ``force``); a member that diverges
fails alone. ``metrics.json``'s ``train.seconds`` is the pack's training wall time.
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

from sae.cell import (
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
from sae.config import RootConfig, to_dict, validate
from sae.data import load_splits
from sae.data.embedding import ExtractionStopped
from sae.device import resolve_device
from sae.identity import run_id
from sae.io import load_meta
from sae.locking import hold_run_lock
from sae.packed_trainer import PackedTrainer
from sae.packing import member_overrides, pack_conflict
from sae.preemption import Interrupted, StopRequest, redeliver, signal_name, stop_signals
from sae.runs import checkpoint_path, run_dir
from sae.threads import set_torch_threads
from sae.trainer import Trainer

log = logging.getLogger(__name__)
# Config groups that must be equal in every member: they fix the data and the step's shape.


class Member:
    def __init__(self, cfg: RootConfig, command: str) -> None:
        self.cfg, self.command = cfg, command
        self.rid = run_id(cfg)
        self.directory = run_dir(cfg, self.rid)
        self.tracker: Any = None
        self.trainer: Trainer | None = None


def run_packed_job(entries: Sequence[str]) -> dict[str, Any]:
    """A sweep's packed job (``pack_members`` set by the sweeper): compose each member from its
    overrides, as its lone job would be, and run the pack. Returns ``{"members": [outcome,
    ...]}`` in the order of ``entries``."""
    from hydra import compose

    members = []
    for entry in entries:
        overrides = member_overrides(entry)
        command = "python -m sae.train " + " ".join(shlex.quote(o) for o in overrides)
        members.append((compose(config_name="train", overrides=overrides), command))
    return {"members": run_pack(members)}


def run_pack(members: Sequence[tuple[DictConfig | RootConfig, str]]) -> list[dict[str, Any]]:
    """Run the pack's members that are not done. Returns one outcome per member, in order
    (``{"run_id", "state", "reason", "run_dir"}``, as ``sae.train.run_cell``)."""
    cells = [Member(validate(node), command) for node, command in members]
    if (conflict := pack_conflict([m.cfg for m in cells])) is not None:
        raise ValueError(conflict)
    outcomes: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as locks:
        # One process per run at a time, as run_cell (with its timeout and holder message);
        # locks taken in a fixed order.
        for member in sorted(cells, key=lambda m: str(m.directory)):
            member.directory.mkdir(parents=True, exist_ok=True)
            locks.enter_context(hold_run_lock(member.directory, member.cfg.run.lock_timeout_s))
        todo = []
        for member in cells:
            if member.rid in outcomes:  # a run id twice in a pack trains once
                continue
            skipped = skip_or_prepare(member.cfg, member.rid, member.directory)
            outcomes[member.rid] = skipped or {}
            if skipped is None:
                todo.append(member)
        if todo:
            outcomes.update(_train_pack(todo))
    return [outcomes[m.rid] for m in cells]


def _train_pack(members: list[Member]) -> dict[str, dict[str, Any]]:
    """Train and evaluate the members; a stop signal (any phase) keeps every finished member
    ``done``, records the others ``interrupted`` / ``preempted`` at their checkpoint, and then
    acts as the signal asks (``sae.preemption``), as a lone run does."""
    for member in members:
        member.tracker = begin_run(member.cfg, member.rid, member.directory, member.command,
                                   concurrent=True)
    outcomes: dict[str, dict[str, Any]] = {}
    stopped: Interrupted | None = None
    with stop_signals() as stop:
        try:
            _train_and_evaluate(members, outcomes, stop)
        except Interrupted as exc:
            stopped = exc
        except ExtractionStopped as exc:  # the cache's shards are kept: a requeue resumes them
            stopped = Interrupted(exc.signum, 0, "extraction")
        except Exception as exc:  # the pack as a whole failed (data, device): members not
            reason = f"{type(exc).__name__}: {exc}"  # finished yet fail
            for m in members:
                if m.rid not in outcomes:
                    outcomes[m.rid] = fail_run(m.rid, m.directory, m.tracker, reason, m.command)
    if stopped is not None:
        for m in members:
            if m.rid not in outcomes:
                record_stop(m.rid, m.directory, m.tracker, m.command, stopped)
        redeliver(stopped.signum)  # exits: submitit requeues on USR2, SIGTERM ends the process
    if stop.signum is not None:  # arrived while the last outputs were written: all finished
        log.warning("pack finished; stopping on %s received meanwhile", signal_name(stop.signum))
        redeliver(stop.signum)
    return outcomes


def resume_step(member: Member) -> int:
    """The step the member's checkpoint resumes from (0 without one)."""
    path = checkpoint_path(member.directory)
    return int(load_meta(path).get("step", 0)) if path.exists() else 0


def groups_by_resume_step(members: Sequence[Member]) -> list[list[int]]:
    """Member indices grouped by the step they resume from: a pack trains in lockstep, and a
    pack killed while writing its members' checkpoints (requeue, preemption) resumes with
    some members one checkpoint ahead. Each group then trains as a pack of its own."""
    groups: dict[int, list[int]] = {}
    for index, member in enumerate(members):
        groups.setdefault(resume_step(member), []).append(index)
    return list(groups.values())


def _train_and_evaluate(members: list[Member], outcomes: dict[str, dict[str, Any]],
                        stop: StopRequest) -> None:
    """Fills ``outcomes`` member by member (a member's entry exists once it is finished)."""
    lead = members[0].cfg
    eval_cfgs = [evaluation_config(m.cfg) for m in members]
    device = resolve_device(lead.train.device)
    threads = set_torch_threads()
    started = time.perf_counter()
    train_set, eval_set = load_splits(lead, lead.train.device, lead.train.progress)  # once
    check_dims(train_set, eval_set)
    x = train_set.x.to(device)
    rng_states = []
    for member in members:
        model = build_model(member.cfg, train_set.dim, device)
        rng_states.append(torch.get_rng_state())  # what the lone run's checkpoints store
        member.trainer = Trainer(member.cfg, model, x, checkpoint_path(member.directory),
                                 member.tracker, to_dict(member.cfg))
    results = {}
    for group in groups_by_resume_step(members):
        trained = PackedTrainer([members[i].trainer for i in group],
                                [rng_states[i] for i in group], stop=stop).run()
        results.update({group[row]: result for row, result in trained.items()})
    train_seconds = time.perf_counter() - started
    for index, member in enumerate(members):
        result = results[index]
        if result.state is None:
            outcomes[member.rid] = fail_run(member.rid, member.directory, member.tracker,
                                            result.failure, member.command)
            continue
        try:
            metrics = evaluate_and_write(member.cfg, member.directory, member.command,
                                         member.trainer, result.state, train_set, eval_set,
                                         eval_cfgs[index], train_seconds, threads, stop)
        except Interrupted:
            raise
        except Exception as exc:  # one member's evaluation failing fails that member only
            outcomes[member.rid] = fail_run(member.rid, member.directory, member.tracker,
                                            f"{type(exc).__name__}: {exc}", member.command)
            continue
        outcomes[member.rid] = finish_run(member.rid, member.directory, member.tracker,
                                          metrics, member.command)
