"""The two sparsity penalties of arXiv:2606.27321 (METHOD.md s3), before Top-k.

Both act on ``z = ReLU(pre)``, the activations *before* the Top-k selection, and both are
restricted to the batch-active set ``A`` (units selected for at least one sample of the batch)
when ``mask`` is on. Why the mask: a unit outside ``A`` gets no reconstruction gradient in this
step, so a penalty on it can only push it further down -- towards a dead latent.

    R_off   = (1/B) sum_i sum_{j in M, j not in S_i} z_ij
    R_ratio = (1/B) sum_i ||z_{i,M}||_1 / (||z_{i,M}||_2 + eps)      in [1, sqrt(|M|)]

with ``M = A`` (mask on) or all n units (mask off). ``S_i`` is always inside ``A``, so the
off-support sum is the masked row sum minus the sum over the support.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_EPS = 1e-8


def batch_active(support: torch.Tensor, n_latents: int) -> torch.Tensor:
    """(n,) bool: units selected at least once in the batch. Carries no gradient."""
    active = torch.zeros(n_latents, dtype=torch.bool, device=support.device)
    return active.index_fill_(0, support.reshape(-1), True)


def _masked_activations(pre: torch.Tensor, support: torch.Tensor, mask: bool) -> torch.Tensor:
    z = F.relu(pre)
    if not mask:
        return z
    return z * batch_active(support, pre.shape[1]).to(z.dtype)


def off_support_l1(pre: torch.Tensor, support: torch.Tensor, mask: bool = True) -> torch.Tensor:
    """Mean over the batch of the L1 of ReLU(pre) on the units of M outside each support.

    ``pre``: (B, n) pre-activations; ``support``: (B, k) int64 Top-k indices.
    """
    z_masked = _masked_activations(pre, support, mask)
    on_support = F.relu(pre.gather(1, support)).sum()
    return (z_masked.sum() - on_support) / pre.shape[0]


def l1_l2_ratio(
    pre: torch.Tensor, support: torch.Tensor, mask: bool = True, eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """Mean over the batch of ||z_M||_1 / (||z_M||_2 + eps); 0 for an all-zero row."""
    z_masked = _masked_activations(pre, support, mask)
    l1 = z_masked.sum(dim=1)
    # sqrt has an infinite derivative at 0; an all-zero row has l1 = 0, so flooring the squared
    # norm at 1e-30 changes no value above that floor and keeps the gradient finite.
    l2 = z_masked.square().sum(dim=1).clamp_min(1e-30).sqrt()
    return (l1 / (l2 + eps)).mean()


def regularizer_penalty(
    name: str, pre: torch.Tensor, support: torch.Tensor, mask: bool, eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """Dispatch on the config name (``none`` gives a zero that keeps the graph uniform)."""
    if name == "offsupport_l1":
        return off_support_l1(pre, support, mask)
    if name == "l1l2":
        return l1_l2_ratio(pre, support, mask, eps)
    if name == "none":
        return pre.new_zeros(())
    raise ValueError(f"unknown regularizer {name!r}; use none, offsupport_l1 or l1l2")
