"""The one training loop: G members in lockstep, G = 1 for a lone run.

    states = TrainingLoop([trainer_a, trainer_b, ...], stop=stop).run()
    state = train_alone(trainer)

Each member is a ``sae.training.trainer.Trainer``: its model, config, checkpoint path and logger. The
Trainer does everything that is per run -- the initialisation (``initial_state``: b_pre, the
least-squares encoder scale, or the resume from its own checkpoint), the host read-out and
divergence check (``_log``), the checkpoint policy (``_checkpoint_due``) -- and
``save_checkpoint`` writes each member's checkpoint as one file of its own, so a member
resumes alone or in any pack. The loop owns what is shared: the step count, the progress line,
the pending losses between log points, when checkpoints are written, the stop signal, and the
members that fail (a member whose loss stops being finite is reported failed and dropped; the
others go on).

The step itself is an engine (:class:`StepEngine`):

* :class:`LoneStep` for one member: ``sae.training.trainer.train_step`` on the member's own model
  and optimizer, with the reference or the fused objective (``train.fast_path``); any model
  (tied, LayerNorm) trains here;
* :class:`PackedStep` for several: the stacked parameters of ``sae.training.packed``, each member on its
  own batch order, one Adam over the stack (elementwise, so each member's own Adam), CUDA
  graphs on CUDA (``sae.training.packed_graph``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Protocol

import torch

from sae.grid.packing import pack_conflict
from sae.runtime.preemption import StopRequest
from sae.runtime.progress import Progress
from sae.training.packed import MemberSpec, PackCoefficients, PackedSAE, packed_train_step
from sae.training.packed_graph import PackedGraphStep
from sae.training.trainer import (
    DivergedError,
    Trainer,
    TrainState,
    batch_indices,
    epoch_permutation,
    make_optimizer,
    progress_line,
    save_checkpoint,
    train_step,
)

log = logging.getLogger(__name__)


@dataclass
class MemberResult:
    state: TrainState | None  # None when the member failed
    failure: Exception | None = None

    @property
    def reason(self) -> str | None:
        return None if self.failure is None else failure_reason(self.failure)


def failure_reason(exc: BaseException) -> str:
    """How a failed run's status names its exception."""
    return f"{type(exc).__name__}: {exc}"


class StepEngine(Protocol):
    """One optimizer step of the members still training (rows, in the loop's order)."""

    def step(self, step: int) -> torch.Tensor:
        """Train every row one step from ``step``; the (G, 4) detached losses."""

    def after_log(self) -> None:
        """The host has read the losses: host bounds valid until the next log may be renewed."""

    def drop(self, rows: list[int]) -> None:
        """Stop training these rows (failed members)."""

    def write_back(self, row: int, trainer: Trainer) -> None:
        """Put the row's weights and Adam moments in the member's own model and optimizer."""

    def release(self, trainer: Trainer) -> None:
        """After ``write_back`` and the member's checkpoint: free what the engine holds twice."""


class LoneStep:
    """One member trained on its own model and optimizer (``sae.training.trainer.train_step``)."""

    def __init__(self, trainer: Trainer, state: TrainState) -> None:
        self.trainer, self.state = trainer, state
        self.perm_cache: dict[int, torch.Tensor] = {}

    def step(self, step: int) -> torch.Tensor:
        t = self.trainer
        window = t.schedule.dead_window
        index = batch_indices(step, t.schedule, t.cfg.seed, t.device, self.perm_cache)
        losses = train_step(t.model, t.optimizer, t.x[index], self.state, t.loss_fn,
                            t.step_kwargs(self.state, window), window, t.cfg.train.autocast_bf16)
        return losses.unsqueeze(0)

    def after_log(self) -> None:
        self.trainer.dead_bound = None  # read afresh by the next step's step_kwargs

    def drop(self, rows: list[int]) -> None:
        pass  # the loop ends: it had one member

    def write_back(self, row: int, trainer: Trainer) -> None:
        pass  # it trains the member's own tensors

    def release(self, trainer: Trainer) -> None:
        pass


