"""Class purity (METHOD.md s4) and the per-latent top activations it and the contact sheets use.

For latent j over the set F_j of samples where it fires (a_ij > 0), or over its top-N
activations when ``top_n`` is given (ties at the N-th value broken arbitrarily):

    binary purity   P_j = max_c #{i in F_j : c in y_i} / |F_j|
    weighted purity P_j = max_c sum_{i in F_j} a_ij [c in y_i] / sum_{i in F_j} a_ij

Labels are (N,) class ids or (N, C) multi-hot. A multi-label sample counts once for each of
its labels; a sample with no label (an all-false row, or a negative id) counts in the
denominator only. Latents that never fire get NaN. Streaming state is O(n C) for all firing
samples, O(n N_top) for the top-N variant.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sae.metrics._sparse import (
    CodesLike,
    as_sparse,
    firing_entries,
    row_slice,
    scatter_matmul_add_,
)
from sae.model import SparseCode


def n_classes_of(labels: torch.Tensor) -> int:
    """C for (N, C) multi-hot labels, or max id + 1 for (N,) class ids."""
    if labels.ndim == 2:
        return labels.shape[1]
    return int(labels.max()) + 1 if labels.numel() else 0


class PurityScores(NamedTuple):
    binary: torch.Tensor  # (n,) float64, NaN for latents that never fire
    weighted: torch.Tensor  # (n,) float64
    top_class: torch.Tensor | None = None  # (n,) int64: the class behind binary, -1 if dead


class PurityAccumulator:
    """Per-latent class counts over firing entries, streamed over (code, labels) chunks."""

    def __init__(self, n_latents: int, n_classes: int, device: torch.device | str = "cpu") -> None:
        f64 = {"dtype": torch.float64, "device": device}
        self.n_latents, self.n_classes = n_latents, n_classes
        self.count_nc = torch.zeros(n_latents, n_classes, **f64)
        self.mass_nc = torch.zeros(n_latents, n_classes, **f64)  # activation mass per class
        self.count_n = torch.zeros(n_latents, **f64)
        self.mass_n = torch.zeros(n_latents, **f64)

    @torch.no_grad()
    def update(self, code: SparseCode, labels_b: torch.Tensor) -> None:
        """Add a chunk: ``labels_b`` holds the chunk's labels, (B,) ids or (B, C) multi-hot."""
        entries = firing_entries(code)
        self.add_entries(entries.latents, entries.values, entries.rows, labels_b)

    @torch.no_grad()
    def add_entries(self, latents_e: torch.Tensor, values_e: torch.Tensor, rows_e: torch.Tensor,
                    labels_b: torch.Tensor) -> None:
        """Add firing entries (latent, activation, row of ``labels_b``)."""
        a = values_e.double()
        self.count_n.index_add_(0, latents_e, torch.ones_like(a))
        self.mass_n.index_add_(0, latents_e, a)
        if labels_b.ndim == 2:
            y_bc = labels_b.to(torch.float64)
            scatter_matmul_add_(self.count_nc, latents_e, rows_e, torch.ones_like(a), y_bc)
            scatter_matmul_add_(self.mass_nc, latents_e, rows_e, a, y_bc)
            return
        y_e = labels_b[rows_e]
        labelled = y_e >= 0  # an unlabelled sample is in the denominator only
        flat = latents_e[labelled] * self.n_classes + y_e[labelled]
        self.count_nc.view(-1).index_add_(0, flat, torch.ones_like(a[labelled]))
        self.mass_nc.view(-1).index_add_(0, flat, a[labelled])

    def result(self) -> PurityScores:
        live = self.count_n > 0
        nan = torch.full_like(self.count_n, float("nan"))
        if self.n_classes == 0:
            return PurityScores(torch.where(live, torch.zeros_like(nan), nan),
                                torch.where(live, torch.zeros_like(nan), nan))
        top_count, top_class = self.count_nc.max(dim=1)
        binary = top_count / self.count_n.clamp_min(1)
        weighted = self.mass_nc.amax(dim=1) / self.mass_n.where(self.mass_n > 0,
                                                                torch.ones_like(self.mass_n))
        return PurityScores(torch.where(live, binary, nan), torch.where(live, weighted, nan),
                            torch.where(live, top_class, torch.full_like(top_class, -1)))


