"""Exact products over the Top-k support: B k d work instead of B n d."""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F


class LatentBags(NamedTuple):
    """The B k support entries grouped by latent: latent j's entries are order[offsets[j]:
    offsets[j+1]], their samples rows[...]. With it, sum_{(i,j) in S} w_ij T_i -> row j (a
    transposed sparse product) is one embedding-bag over the sample table T."""

    order: torch.Tensor  # (B k,) permutation of the flattened support, sorted by latent
    rows: torch.Tensor  # (B k,) sample of each sorted entry
    offsets: torch.Tensor  # (n + 1,)

    @staticmethod
    def build(indices_bk: torch.Tensor, n: int) -> LatentBags:
        k = indices_bk.shape[1]
        latents_sorted, order = indices_bk.reshape(-1).sort()
        boundaries = torch.arange(n + 1, device=indices_bk.device)
        offsets = torch.searchsorted(latents_sorted, boundaries)
        return LatentBags(order, order // k, offsets)

    def scatter_rows(self, weights_bk: torch.Tensor, table_bd: torch.Tensor) -> torch.Tensor:
        """(n, d): row j = sum over the entries (i, j) of weights[i, .] * table[i]."""
        return F.embedding_bag(self.rows, table_bd, self.offsets, mode="sum",
                               per_sample_weights=weights_bk.reshape(-1)[self.order],
                               include_last_offset=True)


def support_pattern(indices_bk: torch.Tensor, n: int) -> torch.Tensor:
    """The support as a (B, n) CSR pattern (k sorted entries per row)."""
    batch, k = indices_bk.shape
    crow = torch.arange(0, batch * k + 1, k, device=indices_bk.device)
    values = torch.zeros(batch * k, device=indices_bk.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, indices_bk.reshape(-1), values, (batch, n),
                                       check_invariants=False)


def support_dots(grad_bd: torch.Tensor, weight_nd: torch.Tensor, indices_bk: torch.Tensor
                  ) -> torch.Tensor:
    """(B, k): <grad_i, weight[indices_ik]>, a product sampled at the support only (B k d).

    CPU: a sampled dense-dense product over the support's CSR pattern. Elsewhere: gathered
    atoms times the gradient, in batch chunks whose gathered atoms stay under ~256 MB.
    """
    if grad_bd.device.type != "cpu":
        return support_dots_gathered(grad_bd, weight_nd, indices_bk)
    pattern = support_pattern(indices_bk, weight_nd.shape[0])
    dots = torch.sparse.sampled_addmm(pattern, grad_bd, weight_nd.t(), beta=0.0)
    return dots.values().view_as(indices_bk)


def support_dots_gathered(grad_bd: torch.Tensor, weight_nd: torch.Tensor,
                           indices_bk: torch.Tensor, max_elements: int = 64 << 20
                           ) -> torch.Tensor:
    batch, k = indices_bk.shape
    rows = max(1, max_elements // (k * weight_nd.shape[1]))
    return torch.cat([
        torch.bmm(F.embedding(indices_bk[i:i + rows], weight_nd),
                  grad_bd[i:i + rows].unsqueeze(2)).squeeze(2)
        for i in range(0, batch, rows)])


def dense_product(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """a @ b in ``dtype`` (autocast's), returned in float32."""
    if dtype is None:
        return a @ b
    return (a.to(dtype) @ b.to(dtype)).float()
