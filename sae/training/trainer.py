"""Stage 2: the pieces of one run's training, which ``sae.training.loop`` drives.

The batch order (:func:`batch_indices`), the lone step (:func:`train_step`), the periodic host
read-out (:meth:`Trainer._log`), and checkpointing (:func:`save_checkpoint` /
:func:`load_checkpoint`) are kept apart in small pieces.

Two properties matter for a grid on preemptible nodes:

* **No per-step host synchronisation.** Losses stay on the device; the host reads them every
  ``train.log_every`` steps (which is also where divergence is detected). Dead-latent
  bookkeeping is a device tensor.
* **Exact resume.** The batch order is a pure function of (seed, epoch), so a checkpoint needs
  only weights, Adam state, the dead-latent counters and the step; training 2N steps equals
  N steps, stop, resume, N steps.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from sae.model import TopKSAE
from sae.regularizers import batch_active
from sae.runtime.preemption import StopRequest
from sae.runtime.progress import Progress
from sae.training.losses import training_loss

# This module imports with torch alone (the config and the run directory only in annotations
# and in the checkpoint functions): the step benchmark (sae.benchmarks.step) times this very
# train_step on GPU machines that have torch and nothing else of ours.
if TYPE_CHECKING:
    from sae.config import RootConfig

log = logging.getLogger(__name__)


class DivergedError(RuntimeError):
    """The loss stopped being finite: the run fails with this reason, never a garbage model."""


class StepLogger(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...


@dataclass
class Schedule:
    n_samples: int
    batch_size: int  # clamped to the dataset size
    steps_per_epoch: int
    total_steps: int
    dead_window: int  # samples without firing after which a latent counts as dead

    @classmethod
    def from_config(cls, cfg: RootConfig, n_samples: int) -> Schedule:
        batch = min(cfg.train.batch_size, n_samples)
        per_epoch = math.ceil(n_samples / batch)
        total = max(1, math.ceil(cfg.train.epochs * per_epoch))
        if cfg.train.max_steps is not None:
            total = min(total, cfg.train.max_steps)
        window = min(cfg.sae.dead_window_samples,
                     max(batch, int(cfg.sae.dead_window_max_epochs * n_samples)))
        return cls(n_samples, batch, per_epoch, total, window)


@dataclass
class TrainState:
    step: int
    samples_since_fired: torch.Tensor  # (n,) int64 on the device
    history: list[dict[str, float]] = field(default_factory=list)  # logged points
    # The step losses since the last logged point, (m, 4): a checkpoint between log steps (a stop
    # signal, a time-based one) keeps them, so the resumed run logs the same curve.
    pending: list[torch.Tensor] = field(default_factory=list)


def batch_indices(step: int, schedule: Schedule, seed: int, device: torch.device,
                  cache: dict[int, torch.Tensor]) -> torch.Tensor:
    """Indices of the batch at ``step``: epoch e uses a permutation seeded by (seed, e)."""
    epoch, position = divmod(step, schedule.steps_per_epoch)
    if epoch not in cache:
        cache.clear()
        cache[epoch] = epoch_permutation(epoch, schedule.n_samples, seed, device)
    start = position * schedule.batch_size
    return cache[epoch][start:start + schedule.batch_size]


def epoch_permutation(epoch: int, n_samples: int, seed: int, device: torch.device
                      ) -> torch.Tensor:
    """The sample order of one epoch, a pure function of (seed, epoch) (the packed trainer
    stacks its members' orders from it)."""
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_samples, generator=generator, device=device)


def make_optimizer(model: TopKSAE, cfg: RootConfig) -> torch.optim.Adam:
    t = cfg.train
    # fused: one kernel over all parameters instead of a loop over tensors, a sizeable share
    # of a small step (docs/performance.md).
    return torch.optim.Adam(model.parameters(), lr=t.lr, eps=t.adam_eps,
                            betas=(t.adam_beta1, t.adam_beta2), fused=True)


def loss_function(cfg: RootConfig):
    """The reference objective, or the fused sparse one (same values and gradients).
    ``train.compile`` runs the fast step's fused penalty kernels through torch.compile (its
    ``compiled`` argument); the rest of the step stays eager."""
    if cfg.train.fast_path:
        try:
            from sae.training.fast import fast_training_loss
        except ImportError:  # the fast path is optional; the reference is always there
            return training_loss
        return partial(fast_training_loss, compiled=cfg.train.compile)
    return training_loss


def dead_count_bound(samples_since_fired: torch.Tensor, window: int, horizon_samples: int) -> int:
    """Upper bound on the dead count (``samples_since_fired >= window``) for the next
    ``horizon_samples`` training samples: counters grow by at most that much and only ever
    reset. One host read-out, to be taken where the trainer synchronises anyway (its log step),
    then passed as the fast step's ``dead_bound`` until the next one."""
    return int((samples_since_fired + horizon_samples >= window).sum())


