"""The packed training loop: G cells trained in lockstep, each as its own ``Trainer`` would.

A pack is built from one ``sae.trainer.Trainer`` per member (its model, config, checkpoint
path and logger). The members' Trainers still do everything that is per run -- the
initialisation (``initial_state``: b_pre, the least-squares encoder scale, or the resume from
the member's own checkpoint), the host read-out and divergence check (``_log``), the checkpoint
policy -- and ``save_checkpoint`` writes each member's checkpoint exactly as a lone run would
(so a member resumes packed or unpacked). The pack only replaces the step:

* each member's batch is its own: the rows of ``epoch_permutation(epoch, N, its seed)``, one
  (G, B) index gather from the shared on-device embeddings;
* the objective is ``sae.packed.packed_training_loss``, Adam runs over the stacked parameters
  (elementwise, so each member's own Adam), and the dead-latent counters are a (G, n) tensor
  whose rows are the members' ``TrainState.samples_since_fired``.

A member whose loss stops being finite is reported failed with the Trainer's reason and dropped
from the pack; the others go on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from sae.packed import MemberSpec, PackCoefficients, PackedSAE, packed_train_step
from sae.packed_graph import PackedGraphStep
from sae.packing import pack_conflict
from sae.preemption import StopRequest
from sae.progress import Progress
from sae.trainer import (
    DivergedError,
    Trainer,
    TrainState,
    epoch_permutation,
    make_optimizer,
    progress_line,
    save_checkpoint,
)

log = logging.getLogger(__name__)


@dataclass
class MemberResult:
    state: TrainState | None  # None when the member failed
    failure: str | None = None


def check_compatible(trainers: list[Trainer]) -> None:
    """Raise naming why the members cannot share a pack (``sae.packing.pack_conflict``), or
    that one was given other data than member 0."""
    if (conflict := pack_conflict([t.cfg for t in trainers])) is not None:
        raise ValueError(conflict)
    first = trainers[0]
    for index, trainer in enumerate(trainers[1:], start=1):
        if trainer.x is not first.x and not torch.equal(trainer.x, first.x):
            raise ValueError(f"pack member {index} trains on other data than member 0")


class PackedTrainer:
    def __init__(self, trainers: list[Trainer],
                 rng_states: list[torch.Tensor] | None = None,
                 cuda_graph: bool = True, stop: StopRequest | None = None) -> None:
        """``rng_states``: each member's torch RNG state right after its model was built; its
        checkpoints store it, as a lone run's do (training itself draws nothing from it).
        ``cuda_graph``: on CUDA, replay the step as CUDA graphs (``sae.packed_graph``; same
        values as the eager step); False runs it op by op. ``stop``: a stop signal ends the
        loop after the current step, every member checkpointed (``Interrupted``)."""
        check_compatible(trainers)
        self.members = list(trainers)
        lead = trainers[0]
        self.cfg, self.x, self.device = lead.cfg, lead.x, lead.device
        self.schedule = lead.schedule
        self.aux_alpha = lead.loss_kwargs["aux_alpha"]
        self.aux_k = lead.loss_kwargs["aux_k"]
        self.specs = [member_spec(t) for t in trainers]
        self.results: dict[int, MemberResult] = {}  # by index into the trainers given
        self.alive = list(range(len(trainers)))  # indices of members still training
        self.perm_epoch: int | None = None
        self.perms: torch.Tensor | None = None  # (G, N) the members' orders of this epoch
        self.rng_states = list(rng_states) if rng_states else [None] * len(trainers)
        # Accelerators: the members that may need AuxK until the next log (None: read afresh).
        self.aux_members: list[int] | None = None
        self.cuda_graph = cuda_graph and self.device.type == "cuda"
        self.graph_step: PackedGraphStep | None = None  # built at the first step on CUDA
        self.stop = stop or StopRequest()

    # -- building the pack from the members' own initial states ------------------------------
    def initial_states(self) -> list[TrainState]:
        states = []
        for member, trainer in enumerate(self.members):
            states.append(trainer.initial_state())
            if trainer.resumed_from is not None:  # load_checkpoint restored the member's RNG
                self.rng_states[member] = torch.get_rng_state()
        steps = {s.step for s in states}
        if len(steps) > 1:
            raise ValueError(f"pack members start at different steps {sorted(steps)}: pack "
                             "only cells resumed from the same step (or train them unpacked)")
        return states

    def _stack(self, states: list[TrainState]) -> None:
        self.pack = PackedSAE([t.model for t in self.members])
        self.optimizer = make_optimizer(self.pack, self.cfg)
        member_slots = [t.optimizer.state for t in self.members]
        for index, packed_param in enumerate(self.pack.parameters()):
            slots = [state[param] for state, param in zip(
                member_slots, (list(t.model.parameters())[index] for t in self.members))]
            if slots[0]:  # resumed: stack the members' Adam moments, share their step counter
                self.optimizer.state[packed_param] = {
                    "step": slots[0]["step"].clone(),
                    "exp_avg": torch.stack([s["exp_avg"] for s in slots]),
                    "exp_avg_sq": torch.stack([s["exp_avg_sq"] for s in slots])}
        for trainer in self.members:
            trainer.optimizer.state.clear()  # the pack holds the moments now
        self.counters = torch.stack([s.samples_since_fired for s in states])  # (G, n)
        self.states = states
        self._view_counters()
        self.coeffs = PackCoefficients.build(self.specs, self.device)

    def _view_counters(self) -> None:
        for row, state in enumerate(self.states):
            state.samples_since_fired = self.counters[row]

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> dict[int, MemberResult]:
        """Train every member to the end; returns each member's final state or its failure."""
        if self.device.type == "cpu":
            torch.set_flush_denormal(True)  # as Trainer.run: the same values, faster
        self._stack(self.initial_states())
        total = self.schedule.total_steps
        step = self.states[0].step
        progress = Progress(total, "", "step", initial=step, enabled=self.cfg.train.progress,
                            final_line=False)
        accumulated: list[torch.Tensor] = []
        self._mark_checkpoint()  # the time-based policy counts training time from here
        try:
            while step < total and self.alive:
                accumulated.append(self.step(step))
                step += 1
                at_end = step == total
                log_step = step % self.cfg.train.log_every == 0 or at_end
                if log_step:
                    self._show(progress, step, self._log(accumulated))
                    accumulated = []
                    self.aux_members = None  # read afresh by the next step
                elif progress.tty:
                    progress.goto(step)
                stopping = self.stop.signum is not None and not at_end
                if self.alive and (at_end or stopping
                                   or self.members[0]._checkpoint_due(step, log_step)):
                    self.save_checkpoints()
                    self._mark_checkpoint()
                if stopping:
                    self.stop.check(step)
        finally:
            progress.close()
        for row, member in enumerate(self.alive):
            self.pack.copy_member_to(row, self.members[member].model)
            self.results[member] = MemberResult(self.states[row])
        return self.results

    @staticmethod
    def _show(progress: Progress, step: int, metrics: dict[str, float] | None) -> None:
        """The lead member's losses, as a lone Trainer shows its own."""
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

    def batch(self, step: int) -> torch.Tensor:
        """(G, B, d): each member's batch at ``step``, as ``sae.trainer.batch_indices``."""
        epoch, position = divmod(step, self.schedule.steps_per_epoch)
        if self.perm_epoch != epoch:
            self.perms = torch.stack([
                epoch_permutation(epoch, self.schedule.n_samples, self.members[m].cfg.seed,
                                  self.device) for m in self.alive])
            self.perm_epoch = epoch
        start = position * self.schedule.batch_size
        index_gb = self.perms[:, start:start + self.schedule.batch_size]
        return self.x[index_gb.reshape(-1)].view(*index_gb.shape, -1)

    def step(self, step: int) -> torch.Tensor:
        """One optimizer step of every member; returns the (G, 4) detached losses."""
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

    def _graph_step(self) -> PackedGraphStep:
        if self.graph_step is None:
            self.graph_step = PackedGraphStep(
                self.pack, self.optimizer, self.counters, self.coeffs, self.schedule.dead_window,
                self.aux_alpha, self.aux_k, self.cfg.train.autocast_bf16,
                self.schedule.batch_size)
        return self.graph_step

    def _dead_possible(self) -> list[int]:
        """On an accelerator, as the trainer's dead bound (sae.fast.dead_count_bound): read
        once per log interval, where the host synchronises anyway; counters grow by at most
        log_every batches meanwhile. The members (rows) that may have a dead latent before the
        next read; AuxK is skipped for the others."""
        horizon = self.cfg.train.log_every * self.schedule.batch_size
        possible = (self.counters + horizon >= self.schedule.dead_window).any(dim=1)
        return possible.nonzero().flatten().tolist()

    # -- read-out, failures and checkpoints -------------------------------------------------
    def _log(self, losses: list[torch.Tensor]) -> dict[str, float] | None:
        """Each member's Trainer reads out its own losses; a diverged member is dropped."""
        per_step = torch.stack(losses).cpu()  # (S, G, 4): one host transfer for the pack
        failed, lead_metrics = [], None
        for row, member in enumerate(self.alive):
            trainer = self.members[member]
            try:
                metrics = trainer._log(self.states[row], list(per_step[:, row]),
                                       self.schedule.dead_window)
            except DivergedError as exc:
                reason = f"{type(exc).__name__}: {exc}"
                log.error("pack member %d failed: %s", member, reason)
                self.results[member] = MemberResult(None, reason)
                failed.append(row)
                continue
            lead_metrics = lead_metrics or metrics
        if failed:
            self._drop_rows(failed)
        return lead_metrics

    def _drop_rows(self, rows: list[int]) -> None:
        keep = [r for r in range(len(self.alive)) if r not in rows]
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
        self.states = [self.states[r] for r in keep]
        self._view_counters()
        self.alive = [self.alive[r] for r in keep]
        self.aux_members, self.graph_step = None, None  # rows and tensors changed
        self.coeffs = PackCoefficients.build([self.specs[m] for m in self.alive], self.device)
        if self.perms is not None:
            self.perms = self.perms.index_select(0, index)

    def save_checkpoints(self) -> None:
        """Each member's checkpoint, exactly the file its lone run would write."""
        outer_rng = torch.get_rng_state()
        for row, member in enumerate(self.alive):
            trainer = self.members[member]
            self.unpack_member(row, trainer)
            if self.rng_states[member] is not None:
                torch.set_rng_state(self.rng_states[member])
            save_checkpoint(trainer.checkpoint_path, trainer.model, trainer.optimizer,
                            self.states[row], trainer.config_for_checkpoint)
            trainer.optimizer.state.clear()
        torch.set_rng_state(outer_rng)

    def unpack_member(self, row: int, trainer: Trainer) -> None:
        """Copy the member's weights and Adam moments from the pack into its own model and
        optimizer (as if it had trained alone)."""
        self.pack.copy_member_to(row, trainer.model)
        for packed_param, param in zip(self.pack.parameters(), trainer.model.parameters()):
            slots = self.optimizer.state.get(packed_param)
            if slots:
                trainer.optimizer.state[param] = {
                    "step": slots["step"].clone(), "exp_avg": slots["exp_avg"][row].clone(),
                    "exp_avg_sq": slots["exp_avg_sq"][row].clone()}


def member_spec(trainer: Trainer) -> MemberSpec:
    kwargs = trainer.loss_kwargs
    return MemberSpec(k=trainer.model.k, regularizer=kwargs["regularizer"],
                      strength=float(kwargs["strength"]), mask=bool(kwargs["mask"]),
                      eps=float(kwargs["eps"]))
