"""grad W_enc and grad b_enc from the gradient of ``pre``, sparse or dense.

Without a penalty the gradient of ``pre`` has k (+ AuxK's) entries per row, so grad W_enc is a
transposed embedding-bag (B k d). With one it is dense on the penalised columns: one product
G^T X.
"""

from __future__ import annotations

import torch

from sae.training.fast.penalties import penalty_grad
from sae.training.fast.plan import StepPlan
from sae.training.fast.saved import Saved
from sae.training.fast.sparse import LatentBags, dense_product


def encoder_grad_sparse(plan: StepPlan, s: Saved, bags: LatentBags | None,
                        g_values: torch.Tensor, g_aux_bc: torch.Tensor | None, n: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """grad of pre has k (+ C) entries per row: grad W_enc = sum over them g_ij x_i -> row j.
    Without bags (the dense formulation): G, dense in the code's buffer, times X."""
    x_c = s.x_centered_bd
    if bags is None:
        g_bn = s.code_bn.zero_().scatter_(1, s.code.indices, g_values)
        if g_aux_bc is not None:
            g_bn.index_add_(1, s.aux.cols, g_aux_bc)
        return dense_product(g_bn.t(), x_c, plan.compute_dtype), g_bn.sum(dim=0)
    g_W_enc = bags.scatter_rows(g_values, x_c)
    g_b_enc = x_c.new_zeros(n).index_add_(0, s.code.indices.reshape(-1), g_values.reshape(-1))
    if g_aux_bc is not None:
        _add_aux_rows(g_W_enc, g_b_enc, s.aux.cols, g_aux_bc, x_c, plan.compute_dtype)
    return g_W_enc, g_b_enc


def _add_aux_rows(g_W_enc: torch.Tensor, g_b_enc: torch.Tensor, cols: torch.Tensor,
                  g_aux_bc: torch.Tensor, x_c: torch.Tensor, dtype: torch.dtype | None) -> None:
    g_W_enc.index_add_(0, cols, dense_product(g_aux_bc.t(), x_c, dtype))  # C x B x d
    g_b_enc.index_add_(0, cols, g_aux_bc.sum(dim=0))


def encoder_grad_dense(plan: StepPlan, s: Saved, w_pen: torch.Tensor | None,
                       g_pre: torch.Tensor | None, g_values: torch.Tensor,
                       g_aux_bc: torch.Tensor | None, n: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """grad of pre = the fused penalty's G and/or the incoming grad of ``pre`` (a penalty left
    to autograd), + the support's and AuxK's entries; grad W_enc = G^T X."""
    if g_pre is None:
        return _penalty_encoder_grad(plan, s, w_pen, g_values, g_aux_bc, n)
    g_bn = g_pre.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    if w_pen is not None:
        pen = s.penalty
        g_pen_bm = penalty_grad(plan, plan.kernels, pen, w_pen, fold=False)[0]
        if plan.kernels.zero_on_support:
            g_pen_bm.scatter_(1, pen.support_bk, 0.0)
        if pen.cols is None:
            g_bn += g_pen_bm
        else:
            g_bn.index_add_(1, pen.cols, g_pen_bm)
    g_bn.scatter_add_(1, s.code.indices, g_values)
    if g_aux_bc is not None:
        g_bn.index_add_(1, s.aux.cols, g_aux_bc)
    return dense_product(g_bn.t(), s.x_centered_bd, plan.compute_dtype), g_bn.sum(dim=0)


def _penalty_encoder_grad(plan: StepPlan, s: Saved, w_pen: torch.Tensor,
                          g_values: torch.Tensor, g_aux_bc: torch.Tensor | None, n: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """G on the penalised columns only (the others get the sparse entries alone)."""
    pen, x_c = s.penalty, s.x_centered_bd
    g_bm, c_b1 = penalty_grad(plan, plan.kernels, pen, w_pen)  # G = c h: h in g_bm
    fold_aux = g_aux_bc is not None and pen.cols is None
    g_support, g_aux = g_values, g_aux_bc if fold_aux else None
    if c_b1 is not None:
        g_support = g_values / c_b1
        g_aux = None if g_aux is None else g_aux / c_b1
    if plan.kernels.zero_on_support:
        g_bm.scatter_(1, pen.support_bk, g_support)  # the penalty's support share is 0
    else:
        g_bm.scatter_add_(1, pen.support_bk, g_support)
    if fold_aux:
        g_bm.index_add_(1, s.aux.cols, g_aux)
    if c_b1 is None:
        g_W_m = dense_product(g_bm.t(), x_c, plan.compute_dtype)  # (m, d): m x B x d
        g_b_m = g_bm.sum(dim=0)
    else:  # G^T X = h^T (c X), G^T 1 = h^T c
        g_W_m = dense_product(g_bm.t(), x_c * c_b1, plan.compute_dtype)
        g_b_m = torch.mv(g_bm.t(), c_b1.reshape(-1).contiguous())
    if pen.cols is None:
        g_W_enc, g_b_enc = g_W_m, g_b_m
    else:
        g_W_enc = g_W_m.new_zeros(n, g_W_m.shape[1]).index_copy_(0, pen.cols, g_W_m)
        g_b_enc = g_b_m.new_zeros(n).index_copy_(0, pen.cols, g_b_m)
    if g_aux_bc is not None and not fold_aux:
        _add_aux_rows(g_W_enc, g_b_enc, s.aux.cols, g_aux_bc, x_c, plan.compute_dtype)
    return g_W_enc, g_b_enc