class TopActivations:
    """The ``top_n`` largest activations of every latent over a stream, with their sample ids.

    Exact: each chunk's firing entries are merged with the kept ones by one sort on
    (latent, -value), O((n top_n + B k) log) per chunk, no dense (B, n) matrix.
    """

    def __init__(self, n_latents: int, top_n: int, device: torch.device | str = "cpu") -> None:
        if top_n <= 0:
            raise ValueError(f"top_n={top_n} must be positive")
        self.n_latents, self.top_n = n_latents, top_n
        self.values_nt = torch.zeros(n_latents, top_n, dtype=torch.float64, device=device)
        self.samples_nt = torch.full((n_latents, top_n), -1, dtype=torch.int64, device=device)
        self.n_seen = 0

    @torch.no_grad()
    def update(self, code: SparseCode, offset: int | None = None) -> None:
        """Add a chunk whose first row is sample ``offset`` of the split (default: running)."""
        offset = self.n_seen if offset is None else offset
        entries = firing_entries(code)
        kept = self.samples_nt >= 0
        lat_kept = torch.arange(self.n_latents, device=kept.device)[:, None].expand_as(kept)
        latents = torch.cat([lat_kept[kept], entries.latents])
        values = torch.cat([self.values_nt[kept], entries.values.double()])
        samples = torch.cat([self.samples_nt[kept], entries.rows + offset])
        by_value = torch.argsort(values, descending=True, stable=True)
        order = by_value[torch.argsort(latents[by_value], stable=True)]
        latents, values, samples = latents[order], values[order], samples[order]
        counts = torch.bincount(latents, minlength=self.n_latents)
        starts = counts.cumsum(0) - counts
        rank = torch.arange(latents.numel(), device=latents.device) - starts[latents]
        top = rank < self.top_n
        self.values_nt[latents[top], rank[top]] = values[top]
        self.samples_nt[latents[top], rank[top]] = samples[top]
        self.n_seen = max(self.n_seen, offset + code.values.shape[0])

    def entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latents, values, sample ids) of every kept activation, flat."""
        kept = self.samples_nt >= 0
        lat = torch.arange(self.n_latents, device=kept.device)[:, None].expand_as(kept)
        return lat[kept], self.values_nt[kept], self.samples_nt[kept]


def purity_of_top(top: TopActivations, labels: torch.Tensor, n_classes: int | None = None
                  ) -> PurityScores:
    """Purity restricted to each latent's top-N activations; ``labels`` of the whole split."""
    n_classes = n_classes_of(labels) if n_classes is None else n_classes
    acc = PurityAccumulator(top.n_latents, n_classes, top.values_nt.device)
    latents, values, samples = top.entries()
    labels = labels.to(top.values_nt.device)
    acc.add_entries(latents, values, samples, labels)
    return acc.result()


def class_purity(
    codes: CodesLike,
    labels: torch.Tensor,
    weighted: bool = False,
    top_n: int | None = None,
    n_latents: int | None = None,
    n_classes: int | None = None,
    chunk_size: int = 8192,
) -> torch.Tensor:
    """Per-latent class purity (n,), float64, NaN for latents that never fire.

    ``labels``: (N,) ids (negative = unlabelled) or (N, C) bool multi-hot. ``weighted`` uses
    activation mass instead of counts; ``top_n`` restricts each latent to its top-N activations.
    """
    code, n = as_sparse(codes, n_latents)
    n_classes = n_classes_of(labels) if n_classes is None else n_classes
    labels = labels.to(code.values.device)
    if top_n is not None:
        top = TopActivations(n, top_n, code.values.device)
        for start in range(0, code.values.shape[0], chunk_size):
            top.update(row_slice(code, start, start + chunk_size), offset=start)
        scores = purity_of_top(top, labels, n_classes)
    else:
        acc = PurityAccumulator(n, n_classes, code.values.device)
        for start in range(0, code.values.shape[0], chunk_size):
            acc.update(row_slice(code, start, start + chunk_size), labels[start:start + chunk_size])
        scores = acc.result()
    return scores.weighted if weighted else scores.binary
