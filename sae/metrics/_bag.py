"""``S @ W`` for a sparse S given row by row, and its gradient ``S^T G``, in cache-sized blocks.

A probe on sparse codes computes logits = S @ W (S: (N, n) with m entries per row, W: (n, C))
and the gradient S^T @ G (G: (N, C)). Both are embedding bags: the forward gathers rows of W
per sample, the backward gathers rows of G per latent (S's entries sorted by latent, a CSC
view built once per chunk). Done over all C classes at once, each gathered row (4 KB at
C = 1000) misses the cache; done over column blocks of ``block_columns`` classes, the block of
W (n x 64 x 4 B = 2 MB at n = 8192) stays in the cache. Same sums in the same order per output
entry as ``F.embedding_bag`` over the full width (equal to the bit in the tests).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

# Column block of the CPU path: measured on 2 AMD EPYC cores (1 MB L2 each), N 50k, m 64,
# C 1000: forward + backward 0.21 s at 64 classes, 0.42 s at 128, 0.24 s at 32, and 0.94 s
# for torch's embedding_bag forward + autograd backward over the full width.
CPU_BLOCK_COLUMNS = 64


class BagRows(NamedTuple):
    """S row by row: sample i holds ``weights[i, r]`` at latent ``indices[i, r]``."""

    indices: torch.Tensor  # (B, m) int64
    weights: torch.Tensor  # (B, m) float32


class BagColumns(NamedTuple):
    """S latent by latent (CSC): latent j holds entries ``offsets[j]`` up to the next offset."""

    rows: torch.Tensor  # (E,) int64 sample index of each entry, grouped by latent
    weights: torch.Tensor  # (E,) float32
    offsets: torch.Tensor  # (n,) int64 start of each latent's entries


def columns_of(bag: BagRows, n_latents: int) -> BagColumns:
    """The CSC view of ``bag`` (a stable sort: entries of a latent keep their row order)."""
    flat = bag.indices.flatten()
    order = torch.argsort(flat, stable=True)
    offsets = torch.zeros(n_latents, dtype=torch.int64, device=flat.device)
    offsets[1:] = torch.bincount(flat, minlength=n_latents).cumsum(0)[:-1]
    width = bag.indices.shape[1]
    return BagColumns(order // width, bag.weights.flatten()[order], offsets)


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


class SparseTimesDense(torch.autograd.Function):
    """``S @ W`` with the gradient ``S^T @ grad`` for W only (S is data, not trained)."""

    @staticmethod
    def forward(ctx, weight_nc: torch.Tensor, rows: BagRows, columns: BagColumns,
                block: int | None) -> torch.Tensor:
        ctx.columns, ctx.block = columns, block
        return blocked_bag(rows.indices, rows.weights, weight_nc, None, block)

    @staticmethod
    def backward(ctx, grad_bc: torch.Tensor):
        columns: BagColumns = ctx.columns
        grad_nc = blocked_bag(columns.rows, columns.weights, grad_bc.contiguous(),
                              columns.offsets, ctx.block)
        return grad_nc, None, None, None
