"""Linear probing under activation truncation (METHOD.md s4), and the raw-embedding probe.

For each budget m, every code keeps only its m largest activations; a linear classifier is fit
on a probe-train split and scored on the evaluation split:

    single-label: multinomial logistic regression, score = accuracy
        loss = (1/N) sum_i CE(W^T f_i + b, y_i) + (weight_decay / 2) ||W||_F^2
    multi-label:  one-vs-rest logistic regressions (one sigmoid per class), score = mAP
        loss = (1/N) sum_i sum_c BCE(W_c^T f_i + b_c, y_ic) + (weight_decay / 2) ||W||_F^2
        mAP  = mean over classes with >= 1 positive in the evaluation split of the average
               precision (scikit-learn ``average_precision_score``)

Features f_i: a sparse code is read as an embedding bag (logits = sum over its kept entries of
a_ij W_j), so no dense (N, n) matrix exists; each latent is divided by the root mean square of
its nonzero train activations (scaling keeps zeros zero, so sparsity survives), and raw
embeddings are standardised per dimension with train statistics. Scaling conditions the
problem; the L2 penalty is on the scaled weights, as with scikit-learn's usual pipeline.

Optimiser: full-batch L-BFGS with a strong-Wolfe line search from W = 0, b = 0. The objective
is convex, so the result is the same for any seed; gradients are accumulated over row chunks,
so memory is one chunk of logits (this scales to ImageNet: 100k x 1000 classes per pass).
Samples without a label (id < 0 or an all-false multi-hot row) are left out of a
single-label probe; a multi-label probe keeps them as negatives for every class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from sae.metrics._probe_kernels import (
    binary_cross_entropy_and_grad_,
    block_columns_for,
    blocked_bag,
    columns_of,
    cross_entropy_and_grad_,
    transposed_bag,
)
from sae.metrics._sparse import CodesLike, as_sparse, firing_entries, truncate_top_m
from sae.metrics.purity import n_classes_of
from sae.model import SparseCode

DEFAULT_M_VALUES = (1, 2, 4, 8, 16, 32)
# The solver's fixed settings (the iteration count is the caller's ``max_iter``); part of the
# key of a stored raw-embedding probe (sae.evaluation.probe_store).
LBFGS_SETTINGS = {"lr": 1.0, "history_size": 20, "line_search_fn": "strong_wolfe",
                  "tolerance_grad": 1e-7, "tolerance_change": 1e-10}


@dataclass
class _Features:
    """Probe inputs: a dense (N, d) matrix or a sparse code over n features.

    ``fast``: the objective is fused (``_fused_objective``), sparse products run in cache-sized
    column blocks (``sae.metrics._probe_kernels``); False: torch's ``embedding_bag`` and
    ``cross_entropy`` with autograd, the previous path, kept as the tests' reference.
    """

    dense: torch.Tensor | None
    code: SparseCode | None
    n_features: int
    fast: bool = True
    _columns_by_start: dict = field(default_factory=dict, repr=False)

    @property
    def n_rows(self) -> int:
        return (self.dense if self.dense is not None else self.code.values).shape[0]

    def logits(self, start: int, stop: int, weight_fc: torch.Tensor, bias_c: torch.Tensor
               ) -> torch.Tensor:
        if self.dense is not None:
            return self.dense[start:stop] @ weight_fc + bias_c
        indices, values = self.code.indices[start:stop], self.code.values[start:stop]
        if not self.fast:
            return F.embedding_bag(indices, weight_fc, per_sample_weights=values,
                                   mode="sum") + bias_c
        return blocked_bag(indices, values, weight_fc, None,
                           block_columns_for(weight_fc.device)) + bias_c

    def add_weight_grad_(self, start: int, stop: int, grad_bc: torch.Tensor,
                         out_fc: torch.Tensor) -> None:
        """``out += features[start:stop]^T @ grad`` (the chunk's share of dLoss/dW)."""
        if self.dense is not None:
            out_fc.addmm_(self.dense[start:stop].T, grad_bc)
            return
        columns = self._columns_by_start.get(start)
        if columns is None:  # the chunks of a fit are the same at every L-BFGS evaluation
            columns = columns_of(self.code.indices[start:stop], self.code.values[start:stop],
                                 self.n_features)
            self._columns_by_start[start] = columns
        out_fc += transposed_bag(columns, grad_bc, block_columns_for(grad_bc.device))

    def rows(self, keep: torch.Tensor) -> _Features:
        if self.dense is not None:
            return _Features(self.dense[keep], None, self.n_features, self.fast)
        return _Features(None, SparseCode(self.code.values[keep], self.code.indices[keep]),
                         self.n_features, self.fast)


def _sparse_scale(code: SparseCode, n_latents: int) -> torch.Tensor:
    """(n,) 1 / RMS of each latent's nonzero activations (1 for latents that never fire)."""
    entries = firing_entries(code)
    sum_sq = torch.zeros(n_latents, dtype=torch.float64, device=code.values.device)
    sum_sq.index_add_(0, entries.latents, entries.values.double().square())
    count = torch.bincount(entries.latents, minlength=n_latents).double()
    rms = (sum_sq / count.clamp_min(1)).sqrt()
    return torch.where(rms > 0, 1.0 / rms, torch.ones_like(rms)).float()


def _scaled_sparse(code: SparseCode, scale_n: torch.Tensor) -> SparseCode:
    return SparseCode(code.values.float() * scale_n[code.indices], code.indices)


def _labelled_rows(y: torch.Tensor) -> torch.Tensor:
    return y >= 0 if y.ndim == 1 else torch.ones(y.shape[0], dtype=torch.bool, device=y.device)


def _fit(features: _Features, y: torch.Tensor, n_classes: int, weight_decay: float,
         max_iter: int, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-batch L-BFGS on the regularised loss of the module docstring; returns (W, b)."""
    device = y.device
    weight_fc = torch.zeros(features.n_features, n_classes, device=device, requires_grad=True)
    bias_c = torch.zeros(n_classes, device=device, requires_grad=True)
    targets = y.float() if y.ndim == 2 else y
    optimizer = torch.optim.LBFGS([weight_fc, bias_c], max_iter=max_iter, **LBFGS_SETTINGS)
    objective = _fused_objective if features.fast else _autograd_objective

    def closure() -> torch.Tensor:
        return objective(features, targets, weight_fc, bias_c, weight_decay, chunk_size)

    with torch.enable_grad():
        optimizer.step(closure)
    return weight_fc.detach(), bias_c.detach()


def _autograd_objective(features: _Features, targets: torch.Tensor, weight_fc: torch.Tensor,
                        bias_c: torch.Tensor, weight_decay: float, chunk_size: int
                        ) -> torch.Tensor:
    """The loss, its gradient left on ``.grad`` by autograd (the reference formulation)."""
    weight_fc.grad = bias_c.grad = None
    n_rows = features.n_rows
    total = 0.0
    for start in range(0, n_rows, chunk_size):
        stop = min(start + chunk_size, n_rows)
        logits = features.logits(start, stop, weight_fc, bias_c)
        if targets.ndim == 2:
            loss = F.binary_cross_entropy_with_logits(logits, targets[start:stop],
                                                      reduction="sum")
        else:
            loss = F.cross_entropy(logits, targets[start:stop], reduction="sum")
        (loss / n_rows).backward()  # the gradient of the full-batch mean, one chunk at a time
        total += float(loss.detach()) / n_rows
    penalty = 0.5 * weight_decay * weight_fc.square().sum()
    penalty.backward()
    return torch.tensor(total + float(penalty.detach()))


@torch.no_grad()
def _fused_objective(features: _Features, targets: torch.Tensor, weight_fc: torch.Tensor,
                     bias_c: torch.Tensor, weight_decay: float, chunk_size: int) -> torch.Tensor:
    """The same loss and gradient without autograd: per chunk the logits, overwritten in place
    by dLoss/dlogits, then W's share through the transposed product."""
    n_rows = features.n_rows
    grad_fc, grad_c = torch.zeros_like(weight_fc), torch.zeros_like(bias_c)
    loss_and_grad_ = (binary_cross_entropy_and_grad_ if targets.ndim == 2
                      else cross_entropy_and_grad_)
    total = 0.0
    for start in range(0, n_rows, chunk_size):
        stop = min(start + chunk_size, n_rows)
        grad_bc = features.logits(start, stop, weight_fc, bias_c)
        total += loss_and_grad_(grad_bc, targets[start:stop])
        features.add_weight_grad_(start, stop, grad_bc, grad_fc)
        grad_c += grad_bc.sum(dim=0)
    weight_fc.grad = grad_fc.div_(n_rows).add_(weight_fc, alpha=weight_decay)
    bias_c.grad = grad_c.div_(n_rows)
    return torch.tensor(total / n_rows + 0.5 * weight_decay * float(weight_fc.square().sum()))


@torch.no_grad()
def _score(features: _Features, y: torch.Tensor, weight_fc: torch.Tensor, bias_c: torch.Tensor,
           chunk_size: int) -> float:
    logits = torch.cat([features.logits(s, min(s + chunk_size, features.n_rows), weight_fc, bias_c)
                        for s in range(0, features.n_rows, chunk_size)])
    if y.ndim == 1:
        return float((logits.argmax(dim=1) == y).double().mean()) if y.numel() else float("nan")
    return mean_average_precision(y, logits)


def mean_average_precision(y_nc: torch.Tensor, scores_nc: torch.Tensor) -> float:
    """Mean over classes with at least one positive of scikit-learn's average precision."""
    from sklearn.metrics import average_precision_score

    y = y_nc.bool().cpu().numpy()
    scores = scores_nc.float().cpu().numpy()
    has_positive = y.any(axis=0)
    if not has_positive.any():
        return float("nan")
    per_class = [average_precision_score(y[:, c], scores[:, c])
                 for c in np.flatnonzero(has_positive)]
    return float(np.mean(per_class))


def probe_metric(y: torch.Tensor) -> str:
    return "mAP" if y.ndim == 2 else "accuracy"


def _fit_and_score(train: _Features, y_train: torch.Tensor, evaluation: _Features,
                   y_eval: torch.Tensor, n_classes: int, weight_decay: float, max_iter: int,
                   chunk_size: int) -> float:
    keep_train, keep_eval = _labelled_rows(y_train), _labelled_rows(y_eval)
    train, y_train = train.rows(keep_train), y_train[keep_train]
    evaluation, y_eval = evaluation.rows(keep_eval), y_eval[keep_eval]
    weight_fc, bias_c = _fit(train, y_train, n_classes, weight_decay, max_iter, chunk_size)
    return _score(evaluation, y_eval, weight_fc, bias_c, chunk_size)


def _resolve(y_train: torch.Tensor, y_eval: torch.Tensor, n_classes: int | None,
             device: torch.device | str | None, reference: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, int, torch.device]:
    device = torch.device(device) if device is not None else reference.device
    if n_classes is None:
        n_classes = max(n_classes_of(y_train), n_classes_of(y_eval))
    return y_train.to(device), y_eval.to(device), n_classes, device


def truncated_probe(
    codes_train: CodesLike,
    y_train: torch.Tensor,
    codes_eval: CodesLike,
    y_eval: torch.Tensor,
    m_values: Sequence[int] = DEFAULT_M_VALUES,
    n_latents: int | None = None,
    n_classes: int | None = None,
    weight_decay: float = 1e-4,
    max_iter: int = 100,
    chunk_size: int = 8192,
    device: torch.device | str | None = None,
    fast: bool = True,
) -> dict[int, float]:
    """{m: accuracy (or mAP)} of a linear probe on codes truncated to their top-m activations.

    Codes: dense (N, n) or sparse (values, indices) with ``n_latents``. Labels: (N,) ids or
    (N, C) multi-hot. An m at or above the code width keeps the whole code. ``fast=False``
    runs the previous formulation (autograd over torch's embedding_bag): the reference.
    """
    code_train, n = as_sparse(codes_train, n_latents)
    code_eval, _ = as_sparse(codes_eval, n)
    y_train, y_eval, n_classes, device = _resolve(y_train, y_eval, n_classes, device,
                                                  code_train.values)
    code_train = SparseCode(*(t.to(device) for t in code_train))
    code_eval = SparseCode(*(t.to(device) for t in code_eval))
    results: dict[int, float] = {}
    for m in sorted(set(m_values)):
        train_m, eval_m = truncate_top_m(code_train, m), truncate_top_m(code_eval, m)
        scale_n = _sparse_scale(train_m, n)
        train_m, eval_m = _scaled_sparse(train_m, scale_n), _scaled_sparse(eval_m, scale_n)
        width = n
        if fast:
            train_m, eval_m, width = _compact_latents(train_m, eval_m, n)
        results[m] = _fit_and_score(
            _Features(None, train_m, width, fast), y_train,
            _Features(None, eval_m, width, fast), y_eval,
            n_classes, weight_decay, max_iter, chunk_size)
    return results


def _compact_latents(train: SparseCode, evaluation: SparseCode, n_latents: int
                     ) -> tuple[SparseCode, SparseCode, int]:
    """Renumber the A latents that fire in the probe-train codes 0..A-1, and every other one A.

    Exact: a latent that never fires in training gets a zero gradient at W = 0, and L-BFGS from
    zero moves only within the span of past gradients, so its weights stay 0 (row A, a zero
    row, stands for all of them). The solver's vectors shrink from n to A + 1 rows.
    """
    fires_n = torch.zeros(n_latents, dtype=torch.bool, device=train.indices.device)
    fires_n[train.indices[train.values > 0]] = True
    n_active = int(fires_n.sum())
    lookup_n = torch.full((n_latents,), n_active, dtype=torch.int64, device=fires_n.device)
    lookup_n[fires_n] = torch.arange(n_active, device=fires_n.device)
    return (SparseCode(train.values, lookup_n[train.indices]),
            SparseCode(evaluation.values, lookup_n[evaluation.indices]), n_active + 1)


def linear_probe(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_eval: torch.Tensor,
    y_eval: torch.Tensor,
    n_classes: int | None = None,
    weight_decay: float = 1e-4,
    max_iter: int = 100,
    chunk_size: int = 8192,
    device: torch.device | str | None = None,
    fast: bool = True,
) -> float:
    """Accuracy (or mAP) of the same probe on raw embeddings: the reference line of the code probes (codes can beat it).
    ``fast=False``: the loss and gradient through autograd (the reference)."""
    y_train, y_eval, n_classes, device = _resolve(y_train, y_eval, n_classes, device, x_train)
    x_train, x_eval = x_train.to(device, torch.float32), x_eval.to(device, torch.float32)
    mean_d = x_train.mean(dim=0)
    std_d = x_train.std(dim=0, unbiased=False)
    std_d = torch.where(std_d > 0, std_d, torch.ones_like(std_d))
    return _fit_and_score(
        _Features((x_train - mean_d) / std_d, None, x_train.shape[1], fast), y_train,
        _Features((x_eval - mean_d) / std_d, None, x_train.shape[1], fast), y_eval,
        n_classes, weight_decay, max_iter, chunk_size)
