"""The training objective of METHOD.md s2:  L = NMSE + alpha * AuxK + lambda * R.

NMSE is normalised by the batch's total variance (mean_i ||x_i - mean(x)||^2), the convention
of Gao et al. 2024; the method card states it (``sae.evaluation.method_card.NMSE_CONVENTION``). ``training_loss`` is the plain reference
implementation; the fast path in ``sae.training.fast`` must match it (tests/test_fast.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from sae import regularizers
from sae.model import ForwardOutput, TopKSAE


class LossParts(NamedTuple):
    total: torch.Tensor
    nmse: torch.Tensor
    auxk: torch.Tensor
    penalty: torch.Tensor  # the regularizer R before multiplying by lambda


# A batch of identical rows has no variance: NMSE is then the squared error over this floor.
VARIANCE_FLOOR = 1e-12


def batch_variance(x: torch.Tensor) -> torch.Tensor:
    """The total variance sum_i ||x_i - mean(x)||^2 of a (B, d) batch, or of each member's batch
    of a (G, B, d) stack, floored."""
    centred = x - x.mean(dim=-2, keepdim=True)
    return centred.square().sum(dim=(-2, -1)).clamp_min(VARIANCE_FLOOR)


def nmse(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Squared error over the batch's total variance (1.0 = predicting the batch mean); per
    member for a (G, B, d) stack."""
    return (x_hat - x).square().sum(dim=(-2, -1)) / batch_variance(x)


def auxk_loss(
    model: TopKSAE, pre: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor, aux_k: int
) -> torch.Tensor:
    """Gao et al. 2024: reconstruct the residual with the top-``aux_k`` *dead* latents.

    ``dead`` is an (n,) bool mask kept on the device; with no dead latent the loss is an exact
    zero, computed without asking the host how many are dead (no synchronisation).
    """
    dead_pre = pre.masked_fill(~dead, float("-inf"))
    top = dead_pre.topk(min(aux_k, pre.shape[1]), dim=1, sorted=False)
    values = F.relu(top.values)  # ReLU(-inf) = 0: live latents contribute nothing
    residual_hat = F.embedding_bag(top.indices, model.W_dec, per_sample_weights=values,
                                   mode="sum")
    return nmse(residual_hat, residual) * dead.any().to(pre.dtype)


def training_loss(
    model: TopKSAE,
    x: torch.Tensor,
    *,
    regularizer: str,
    strength: float,
    mask: bool,
    eps: float,
    dead: torch.Tensor,
    aux_alpha: float,
    aux_k: int,
) -> tuple[LossParts, ForwardOutput]:
    out = model(x)
    reconstruction = nmse(out.x_hat, x)
    auxk = (
        auxk_loss(model, out.pre, (x - out.x_hat).detach(), dead, aux_k)
        if aux_alpha > 0 else x.new_zeros(())
    )
    penalty = regularizers.get(regularizer).bind(eps=eps)(out.pre, out.code.indices, mask)
    total = reconstruction + aux_alpha * auxk + strength * penalty
    return LossParts(total, reconstruction, auxk, penalty), out
