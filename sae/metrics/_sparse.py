"""Sparse code helpers shared by the metrics: dense <-> (values, indices), firing entries, S @ X.

A code is "firing" for latent j on sample i when ``a_ij > 0``. Top-k codes may carry selected
entries whose ReLU value is 0; every metric ignores them, exactly as a dense code would.
Within one row the indices are assumed distinct (Top-k and dense conversion guarantee it).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from sae.model import SparseCode

CodesLike = torch.Tensor | SparseCode | tuple[torch.Tensor, torch.Tensor]


class FiringEntries(NamedTuple):
    """The nonzeros of a (B, n) code as flat coordinate lists (length E <= B * k)."""

    rows: torch.Tensor  # (E,) int64 sample index within the chunk
    latents: torch.Tensor  # (E,) int64 latent id
    values: torch.Tensor  # (E,) activation > 0


def as_sparse(codes: CodesLike, n_latents: int | None = None) -> tuple[SparseCode, int]:
    """A ``SparseCode`` and the number of latents, from dense (N, n) codes or (values, indices).

    Dense codes keep, per row, as many slots as the busiest row has nonzeros; the padding slots
    hold zeros and are ignored downstream. Sparse codes need ``n_latents`` (the indices alone
    cannot tell how many latents never fire).
    """
    if isinstance(codes, torch.Tensor):
        if codes.ndim != 2:
            raise ValueError(f"dense codes must be (N, n), got shape {tuple(codes.shape)}")
        if n_latents is not None and n_latents != codes.shape[1]:
            raise ValueError(f"n_latents={n_latents} but dense codes have {codes.shape[1]} columns")
        width = int((codes > 0).sum(dim=1).max()) if codes.shape[0] else 0
        top = codes.topk(width, dim=1)
        return SparseCode(top.values.clamp_min(0), top.indices), codes.shape[1]
    values, indices = codes
    if n_latents is None:
        raise ValueError("sparse (values, indices) codes need n_latents. Fix: pass n_latents=n")
    if values.shape != indices.shape or values.ndim != 2:
        raise ValueError(f"values {tuple(values.shape)} and indices {tuple(indices.shape)} must "
                         "both be (N, k)")
    return SparseCode(values, indices.long()), n_latents


def firing_entries(code: SparseCode) -> FiringEntries:
    """Coordinates of the strictly positive activations of a code chunk."""
    keep_bk = code.values > 0
    rows_bk = torch.arange(code.values.shape[0], device=code.values.device)[:, None]
    rows_bk = rows_bk.expand_as(code.values)
    return FiringEntries(rows_bk[keep_bk], code.indices[keep_bk], code.values[keep_bk])


def scatter_matmul_add_(out_nd: torch.Tensor, latents: torch.Tensor, rows: torch.Tensor,
                        weights: torch.Tensor, dense_bd: torch.Tensor) -> torch.Tensor:
    """``out += S @ dense`` in place, for the sparse (n, B) matrix ``S[latent, row] = weight``.

    Cost O(E * D) for E entries, never O(n * B * D). S is built as CSR (entries sorted by
    latent) and added with ``addmm_``, the fastest of the forms compared (a loop of
    ``index_add_``, a COO product, allocating S @ dense; docs/performance.md).
    """
    if latents.numel() == 0:
        return out_nd
    n_latents = out_nd.shape[0]
    order = torch.argsort(latents, stable=True)
    crow = torch.zeros(n_latents + 1, dtype=torch.int64, device=latents.device)
    crow[1:] = torch.bincount(latents, minlength=n_latents).cumsum(0)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": it is exact here
        warnings.simplefilter("ignore", UserWarning)
        matrix = torch.sparse_csr_tensor(crow, rows[order], weights[order].to(out_nd.dtype),
                                         size=(n_latents, dense_bd.shape[0]))
        return out_nd.addmm_(matrix, dense_bd.to(out_nd.dtype))


def truncate_top_m(code: SparseCode, m: int) -> SparseCode:
    """Keep the ``m`` largest activations of each row (all of them when ``m >= k``)."""
    if m >= code.values.shape[1]:
        return code
    top = code.values.topk(m, dim=1)
    return SparseCode(top.values, code.indices.gather(1, top.indices))


def row_slice(code: SparseCode, start: int, stop: int) -> SparseCode:
    return SparseCode(code.values[start:stop], code.indices[start:stop])
