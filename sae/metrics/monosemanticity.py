"""The MonoSemanticity score of Pach et al. 2025 (METHOD.md s4), exact, in O(N k d).

Definition, per latent j over a split of N samples with similarity embeddings e_i (cosine
similarity: the e_i are L2-normalised here):

    t_ij = (a_ij - min_j) / (max_j - min_j)          min_j, max_j over all N samples
    MS_j = sum_{i<l} t_ij t_lj <e_i, e_l>  /  sum_{i<l} t_ij t_lj

Linear form: with w_j = sum_i t_ij e_i, u_j = sum_i t_ij, v_j = sum_i t_ij^2 and ||e_i|| = 1,
||w_j||^2 = v_j + 2 sum_{i<l} t_ij t_lj <e_i, e_l> and u_j^2 = v_j + 2 sum_{i<l} t_ij t_lj, so

    MS_j = (||w_j||^2 - v_j) / (u_j^2 - v_j).

The min-max shift folded in. MS_j is unchanged by the scale 1 / (max_j - min_j), so work with
s_ij = a_ij - m_j. Let F_j be the samples where latent j fires (a_ij > 0). Then m_j = 0 unless j
fires on every sample (|F_j| = N), in which case m_j = min_{i} a_ij > 0 and the shift matters.
From the nonzeros alone:

    A_j = sum_{i in F_j} a_ij,  Q_j = sum_{i in F_j} a_ij^2,  W_j = sum_{i in F_j} a_ij e_i,
    E   = sum_i e_i (all samples)
    u_j = A_j - N m_j,   v_j = Q_j - 2 m_j A_j + N m_j^2,   w_j = W_j - m_j E.

One pass suffices: m_j is known at the end (it is the running minimum over firing entries when
the firing count reaches N), and A, Q, W, E do not depend on it. W costs O(N k d) (a sparse
product over the firing entries); everything else O(N k + n d). State is float64.

Undefined scores are NaN: a latent that never fires, one whose activations are constant over
the split (max_j = min_j), and one with fewer than two samples of t_ij > 0 (no pair has weight).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from sae.metrics._sparse import (
    CodesLike,
    as_sparse,
    firing_entries,
    row_slice,
    scatter_matmul_add_,
)
from sae.model import SparseCode

# A pair-weight total below this fraction of u^2 is rounding of an exact zero (one sample with
# t > 0 gives u^2 = v exactly); a genuine two-sample latent with t_2 = 1e-6 is still 2e-6 u^2.
_RELATIVE_ZERO = 1e-10


class MonoAccumulator:
    """Streaming MonoScore: feed (code chunk, embedding chunk) pairs, then ``scores()``."""

    def __init__(self, n_latents: int, dim: int, device: torch.device | str = "cpu") -> None:
        f64 = {"dtype": torch.float64, "device": device}
        self.n_latents = n_latents
        self.n_samples = 0
        self.e_sum_d = torch.zeros(dim, **f64)
        self.w_nd = torch.zeros(n_latents, dim, **f64)
        self.sum_a_n = torch.zeros(n_latents, **f64)
        self.sum_a2_n = torch.zeros(n_latents, **f64)
        self.min_n = torch.full((n_latents,), float("inf"), **f64)  # over firing entries
        self.max_n = torch.zeros(n_latents, **f64)
        self.count_n = torch.zeros(n_latents, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, code: SparseCode, embeddings_bd: torch.Tensor) -> None:
        if code.values.shape[0] != embeddings_bd.shape[0]:
            raise ValueError(f"{code.values.shape[0]} codes for {embeddings_bd.shape[0]} "
                             "similarity embeddings")
        e_bd = F.normalize(embeddings_bd.double(), dim=1)
        entries = firing_entries(code)
        lat, a = entries.latents, entries.values.double()
        self.count_n += torch.bincount(lat, minlength=self.n_latents)
        self.sum_a_n.index_add_(0, lat, a)
        self.sum_a2_n.index_add_(0, lat, a.square())
        self.min_n.scatter_reduce_(0, lat, a, reduce="amin")
        self.max_n.scatter_reduce_(0, lat, a, reduce="amax")
        scatter_matmul_add_(self.w_nd, lat, entries.rows, a, e_bd)
        self.e_sum_d += e_bd.sum(dim=0)
        self.n_samples += code.values.shape[0]

    def scores(self) -> torch.Tensor:
        """(n,) float64 MS_j, NaN where undefined (module docstring)."""
        n = float(self.n_samples)
        fires_everywhere = self.count_n == self.n_samples
        m_n = torch.where(fires_everywhere, self.min_n, torch.zeros_like(self.min_n))
        u_n = self.sum_a_n - n * m_n
        v_n = self.sum_a2_n - 2 * m_n * self.sum_a_n + n * m_n.square()
        w_nd = self.w_nd - m_n[:, None] * self.e_sum_d[None, :]
        numerator = w_nd.square().sum(dim=1) - v_n
        denominator = u_n.square() - v_n
        defined = (
            (self.count_n > 0)
            & (self.max_n > m_n)
            & (denominator > _RELATIVE_ZERO * u_n.square())
        )
        scores = numerator / torch.where(defined, denominator, torch.ones_like(denominator))
        return torch.where(defined, scores, torch.full_like(scores, float("nan")))


def monosemanticity(
    codes: CodesLike,
    embeddings_nd: torch.Tensor,
    n_latents: int | None = None,
    chunk_size: int = 8192,
) -> torch.Tensor:
    """Per-latent MonoSemanticity scores (n,), float64, NaN for undefined (never-firing) latents.

    ``codes``: dense (N, n) or sparse (values, indices) with ``n_latents``; ``embeddings_nd``:
    the similarity embeddings, one row per sample (normalised here).
    """
    code, n = as_sparse(codes, n_latents)
    acc = MonoAccumulator(n, embeddings_nd.shape[1], code.values.device)
    for start in range(0, code.values.shape[0], chunk_size):
        stop = start + chunk_size
        acc.update(row_slice(code, start, stop), embeddings_nd[start:stop])
    return acc.scores()


class MonoSummary(NamedTuple):
    mean_live: float  # mean over latents with a score
    mean_dead0: float  # mean over all n latents, unscored ones counted as 0 (MonoLoss)
    median: float  # over latents with a score
    p90: float  # 90th percentile (linear interpolation) over latents with a score
    n_scored: int


def monosemanticity_summary(scores_n: torch.Tensor) -> MonoSummary:
    """Summaries of per-latent scores; NaN scores (dead or undefined) are "not live"."""
    scores = scores_n.detach().double().cpu().numpy()
    finite = scores[np.isfinite(scores)]
    if finite.size == 0:
        nan = float("nan")
        return MonoSummary(nan, 0.0 if scores.size else nan, nan, nan, 0)
    return MonoSummary(
        mean_live=float(finite.mean()),
        mean_dead0=float(finite.sum() / scores.size),
        median=float(np.median(finite)),
        p90=float(np.percentile(finite, 90)),
        n_scored=int(finite.size),
    )
