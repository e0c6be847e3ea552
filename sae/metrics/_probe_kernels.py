"""The probe's fused objective pieces: ``S @ W`` and ``S^T G`` in cache-sized column blocks, and
the cross-entropies with their logit gradients computed in place.

A probe on sparse codes computes logits = S @ W (S: (N, n) with m entries per row, W: (n, C))
and the gradient S^T @ G (G: (N, C)). Both are embedding bags: the forward gathers rows of W
per sample, the backward gathers rows of G per latent (S's entries sorted by latent, a CSC
view built once per fit). Done over all C classes at once, each gathered row (4 KB at
C = 1000) misses the cache; done over column blocks of ``CPU_BLOCK_COLUMNS`` classes, the
block of W (n x 64 x 4 B = 2 MB at n = 8192) stays in the cache. Each output entry is the same
sum in the same order as ``F.embedding_bag`` over the full width.

The losses return their sum and leave d(sum)/d(logits) in the logits buffer: one pass over
the (N, C) logits fewer than autograd's log-softmax, loss and backward, and no second buffer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

# Column block of the CPU path: the fastest of the widths measured (docs/performance.md,
# "Code choices").
CPU_BLOCK_COLUMNS = 64


class BagColumns(NamedTuple):
    """S latent by latent (CSC): latent j holds entries ``offsets[j]`` up to the next offset."""

    rows: torch.Tensor  # (E,) int64 sample index of each entry, grouped by latent
    weights: torch.Tensor  # (E,) float32
    offsets: torch.Tensor  # (n,) int64 start of each latent's entries


def columns_of(indices_bm: torch.Tensor, weights_bm: torch.Tensor, n_latents: int) -> BagColumns:
    """The CSC view of the rows (a stable sort: a latent's entries keep their row order)."""
    flat = indices_bm.flatten()
    order = torch.argsort(flat, stable=True)
    offsets = torch.zeros(n_latents, dtype=torch.int64, device=flat.device)
    offsets[1:] = torch.bincount(flat, minlength=n_latents).cumsum(0)[:-1]
    return BagColumns(order // indices_bm.shape[1], weights_bm.flatten()[order], offsets)


def block_columns_for(device: torch.device) -> int | None:
    """Column block per device: cache-sized on CPU; None (the full width, one launch) on GPUs."""
    return CPU_BLOCK_COLUMNS if device.type == "cpu" else None


def blocked_bag(indices: torch.Tensor, weights: torch.Tensor, dense: torch.Tensor,
                offsets: torch.Tensor | None, block: int | None) -> torch.Tensor:
    """``F.embedding_bag(indices, dense, offsets, per_sample_weights=weights, mode="sum")``,
    computed over column blocks of ``dense`` (None: the whole width at once)."""
    width = dense.shape[1]
    if block is None or block >= width:
        return F.embedding_bag(indices, dense, offsets, per_sample_weights=weights, mode="sum")
    return torch.cat([F.embedding_bag(indices, dense[:, c:c + block].contiguous(), offsets,
                                      per_sample_weights=weights, mode="sum")
                      for c in range(0, width, block)], dim=1)


def transposed_bag(columns: BagColumns, grad_bc: torch.Tensor, block: int | None) -> torch.Tensor:
    """``S^T @ grad`` (n, C) for the S whose CSC view is ``columns``."""
    return blocked_bag(columns.rows, columns.weights, grad_bc, columns.offsets, block)


def cross_entropy_and_grad_(logits_bc: torch.Tensor, targets_b: torch.Tensor) -> float:
    """sum_i CE(logits_i, y_i); ``logits_bc`` is overwritten by softmax - onehot."""
    max_b1 = logits_bc.amax(dim=1, keepdim=True)
    picked_b1 = logits_bc.gather(1, targets_b[:, None])
    exp_bc = logits_bc.sub_(max_b1).exp_()
    sum_b1 = exp_bc.sum(dim=1, keepdim=True)
    loss = float((sum_b1.log() + max_b1 - picked_b1).sum())
    exp_bc.div_(sum_b1).scatter_add_(1, targets_b[:, None], -torch.ones_like(picked_b1))
    return loss


def binary_cross_entropy_and_grad_(logits_bc: torch.Tensor, targets_bc: torch.Tensor) -> float:
    """sum_ic BCE(logits_ic, y_ic); ``logits_bc`` is overwritten by sigmoid - y."""
    loss = float(F.binary_cross_entropy_with_logits(logits_bc, targets_bc, reduction="sum"))
    logits_bc.sigmoid_().sub_(targets_bc)
    return loss
