"""G Top-k SAEs of one shape trained in lockstep: the stacked weights and the batched objective.

A pack holds its members' parameters stacked on a leading member axis (``W_dec``, ``W_enc``:
(G, n, d); ``b_enc``: (G, n); ``b_pre``: (G, d)) and computes every member's objective of
``sae.training.losses.training_loss`` at once, with a launch count that does not depend on G:

* the encoder product is one ``bmm`` over the members, each on its own batch (G, B, d);
* Top-k (``sae.training.fast.topk_by_chunks`` over the G B rows) takes the largest k of the pack; a
  member with a smaller k keeps the first k of the sorted selection (the same set) and zeroes
  the rest;
* decoding (and AuxK's decoding) is one embedding-bag over the (G n, d) stacked atoms, or, where
  the lone fast step takes its dense formulation (CUDA under 16-bit autocast or TF32:
  ``sae.training.fast.Formulation``), one ``bmm`` of the (G, B, n) dense code with the stacked atoms;
* the penalties (one hand-fused autograd function for the terms the registry names as
  ``Regularizer.pack_term``; any other registered penalty by autograd through its reference,
  member by member) and AuxK reduce over each member's own (B, n) block; AuxK runs for the members the host names (those that may have a dead
  latent), the others' AuxK being an exact zero; a member's regularizer, strength and mask are per-member coefficient
  tensors (G,), so a mixed pack adds no launch.

Each member's loss depends on its own slice of the parameters only, so the gradient of the
summed loss is, slice by slice, each member's own gradient, and Adam (elementwise) over the
stacked tensors is each member's own Adam. The values equal the unpacked objective up to the
summation order of float32 reductions (tests/test_packed.py states the tolerance).

This module knows the model and the objective; the loop (batch orders, logging, checkpoints,
failed members) is ``sae.training.loop``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from sae import regularizers
from sae.model import NORM_FLOOR, TopKSAE
from sae.regularizers.common import SQUARED_L2_FLOOR
from sae.training.fast import AUTO, topk_by_chunks
from sae.training.fast.plan import autocast_dtype
from sae.training.losses import LossParts, nmse
from sae.training.trainer import autocast


@dataclass(frozen=True)
class MemberSpec:
    """What differs between the members of a pack (everything else is the pack's)."""

    k: int
    regularizer: str  # a registered name (sae.regularizers)
    strength: float
    mask: bool
    eps: float


class AutogradPenalty(NamedTuple):
    """A member whose regularizer has no fused pack term: its reference penalty, bound to its
    config, differentiated by autograd on its own (B, n) block."""

    member: int
    penalty: object  # penalty(pre_bn, support_bk, mask) -> scalar
    strength: float
    mask: bool
    k: int


class PackCoefficients(NamedTuple):
    """Per-member settings as (G,) device tensors, plus the host facts that shape the step."""

    k: torch.Tensor  # (G,) int64
    off_strength: torch.Tensor  # (G,) lambda of members whose pack_term is off_support, else 0
    ratio_strength: torch.Tensor  # (G,) lambda of members whose pack_term is ratio, else 0
    is_off: torch.Tensor  # (G,) bool
    is_ratio: torch.Tensor  # (G,) bool
    mask: torch.Tensor  # (G,) bool
    eps: torch.Tensor  # (G,) float
    k_max: int
    mixed_k: bool  # k differs between members: the selection must be sorted
    any_off: bool  # compute the off-support L1 at all
    any_ratio: bool  # compute the L1/L2 ratio at all
    autograd: tuple[AutogradPenalty, ...] = ()  # members without a fused pack term

    @classmethod
    def build(cls, specs: list[MemberSpec], device: torch.device) -> PackCoefficients:
        """The coefficients of ``specs``; each regularizer's ``pack_term`` (its registry entry)
        says which fused term computes it, or that autograd does (None)."""

        def column(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device)

        entries = [regularizers.get(s.regularizer) for s in specs]
        is_off = [e.pack_term == "off_support" for e in entries]
        is_ratio = [e.pack_term == "ratio" for e in entries]
        autograd = tuple(
            AutogradPenalty(g, e.bind(eps=s.eps), s.strength, s.mask, s.k)
            for g, (s, e) in enumerate(zip(specs, entries, strict=True)) if e.pack_term is None)
        ks = [s.k for s in specs]
        return cls(
            k=column(ks, torch.int64),
            off_strength=column([s.strength if o else 0.0 for s, o in zip(specs, is_off)]),
            ratio_strength=column([s.strength if r else 0.0 for s, r in zip(specs, is_ratio)]),
            is_off=column(is_off, torch.bool), is_ratio=column(is_ratio, torch.bool),
            mask=column([s.mask for s in specs], torch.bool),
            eps=column([s.eps for s in specs]),
            k_max=max(ks), mixed_k=len(set(ks)) > 1, any_off=any(is_off),
            any_ratio=any(is_ratio), autograd=autograd)


class PackedSAE(nn.Module):
    """The stacked parameters of G untied Top-k SAEs without LayerNorm (n, d shared).

    Parameter names and order are those of ``TopKSAE`` (W_dec, W_enc_untied, b_enc, b_pre), so
    a member's slices map one to one onto a lone model and onto its Adam state.
    """

    PARAMETERS = ("W_dec", "W_enc_untied", "b_enc", "b_pre")

    def __init__(self, members: list[TopKSAE]) -> None:
        super().__init__()
        first = members[0]
        for model in members:
            if model.tied or model.layernorm:
                raise ValueError("a pack trains untied SAEs without LayerNorm; run tied or "
                                 "LayerNorm cells unpacked (pack=1)")
            if (model.d, model.n_latents) != (first.d, first.n_latents):
                raise ValueError(f"a pack needs one shape (d, n); got ({model.d}, "
                                 f"{model.n_latents}) beside ({first.d}, {first.n_latents})")
        self.d, self.n_latents = first.d, first.n_latents
        for name in self.PARAMETERS:
            stacked = torch.stack([getattr(m, name).detach() for m in members])
            self.register_parameter(name, nn.Parameter(stacked.clone()))

    @property
    def size(self) -> int:
        return self.W_dec.shape[0]

    @torch.no_grad()
    def copy_member_to(self, index: int, model: TopKSAE) -> None:
        for name in self.PARAMETERS:
            getattr(model, name).copy_(getattr(self, name)[index])

    @torch.no_grad()
    def keep_members_(self, keep: list[int]) -> None:
        """Drop every member not in ``keep`` (new parameter tensors: rebuild the optimizer)."""
        index = torch.tensor(keep, device=self.W_dec.device)
        for name in self.PARAMETERS:
            setattr(self, name, nn.Parameter(getattr(self, name).index_select(0, index)))

    # -- the unit-norm decoder constraint, per member, as TopKSAE -----------------------------
    @torch.no_grad()
    def project_decoder_grad_(self) -> None:
        grad = self.W_dec.grad
        if grad is not None:
            parallel = torch.linalg.vecdot(grad, self.W_dec)  # (G, n)
            grad.addcmul_(parallel.unsqueeze(2), self.W_dec, value=-1)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=2, keepdim=True).clamp_min(NORM_FLOOR))

    # -- the batched objective ----------------------------------------------------------------
    def encode_pre(self, x_gbd: torch.Tensor) -> torch.Tensor:
        """(G, B, n) pre-activations W_enc (x - b_pre) + b_enc, as x W_enc^T + (b_enc - W_enc
        b_pre): x carries no gradient, so the backward needs no (B, n) x (n, d) product for it.
        Under autocast they stay in its 16-bit dtype (the product's output, as the lone step's
        ``sae.training.fast.sparse.dense_product`` rounds it): the (G, B, n) passes after it read half
        the bytes, and ``_SparseHead`` computes its sums in float32."""
        bias_gn = self.b_enc - torch.bmm(self.W_enc_untied, self.b_pre.unsqueeze(2)).squeeze(2)
        # bmm then a broadcast add: faster than baddbmm with a broadcast bias on the CPU
        # (docs/performance.md, "Code choices").
        return torch.bmm(x_gbd, self.W_enc_untied.transpose(1, 2)).add_(bias_gn.unsqueeze(1))

    def decode(self, values_gbk: torch.Tensor, indices_gbk: torch.Tensor,
               members: torch.Tensor | None = None, dense: bool = False) -> torch.Tensor:
        """(G', B, d) sum_j a_j W_dec[g, j] for the members ``members`` (default: all, in
        order): one embedding-bag over the stacked atoms, or with ``dense`` one ``bmm`` of the
        (G', B, n) dense code with the members' atoms (tensor cores; autocast's dtype)."""
        groups, batch, width = indices_gbk.shape
        if dense:
            atoms = self.W_dec if members is None else self.W_dec.index_select(0, members)
            # The code is built in the product's dtype: no (G, B, n) cast either way.
            dtype = autocast_dtype(values_gbk.device.type) or values_gbk.dtype
            code = values_gbk.new_zeros(groups, batch, self.n_latents, dtype=dtype).scatter(
                2, indices_gbk, values_gbk.to(dtype))
            return torch.bmm(code, atoms).float()
        if members is None:
            members = torch.arange(groups, device=indices_gbk.device)
        offsets = (members * self.n_latents).view(-1, 1, 1)
        flat = F.embedding_bag((indices_gbk + offsets).view(groups * batch, width),
                               self.W_dec.view(-1, self.d),
                               per_sample_weights=values_gbk.reshape(groups * batch, width),
                               mode="sum")
        return flat.view(groups, batch, self.d)


