"""Off-support L1: the L1 of the pre-Top-k activations outside each sample's support.

    R_off = (1/B) sum_i sum_{j in M, j not in S_i} ReLU(pre_ij)

``S_i`` always lies inside the mask ``M``, so R is the masked row sum minus the sum of the
Top-k values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sae.regularizers.base import FusedKernels, Regularizer
from sae.regularizers.common import masked_activations, masked_relu


def off_support_l1(pre: torch.Tensor, support: torch.Tensor, mask: bool = True) -> torch.Tensor:
    """Mean over the batch of the L1 of ReLU(pre) on the units of M outside each support.

    ``pre``: (B, n) pre-activations; ``support``: (B, k) int64 Top-k indices.
    """
    z_masked = masked_activations(pre, support, mask)
    on_support = F.relu(pre.gather(1, support)).sum()
    return (z_masked.sum() - on_support) / pre.shape[0]


def fused_forward(pre_bm: torch.Tensor, upper_m: torch.Tensor | None, values_bk: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    z_bm = masked_relu(pre_bm, upper_m)
    return (z_bm.sum() - values_bk.sum()) / pre_bm.shape[0], z_bm, ()


def fused_grad(z_bm: torch.Tensor, saved: tuple, scale: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """scale dR/dpre = (scale / B) [z > 0]: h = [z > 0], in place in z (not needed after).
    The support's share is 0 (the Top-k values are subtracted): ``zero_on_support``."""
    batch = z_bm.shape[0]
    return z_bm.sign_(), (scale / batch).reshape(1, 1).expand(batch, 1)


REGULARIZER = Regularizer(
    name="offsupport_l1", penalty=off_support_l1,
    kernels=FusedKernels(forward=fused_forward, grad=fused_grad, zero_on_support=True),
    pack_term="off_support",
)