class PackedStep:
    """G members on stacked parameters (``sae.training.packed``)."""

    def __init__(self, trainers: list[Trainer], states: list[TrainState], cuda_graph: bool
                 ) -> None:
        lead = trainers[0]
        self.cfg, self.x, self.device, self.schedule = lead.cfg, lead.x, lead.device, lead.schedule
        self.aux_alpha, self.aux_k = lead.loss_kwargs["aux_alpha"], lead.loss_kwargs["aux_k"]
        self.trainers, self.states = list(trainers), list(states)
        self.specs = [member_spec(t) for t in trainers]
        self.perm_epoch: int | None = None
        self.perms: torch.Tensor | None = None  # (G, N) the members' orders of this epoch
        # Accelerators: the members that may need AuxK until the next log (None: read afresh).
        self.aux_members: list[int] | None = None
        self.cuda_graph = cuda_graph and self.device.type == "cuda"
        self.graph_step: PackedGraphStep | None = None  # built at the first step on CUDA
        self._stack()

    def _stack(self) -> None:
        self.pack = PackedSAE([t.model for t in self.trainers])
        self.optimizer = make_optimizer(self.pack, self.cfg)
        member_slots = [t.optimizer.state for t in self.trainers]
        for index, packed_param in enumerate(self.pack.parameters()):
            slots = [state[param] for state, param in zip(
                member_slots, (list(t.model.parameters())[index] for t in self.trainers))]
            if slots[0]:  # resumed: stack the members' Adam moments, share their step counter
                self.optimizer.state[packed_param] = {
                    "step": slots[0]["step"].clone(),
                    "exp_avg": torch.stack([s["exp_avg"] for s in slots]),
                    "exp_avg_sq": torch.stack([s["exp_avg_sq"] for s in slots])}
        for trainer in self.trainers:
            trainer.optimizer.state.clear()  # the pack holds the moments now
        self.counters = torch.stack([s.samples_since_fired for s in self.states])  # (G, n)
        self._view_counters()
        self.coeffs = PackCoefficients.build(self.specs, self.device)

    def _view_counters(self) -> None:
        """Each member's TrainState reads its row of the (G, n) dead-latent counters."""
        for row, state in enumerate(self.states):
            state.samples_since_fired = self.counters[row]

    def batch(self, step: int) -> torch.Tensor:
        """(G, B, d): each member's batch at ``step``, as ``sae.training.trainer.batch_indices``."""
        epoch, position = divmod(step, self.schedule.steps_per_epoch)
        if self.perm_epoch != epoch:
            self.perms = torch.stack([
                epoch_permutation(epoch, self.schedule.n_samples, t.cfg.seed, self.device)
                for t in self.trainers])
            self.perm_epoch = epoch
        start = position * self.schedule.batch_size
        index_gb = self.perms[:, start:start + self.schedule.batch_size]
        return self.x[index_gb.reshape(-1)].view(*index_gb.shape, -1)

    def step(self, step: int) -> torch.Tensor:
        if self.device.type != "cpu" and self.aux_members is None:
            self.aux_members = self._dead_possible()
        if self.cuda_graph:
            losses = self._graph_step()(self.batch(step), self.aux_members)
        else:
            losses = packed_train_step(self.pack, self.optimizer, self.batch(step),
                                       self.counters, self.coeffs, self.schedule.dead_window,
                                       self.aux_alpha, self.aux_k, self.cfg.train.autocast_bf16,
                                       self.aux_members)
        for state in self.states:
            state.step = step + 1
        return losses

    def after_log(self) -> None:
        self.aux_members = None  # read afresh by the next step

    def _graph_step(self) -> PackedGraphStep:
        if self.graph_step is None:
            self.graph_step = PackedGraphStep(
                self.pack, self.optimizer, self.counters, self.coeffs, self.schedule.dead_window,
                self.aux_alpha, self.aux_k, self.cfg.train.autocast_bf16,
                self.schedule.batch_size)
        return self.graph_step

    def _dead_possible(self) -> list[int]:
        """On an accelerator, as the lone step's dead bound (sae.training.trainer.dead_count_bound):
        read once per log interval, where the host synchronises anyway; counters grow by at
        most log_every batches meanwhile. The members (rows) that may have a dead latent before
        the next read; AuxK is skipped for the others."""
        horizon = self.cfg.train.log_every * self.schedule.batch_size
        possible = (self.counters + horizon >= self.schedule.dead_window).any(dim=1)
        return possible.nonzero().flatten().tolist()

    def drop(self, rows: list[int]) -> None:
        keep = [r for r in range(len(self.trainers)) if r not in rows]
        moments = {name: self.optimizer.state.get(param, {})
                   for name, param in self.pack.named_parameters()}
        self.pack.keep_members_(keep)
        self.optimizer = make_optimizer(self.pack, self.cfg)
        index = torch.tensor(keep, device=self.device)
        for name, param in self.pack.named_parameters():
            slots = moments[name]
            if slots:
                self.optimizer.state[param] = {
                    "step": slots["step"], "exp_avg": slots["exp_avg"].index_select(0, index),
                    "exp_avg_sq": slots["exp_avg_sq"].index_select(0, index)}
        self.counters = self.counters.index_select(0, index)
        self.trainers = [self.trainers[r] for r in keep]
        self.states = [self.states[r] for r in keep]
        self.specs = [self.specs[r] for r in keep]
        self._view_counters()
        self.aux_members, self.graph_step = None, None  # rows and tensors changed
        self.coeffs = PackCoefficients.build(self.specs, self.device)
        if self.perms is not None:
            self.perms = self.perms.index_select(0, index)

    def write_back(self, row: int, trainer: Trainer) -> None:
        self.pack.copy_member_to(row, trainer.model)
        for packed_param, param in zip(self.pack.parameters(), trainer.model.parameters()):
            slots = self.optimizer.state.get(packed_param)
            if slots:
                trainer.optimizer.state[param] = {
                    "step": slots["step"].clone(), "exp_avg": slots["exp_avg"][row].clone(),
                    "exp_avg_sq": slots["exp_avg_sq"][row].clone()}

    def release(self, trainer: Trainer) -> None:
        trainer.optimizer.state.clear()  # the pack holds the moments