class PackedStepOutput(NamedTuple):
    parts: LossParts  # each (G,): total, nmse, auxk, penalty
    fired: torch.Tensor  # (G, n) bool: the batch-active units of each member


def packed_training_loss(pack: PackedSAE, x_gbd: torch.Tensor, coeffs: PackCoefficients, *,
                         dead_gn: torch.Tensor, aux_alpha: float, aux_k: int,
                         aux_members: Sequence[int] | None = None) -> PackedStepOutput:
    """Every member's L = NMSE + alpha AuxK + lambda R (sae.training.losses.training_loss), batched.

    ``aux_members``: the members (rows) that may have a dead latent, known on the host; AuxK is
    computed for those only (for the others its value and gradient are exact zeros in the
    reference too). None: every member.
    """
    dense = uses_dense_decoder(x_gbd.device.type)
    pre = pack.encode_pre(x_gbd)
    with_penalty = coeffs.any_off or coeffs.any_ratio
    values, top_indices, fired, masked_sum, ratio = _SparseHead.apply(pre, coeffs, with_penalty)
    x_hat = pack.decode(values, top_indices, dense=dense) + pack.b_pre.unsqueeze(1)
    reconstruction = nmse(x_hat, x_gbd)
    zero = reconstruction.new_zeros(reconstruction.shape)
    auxk = zero
    groups = pre.shape[0]
    rows = list(range(groups)) if aux_members is None else sorted(aux_members)
    if aux_alpha > 0 and rows:
        auxk = _auxk(pack, pre, (x_gbd - x_hat).detach(), dead_gn, aux_k, rows, dense)
    total = reconstruction + aux_alpha * auxk
    penalty = zero
    if coeffs.any_off:  # the off-support part is the masked sum less the support's
        off = (masked_sum - values.sum(dim=(1, 2))) / pre.shape[1]
        total = total + coeffs.off_strength * off
        penalty = torch.where(coeffs.is_off, off, penalty)
    if coeffs.any_ratio:
        total = total + coeffs.ratio_strength * ratio
        penalty = torch.where(coeffs.is_ratio, ratio, penalty)
    for member in coeffs.autograd:  # a registered penalty without a fused term: its reference
        g = member.member
        value = member.penalty(pre[g].float(), top_indices[g, :, :member.k], member.mask)
        one_hot = torch.zeros_like(total).index_fill_(0, _device_rows((g,), pre.device), 1.0)
        total = total + one_hot * (member.strength * value)
        penalty = penalty + one_hot * value.detach()
    return PackedStepOutput(LossParts(total, reconstruction, auxk, penalty), fired)


