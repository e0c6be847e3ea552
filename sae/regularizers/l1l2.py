"""The L1/L2 ratio: a scale-invariant sparsity measure of the pre-Top-k activations.

    R_ratio = (1/B) sum_i ||z_{i,M}||_1 / (||z_{i,M}||_2 + eps)     in [1, sqrt(|M|)]

with z = ReLU(pre); its square is the effective number of active units.
"""

from __future__ import annotations

import torch

from sae.regularizers.base import FusedKernels, Regularizer
from sae.regularizers.common import L2_FLOOR, SQUARED_L2_FLOOR, masked_activations, masked_relu

DEFAULT_EPS = 1e-8


def l1_l2_ratio(
    pre: torch.Tensor, support: torch.Tensor, mask: bool = True, eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """Mean over the batch of ||z_M||_1 / (||z_M||_2 + eps); 0 for an all-zero row."""
    z_masked = masked_activations(pre, support, mask)
    l1 = z_masked.sum(dim=1)
    l2 = z_masked.square().sum(dim=1).clamp_min(SQUARED_L2_FLOOR).sqrt()
    return (l1 / (l2 + eps)).mean()


def fused_forward(pre_bm: torch.Tensor, upper_m: torch.Tensor | None, values_bk: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """R with saved (||z_i||_1, ||z_i||_2 floored as the reference)."""
    z_bm = masked_relu(pre_bm, upper_m)
    l1, l2 = z_bm.sum(dim=1), torch.linalg.vector_norm(z_bm, dim=1).clamp_min(L2_FLOOR)
    return (l1 / (l2 + eps)).mean(), z_bm, (l1, l2)


def fused_grad(z_bm: torch.Tensor, saved: tuple, scale: torch.Tensor, eps: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """R_i = l1/(l2 + eps): dR_i/dz_ij = 1/(l2 + eps) - l1 z_ij / ((l2 + eps)^2 l2) where
    z > 0 (the floor on l2 passes no gradient, as the reference's clamp). As c h:
    c = scale / (B (l2 + eps)), h = [z > 0] - z l1 / ((l2 + eps) l2)."""
    l1, l2 = saved
    denominator = l2 + eps
    c1_b = scale / z_bm.shape[0] / denominator
    ratio_b = l1 / (denominator * l2) * (l2 > L2_FLOOR)
    h_bm = torch.sign(z_bm).addcmul_(z_bm, ratio_b.unsqueeze(1), value=-1.0)
    return h_bm, c1_b.unsqueeze(1)


REGULARIZER = Regularizer(
    name="l1l2", penalty=l1_l2_ratio, fields=("eps",),
    kernels=FusedKernels(forward=fused_forward, grad=fused_grad, zero_on_support=False),
    pack_term="ratio",
)