def autocast(device_type: str, enabled: bool):
    """bf16 autocast around the loss (the dense products in bf16; parameters, Adam and the
    elementwise parts stay float32: fp32 master weights). ``device_type``: "cpu", "cuda"."""
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=enabled)


def train_step(model: TopKSAE, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               state: TrainState, loss_fn, loss_kwargs: dict[str, Any], dead_window: int,
               bf16: bool = False) -> torch.Tensor:
    """One optimizer step. Returns the detached (total, nmse, auxk, penalty) as one device
    tensor; nothing here waits for the device."""
    optimizer.zero_grad(set_to_none=True)
    dead = state.samples_since_fired >= dead_window
    with autocast(x.device.type, bf16):
        parts, out = loss_fn(model, x, dead=dead, **loss_kwargs)
    parts.total.backward()
    model.project_decoder_grad_()
    optimizer.step()
    model.normalize_decoder_()
    fired = batch_active(out.code.indices, model.n_latents)
    state.samples_since_fired.add_(x.shape[0]).masked_fill_(fired, 0)
    state.step += 1
    return torch.stack([parts.total, parts.nmse, parts.auxk, parts.penalty]).detach()


# -- checkpoints ------------------------------------------------------------------------------
def resume_candidates(path: Path) -> tuple[Path, Path]:
    """The checkpoints a run resumes from, newest first: ``path``, then the one before it
    (where a corrupt newest one is set aside)."""
    return path, older_checkpoint(path)


def older_checkpoint(path: Path) -> Path:
    """Where the checkpoint before ``path`` is kept: ``prev.safetensors`` beside
    ``last.safetensors`` (``<stem>-prev<suffix>`` for any other name)."""
    from sae.grid.runs import LAST_CHECKPOINT, PREV_CHECKPOINT

    if path.name == LAST_CHECKPOINT:
        return path.with_name(PREV_CHECKPOINT)
    return path.with_name(f"{path.stem}-prev{path.suffix}")


def save_checkpoint(path: Path, model: TopKSAE, optimizer: torch.optim.Optimizer,
                    state: TrainState, config: dict[str, Any]) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_state = optimizer.state_dict()
    for index, slots in opt_state["state"].items():
        for slot, value in slots.items():
            tensors[f"optim.{index}.{slot}"] = torch.as_tensor(value)
    tensors["samples_since_fired"] = state.samples_since_fired
    if state.pending:
        tensors["pending_losses"] = torch.stack(state.pending)
    tensors["torch_rng"] = torch.get_rng_state()
    meta = {"kind": "training_checkpoint", "step": state.step, "spec": model.spec(),
            "param_groups": opt_state["param_groups"], "history": state.history,
            "config": config}
    from sae.io.tensors import save_tensors

    save_tensors(path, tensors, meta, previous=older_checkpoint(path))


