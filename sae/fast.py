"""The training objective of ``sae.losses.training_loss`` at close to the cost of one matrix product.

Same values and gradients (float tolerance; tests/test_fast.py), same signature (plus an
optional ``dead_bound``), same return contract. The cost floor of a step is the encoder product
``pre = (x - b_pre) W_enc^T + b_enc``: B x d x n multiply-adds (B = 1024, d = 768, n = 12288:
9.7 G). Autograd through the reference spends three such products (the forward,
grad W_enc = G^T X and grad X = G W_enc) plus dense (B, n) temporaries for Top-k, the masks and
AuxK's selection over all n columns. Here:

* Top-k by group maxima (``topk_by_chunks``): exact; one vectorised max over column groups
  reads the (B, n) matrix once, and the selections see 576 entries per row, not 12288.
* Decoder, forward and backward, over the k selected atoms only: x_hat is an embedding-bag of
  k rows (B k d = 25 M multiply-adds, 0.3 % of the product); grad W_dec is the same
  embedding-bag run "transposed", over the support grouped by latent (``_LatentBags``); the
  gradient of the k values is a product sampled at the support only.
* Encoder backward: grad X is never formed (x carries no gradient; b_pre's share is the
  n-vector grad_b_enc times W_enc: n x d). Without a regularizer the gradient of ``pre`` has
  k (+ AuxK's) entries per row, so grad W_enc is again a transposed embedding-bag: B k d, not
  B n d. With a regularizer it is dense on the penalised columns: one product G^T X, so two
  products in all is the floor of a regularized step.
* Regularizers: z = ReLU(pre) on the mask is one clamp (upper bound 0 off the mask), kept as
  the only (B, n) temporary of the forward; the backward builds G from it (in place for the
  off-support L1), writes the support's entries into it, and multiplies. With the mask, only
  the batch-active columns are gathered when they are few: a host bound (B k <= n / 2), or on
  the CPU the exact count (<= 0.8 n; host memory, nothing to wait for).
* AuxK on the dead columns only: at most C columns (C >= the dead count, a host integer) are
  gathered, so the AuxK decode and its gradients are dense B x C x d products instead of
  B x aux_k embedding-bag rows; C = 0 (no dead latent) costs nothing.
* No host-device synchronisation: every decision is taken from shapes, the config and host
  integers. On CUDA the dead-count bound is the caller's (``dead_bound``, from
  ``dead_count_bound`` at the trainer's log step); without it AuxK looks at all n columns
  (exact, three extra products). On the CPU the counts are read directly.

Fallback to the reference ``training_loss``: an input that itself requires a gradient. Tied
weights, LayerNorm, autocast (the dense products in the autocast dtype, the rest in float32)
and ``k = n`` run on the fast path. ``use_compiled_kernels`` optionally fuses the
regularizers' elementwise passes with ``torch.compile``.

The returned ``ForwardOutput`` holds detached tensors (x_hat, pre, code): the graph lives in
the returned ``LossParts`` only.

On CUDA under 16-bit autocast the k-sparse parts switch to products with the dense (B, n) code
(``set_formulation``; same values): tensor cores beat PyTorch's gather kernels there.

Measured (``python -m sae.bench step``, times relative to one encoder product in the same
process). 2 shared CPU cores, default size, float32: no regularizer 1.55-1.8x (reference
5.7-6.0x); masked off-support L1 or L1/L2 2.9-3.7x (reference 6.0-7.1x). The regularized step's
floor here is two products (the forward and G^T X, ~2.2) plus Adam (~0.16). With bf16 autocast
on this AMX CPU the fast step is 5.1x (none) and 3.4x (L1/L2 + mask) faster than the float32
reference. One H200, bf16, B 4096, d 1024, n 8192, k 64: 2.7 ms (none) to 4.2 ms (L1/L2 + mask)
per eager step, launch-bound; replayed as a CUDA graph, 4.3 ms a step with 85 % of the latents
dead (AuxK over all columns).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from sae.losses import LossParts, training_loss
from sae.model import ForwardOutput, InputStats, SparseCode, TopKSAE

# The floors of the reference (sae.losses.nmse, sae.regularizers.l1_l2_ratio).
VARIANCE_FLOOR = 1e-12
L2_FLOOR = 1e-15  # sqrt of the reference's floor 1e-30 on the squared norm
REGULARIZERS = ("none", "offsupport_l1", "l1l2")


# -- host-side plan ---------------------------------------------------------------------------
@dataclass(frozen=True)
class StepPlan:
    """Every decision of one step, taken on the host from shapes, config and host integers."""

    k: int
    regularizer: str
    mask: bool
    strength: float
    eps: float
    aux_alpha: float
    aux_k: int
    aux_cols: int  # C: dead-first columns AuxK looks at (an upper bound on the dead count); 0 = none
    active_cols: int  # host bound on the batch-active count: n, or B k when B k <= n / 2
    compute_dtype: torch.dtype | None  # dtype of the two dense products; None = float32
    dense_decoder: bool  # the k-sparse parts as products with the dense (B, n) code
    chunked_topk: bool  # Top-k by group maxima (topk_by_chunks) rather than torch.topk


# -- formulations by device --------------------------------------------------------------------
# The k-sparse parts (decoding, grad W_dec, the support's dot products, grad W_enc without a
# regularizer) have two exact formulations: "sparse" gathers and embedding-bags over the
# support (B k d work, bandwidth-bound) and "dense" products with the (B, n) code (B n d work,
# on tensor cores). On the CPU sparse wins by n / k. On CUDA under 16-bit autocast the tensor
# cores win: on an H200 at B 4096, d 1024, n 8192, k 64, PyTorch's embedding-bag and gather
# kernels took ~2.9 ms per step where a bf16 product takes ~0.1 ms. Top-k by group maxima
# saves the CPU's slow selection and was faster than CUDA's radix select too. "auto" picks
# per device; the settings exist for tests and measurements (sae.bench step --decoder/--topk).
DECODER_MODES = ("auto", "sparse", "dense")
TOPK_MODES = ("auto", "chunks", "plain")
_formulation = {"decoder": "auto", "topk": "auto"}


def set_formulation(decoder: str = "auto", topk: str = "auto") -> None:
    """Force a formulation of the k-sparse parts and of Top-k ("auto": by device)."""
    if decoder not in DECODER_MODES or topk not in TOPK_MODES:
        raise ValueError(f"decoder must be one of {DECODER_MODES} and topk one of {TOPK_MODES}"
                         f", got {decoder!r} and {topk!r}")
    _formulation.update(decoder=decoder, topk=topk)


def resolved_formulation(device: str, compute_dtype: torch.dtype | None) -> dict[str, str]:
    """What a step on ``device`` ("cpu", "cuda") under ``compute_dtype`` (autocast's, or None)
    runs now: {"decoder": "sparse" | "dense", "topk": "chunks" | "plain"}."""
    return {"decoder": "dense" if _dense_decoder(device, compute_dtype) else "sparse",
            "topk": "chunks" if _chunked_topk(device) else "plain"}


def _dense_decoder(device: str, compute_dtype: torch.dtype | None) -> bool:
    if _formulation["decoder"] != "auto":
        return _formulation["decoder"] == "dense"
    tensor_cores = compute_dtype in (torch.bfloat16, torch.float16) or (
        torch.get_float32_matmul_precision() != "highest")
    return device == "cuda" and tensor_cores


def _chunked_topk(device: str) -> bool:
    if _formulation["topk"] != "auto":
        return _formulation["topk"] == "chunks"
    return True  # measured faster on CUDA too (H200, bf16: 2.3 ms against 3.0 ms a step)


def make_plan(
    model: TopKSAE, x: torch.Tensor, *, regularizer: str, strength: float, mask: bool,
    eps: float, dead: torch.Tensor, aux_alpha: float, aux_k: int, dead_bound: int | None,
) -> StepPlan:
    if regularizer not in REGULARIZERS:
        raise ValueError(f"unknown regularizer {regularizer!r}; use none, offsupport_l1 or l1l2")
    batch, n = x.shape[0], model.n_latents
    aux_cols = _aux_columns(dead, dead_bound, n) if aux_alpha > 0 else 0
    # A holds at most B k distinct units: a bound known without looking at the data. Gathering
    # the columns pays off when it halves the work (B k <= n / 2); typical sizes are dense.
    gather = mask and regularizer != "none" and batch * model.k <= n // 2
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    compute_dtype = torch.get_autocast_dtype(device) if autocast else None
    return StepPlan(
        k=model.k, regularizer=regularizer, mask=mask, strength=float(strength), eps=float(eps),
        aux_alpha=float(aux_alpha), aux_k=min(aux_k, n), aux_cols=aux_cols,
        active_cols=batch * model.k if gather else n,
        compute_dtype=compute_dtype, dense_decoder=_dense_decoder(device, compute_dtype),
        chunked_topk=_chunked_topk(device),
    )


def _aux_columns(dead: torch.Tensor, dead_bound: int | None, n: int) -> int:
    """C >= the dead count, from host knowledge only (0: AuxK is an exact zero, skip it)."""
    if dead_bound is not None:
        return max(0, min(int(dead_bound), n))
    if dead.device.type == "cpu":  # the mask lives in host memory: counting waits for nothing
        return int(dead.sum())
    return n


def dead_count_bound(samples_since_fired: torch.Tensor, window: int, horizon_samples: int) -> int:
    """Upper bound on the dead count (``samples_since_fired >= window``) for the next
    ``horizon_samples`` training samples: counters grow by at most that much and only ever
    reset. One host read-out, to be taken where the trainer synchronises anyway (its log step),
    then passed as ``dead_bound`` to every step until the next one."""
    return int((samples_since_fired + horizon_samples >= window).sum())


# -- exact Top-k by group maxima --------------------------------------------------------------
def topk_by_chunks(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row (values, indices), exact, via maxima of column groups.

    Split the w columns into g groups of c (group r = columns r, r + g, r + 2g, ...). Each of
    the row's top k values lies in one of the k groups with the largest maxima (a group outside
    them has k groups above it, each holding a larger value). So: one max over the c strided
    slices (a vectorised elementwise max, one read of the matrix), then Top-k of the g group
    maxima and Top-k of the k c candidates, each again by groups while that halves the work.
    A CPU selection costs ~6 ns per entry, the max ~0.2 ns: for n = 12288, k = 32 the
    selections see 192 + 128 + 128 + 128 entries per row instead of 12288.
    Ties may pick other indices with the same values.
    """
    batch, width = pre.shape
    c = _group_size(width, k)
    if c == 1:
        return pre.topk(k, dim=1, sorted=False)
    groups = width // c
    group_max_bg = pre.view(batch, c, groups).amax(dim=1)  # (B, g)
    top_groups_bk = topk_by_chunks(group_max_bg, k)[1]  # (B, k)
    offsets_c = torch.arange(c, device=pre.device) * groups  # (c,)
    candidates = (top_groups_bk.unsqueeze(2) + offsets_c).view(batch, k * c)  # (B, k c)
    values, where = topk_by_chunks(pre.gather(1, candidates), k)
    return values, candidates.gather(1, where)


def _group_size(width: int, k: int) -> int:
    """Group size c minimising g + k c (the two selection widths) among those that at least
    halve w; 1 = a plain Top-k is as cheap."""
    best, best_cost = 1, width
    for c in (4, 8, 16, 32, 64):
        if width % c == 0 and width // c >= 2 * k:
            cost = width // c + k * c
            if cost * 2 <= width and cost < best_cost:
                best, best_cost = c, cost
    return best


# -- sparse products ---------------------------------------------------------------------------
class _LatentBags(NamedTuple):
    """The B k support entries grouped by latent: latent j's entries are order[offsets[j]:
    offsets[j+1]], their samples rows[...]. With it, sum_{(i,j) in S} w_ij T_i -> row j (a
    transposed sparse product) is one embedding-bag over the sample table T."""

    order: torch.Tensor  # (B k,) permutation of the flattened support, sorted by latent
    rows: torch.Tensor  # (B k,) sample of each sorted entry
    offsets: torch.Tensor  # (n + 1,)

    @staticmethod
    def build(indices_bk: torch.Tensor, n: int) -> _LatentBags:
        k = indices_bk.shape[1]
        latents_sorted, order = indices_bk.reshape(-1).sort()
        boundaries = torch.arange(n + 1, device=indices_bk.device)
        offsets = torch.searchsorted(latents_sorted, boundaries)
        return _LatentBags(order, order // k, offsets)

    def scatter_rows(self, weights_bk: torch.Tensor, table_bd: torch.Tensor) -> torch.Tensor:
        """(n, d): row j = sum over the entries (i, j) of weights[i, .] * table[i]."""
        return F.embedding_bag(self.rows, table_bd, self.offsets, mode="sum",
                               per_sample_weights=weights_bk.reshape(-1)[self.order],
                               include_last_offset=True)


def _support_pattern(indices_bk: torch.Tensor, n: int) -> torch.Tensor:
    """The support as a (B, n) CSR pattern (k sorted entries per row)."""
    batch, k = indices_bk.shape
    crow = torch.arange(0, batch * k + 1, k, device=indices_bk.device)
    values = torch.zeros(batch * k, device=indices_bk.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, indices_bk.reshape(-1), values, (batch, n),
                                       check_invariants=False)


def _support_dots(grad_bd: torch.Tensor, weight_nd: torch.Tensor, indices_bk: torch.Tensor
                  ) -> torch.Tensor:
    """(B, k): <grad_i, weight[indices_ik]>, a product sampled at the support only (B k d).

    CPU: a sampled dense-dense product over the support's CSR pattern. Elsewhere: gathered
    atoms times the gradient, in batch chunks whose gathered atoms stay under ~256 MB.
    """
    if grad_bd.device.type != "cpu":
        return _support_dots_gathered(grad_bd, weight_nd, indices_bk)
    pattern = _support_pattern(indices_bk, weight_nd.shape[0])
    dots = torch.sparse.sampled_addmm(pattern, grad_bd, weight_nd.t(), beta=0.0)
    return dots.values().view_as(indices_bk)


def _support_dots_gathered(grad_bd: torch.Tensor, weight_nd: torch.Tensor,
                           indices_bk: torch.Tensor, max_elements: int = 64 << 20
                           ) -> torch.Tensor:
    batch, k = indices_bk.shape
    rows = max(1, max_elements // (k * weight_nd.shape[1]))
    return torch.cat([
        torch.bmm(F.embedding(indices_bk[i:i + rows], weight_nd),
                  grad_bd[i:i + rows].unsqueeze(2)).squeeze(2)
        for i in range(0, batch, rows)])


def _dense_product(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """a @ b in ``dtype`` (autocast's), returned in float32."""
    if dtype is None:
        return a @ b
    return (a.to(dtype) @ b.to(dtype)).float()


# -- forward pieces ----------------------------------------------------------------------------
class _AuxState(NamedTuple):
    cols: torch.Tensor  # (C,) dead-first latent ids
    weight_cd: torch.Tensor  # (C, d) their decoder atoms
    code_bc: torch.Tensor  # (B, C) AuxK code on those columns (0 off its top aux_k)
    error_bd: torch.Tensor  # (B, d) residual_hat - residual
    scale: torch.Tensor  # () 2 * any_dead / variance(residual)


def _auxk_forward(plan: StepPlan, pre_bn: torch.Tensor, dead: torch.Tensor, W_dec: torch.Tensor,
                  residual_bd: torch.Tensor) -> tuple[torch.Tensor, _AuxState]:
    """Gao et al. AuxK restricted to C dead-first columns: equal to the reference's top-aux_k
    over all columns (live ones at -inf) whenever C >= the dead count."""
    C = plan.aux_cols
    cols = dead.to(pre_bn.dtype).topk(C, sorted=False).indices  # dead ones first
    pre_bc = pre_bn.index_select(1, cols).masked_fill_(~dead[cols], float("-inf"))
    if C > plan.aux_k:
        top = pre_bc.topk(plan.aux_k, dim=1, sorted=False)
        code_bc = torch.zeros_like(pre_bc).scatter_(1, top.indices, F.relu(top.values))
    else:  # every dead column is in every row's top aux_k
        code_bc = pre_bc.relu_()
    weight_cd = W_dec.index_select(0, cols)
    error_bd = _dense_product(code_bc, weight_cd, plan.compute_dtype) - residual_bd
    variance = _variance(residual_bd)
    any_dead = dead.any().to(pre_bn.dtype)
    loss = error_bd.square().sum() / variance * any_dead
    return loss, _AuxState(cols, weight_cd, code_bc, error_bd, 2 * any_dead / variance)


def _variance(x_bd: torch.Tensor) -> torch.Tensor:
    return (x_bd - x_bd.mean(dim=0, keepdim=True)).square().sum().clamp_min(VARIANCE_FLOOR)


# -- the regularizers' elementwise passes (eager; ``use_compiled_kernels`` fuses them) ---------
# z = ReLU(pre) on the penalised columns is one clamp: lower 0, upper +inf on M and 0 off it,
# so the mask costs no (B, n) pass of its own. Each kernel is one or two passes over (B, m).
def _masked_relu(pre_bm: torch.Tensor, upper_m: torch.Tensor | None) -> torch.Tensor:
    if upper_m is None:
        return F.relu(pre_bm)
    return torch.clamp(pre_bm, min=torch.zeros_like(upper_m), max=upper_m)


def _l1l2_forward(pre_bm: torch.Tensor, upper_m: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z, ||z_i||_1, ||z_i||_2 floored as the reference: sqrt(max(sum z^2, 1e-30)))."""
    z_bm = _masked_relu(pre_bm, upper_m)
    return z_bm, z_bm.sum(dim=1), torch.linalg.vector_norm(z_bm, dim=1).clamp_min(L2_FLOOR)


def _l1l2_grad(z_bm: torch.Tensor, c1_b1: torch.Tensor, c2_b1: torch.Tensor) -> torch.Tensor:
    """G = c1 [z > 0] - c2 z (z [z > 0] = z), overwriting nothing the caller still needs."""
    return torch.sign(z_bm).mul_(c1_b1).addcmul_(z_bm, c2_b1, value=-1.0)


def _offsupport_forward(pre_bm: torch.Tensor, upper_m: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    z_bm = _masked_relu(pre_bm, upper_m)
    return z_bm, z_bm.sum()


def _offsupport_grad(z_bm: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """G = scale [z > 0], in place in the forward's buffer (z is not needed afterwards)."""
    return z_bm.sign_().mul_(scale)


class _Kernels:
    """The four kernels above, swapped for ``torch.compile``d versions on request."""

    l1l2_forward = staticmethod(_l1l2_forward)
    l1l2_grad = staticmethod(_l1l2_grad)
    offsupport_forward = staticmethod(_offsupport_forward)
    offsupport_grad = staticmethod(_offsupport_grad)


def _l1l2_forward_fusable(pre_bm, upper_m):
    z_bm = F.relu(pre_bm) if upper_m is None else torch.clamp(
        pre_bm, min=torch.zeros_like(upper_m), max=upper_m)
    return z_bm, z_bm.sum(dim=1), z_bm.square().sum(dim=1).clamp_min(L2_FLOOR**2).sqrt()


def _l1l2_grad_fusable(z_bm, c1_b1, c2_b1):
    return torch.where(z_bm > 0, c1_b1 - c2_b1 * z_bm, 0.0)


def _offsupport_grad_fusable(z_bm, scale):
    return torch.where(z_bm > 0, scale, 0.0)


def use_compiled_kernels(enabled: bool = True) -> None:
    """Fuse the regularizers' elementwise passes with ``torch.compile`` (one pass each instead
    of two or three; measured 0 to 0.15 of the encoder product saved per step on 2 CPU cores at
    the default size, nothing on an H200). The first step of each shape pays the compilation
    (tens of seconds)."""
    if not enabled:
        _Kernels.l1l2_forward = staticmethod(_l1l2_forward)
        _Kernels.l1l2_grad = staticmethod(_l1l2_grad)
        _Kernels.offsupport_forward = staticmethod(_offsupport_forward)
        _Kernels.offsupport_grad = staticmethod(_offsupport_grad)
        return
    _Kernels.l1l2_forward = staticmethod(torch.compile(_l1l2_forward_fusable))
    _Kernels.l1l2_grad = staticmethod(torch.compile(_l1l2_grad_fusable))
    _Kernels.offsupport_forward = staticmethod(torch.compile(_offsupport_forward))
    _Kernels.offsupport_grad = staticmethod(torch.compile(_offsupport_grad_fusable))


class _PenaltyState(NamedTuple):
    z_bm: torch.Tensor  # (B, m) ReLU(pre) on the penalised columns (0 off the mask)
    support_bk: torch.Tensor  # (B, k) support positions among those columns
    cols: torch.Tensor | None  # (m,) latent ids of the columns; None = all n
    l1: torch.Tensor | None  # (B,) l1l2 only
    l2: torch.Tensor | None  # (B,) l1l2 only, floored


GATHER_FRACTION = 0.8  # gather the active columns when they are at most this share of n


def active_capacity(plan: StepPlan, active_n: torch.Tensor) -> int | None:
    """How many columns the masked penalty gathers (>= |A|), or None for all n columns.

    On the CPU the batch-active count is read directly (host memory: nothing to wait for);
    elsewhere the host bound B k of the plan stands in for it. Gathering costs one pass over
    the gathered columns and saves the product and the passes over the others."""
    n = active_n.shape[0]
    capacity = plan.active_cols
    if active_n.device.type == "cpu":
        capacity = int(active_n.sum())
    return capacity if capacity <= GATHER_FRACTION * n else None


def _penalty_columns(plan: StepPlan, pre_bn: torch.Tensor, support_bk: torch.Tensor
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


def _penalty_forward(plan: StepPlan, pre_bn: torch.Tensor, code: SparseCode
                     ) -> tuple[torch.Tensor, _PenaltyState]:
    pre_bm, cols, upper_m, support_bk = _penalty_columns(plan, pre_bn, code.indices)
    batch = pre_bn.shape[0]
    if plan.regularizer == "offsupport_l1":
        # R = (sum of z over M - sum of the Top-k values) / B: S_i lies inside M.
        z_bm, z_sum = _Kernels.offsupport_forward(pre_bm, upper_m)
        value = (z_sum - code.values.sum()) / batch
        return value, _PenaltyState(z_bm, support_bk, cols, None, None)
    z_bm, l1, l2 = _Kernels.l1l2_forward(pre_bm, upper_m)
    value = (l1 / (l2 + plan.eps)).mean()
    return value, _PenaltyState(z_bm, support_bk, cols, l1, l2)


class _Saved(NamedTuple):
    x_centered_bd: torch.Tensor  # (B, d) x_in - b_pre: the encoder's input
    code: SparseCode
    error_bd: torch.Tensor  # (B, d) x_hat - x
    variance: torch.Tensor  # () batch variance of x
    std_b1: torch.Tensor | None  # LayerNorm scale, None without LayerNorm
    aux: _AuxState | None
    penalty: _PenaltyState | None
    code_bn: torch.Tensor | None  # (B, n) the code, dense (dense_decoder only)


def _forward(plan: StepPlan, x: torch.Tensor, x_in: torch.Tensor, stats: InputStats | None,
             dead: torch.Tensor, W_enc: torch.Tensor, W_dec: torch.Tensor, b_enc: torch.Tensor,
             b_pre: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], _Saved]:
    x_centered = x_in - b_pre
    if plan.compute_dtype is None:  # the floor: B x d x n
        pre = torch.addmm(b_enc, x_centered, W_enc.t())
    else:
        pre = _dense_product(x_centered, W_enc.t(), plan.compute_dtype).add_(b_enc)
    if plan.chunked_topk:
        values, indices = topk_by_chunks(pre, plan.k)
    else:
        values, indices = pre.topk(plan.k, dim=1, sorted=False)
    indices, order = indices.sort(dim=1)  # sorted rows: a valid CSR pattern for the backward
    code = SparseCode(F.relu(values.gather(1, order)), indices)
    code_bn = None
    if plan.dense_decoder:
        code_bn = torch.zeros_like(pre).scatter_(1, indices, code.values)
        x_hat = _dense_product(code_bn, W_dec, plan.compute_dtype) + b_pre
    else:
        x_hat = F.embedding_bag(indices, W_dec, per_sample_weights=code.values,
                                mode="sum") + b_pre
    if stats is not None:
        x_hat = x_hat * stats.std + stats.mean
    error = x_hat - x
    variance = _variance(x)
    nmse = error.square().sum() / variance
    auxk, aux = x.new_zeros(()), None
    if plan.aux_cols > 0:
        auxk, aux = _auxk_forward(plan, pre, dead, W_dec, -error)
    penalty, pen = x.new_zeros(()), None
    if plan.regularizer != "none":
        penalty, pen = _penalty_forward(plan, pre, code)
    total = nmse + plan.aux_alpha * auxk + plan.strength * penalty
    saved = _Saved(x_centered, code, error, variance, None if stats is None else stats.std,
                   aux, pen, code_bn)
    return (total, nmse, auxk, penalty, x_hat, pre, code.values, indices), saved


# -- backward pieces ---------------------------------------------------------------------------
def _weight(g_total: torch.Tensor | None, coefficient: float, g_part: torch.Tensor | None
            ) -> torch.Tensor | None:
    """d(loss)/d(part) as a device scalar; None when it is zero for a host-known reason."""
    terms = []
    if g_total is not None and coefficient != 0:
        terms.append(g_total * coefficient)
    if g_part is not None:
        terms.append(g_part)
    return sum(terms[1:], terms[0]) if terms else None


def _penalty_grad(plan: StepPlan, pen: _PenaltyState, w_pen: torch.Tensor, batch: int
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """G = w dR/dpre on the penalised columns, as (H, c): G = c H with c a per-row scale
    (B, 1), or (G, None). Factoring c out of the (B, m) pass and into the (B, d) input of the
    product (G^T X = H^T (c X)) saves one pass over (B, m); taken where c is read for free (the
    CPU) and is a safe divisor (the support's and AuxK's entries are written as g / c)."""
    scale = w_pen / batch
    if plan.regularizer == "offsupport_l1":
        # [z > 0] / B off the support; the support's share is 0 (the Top-k values are
        # subtracted), left for the caller to overwrite with the reconstruction gradient.
        if _foldable(scale, _Kernels.offsupport_grad is _offsupport_grad):
            return pen.z_bm.sign_(), scale.reshape(1, 1).expand(batch, 1)
        return _Kernels.offsupport_grad(pen.z_bm, scale), None
    # R_i = l1/(l2 + eps): dR_i/dz_ij = 1/(l2 + eps) - l1 z_ij / ((l2 + eps)^2 l2) where z > 0
    # (the floor on l2 passes no gradient, as the reference's clamp).
    denominator = pen.l2 + plan.eps
    c1 = scale / denominator
    if _foldable(c1, _Kernels.l1l2_grad is _l1l2_grad):
        ratio = pen.l1 / (denominator * pen.l2) * (pen.l2 > L2_FLOOR)  # c2 / c1
        h_bm = torch.sign(pen.z_bm).addcmul_(pen.z_bm, ratio.unsqueeze(1), value=-1.0)
        return h_bm, c1.unsqueeze(1)
    c2 = scale * pen.l1 / (denominator.square() * pen.l2) * (pen.l2 > L2_FLOOR)
    return _Kernels.l1l2_grad(pen.z_bm, c1.unsqueeze(1), c2.unsqueeze(1)), None


FOLD_RANGE = (1e-15, 1e15)  # |c| for which g / c and (g / c) c stay normal floats


def _foldable(c: torch.Tensor, eager: bool) -> bool:
    """Whether the row scale c can be factored out: eager kernels (the compiled ones already
    fuse the passes), host memory (reading c waits for nothing) and every |c| in range."""
    if not eager or c.device.type != "cpu":
        return False
    magnitude = c.abs()
    return bool(((magnitude >= FOLD_RANGE[0]) & (magnitude <= FOLD_RANGE[1])).all())


class _FusedLoss(torch.autograd.Function):
    """(total, nmse, auxk, penalty, x_hat, pre, values, indices) with a hand-written backward
    over the parameters (W_dec, b_enc, b_pre, W_enc if untied)."""

    @staticmethod
    def forward(ctx: Any, plan: StepPlan, x: torch.Tensor, x_in: torch.Tensor,
                stats: InputStats | None, dead: torch.Tensor, W_dec: torch.Tensor,
                b_enc: torch.Tensor, b_pre: torch.Tensor, W_enc_untied: torch.Tensor | None
                ) -> tuple[torch.Tensor, ...]:
        W_enc = W_dec if W_enc_untied is None else W_enc_untied
        with torch.autocast(x.device.type, enabled=False):
            outputs, saved = _forward(plan, x, x_in, stats, dead, W_enc, W_dec, b_enc, b_pre)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*outputs[4:])
        ctx.plan, ctx.saved, ctx.tied = plan, saved, W_enc_untied is None
        ctx.save_for_backward(W_enc, W_dec)
        return outputs

    @staticmethod
    def backward(ctx: Any, g_total, g_nmse, g_auxk, g_penalty, *_unused):
        if ctx.saved is None:
            raise RuntimeError("the fast step's backward runs once: it builds the gradient in "
                               "the forward's buffers (use sae.losses.training_loss to "
                               "differentiate twice)")
        saved, ctx.saved = ctx.saved, None
        with torch.autocast(saved.error_bd.device.type, enabled=False):
            grads = _backward(ctx.plan, saved, *ctx.saved_tensors, g_total, g_nmse, g_auxk,
                              g_penalty)
        g_W_enc, g_W_dec, g_b_enc, g_b_pre = grads
        inputs = (None,) * 5  # plan, x, x_in, stats, dead
        if ctx.tied:
            return *inputs, g_W_dec.add_(g_W_enc), g_b_enc, g_b_pre, None
        return *inputs, g_W_dec, g_b_enc, g_b_pre, g_W_enc


def _backward(plan: StepPlan, s: _Saved, W_enc: torch.Tensor, W_dec: torch.Tensor,
              g_total, g_nmse, g_auxk, g_penalty) -> tuple[torch.Tensor, ...]:
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
        g_values = _support_dots(g_y, W_dec, indices) * (values > 0)  # (B, k), ReLU'
        bags = _LatentBags.build(indices, n)
        g_W_dec = bags.scatter_rows(values, g_y)  # (n, d), B k d multiply-adds
    else:  # the same as products with the dense code: B n d each, on tensor cores
        bags = None
        dots_bn = _dense_product(g_y, W_dec.t(), plan.compute_dtype)
        g_values = dots_bn.gather(1, indices) * (values > 0)
        g_W_dec = _dense_product(s.code_bn.t(), g_y, plan.compute_dtype)

    g_aux_bc = None
    if w_aux is not None:  # AuxK: dense products over its C columns
        a = s.aux
        g_residual_bd = a.error_bd * (a.scale * w_aux)
        dtype = plan.compute_dtype
        g_W_dec.index_add_(0, a.cols, _dense_product(a.code_bc.t(), g_residual_bd, dtype))
        g_aux_bc = _dense_product(g_residual_bd, a.weight_cd.t(), dtype) * (a.code_bc > 0)

    if w_pen is not None:
        g_W_enc, g_b_enc = _encoder_grad_dense(plan, s, w_pen, g_values, g_aux_bc, n)
    else:
        g_W_enc, g_b_enc = _encoder_grad_sparse(plan, s, bags, g_values, g_aux_bc, n)
    g_b_pre -= g_b_enc @ W_enc  # pre depends on b_pre through -W_enc b_pre
    return g_W_enc, g_W_dec, g_b_enc, g_b_pre


def _encoder_grad_sparse(plan: StepPlan, s: _Saved, bags: _LatentBags | None,
                         g_values: torch.Tensor, g_aux_bc: torch.Tensor | None, n: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """grad of pre has k (+ C) entries per row: grad W_enc = sum over them g_ij x_i -> row j.
    Without bags (the dense formulation): G, dense in the code's buffer, times X."""
    x_c = s.x_centered_bd
    if bags is None:
        g_bn = s.code_bn.zero_().scatter_(1, s.code.indices, g_values)
        if g_aux_bc is not None:
            g_bn.index_add_(1, s.aux.cols, g_aux_bc)
        return _dense_product(g_bn.t(), x_c, plan.compute_dtype), g_bn.sum(dim=0)
    g_W_enc = bags.scatter_rows(g_values, x_c)
    g_b_enc = x_c.new_zeros(n).index_add_(0, s.code.indices.reshape(-1), g_values.reshape(-1))
    if g_aux_bc is not None:
        _add_aux_rows(g_W_enc, g_b_enc, s.aux.cols, g_aux_bc, x_c, plan.compute_dtype)
    return g_W_enc, g_b_enc


def _add_aux_rows(g_W_enc: torch.Tensor, g_b_enc: torch.Tensor, cols: torch.Tensor,
                  g_aux_bc: torch.Tensor, x_c: torch.Tensor, dtype: torch.dtype | None) -> None:
    g_W_enc.index_add_(0, cols, _dense_product(g_aux_bc.t(), x_c, dtype))  # C x B x d
    g_b_enc.index_add_(0, cols, g_aux_bc.sum(dim=0))


def _encoder_grad_dense(plan: StepPlan, s: _Saved, w_pen: torch.Tensor, g_values: torch.Tensor,
                        g_aux_bc: torch.Tensor | None, n: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """grad of pre = the penalty's G (dense on its columns) + the support's and AuxK's
    entries; grad W_enc = G^T X: one product over the penalised columns."""
    pen, x_c = s.penalty, s.x_centered_bd
    g_bm, c_b1 = _penalty_grad(plan, pen, w_pen, x_c.shape[0])  # G = c H: H in g_bm
    fold_aux = g_aux_bc is not None and pen.cols is None
    g_support, g_aux = g_values, g_aux_bc if fold_aux else None
    if c_b1 is not None:
        g_support = g_values / c_b1
        g_aux = None if g_aux is None else g_aux / c_b1
    if plan.regularizer == "offsupport_l1":
        g_bm.scatter_(1, pen.support_bk, g_support)  # the penalty's support share is 0
    else:
        g_bm.scatter_add_(1, pen.support_bk, g_support)
    if fold_aux:
        g_bm.index_add_(1, s.aux.cols, g_aux)
    if c_b1 is None:
        g_W_m = _dense_product(g_bm.t(), x_c, plan.compute_dtype)  # (m, d): m x B x d
        g_b_m = g_bm.sum(dim=0)
    else:  # G^T X = H^T (c X), G^T 1 = H^T c
        g_W_m = _dense_product(g_bm.t(), x_c * c_b1, plan.compute_dtype)
        g_b_m = torch.mv(g_bm.t(), c_b1.reshape(-1).contiguous())
    if pen.cols is None:
        g_W_enc, g_b_enc = g_W_m, g_b_m
    else:
        g_W_enc = g_W_m.new_zeros(n, g_W_m.shape[1]).index_copy_(0, pen.cols, g_W_m)
        g_b_enc = g_b_m.new_zeros(n).index_copy_(0, pen.cols, g_b_m)
    if g_aux_bc is not None and not fold_aux:
        _add_aux_rows(g_W_enc, g_b_enc, s.aux.cols, g_aux_bc, x_c, plan.compute_dtype)
    return g_W_enc, g_b_enc


# -- entry point -------------------------------------------------------------------------------
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
) -> tuple[LossParts, ForwardOutput]:
    """``sae.losses.training_loss``, fast. ``dead_bound``: optional host upper bound on
    ``dead.sum()`` (see ``dead_count_bound``); it lets AuxK look at that many columns instead
    of all n on CUDA (on the CPU the count is read directly)."""
    kwargs = dict(regularizer=regularizer, strength=strength, mask=mask, eps=eps, dead=dead,
                  aux_alpha=aux_alpha, aux_k=aux_k)
    if x.requires_grad:  # the hand-written backward gives no gradient to x
        return training_loss(model, x, **kwargs)
    plan = make_plan(model, x, dead_bound=dead_bound, **kwargs)
    x_in, stats = model.standardize(x)
    total, nmse, auxk, penalty, x_hat, pre, values, indices = _FusedLoss.apply(
        plan, x, x_in, stats, dead, model.W_dec, model.b_enc, model.b_pre, model.W_enc_untied)
    return LossParts(total, nmse, auxk, penalty), ForwardOutput(
        x_hat, pre, SparseCode(values, indices), stats)


# -- CPU runtime ---------------------------------------------------------------------------------
def tune_cpu_allocator() -> bool:
    """Keep freed large blocks in the process (glibc: no mmap for big allocations, no trim).

    A (B, n) float32 temporary is 50 MB; by default glibc maps and unmaps it on every
    allocation, and the kernel zero-fills it page by page: measured 3-5x the cost of the
    arithmetic of a ReLU pass on this machine. Affects every CPU tensor of the process; call
    once at start-up. Returns False where glibc's mallopt is not available.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**30))
    except (OSError, AttributeError):
        return False
