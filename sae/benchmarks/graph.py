"""The training run's step, eager or captured once as a CUDA graph and replayed.

CUDA graphs live here, in the benchmark, and not in the trainer: the replay is what the
benchmark measures on CUDA (tests/test_bench.py checks that replays train exactly as the eager
step).
"""

from __future__ import annotations

import torch

from sae.benchmarks.common import Trainee
from sae.training.cuda_graphs import capture_step, optimizer_tensors
from sae.training.fast import fast_training_loss


class EagerStep:
    """The trainer's step, op by op; ``kwargs`` may carry the fast step's options
    (``formulation``, ``compiled``)."""

    def __init__(self, trainee: Trainee, kwargs: dict, window: int, autocast: bool) -> None:
        self.trainee, self.kwargs, self.window, self.autocast = trainee, kwargs, window, autocast

    def __call__(self, x: torch.Tensor, dead_bound: int) -> torch.Tensor:
        return self.trainee.step(x, lambda *a, **kw: fast_training_loss(
            *a, **kw, dead_bound=dead_bound), self.kwargs, self.window, self.autocast)


class GraphStep(EagerStep):
    """The same step captured once as a CUDA graph and replayed: possible because the fast
    step never synchronises and its shapes depend only on host integers. The AuxK column
    count is baked in, so the graph is captured again when the dead-count bound outgrows it
    (capacities are powers of two). A capture leaves the training state as it found it
    (``sae.training.cuda_graphs.capture_step``)."""

    def __init__(self, trainee: Trainee, kwargs: dict, window: int, autocast: bool,
                 batch: int, dim: int) -> None:
        super().__init__(trainee, kwargs, window, autocast)
        self.x = torch.zeros(batch, dim, device="cuda")
        self.capacity, self.graph, self.loss = -1, None, None
        self.captures = 0

    def __call__(self, x: torch.Tensor, dead_bound: int) -> torch.Tensor:
        self.x.copy_(x)
        if dead_bound > self.capacity:
            n = self.trainee.model.n_latents
            self._capture(0 if dead_bound == 0 else min(n, 1 << (dead_bound - 1).bit_length()))
        self.graph.replay()
        return self.loss.clone()

    def _body(self, capacity: int) -> torch.Tensor:
        """The eager step on the static input (its zero_grad is a no-op here: the grads are
        already None, and the graph allocates them)."""
        return EagerStep.__call__(self, self.x, capacity)

    def _capture(self, capacity: int) -> None:
        optimizer = self.trainee.optimizer
        self.graph, self.loss = capture_step(
            lambda: self._body(capacity), self._state_tensors,
            lambda: optimizer.zero_grad(set_to_none=True))
        self.capacity = capacity
        self.captures += 1

    def _state_tensors(self) -> list[torch.Tensor]:
        t = self.trainee
        return [*t.model.parameters(), t.samples_since_fired, *optimizer_tensors(t.optimizer)]