def uses_dense_decoder(device_type: str) -> bool:
    """The lone fast step's rule (``sae.training.fast.Formulation``): the dense code times the atoms on
    CUDA under 16-bit autocast (or TF32), the embedding-bag elsewhere."""
    return AUTO.dense_decoder(device_type, autocast_dtype(device_type))


def _batch_active(indices_gbk: torch.Tensor, keep_gk: torch.Tensor | None, n: int
                  ) -> torch.Tensor:
    """(G, n) bool: units selected at least once in each member's batch (its own k only).
    Entries beyond a member's k point at a spare column n, cut off at the end."""
    groups = indices_gbk.shape[0]
    if keep_gk is not None:
        indices_gbk = torch.where(keep_gk, indices_gbk, n)
    active = torch.zeros(groups, n + 1, dtype=torch.bool, device=indices_gbk.device)
    return active.scatter_(1, indices_gbk.reshape(groups, -1), True)[:, :n]


def _topk(pre: torch.Tensor, k: int, ordered: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over the last axis of (G, B, n) by group maxima (sae.training.fast.topk_by_chunks, exact),
    sorted by value when ``ordered`` (a member with a smaller k keeps the first of them)."""
    groups, batch, n = pre.shape
    values, indices = topk_by_chunks(pre.view(groups * batch, n), k)
    if ordered:
        values, order = values.sort(dim=1, descending=True)
        indices = indices.gather(1, order)
    return values.view(groups, batch, k), indices.view(groups, batch, k)


class _SparseHead(torch.autograd.Function):
    """Everything the objective reads of pre (G, B, n), with one hand-written backward:

    * the Top-k code: values = ReLU of the selected pre (G, B, k_max), a member with a smaller
      k keeping the first k of the sorted selection, and their indices;
    * the batch-active units of each member (G, n);
    * with the penalties: per member, of z = ReLU(pre) on its penalised columns (all, or with
      the mask the batch-active ones), the sum of z over the batch (G,) and the L1/L2 ratio of
      sae.regularizers (G,) (mean over rows of ||z||_1 / (||z||_2 + eps), squared norm floored
      at 1e-30).

    Fused by hand: autograd through the reference spends ~12 passes over the (G, B, n) block,
    and autograd through Top-k a zero block, a scatter and a sum more. This forward reads pre
    (16-bit under autocast) 3 times and writes z once; the backward writes the gradient of pre
    in two passes, in pre's dtype (the one the encoder product's backward reads), and adds the
    code's gradient at the k selected entries of each row.
    """

    @staticmethod
    def forward(ctx, pre, coeffs: PackCoefficients, with_penalty: bool):
        top_values, indices = _topk(pre, coeffs.k_max, coeffs.mixed_k)
        slope_mask = top_values > 0  # d ReLU / d pre at the selected entries
        keep_gk = None
        if coeffs.mixed_k:  # sorted: a member's top k are the first k of the top k_max
            positions = torch.arange(coeffs.k_max, device=pre.device)
            keep_gk = (positions < coeffs.k.unsqueeze(1)).unsqueeze(1)  # (G, 1, k_max)
            slope_mask &= keep_gk
        values = torch.where(slope_mask, top_values.float(), 0.0)
        fired = _batch_active(indices, keep_gk, pre.shape[2])
        masked_sum = ratio = values.new_zeros(pre.shape[0])
        z, coefficients = None, None
        if with_penalty:
            columns_gn = torch.where(coeffs.mask.unsqueeze(1), fired, True).float()
            z = pre.clamp_min(0) * columns_gn.unsqueeze(1)  # (G, B, n) float32
            l1 = z.sum(dim=2)  # (G, B)
            masked_sum = l1.sum(dim=1)
            if coeffs.any_ratio:
                squared = torch.linalg.vecdot(z, z)  # (G, B), no (G, B, n) temporary
                l2 = squared.clamp_min(SQUARED_L2_FLOOR).sqrt()
                denominator = l2 + coeffs.eps.unsqueeze(1)
                ratio = (l1 / denominator).mean(dim=1)
                # d/dz_j of l1 / (l2 + eps) = 1 / (l2 + eps) - l1 z_j / (l2 (l2 + eps)^2); the
                # floor's derivative is 0 below it (as the reference's clamp_min).
                slope = (l1 / (denominator.square() * l2)) * (squared >= SQUARED_L2_FLOOR)
                coefficients = (1 / denominator, slope)
        ctx.save_for_backward(indices, slope_mask, z)
        ctx.coefficients = coefficients
        ctx.pre_shape, ctx.pre_dtype = pre.shape, pre.dtype
        ctx.mark_non_differentiable(indices, fired)
        return values, indices, fired, masked_sum, ratio

    @staticmethod
    def backward(ctx, grad_values, _indices, _fired, grad_sum, grad_ratio):
        indices, slope_mask, z = ctx.saved_tensors
        if z is None:
            grad = torch.zeros(ctx.pre_shape, dtype=ctx.pre_dtype, device=indices.device)
        else:  # every entry written below
            grad = torch.empty(ctx.pre_shape, dtype=ctx.pre_dtype, device=indices.device)
            batch = z.shape[1]
            row_term = grad_sum.view(-1, 1, 1).expand(-1, batch, 1)  # (G, B, 1)
            if ctx.coefficients is not None:
                inverse, slope = ctx.coefficients
                scale = (grad_ratio / batch).unsqueeze(1)  # the mean over rows
                row_term = row_term + (scale * inverse).unsqueeze(2)
                per_entry = torch.addcmul(row_term, z, (-scale * slope).unsqueeze(2))
            else:
                per_entry = row_term.expand_as(z)
            # Only where z > 0 (pre > 0 on a penalised column) does z depend on pre: ReLU's
            # own backward kernel, one vectorised pass written in pre's dtype (far faster than
            # masked_fill_ or where: docs/performance.md, "Code choices").
            torch.ops.aten.threshold_backward.grad_input(per_entry, z, 0, grad_input=grad)
        code_grad = torch.where(slope_mask, grad_values, 0.0).to(grad.dtype)
        grad.scatter_add_(2, indices, code_grad)
        return grad, None, None


def _auxk(pack: PackedSAE, pre: torch.Tensor, residual: torch.Tensor, dead_gn: torch.Tensor,
          aux_k: int, rows: list[int], dense: bool) -> torch.Tensor:
    """(G,) sae.training.losses.auxk_loss per member: the residual from its top-aux_k dead latents,
    computed for the members ``rows`` (0 for the others)."""
    groups = pre.shape[0]
    if len(rows) < groups:
        index = _device_rows(tuple(rows), pre.device)
        pre, residual, dead_gn = (t.index_select(0, index) for t in (pre, residual, dead_gn))
    else:
        index = None
    # -inf on the live columns, as the reference's masked_fill (a broadcast add: see above).
    live_bias = torch.zeros_like(dead_gn, dtype=pre.dtype).masked_fill_(~dead_gn, float("-inf"))
    dead_pre = pre + live_bias.unsqueeze(1)
    top = dead_pre.topk(min(aux_k, pre.shape[2]), dim=2, sorted=False)
    residual_hat = pack.decode(F.relu(top.values).float(), top.indices, members=index,
                               dense=dense)
    loss = nmse(residual_hat, residual) * dead_gn.any(dim=1).to(pre.dtype)
    if index is None:
        return loss
    return loss.new_zeros(groups).index_add(0, index, loss)


@functools.lru_cache(maxsize=64)
def _device_rows(rows: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The row indices as a device tensor, made once per (rows, device): a host-to-device copy
    is not allowed inside a CUDA graph capture, and the capture's warm-up steps run first."""
    return torch.tensor(rows, device=device)


