"""The packed step captured as CUDA graphs and replayed (the packed trainer's step on CUDA).

A packed step at the paper's sizes is launch-bound when run op by op (docs/performance.md):
one replay launches the whole step. The step's shapes depend on host values only: the pack's
shape and coefficients (fixed for the pack's life) and the members that need AuxK (read once
per log interval). One graph is captured per AuxK member set met, all in one memory pool
(they are replayed one at a time); an epoch's short last batch runs op by op; past ``MAX_GRAPHS`` sets, AuxK runs for every member (an
exact superset: AuxK of a member with no dead latent is zero), so captures stay bounded.

The graphs hold the pack's parameter, optimizer and counter tensors: a pack that drops a
member (new tensors) builds a new ``PackedGraphStep``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sae.training.cuda_graphs import capture_step, optimizer_tensors
from sae.training.packed import PackCoefficients, PackedSAE, packed_train_step

MAX_GRAPHS = 4


class PackedGraphStep:
    def __init__(self, pack: PackedSAE, optimizer: torch.optim.Optimizer,
                 counters_gn: torch.Tensor, coeffs: PackCoefficients, dead_window: int,
                 aux_alpha: float, aux_k: int, bf16: bool, batch: int) -> None:
        self.pack, self.optimizer, self.counters = pack, optimizer, counters_gn
        self.coeffs, self.dead_window = coeffs, dead_window
        self.aux_alpha, self.aux_k, self.bf16 = aux_alpha, aux_k, bf16
        self.x = torch.zeros(pack.size, batch, pack.d, device=pack.W_dec.device)
        for group in optimizer.param_groups:  # Adam's step count on the device, updated
            group["capturable"] = True  # there (fused Adam keeps it there already)
        self.graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()

    @property
    def captures(self) -> int:
        return len(self.graphs)

    def __call__(self, x_gbd: torch.Tensor, aux_members: Sequence[int]) -> torch.Tensor:
        """One step of every member on ``x_gbd`` (G, B, d); returns the (G, 4) losses."""
        if x_gbd.shape != self.x.shape:  # an epoch's short last batch: one step op by op
            return self._eager(x_gbd, aux_members)
        key = self._key(aux_members)
        self.x.copy_(x_gbd)
        if key not in self.graphs:
            self.graphs[key] = capture_step(lambda: self._body(key), self._state_tensors,
                                            self._zero_grad, self.pool)
        graph, losses = self.graphs[key]
        graph.replay()
        return losses.clone()

    def _key(self, aux_members: Sequence[int]) -> tuple[int, ...]:
        key = tuple(sorted(aux_members))
        if key in self.graphs or len(self.graphs) < MAX_GRAPHS - 1:
            return key
        return tuple(range(self.pack.size))  # the last slot: AuxK for every member

    def _body(self, aux_members: tuple[int, ...]) -> torch.Tensor:
        return self._eager(self.x, aux_members)

    def _eager(self, x_gbd: torch.Tensor, aux_members: Sequence[int]) -> torch.Tensor:
        return packed_train_step(self.pack, self.optimizer, x_gbd, self.counters, self.coeffs,
                                 self.dead_window, self.aux_alpha, self.aux_k, self.bf16,
                                 aux_members)

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def _state_tensors(self) -> list[torch.Tensor]:
        return [*self.pack.parameters(), self.counters, *optimizer_tensors(self.optimizer)]
