"""The penalty's share of the fast step, dispatched to the regularizer's fused kernels.

Which columns the penalty works on (all n, or the gathered batch-active ones), the clamp bound
that applies the mask, and the gradient G = dR/dpre on those columns as c h (a per-row scale c
times h), which the encoder's product either multiplies out or folds into its (B, d) input.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sae.regularizers import FusedKernels
from sae.training.fast.plan import StepPlan

GATHER_FRACTION = 0.8  # gather the active columns when they are at most this share of n
FOLD_RANGE = (1e-15, 1e15)  # |c| for which g / c and (g / c) c stay normal floats


# The CPU reads the exact batch-active count; False makes it use the host bound as other
# devices do, so the padded columns (inactive ones up to the bound) run on the CPU too
# (tests/test_fast.py's "padded" path).
READ_COUNT_ON_CPU = True


class PenaltyState(NamedTuple):
    z_bm: torch.Tensor  # (B, m) ReLU(pre) on the penalised columns (0 off the mask)
    support_bk: torch.Tensor  # (B, k) support positions among those columns
    cols: torch.Tensor | None  # (m,) latent ids of the columns; None = all n
    saved: tuple  # what the kernels' forward kept for their grad


def active_capacity(plan: StepPlan, active_n: torch.Tensor) -> int | None:
    """How many columns the masked penalty gathers (>= |A|), or None for all n columns.

    On the CPU the batch-active count is read directly (host memory: nothing to wait for);
    elsewhere the host bound B k of the plan stands in for it. Gathering costs one pass over
    the gathered columns and saves the product and the passes over the others."""
    n = active_n.shape[0]
    capacity = plan.active_cols
    if active_n.device.type == "cpu" and READ_COUNT_ON_CPU:
        capacity = int(active_n.sum())
    return capacity if capacity <= GATHER_FRACTION * n else None


def penalty_columns(plan: StepPlan, pre_bn: torch.Tensor, support_bk: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None,
                               torch.Tensor]:
    """(pre on the penalised columns, their latent ids or None for all, the clamp's upper bound
    there (+inf on the mask, 0 off it; None without mask), the support's positions)."""
    n = pre_bn.shape[1]
    if not plan.mask:
        return pre_bn, None, None, support_bk
    active_n = torch.zeros(n, dtype=torch.bool, device=pre_bn.device)
    active_n.index_fill_(0, support_bk.reshape(-1), True)
    upper_n = torch.zeros(n, dtype=pre_bn.dtype, device=pre_bn.device)
    upper_n.masked_fill_(active_n, float("inf"))
    capacity = active_capacity(plan, active_n)
    if capacity is None:
        return pre_bn, None, upper_n, support_bk
    # Every active column, padded with inactive ones (upper 0) up to the capacity.
    cols = active_n.to(pre_bn.dtype).topk(capacity, sorted=False).indices
    position_n = torch.zeros(n, dtype=torch.int64, device=pre_bn.device)
    position_n[cols] = torch.arange(cols.shape[0], device=pre_bn.device)
    return pre_bn.index_select(1, cols), cols, upper_n[cols], position_n[support_bk]


def penalty_forward(plan: StepPlan, kernels: FusedKernels, pre_bn: torch.Tensor,
                    values_bk: torch.Tensor, indices_bk: torch.Tensor
                    ) -> tuple[torch.Tensor, PenaltyState]:
    pre_bm, cols, upper_m, support_bk = penalty_columns(plan, pre_bn, indices_bk)
    value, z_bm, saved = kernels.forward(pre_bm, upper_m, values_bk, **plan.params)
    return value, PenaltyState(z_bm, support_bk, cols, saved)


def penalty_grad(plan: StepPlan, kernels: FusedKernels, pen: PenaltyState, w_pen: torch.Tensor,
                 fold: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """G = w dR/dpre on the penalised columns, as (h, c) with G = c h, or (G, None).

    Factoring the per-row scale c (B, 1) out of the (B, m) pass and into the (B, d) input of
    the product (G^T X = h^T (c X)) saves one pass over (B, m). Taken where c is read for free
    (the CPU) and is a safe divisor (the support's and AuxK's entries are written as g / c)."""
    h_bm, c_b1 = kernels.grad(pen.z_bm, pen.saved, w_pen, **plan.params)
    if fold and foldable(c_b1):
        return h_bm, c_b1
    return h_bm.mul_(c_b1), None


def foldable(c: torch.Tensor) -> bool:
    """Whether the row scale c can be factored out: host memory (reading c waits for nothing)
    and every |c| in range."""
    if c.device.type != "cpu":
        return False
    magnitude = c.abs()
    return bool(((magnitude >= FOLD_RANGE[0]) & (magnitude <= FOLD_RANGE[1])).all())
