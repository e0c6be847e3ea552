"""Dictionary comparisons: seed stability and planted-atom recovery (METHOD.md s4).

    max_cos(A -> B)_a = max_b cos(A_a, B_b)                       (signed cosine)
    seed_stability(A, B) = (mean_a max_cos(A -> B) + mean_b max_cos(B -> A)) / 2
    planted_recovery(D, P) = (fraction of planted atoms p with max_cos(P -> D)_p >= threshold,
                              mean_p max_cos(P -> D)_p)

The cosine is signed: SAE activations are non-negative, so an atom and its negation are
different features. Cosines are computed in row chunks, never as one (n_a, n_b) matrix.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


@torch.no_grad()
def max_cosines(a_nd: torch.Tensor, b_md: torch.Tensor, chunk_size: int = 4096
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(max over b of cos for each row of a (n,), max over a for each row of b (m,))."""
    if a_nd.shape[1] != b_md.shape[1]:
        raise ValueError(f"atoms of dim {a_nd.shape[1]} and {b_md.shape[1]} cannot be compared")
    a_nd = F.normalize(a_nd.float(), dim=1)
    b_md = F.normalize(b_md.float().to(a_nd.device), dim=1)
    best_a = torch.full((a_nd.shape[0],), -1.0, device=a_nd.device)
    best_b = torch.full((b_md.shape[0],), -1.0, device=a_nd.device)
    for start in range(0, a_nd.shape[0], chunk_size):
        cos_cm = a_nd[start:start + chunk_size] @ b_md.T
        best_a[start:start + chunk_size] = cos_cm.amax(dim=1)
        best_b = torch.maximum(best_b, cos_cm.amax(dim=0))
    return best_a, best_b


def seed_stability(decoder_a: torch.Tensor, decoder_b: torch.Tensor,
                   chunk_size: int = 4096) -> float:
    """Mean max cosine between the atoms (rows) of two dictionaries, both directions averaged."""
    best_a, best_b = max_cosines(decoder_a, decoder_b, chunk_size)
    return 0.5 * (float(best_a.double().mean()) + float(best_b.double().mean()))


class PlantedRecovery(NamedTuple):
    fraction: float  # planted atoms with a decoder atom at cosine >= threshold
    mean_max_cos: float  # mean over planted atoms of the best cosine


def planted_recovery(decoder: torch.Tensor, planted_atoms: torch.Tensor,
                     threshold: float = 0.9, chunk_size: int = 4096) -> PlantedRecovery:
    """How well a learned dictionary (rows = atoms) recovers the planted one."""
    best_planted, _ = max_cosines(planted_atoms, decoder, chunk_size)
    best = best_planted.double()
    return PlantedRecovery(float((best >= threshold).double().mean()), float(best.mean()))
