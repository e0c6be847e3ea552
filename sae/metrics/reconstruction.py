"""Reconstruction and firing statistics: R^2, NMSE / FVU, L0, dead latents (METHOD.md s4).

Definitions, over a split of N samples x_i in R^d with reconstructions x_hat_i:

    SS_res,d = sum_i (x_hat_id - x_id)^2          SS_tot,d = sum_i (x_id - mean_d)^2
    R^2      = mean over {d : SS_tot,d > 0} of (1 - SS_res,d / SS_tot,d)
    NMSE     = sum_d SS_res,d / sum_d SS_tot,d
             = sum_i ||x_hat_i - x_i||^2 / sum_i ||x_i - mean(x)||^2
    FVU      = NMSE (fraction of variance unexplained, Gao et al. 2024; the same number)
    R^2_vw   = 1 - sum_{d: SS_tot,d > 0} SS_res,d / sum_d SS_tot,d
             (scikit-learn's "variance_weighted" R^2; = 1 - NMSE when no dimension is constant;
               robust to near-constant dimensions, which can drive the uniform average far
               below 0 -- e.g. the border pixels of the 8x8 digits)
    L0       = (1/N) sum_i #{j : a_ij > 0}
    dead_j   = [a_ij = 0 for every i]

R^2 is scikit-learn's ``r2_score(..., multioutput="uniform_average")`` on every split whose
dimensions all vary. It differs only on constant dimensions, which METHOD.md excludes while
scikit-learn scores them 1 (perfect) or 0; a dimension is constant when its min equals its max,
an exact test (a variance computed in floating point is rarely exactly zero). NMSE normalises by
the split's total variance around the split mean: the training loss's convention with the batch
replaced by the split.

Everything accumulates in float64 over chunks (Chan et al.'s pairwise update for the variance),
so a streamed split gives the one-shot numbers up to rounding.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sae.metrics._sparse import CodesLike, as_sparse, firing_entries
from sae.model import SparseCode


class ReconstructionScores(NamedTuple):
    r2: float
    nmse: float
    fvu: float
    n_constant_dims: int  # dimensions left out of R^2 (SS_tot = 0)
    r2_variance_weighted: float  # scikit-learn's variance-weighted R^2


class R2Accumulator:
    """Streaming R^2 / NMSE / FVU over chunks of (x, x_hat); float64 state of size O(d)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean_d: torch.Tensor | None = None
        self.m2_d: torch.Tensor | None = None  # sum of squared deviations from the running mean
        self.ss_res_d: torch.Tensor | None = None
        self.min_d: torch.Tensor | None = None
        self.max_d: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, x_bd: torch.Tensor, x_hat_bd: torch.Tensor) -> None:
        if x_bd.shape != x_hat_bd.shape or x_bd.ndim != 2:
            raise ValueError(f"x {tuple(x_bd.shape)} and x_hat {tuple(x_hat_bd.shape)} must "
                             "both be (B, d)")
        b = x_bd.shape[0]
        if b == 0:
            return
        x64 = x_bd.double()
        mean_b = x64.mean(dim=0)
        m2_b = (x64 - mean_b).square().sum(dim=0)
        ss_res_b = (x_hat_bd.double() - x64).square().sum(dim=0)
        if self.count == 0:
            self.mean_d, self.m2_d, self.ss_res_d = mean_b, m2_b, ss_res_b
            self.min_d, self.max_d = x64.amin(dim=0), x64.amax(dim=0)
        else:
            # Chan et al.: merge (count, mean, M2) of two parts without catastrophic cancellation.
            total = self.count + b
            delta = mean_b - self.mean_d
            self.mean_d = self.mean_d + delta * (b / total)
            self.m2_d = self.m2_d + m2_b + delta.square() * (self.count * b / total)
            self.ss_res_d = self.ss_res_d + ss_res_b
            self.min_d = torch.minimum(self.min_d, x64.amin(dim=0))
            self.max_d = torch.maximum(self.max_d, x64.amax(dim=0))
        self.count += b

    def result(self) -> ReconstructionScores:
        if self.count == 0:
            raise ValueError("R2Accumulator.result() before any update")
        varying_d = self.max_d > self.min_d
        n_constant = int((~varying_d).sum())
        if varying_d.any():
            r2_d = 1.0 - self.ss_res_d[varying_d] / self.m2_d[varying_d]
            r2 = float(r2_d.mean())
        else:
            r2 = float("nan")
        ss_tot = float(self.m2_d.sum())
        nmse_value = float(self.ss_res_d.sum()) / ss_tot if ss_tot > 0 else float("nan")
        weighted = (1.0 - float(self.ss_res_d[varying_d].sum()) / ss_tot if ss_tot > 0
                    else float("nan"))
        return ReconstructionScores(r2, nmse_value, nmse_value, n_constant, weighted)


def reconstruction_scores(x_nd: torch.Tensor, x_hat_nd: torch.Tensor) -> ReconstructionScores:
    acc = R2Accumulator()
    acc.update(x_nd, x_hat_nd)
    return acc.result()


def r2_score(x_nd: torch.Tensor, x_hat_nd: torch.Tensor) -> float:
    """R^2 = mean_{d: SS_tot,d > 0} (1 - SS_res,d / SS_tot,d), float64 (module docstring)."""
    return reconstruction_scores(x_nd, x_hat_nd).r2


def nmse(x_nd: torch.Tensor, x_hat_nd: torch.Tensor) -> float:
    """sum_i ||x_hat_i - x_i||^2 / sum_i ||x_i - mean(x)||^2 (split-mean total variance)."""
    return reconstruction_scores(x_nd, x_hat_nd).nmse


def fvu(x_nd: torch.Tensor, x_hat_nd: torch.Tensor) -> float:
    """Fraction of variance unexplained; identical to :func:`nmse` by definition."""
    return reconstruction_scores(x_nd, x_hat_nd).fvu


class FiringCounter:
    """Streaming per-latent firing counts: L0, firing frequency and dead latents."""

    def __init__(self, n_latents: int, device: torch.device | str = "cpu") -> None:
        self.n_latents = n_latents
        self.n_samples = 0
        self.counts_n = torch.zeros(n_latents, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, code: SparseCode) -> None:
        entries = firing_entries(code)
        self.counts_n += torch.bincount(entries.latents, minlength=self.n_latents)
        self.n_samples += code.values.shape[0]

    def l0(self) -> float:
        """Mean number of firing latents per sample."""
        if self.n_samples == 0:
            return float("nan")
        return float(self.counts_n.sum()) / self.n_samples

    def dead(self) -> torch.Tensor:
        """(n,) bool: latents that never fired."""
        return self.counts_n == 0

    def frequency(self) -> torch.Tensor:
        """(n,) float64: fraction of samples on which each latent fires."""
        return self.counts_n.double() / max(self.n_samples, 1)


def _counter(codes: CodesLike, n_latents: int | None) -> FiringCounter:
    code, n = as_sparse(codes, n_latents)
    counter = FiringCounter(n, code.values.device)
    counter.update(code)
    return counter


def l0(codes: CodesLike, n_latents: int | None = None) -> float:
    """L0 = (1/N) sum_i #{j : a_ij > 0}; dense (N, n) codes or (values, indices)."""
    return _counter(codes, n_latents).l0()


def dead_latents(codes: CodesLike, n_latents: int | None = None) -> torch.Tensor:
    """(n,) bool mask, True for latents with a_ij = 0 on every sample of ``codes``."""
    return _counter(codes, n_latents).dead()
