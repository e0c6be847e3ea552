"""The entry point: ``fast_training_loss``, the reference objective through the fused step."""

from __future__ import annotations

import torch

from sae import regularizers
from sae.model import ForwardOutput, SparseCode, TopKSAE
from sae.training.fast.function import FusedLoss
from sae.training.fast.plan import AUTO, Formulation, make_plan
from sae.training.losses import LossParts, training_loss


def fast_training_loss(
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
    dead_bound: int | None = None,
    formulation: Formulation = AUTO,
    compiled: bool = False,
) -> tuple[LossParts, ForwardOutput]:
    """``sae.training.losses.training_loss``, fast: the same values and gradients to float tolerance.

    ``dead_bound``: optional host upper bound on ``dead.sum()`` (the trainer's
    ``dead_count_bound``); it lets AuxK look at that many columns instead of all n on CUDA (on
    the CPU the count is read directly). ``formulation``: how the k-sparse parts and Top-k are
    computed (default: by device). ``compiled``: the penalty's fused kernels through
    ``torch.compile``. A regularizer without fused kernels is differentiated by autograd on its
    reference penalty, on the fast step's ``pre``; an input that itself requires a gradient
    falls back to the reference."""
    kwargs = dict(regularizer=regularizer, strength=strength, mask=mask, eps=eps, dead=dead,
                  aux_alpha=aux_alpha, aux_k=aux_k)
    if x.requires_grad:  # the hand-written backward gives no gradient to x
        return training_loss(model, x, **kwargs)
    plan = make_plan(model, x, dead_bound=dead_bound, formulation=formulation,
                     compiled=compiled, **kwargs)
    x_in, stats = model.standardize(x)
    total, nmse, auxk, penalty, x_hat, pre, values, indices = FusedLoss.apply(
        plan, x, x_in, stats, dead, model.W_dec, model.b_enc, model.b_pre, model.W_enc_untied)
    if plan.kernels is None:  # the reference penalty, by autograd through pre
        penalty = regularizers.get(regularizer).penalty(pre, indices, mask, **plan.params)
        total = total + plan.strength * penalty
    return LossParts(total, nmse, auxk, penalty), ForwardOutput(
        x_hat, pre.detach(), SparseCode(values, indices), stats)