def load_checkpoint(path: Path, model: TopKSAE, optimizer: torch.optim.Optimizer,
                    device: torch.device) -> TrainState:
    from sae.io.tensors import load_tensors

    tensors, meta = load_tensors(path, device)
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items()
                           if k.startswith("model.")})
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, slot = name.split(".", 2)
            # Adam keeps its step counter on the CPU unless capturable; restore it there.
            slots.setdefault(int(index), {})[slot] = value.cpu() if slot == "step" else value
    optimizer.load_state_dict({"state": slots, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["torch_rng"].cpu())
    pending = list(tensors["pending_losses"].unbind(0)) if "pending_losses" in tensors else []
    return TrainState(meta["step"], tensors["samples_since_fired"], list(meta["history"]),
                      pending)


def progress_line(progress: Progress, step: int, metrics: dict[str, float]) -> str:
    """The plain line of a logged step, for log files."""
    return (f"step {step}/{progress.total} ({100 * step / progress.total:.0f}%) "
            f"loss {metrics['loss']:.4f} nmse {metrics['nmse']:.4f} "
            f"dead {metrics['dead']:.0f} | {progress.rate():.1f} steps/s, {progress.timing()}")


# -- one member of the training loop (sae.training.loop) ------------------------------------
class Trainer:
    """Everything of one run that the loop drives: its model and optimizer, schedule,
    initial state or resume, host read-out and divergence check, and checkpoint policy."""

    def __init__(self, cfg: RootConfig, model: TopKSAE, x_train: torch.Tensor,
                 checkpoint_path: Path, logger: StepLogger, config_for_checkpoint: dict,
                 stop: StopRequest | None = None) -> None:
        self.cfg, self.model, self.x = cfg, model, x_train
        # A stop signal (sae.runtime.preemption) ends the loop after the current step, checkpointed.
        self.stop = stop or StopRequest()
        self.device = x_train.device
        self.schedule = Schedule.from_config(cfg, x_train.shape[0])
        self.optimizer = make_optimizer(model, cfg)
        self.checkpoint_path, self.logger = checkpoint_path, logger
        self.config_for_checkpoint = config_for_checkpoint
        self.loss_fn = loss_function(cfg)
        aux_k = cfg.sae.aux_k or min(model.d // 2, model.n_latents)
        self.loss_kwargs = dict(regularizer=cfg.regularizer.name, strength=cfg.regularizer.strength,
                                mask=cfg.mask, eps=cfg.regularizer.eps, aux_alpha=cfg.sae.aux_alpha,
                                aux_k=max(aux_k, 1))
        self.resumed_from: int | None = None
        # On an accelerator the fast step gets a host upper bound on the dead count (AuxK then
        # gathers that many columns, not all n); the CPU reads the count itself.
        self.pass_dead_bound = self.loss_fn is not training_loss and self.device.type != "cpu"
        self.dead_bound: int | None = None  # valid until the next log step
        self.last_checkpoint = 0.0  # time.monotonic() of the last checkpoint (or of the start)
        self.encoder_scale: float | None = None  # set by the initial calibration

    def initial_state(self) -> TrainState:
        resumed = self.resume()
        if resumed is not None:
            return resumed
        sample = self.x[: min(self.x.shape[0], 65536)]
        self.model.init_b_pre_(sample)
        self.encoder_scale = self.model.calibrate_encoder_scale_(sample)
        counters = torch.zeros(self.model.n_latents, dtype=torch.int64, device=self.device)
        return TrainState(0, counters)

    def resume(self) -> TrainState | None:
        """The state of the newest whole checkpoint (last, then the one before), or None. A
        corrupt one is set aside with a one-line warning naming it (never trained from)."""
        from sae.io.tensors import CorruptCheckpointError, set_aside_corrupt

        for path in resume_candidates(self.checkpoint_path):
            if not path.exists():
                continue
            try:
                state = load_checkpoint(path, self.model, self.optimizer, self.device)
            except CorruptCheckpointError as exc:
                aside = set_aside_corrupt(path)
                log.warning("corrupt checkpoint %s moved to %s: %s; resuming from an older one "
                            "or from scratch", path, aside, str(exc).removeprefix(f"{path}: "))
                continue
            self.resumed_from = state.step
            log.info("resumed from checkpoint %s at step %d", path, state.step)
            return state
        return None

    def _checkpoint_due(self, step: int, log_step: bool) -> bool:
        """Every ``checkpoint_every`` steps, and every ``checkpoint_every_s`` seconds of
        training. Time is read at log steps only, where the host has synchronised anyway. By
        time because step times differ by orders of magnitude between CPU and GPU, so a step
        count that suits one device checkpoints far too often or too rarely on the other
        (docs/performance.md)."""
        t = self.cfg.train
        if t.checkpoint_every and step % t.checkpoint_every == 0:
            return True
        return bool(log_step and t.checkpoint_every_s
                    and time.monotonic() - self.last_checkpoint >= t.checkpoint_every_s)

    def step_kwargs(self, state: TrainState, window: int) -> dict[str, Any]:
        """The loss's keyword arguments, with the dead-count bound where it is passed: read
        once after each log step (the host synchronises there anyway) for the log_every steps
        until the next one; counters grow by at most that many samples meanwhile."""
        if not self.pass_dead_bound:
            return self.loss_kwargs
        if self.dead_bound is None:
            horizon = self.cfg.train.log_every * self.schedule.batch_size
            self.dead_bound = dead_count_bound(state.samples_since_fired, window, horizon)
        return {**self.loss_kwargs, "dead_bound": self.dead_bound}

    def _log(self, state: TrainState, losses: list[torch.Tensor], window: int
             ) -> dict[str, float]:
        """The host read-out: mean losses since the last point; raises on divergence."""
        means = torch.stack(losses).float().mean(0).tolist()
        if not all(math.isfinite(v) for v in means):
            raise DivergedError(
                f"loss became {means[0]} by step {state.step} (nmse {means[1]}, auxk {means[2]}, "
                f"penalty {means[3]}). Fix: lower train.lr (now {self.cfg.train.lr}) or "
                f"regularizer.strength (now {self.cfg.regularizer.strength})")
        dead = int((state.samples_since_fired >= window).sum())
        metrics = {"loss": means[0], "nmse": means[1], "auxk": means[2], "penalty": means[3],
                   "dead": float(dead), "dead_fraction": dead / self.model.n_latents,
                   "lr": self.optimizer.param_groups[0]["lr"],  # SAELens logs both of these
                   "samples_seen": float(state.step * self.schedule.batch_size)}
        state.history.append({"step": state.step, **metrics})
        self.logger.log({f"train/{k}": v for k, v in metrics.items()}, step=state.step)
        return metrics
