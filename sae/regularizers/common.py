"""Pieces the penalties share: the batch-active set and ReLU restricted to the mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# sqrt has an infinite derivative at 0; an all-zero row has l1 = 0, so flooring the squared
# norm at 1e-30 (the norm at 1e-15) changes no value above that floor and keeps the gradient
# finite.
SQUARED_L2_FLOOR = 1e-30
L2_FLOOR = 1e-15


def batch_active(support: torch.Tensor, n_latents: int) -> torch.Tensor:
    """(n,) bool: units selected at least once in the batch. Carries no gradient."""
    active = torch.zeros(n_latents, dtype=torch.bool, device=support.device)
    return active.index_fill_(0, support.reshape(-1), True)


def masked_activations(pre: torch.Tensor, support: torch.Tensor, mask: bool) -> torch.Tensor:
    """z = ReLU(pre), zero outside the batch-active units when ``mask`` (the reference)."""
    z = F.relu(pre)
    if not mask:
        return z
    return z * batch_active(support, pre.shape[1]).to(z.dtype)


def masked_relu(pre_bm: torch.Tensor, upper_m: torch.Tensor | None) -> torch.Tensor:
    """The fused kernels' z: one clamp, lower 0 and upper +inf on the mask, 0 off it (so the
    mask costs no pass of its own); ``upper_m`` None = no mask."""
    if upper_m is None:
        return F.relu(pre_bm)
    return torch.clamp(pre_bm, min=torch.zeros_like(upper_m), max=upper_m)
