"""G Top-k SAEs of one shape trained in lockstep: the stacked weights and the batched objective.

A pack holds its members' parameters stacked on a leading member axis (``W_dec``, ``W_enc``:
(G, n, d); ``b_enc``: (G, n); ``b_pre``: (G, d)) and computes every member's objective of
``sae.losses.training_loss`` at once, with a launch count that does not depend on G:

* the encoder product is one ``baddbmm`` over the members, each on its own batch (G, B, d);
* Top-k runs over (G, B, n) with the largest k of the pack; a member with a smaller k keeps the
  first k of the sorted selection (the same set) and zeroes the rest;
* decoding (and AuxK's decoding) is one embedding-bag over the (G n, d) stacked atoms;
* the penalties and AuxK reduce over each member's own (B, n) block; a member's regularizer,
  strength and mask are per-member coefficient tensors (G,), so a mixed pack adds no launch.

Each member's loss depends on its own slice of the parameters only, so the gradient of the
summed loss is, slice by slice, each member's own gradient, and Adam (elementwise) over the
stacked tensors is each member's own Adam. The values equal the unpacked objective up to the
summation order of float32 reductions (tests/test_packed.py states the tolerance).

This module knows the model and the objective; the loop (batch orders, logging, checkpoints,
failed members) is ``sae.packed_trainer``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from sae.losses import LossParts
from sae.model import TopKSAE

VARIANCE_FLOOR = 1e-12  # sae.losses.nmse's floor
L2_SQUARED_FLOOR = 1e-30  # sae.regularizers.l1_l2_ratio's floor
REGULARIZERS = ("none", "offsupport_l1", "l1l2")


@dataclass(frozen=True)
class MemberSpec:
    """What differs between the members of a pack (everything else is the pack's)."""

    k: int
    regularizer: str  # none | offsupport_l1 | l1l2
    strength: float
    mask: bool
    eps: float


class PackCoefficients(NamedTuple):
    """Per-member settings as (G,) device tensors, plus the host facts that shape the step."""

    k: torch.Tensor  # (G,) int64
    off_strength: torch.Tensor  # (G,) lambda of members with offsupport_l1, else 0
    ratio_strength: torch.Tensor  # (G,) lambda of members with l1l2, else 0
    is_off: torch.Tensor  # (G,) bool
    is_ratio: torch.Tensor  # (G,) bool
    mask: torch.Tensor  # (G,) bool
    eps: torch.Tensor  # (G,) float
    k_max: int
    mixed_k: bool  # k differs between members: the selection must be sorted
    any_off: bool  # compute the off-support L1 at all
    any_ratio: bool  # compute the L1/L2 ratio at all

    @classmethod
    def build(cls, specs: list[MemberSpec], device: torch.device) -> PackCoefficients:
        for spec in specs:
            if spec.regularizer not in REGULARIZERS:
                raise ValueError(f"unknown regularizer {spec.regularizer!r}; use "
                                 + ", ".join(REGULARIZERS))

        def column(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device)

        is_off = [s.regularizer == "offsupport_l1" for s in specs]
        is_ratio = [s.regularizer == "l1l2" for s in specs]
        ks = [s.k for s in specs]
        return cls(
            k=column(ks, torch.int64),
            off_strength=column([s.strength if o else 0.0 for s, o in zip(specs, is_off)]),
            ratio_strength=column([s.strength if r else 0.0 for s, r in zip(specs, is_ratio)]),
            is_off=column(is_off, torch.bool), is_ratio=column(is_ratio, torch.bool),
            mask=column([s.mask for s in specs], torch.bool),
            eps=column([s.eps for s in specs]),
            k_max=max(ks), mixed_k=len(set(ks)) > 1, any_off=any(is_off),
            any_ratio=any(is_ratio))


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
        self.W_dec.div_(self.W_dec.norm(dim=2, keepdim=True).clamp_min(1e-12))

    # -- the batched objective ----------------------------------------------------------------
    def encode_pre(self, x_gbd: torch.Tensor) -> torch.Tensor:
        """(G, B, n) pre-activations W_enc (x - b_pre) + b_enc, as x W_enc^T + (b_enc - W_enc
        b_pre): x carries no gradient, so the backward needs no (B, n) x (n, d) product for it."""
        bias_gn = self.b_enc - torch.bmm(self.W_enc_untied, self.b_pre.unsqueeze(2)).squeeze(2)
        pre = torch.baddbmm(bias_gn.unsqueeze(1), x_gbd, self.W_enc_untied.transpose(1, 2))
        return pre.to(self.W_dec.dtype)  # under autocast, the rest in float32 (as TopKSAE)

    def decode(self, values_gbk: torch.Tensor, indices_gbk: torch.Tensor) -> torch.Tensor:
        """(G, B, d) sum_j a_j W_dec[g, j]: one embedding-bag over the stacked atoms."""
        groups, batch, width = indices_gbk.shape
        offsets = (torch.arange(groups, device=indices_gbk.device) * self.n_latents).view(-1, 1, 1)
        flat = F.embedding_bag((indices_gbk + offsets).view(groups * batch, width),
                               self.W_dec.view(groups * self.n_latents, self.d),
                               per_sample_weights=values_gbk.reshape(groups * batch, width),
                               mode="sum")
        return flat.view(groups, batch, self.d)


class PackedStepOutput(NamedTuple):
    parts: LossParts  # each (G,): total, nmse, auxk, penalty
    fired: torch.Tensor  # (G, n) bool: the batch-active units of each member


def member_nmse(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(G,) sae.losses.nmse of each member's (B, d) block."""
    variance = (x - x.mean(dim=1, keepdim=True)).square().sum(dim=(1, 2))
    return (x_hat - x).square().sum(dim=(1, 2)) / variance.clamp_min(VARIANCE_FLOOR)


def packed_training_loss(pack: PackedSAE, x_gbd: torch.Tensor, coeffs: PackCoefficients, *,
                         dead_gn: torch.Tensor, aux_alpha: float, aux_k: int,
                         aux_needed: bool = True) -> PackedStepOutput:
    """Every member's L = NMSE + alpha AuxK + lambda R (sae.losses.training_loss), batched.

    ``aux_needed=False`` (the host knows no member has a dead latent) skips AuxK: its value and
    gradient are then exact zeros in the reference too.
    """
    pre = pack.encode_pre(x_gbd)
    top = pre.topk(coeffs.k_max, dim=2, sorted=coeffs.mixed_k)
    values = F.relu(top.values)
    keep_gk = None
    if coeffs.mixed_k:  # sorted: a member's top k are the first k of the top k_max
        positions = torch.arange(coeffs.k_max, device=pre.device)
        keep_gk = (positions < coeffs.k.unsqueeze(1)).unsqueeze(1)  # (G, 1, k_max)
        values = values * keep_gk
    x_hat = pack.decode(values, top.indices) + pack.b_pre.unsqueeze(1)
    reconstruction = member_nmse(x_hat, x_gbd)
    fired = _batch_active(top.indices, keep_gk, pack.n_latents)
    zero = reconstruction.new_zeros(reconstruction.shape)
    auxk = zero
    if aux_alpha > 0 and aux_needed:
        auxk = _auxk(pack, pre, (x_gbd - x_hat).detach(), dead_gn, aux_k)
    total = reconstruction + aux_alpha * auxk
    penalty = zero
    if coeffs.any_off or coeffs.any_ratio:
        z_masked = F.relu(pre) * torch.where(coeffs.mask.unsqueeze(1), fired,
                                             True).to(pre.dtype).unsqueeze(1)
        if coeffs.any_off:
            off = (z_masked.sum(dim=(1, 2)) - values.sum(dim=(1, 2))) / pre.shape[1]
            total = total + coeffs.off_strength * off
            penalty = torch.where(coeffs.is_off, off, penalty)
        if coeffs.any_ratio:
            ratio = _l1_l2_ratio(z_masked, coeffs.eps)
            total = total + coeffs.ratio_strength * ratio
            penalty = torch.where(coeffs.is_ratio, ratio, penalty)
    return PackedStepOutput(LossParts(total, reconstruction, auxk, penalty), fired)


def _batch_active(indices_gbk: torch.Tensor, keep_gk: torch.Tensor | None, n: int
                  ) -> torch.Tensor:
    """(G, n) bool: units selected at least once in each member's batch (its own k only).
    Entries beyond a member's k point at a spare column n, cut off at the end."""
    groups = indices_gbk.shape[0]
    if keep_gk is not None:
        indices_gbk = torch.where(keep_gk, indices_gbk, n)
    active = torch.zeros(groups, n + 1, dtype=torch.bool, device=indices_gbk.device)
    return active.scatter_(1, indices_gbk.reshape(groups, -1), True)[:, :n]


def _l1_l2_ratio(z_masked: torch.Tensor, eps_g: torch.Tensor) -> torch.Tensor:
    """(G,) sae.regularizers.l1_l2_ratio of each member's masked activations."""
    l1 = z_masked.sum(dim=2)
    l2 = z_masked.square().sum(dim=2).clamp_min(L2_SQUARED_FLOOR).sqrt()
    return (l1 / (l2 + eps_g.unsqueeze(1))).mean(dim=1)


def _auxk(pack: PackedSAE, pre: torch.Tensor, residual: torch.Tensor, dead_gn: torch.Tensor,
          aux_k: int) -> torch.Tensor:
    """(G,) sae.losses.auxk_loss per member: the residual from its top-aux_k dead latents."""
    dead_pre = pre.masked_fill(~dead_gn.unsqueeze(1), float("-inf"))
    top = dead_pre.topk(min(aux_k, pre.shape[2]), dim=2, sorted=False)
    residual_hat = pack.decode(F.relu(top.values), top.indices)
    return member_nmse(residual_hat, residual) * dead_gn.any(dim=1).to(pre.dtype)