def member_spec(trainer: Trainer) -> MemberSpec:
    kwargs = trainer.loss_kwargs
    return MemberSpec(k=trainer.model.k, regularizer=kwargs["regularizer"],
                      strength=float(kwargs["strength"]), mask=bool(kwargs["mask"]),
                      eps=float(kwargs["eps"]))


def check_compatible(trainers: list[Trainer]) -> None:
    """Raise naming why the members cannot train together (``sae.grid.packing.pack_conflict``), or
    that one was given other data than member 0."""
    if (conflict := pack_conflict([t.cfg for t in trainers])) is not None:
        raise ValueError(conflict)
    first = trainers[0]
    for index, trainer in enumerate(trainers[1:], start=1):
        if trainer.x is not first.x and not torch.equal(trainer.x, first.x):
            raise ValueError(f"pack member {index} trains on other data than member 0")


class TrainingLoop:
    def __init__(self, trainers: list[Trainer], rng_states: list[torch.Tensor] | None = None,
                 cuda_graph: bool = True, stop: StopRequest | None = None) -> None:
        """``rng_states``: each member's torch RNG state right after its model was built; its
        checkpoints store it (training itself draws nothing from it; None: the process's
        state at the checkpoint, right for a lone member). ``cuda_graph``: on CUDA, a pack
        replays its step as CUDA graphs (same values as op by op). ``stop``: a stop signal
        ends the loop after the current step, every member checkpointed (``Interrupted``);
        default the lead member's."""
        check_compatible(trainers)
        self.members = list(trainers)
        lead = trainers[0]
        self.cfg, self.device, self.schedule = lead.cfg, lead.device, lead.schedule
        self.results: dict[int, MemberResult] = {}  # by index into the trainers given
        self.alive = list(range(len(trainers)))  # indices of members still training
        self.rng_states = list(rng_states) if rng_states else [None] * len(trainers)
        self.cuda_graph = cuda_graph
        self.stop = stop or lead.stop

    def initial_states(self) -> list[TrainState]:
        states = []
        for member, trainer in enumerate(self.members):
            states.append(trainer.initial_state())
            if trainer.resumed_from is not None:
                self.rng_states[member] = torch.get_rng_state()  # load_checkpoint restored it
        steps = {s.step for s in states}
        if len(steps) > 1:
            raise ValueError(f"pack members start at different steps {sorted(steps)}: pack "
                             "only cells resumed from the same step (or train them unpacked)")
        return states

    def make_stepper(self, states: list[TrainState]) -> StepEngine:
        """One member steps alone: the lone fused step trains any model (tied, LayerNorm),
        is faster than the packed step of one, and keeps a lone run's numbers
        (docs/performance.md, "the packed step of one")."""
        if len(self.members) == 1:
            return LoneStep(self.members[0], states[0])
        return PackedStep(self.members, states, self.cuda_graph)

    def run(self) -> dict[int, MemberResult]:
        """Train every member to the end; returns each member's final state or its failure."""
        if self.device.type == "cpu":
            # Adam's second moments of rarely-selected latents decay into denormal floats
            # (< 1.2e-38), which x86 CPUs process far slower than normal floats
            # (docs/performance.md); flushing them to zero changes no value above 1e-38.
            torch.set_flush_denormal(True)
        self.states = self.initial_states()
        self.stepper = self.make_stepper(self.states)
        total = self.schedule.total_steps
        step = self.states[0].step
        progress = Progress(total, "", "step", initial=step, enabled=self.cfg.train.progress,
                            final_line=False)
        pending = restore_pending(self.states)  # the (G, 4) step losses since the last log
        self._mark_checkpoint()  # the time-based policy counts training time from here
        try:
            while step < total and self.alive:
                pending.append(self.stepper.step(step))
                step += 1
                at_end = step == total
                log_step = step % self.cfg.train.log_every == 0 or at_end
                if log_step:
                    self._show(progress, step, self._log(pending))
                    pending = []
                    self.stepper.after_log()
                elif progress.tty:
                    progress.goto(step)
                stopping = self.stop.signum is not None and not at_end
                if self.alive and (at_end or stopping
                                   or self.members[self.alive[0]]._checkpoint_due(step, log_step)):
                    self.save_checkpoints(pending)
                    self._mark_checkpoint()
                if stopping:
                    self.stop.check(step)
        finally:
            progress.close()
        for row, member in enumerate(self.alive):
            self.stepper.write_back(row, self.members[member])
            self.results[member] = MemberResult(self.states[row])
        return self.results

    @staticmethod
    def _show(progress: Progress, step: int, metrics: dict[str, float] | None) -> None:
        """The lead member's losses, as its Trainer reads them out."""
        if metrics is None:  # every member failed at this step
            progress.goto(step)
            return
        progress.goto(step, loss=f"{metrics['loss']:.4f}", dead=metrics["dead"])
        progress.note(progress_line(progress, step, metrics))

    def _mark_checkpoint(self) -> None:
        """The members' Trainers decide when a checkpoint is due (``_checkpoint_due``)."""
        now = time.monotonic()
        for trainer in self.members:
            trainer.last_checkpoint = now

    def _log(self, pending: list[torch.Tensor]) -> dict[str, float] | None:
        """Each member's Trainer reads out its own losses; a diverged member is dropped."""
        per_step = torch.stack(pending).cpu()  # (S, G, 4): one host transfer for the pack
        failed, lead_metrics = [], None
        for row, member in enumerate(self.alive):
            trainer = self.members[member]
            try:
                metrics = trainer._log(self.states[row], list(per_step[:, row]),
                                       self.schedule.dead_window)
            except DivergedError as exc:
                if len(self.members) > 1:
                    log.error("pack member %d failed: %s: %s", member, type(exc).__name__, exc)
                self.results[member] = MemberResult(None, exc)
                failed.append(row)
                continue
            lead_metrics = lead_metrics or metrics
        if failed:
            self._drop_rows(failed)
        return lead_metrics

    def _drop_rows(self, rows: list[int]) -> None:
        keep = [r for r in range(len(self.alive)) if r not in rows]
        if keep:
            self.stepper.drop(rows)
        self.states = [self.states[r] for r in keep]
        self.alive = [self.alive[r] for r in keep]

    def save_checkpoints(self, pending: list[torch.Tensor]) -> None:
        """Each member's checkpoint, one file of its own whatever the engine; the losses since
        the last log point go with it, so a resumed run logs the same curve."""
        outer_rng = torch.get_rng_state()
        for row, member in enumerate(self.alive):
            trainer, state = self.members[member], self.states[row]
            self.stepper.write_back(row, trainer)
            state.pending = [losses[row] for losses in pending]
            if self.rng_states[member] is not None:
                torch.set_rng_state(self.rng_states[member])
            save_checkpoint(trainer.checkpoint_path, trainer.model, trainer.optimizer, state,
                            trainer.config_for_checkpoint)
            self.stepper.release(trainer)
        torch.set_rng_state(outer_rng)


def restore_pending(states: list[TrainState]) -> list[torch.Tensor]:
    """The members' losses since the last log point, as (G, 4) per step: a checkpoint written
    between log points kept them (the members of a loop resume from one step, so they hold
    the same count)."""
    return [torch.stack(rows) for rows in zip(*(s.pending for s in states), strict=True)]


def train_alone(trainer: Trainer) -> TrainState:
    """A lone run: the loop with one member. Raises the member's failure (DivergedError)."""
    result = TrainingLoop([trainer]).run()[0]
    if result.state is None:
        raise result.failure
    return result.state