def packed_train_step(pack: PackedSAE, optimizer: torch.optim.Optimizer, x_gbd: torch.Tensor,
                      counters_gn: torch.Tensor, coeffs: PackCoefficients, dead_window: int,
                      aux_alpha: float, aux_k: int, bf16: bool = False,
                      aux_members: Sequence[int] | None = None) -> torch.Tensor:
    """One optimizer step of every member, as ``sae.training.trainer.train_step`` does for one: the
    losses, the backward, the decoder gradient projection, Adam, the decoder normalisation and
    the dead-latent counters (G, n). Returns the (G, 4) detached (total, nmse, auxk, penalty).

    ``aux_members``: the members that may have a dead latent (AuxK is skipped for the others,
    whose AuxK value and gradient are then exact zeros in the reference too); None reads them
    from the counters on the CPU (host memory: nothing to wait for) and takes every member
    elsewhere. Nothing here waits for the device, so the step can be captured as a CUDA graph
    (``sae.training.packed_graph``).
    """
    optimizer.zero_grad(set_to_none=True)
    dead = counters_gn >= dead_window
    if aux_members is None and x_gbd.device.type == "cpu":
        aux_members = dead.any(dim=1).nonzero().flatten().tolist()
    with autocast(x_gbd.device.type, bf16):
        out = packed_training_loss(pack, x_gbd, coeffs, dead_gn=dead, aux_alpha=aux_alpha,
                                   aux_k=aux_k, aux_members=aux_members)
    out.parts.total.sum().backward()  # members share no parameter: each gets its own gradient
    pack.project_decoder_grad_()
    optimizer.step()
    pack.normalize_decoder_()
    counters_gn.add_(x_gbd.shape[1]).masked_fill_(out.fired, 0)
    return torch.stack(out.parts).detach().T
