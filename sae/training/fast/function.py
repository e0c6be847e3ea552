"""The fast step's autograd Function: the forward pieces and a hand-written backward."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from sae.model import InputStats, SparseCode
from sae.training.fast.auxk import aux_gradients, auxk_forward
from sae.training.fast.encoder_grad import encoder_grad_dense, encoder_grad_sparse
from sae.training.fast.penalties import penalty_forward
from sae.training.fast.plan import StepPlan
from sae.training.fast.saved import Saved
from sae.training.fast.sparse import LatentBags, dense_product, support_dots
from sae.training.fast.topk import topk_by_chunks
from sae.training.losses import batch_variance


def encode(plan: StepPlan, x_centered: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor
           ) -> tuple[torch.Tensor, SparseCode]:
    """pre = x_c W_enc^T + b_enc (the floor: B x d x n) and its Top-k code, rows sorted by
    latent (a valid CSR pattern for the backward)."""
    if plan.compute_dtype is None:
        pre = torch.addmm(b_enc, x_centered, W_enc.t())
    else:
        pre = dense_product(x_centered, W_enc.t(), plan.compute_dtype).add_(b_enc)
    if plan.chunked_topk:
        values, indices = topk_by_chunks(pre, plan.k)
    else:
        values, indices = pre.topk(plan.k, dim=1, sorted=False)
    indices, order = indices.sort(dim=1)
    return pre, SparseCode(F.relu(values.gather(1, order)), indices)


def forward(plan: StepPlan, x: torch.Tensor, x_in: torch.Tensor, stats: InputStats | None,
            dead: torch.Tensor, W_enc: torch.Tensor, W_dec: torch.Tensor, b_enc: torch.Tensor,
            b_pre: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], Saved]:
    x_centered = x_in - b_pre
    pre, code = encode(plan, x_centered, W_enc, b_enc)
    code_bn = None
    if plan.dense_decoder:
        code_bn = torch.zeros_like(pre).scatter_(1, code.indices, code.values)
        x_hat = dense_product(code_bn, W_dec, plan.compute_dtype) + b_pre
    else:
        x_hat = F.embedding_bag(code.indices, W_dec, per_sample_weights=code.values,
                                mode="sum") + b_pre
    if stats is not None:
        x_hat = x_hat * stats.std + stats.mean
    error = x_hat - x
    variance = batch_variance(x)
    nmse = error.square().sum() / variance
    auxk, aux = x.new_zeros(()), None
    if plan.aux_cols > 0:
        auxk, aux = auxk_forward(plan, pre, dead, W_dec, -error)
    penalty, pen = x.new_zeros(()), None
    if plan.kernels is not None:
        penalty, pen = penalty_forward(plan, plan.kernels, pre, code.values, code.indices)
    total = nmse + plan.aux_alpha * auxk + plan.strength * penalty
    saved = Saved(x_centered, code, error, variance, None if stats is None else stats.std,
                  aux, pen, code_bn)
    return (total, nmse, auxk, penalty, x_hat, pre, code.values, code.indices), saved


class FusedLoss(torch.autograd.Function):
    """(total, nmse, auxk, penalty, x_hat, pre, values, indices) with a hand-written backward
    over the parameters (W_dec, b_enc, b_pre, W_enc if untied). ``pre`` is differentiable: a
    penalty left to autograd sends its gradient back through it."""

    @staticmethod
    def forward(ctx: Any, plan: StepPlan, x: torch.Tensor, x_in: torch.Tensor,
                stats: InputStats | None, dead: torch.Tensor, W_dec: torch.Tensor,
                b_enc: torch.Tensor, b_pre: torch.Tensor, W_enc_untied: torch.Tensor | None
                ) -> tuple[torch.Tensor, ...]:
        W_enc = W_dec if W_enc_untied is None else W_enc_untied
        with torch.autocast(x.device.type, enabled=False):
            outputs, saved = forward(plan, x, x_in, stats, dead, W_enc, W_dec, b_enc, b_pre)
        ctx.set_materialize_grads(False)
        x_hat, _pre, values, indices = outputs[4:]
        ctx.mark_non_differentiable(x_hat, values, indices)
        ctx.plan, ctx.saved, ctx.tied = plan, saved, W_enc_untied is None
        ctx.save_for_backward(W_enc, W_dec)
        return outputs

    @staticmethod
    def backward(ctx: Any, g_total, g_nmse, g_auxk, g_penalty, _g_x_hat, g_pre, *_unused):
        if ctx.saved is None:
            raise RuntimeError("the fast step's backward runs once: it builds the gradient in "
                               "the forward's buffers (use sae.training.losses.training_loss to "
                               "differentiate twice)")
        saved, ctx.saved = ctx.saved, None
        with torch.autocast(saved.error_bd.device.type, enabled=False):
            grads = backward(ctx.plan, saved, *ctx.saved_tensors, g_total, g_nmse, g_auxk,
                             g_penalty, g_pre)
        g_W_enc, g_W_dec, g_b_enc, g_b_pre = grads
        inputs = (None,) * 5  # plan, x, x_in, stats, dead
        if ctx.tied:
            return *inputs, g_W_dec.add_(g_W_enc), g_b_enc, g_b_pre, None
        return *inputs, g_W_dec, g_b_enc, g_b_pre, g_W_enc


def _weight(g_total: torch.Tensor | None, coefficient: float, g_part: torch.Tensor | None
            ) -> torch.Tensor | None:
    """d(loss)/d(part) as a device scalar; None when it is zero for a host-known reason."""
    terms = []
    if g_total is not None and coefficient != 0:
        terms.append(g_total * coefficient)
    if g_part is not None:
        terms.append(g_part)
    return sum(terms[1:], terms[0]) if terms else None


def backward(plan: StepPlan, s: Saved, W_enc: torch.Tensor, W_dec: torch.Tensor,
             g_total, g_nmse, g_auxk, g_penalty, g_pre) -> tuple[torch.Tensor, ...]:
    w_nmse = _weight(g_total, 1.0, g_nmse)
    w_aux = _weight(g_total, plan.aux_alpha, g_auxk) if s.aux is not None else None
    w_pen = _weight(g_total, plan.strength, g_penalty) if s.penalty is not None else None
    x_c, (values, indices) = s.x_centered_bd, s.code
    n = W_dec.shape[0]
    if w_nmse is None:
        w_nmse = x_c.new_zeros(())

    # Reconstruction: x_hat = y * std + mean, y = sum_k a_k W_dec[j_k] + b_pre.
    g_y = s.error_bd * (2 * w_nmse / s.variance)  # (B, d)
    if s.std_b1 is not None:
        g_y = g_y * s.std_b1
    g_b_pre = g_y.sum(dim=0)
    if s.code_bn is None:
        g_values = support_dots(g_y, W_dec, indices) * (values > 0)  # (B, k), ReLU'
        bags = LatentBags.build(indices, n)
        g_W_dec = bags.scatter_rows(values, g_y)  # (n, d), B k d multiply-adds
    else:  # the same as products with the dense code: B n d each, on tensor cores
        bags = None
        dots_bn = dense_product(g_y, W_dec.t(), plan.compute_dtype)
        g_values = dots_bn.gather(1, indices) * (values > 0)
        g_W_dec = dense_product(s.code_bn.t(), g_y, plan.compute_dtype)

    g_aux_bc = None if w_aux is None else aux_gradients(plan, s.aux, w_aux, g_W_dec)
    if w_pen is not None or g_pre is not None:
        g_W_enc, g_b_enc = encoder_grad_dense(plan, s, w_pen, g_pre, g_values, g_aux_bc, n)
    else:
        g_W_enc, g_b_enc = encoder_grad_sparse(plan, s, bags, g_values, g_aux_bc, n)
    g_b_pre -= g_b_enc @ W_enc  # pre depends on b_pre through -W_enc b_pre
    return g_W_enc, g_W_dec, g_b_enc, g_b_pre
