"""AuxK (Gao et al. 2024) over the dead columns only: dense B x C x d products, C >= dead count."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from sae.training.fast.plan import StepPlan
from sae.training.fast.sparse import dense_product
from sae.training.losses import batch_variance


class AuxState(NamedTuple):
    cols: torch.Tensor  # (C,) dead-first latent ids
    weight_cd: torch.Tensor  # (C, d) their decoder atoms
    code_bc: torch.Tensor  # (B, C) AuxK code on those columns (0 off its top aux_k)
    error_bd: torch.Tensor  # (B, d) residual_hat - residual
    scale: torch.Tensor  # () 2 * any_dead / variance(residual)


def auxk_forward(plan: StepPlan, pre_bn: torch.Tensor, dead: torch.Tensor, W_dec: torch.Tensor,
                 residual_bd: torch.Tensor) -> tuple[torch.Tensor, AuxState]:
    """Gao et al. AuxK restricted to C dead-first columns: equal to the reference's top-aux_k
    over all columns (live ones at -inf) whenever C >= the dead count."""
    C = plan.aux_cols
    cols = dead.to(pre_bn.dtype).topk(C, sorted=False).indices  # dead ones first
    pre_bc = pre_bn.index_select(1, cols).masked_fill_(~dead[cols], float("-inf"))
    if C > plan.aux_k:
        top = pre_bc.topk(plan.aux_k, dim=1, sorted=False)
        code_bc = torch.zeros_like(pre_bc).scatter_(1, top.indices, F.relu(top.values))
    else:  # every dead column is in every row's top aux_k
        code_bc = pre_bc.relu_()
    weight_cd = W_dec.index_select(0, cols)
    error_bd = dense_product(code_bc, weight_cd, plan.compute_dtype) - residual_bd
    variance = batch_variance(residual_bd)
    any_dead = dead.any().to(pre_bn.dtype)
    loss = error_bd.square().sum() / variance * any_dead
    return loss, AuxState(cols, weight_cd, code_bc, error_bd, 2 * any_dead / variance)


def aux_gradients(plan: StepPlan, aux: AuxState, w_aux: torch.Tensor, g_W_dec: torch.Tensor
                  ) -> torch.Tensor:
    """Adds AuxK's share of grad W_dec into ``g_W_dec``; returns grad of its (B, C) pre."""
    g_residual_bd = aux.error_bd * (aux.scale * w_aux)
    dtype = plan.compute_dtype
    g_W_dec.index_add_(0, aux.cols, dense_product(aux.code_bc.t(), g_residual_bd, dtype))
    return dense_product(g_residual_bd, aux.weight_cd.t(), dtype) * (aux.code_bc > 0)
