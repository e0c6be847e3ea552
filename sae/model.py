"""The Top-k sparse autoencoder of METHOD.md s2.

    pre   = W_enc (x - b_pre) + b_enc                 (B, n)
    S     = TopK(pre, k);  a_j = ReLU(pre_j) for j in S, 0 elsewhere
    x_hat = W_dec a + b_pre

Codes are kept sparse, as ``SparseCode(values (B, k), indices (B, k))``: decoding is an
embedding-bag over the k selected decoder atoms, never a dense (B, n) x (n, d) product with
mostly zeros. Decoder atoms are the rows of ``W_dec`` (n, d) and are kept at unit norm by the
trainer (``project_decoder_grad_`` before the step, ``normalize_decoder_`` after it).

This module knows nothing of training, logging or launching; a saved SAE is a checkpoint file
of :mod:`sae.io` (:func:`save_model`, :func:`load_model`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from sae.io.tensors import load_tensors, save_tensors

LAYERNORM_EPS = 1e-5
NORM_FLOOR = 1e-12  # a decoder atom of norm 0 stays 0 when normalised, never NaN


class SparseCode(NamedTuple):
    """A Top-k code: for each sample, k activations (>= 0) and the latents they belong to."""

    values: torch.Tensor  # (B, k) float, ReLU of the selected pre-activations
    indices: torch.Tensor  # (B, k) int64 latent ids

    def to_dense(self, n_latents: int) -> torch.Tensor:
        """(B, n) dense codes; for metrics and tests on small data."""
        dense = self.values.new_zeros(self.values.shape[0], n_latents)
        return dense.scatter_(1, self.indices, self.values)


class InputStats(NamedTuple):
    """Per-sample standardisation undone on the output (the optional LayerNorm)."""

    mean: torch.Tensor  # (B, 1)
    std: torch.Tensor  # (B, 1)


class ForwardOutput(NamedTuple):
    x_hat: torch.Tensor  # (B, d) reconstruction in input space
    pre: torch.Tensor  # (B, n) pre-activations (the regularizers act on ReLU(pre))
    code: SparseCode  # the Top-k selection
    stats: InputStats | None  # LayerNorm statistics, None without LayerNorm


class TopKSAE(nn.Module):
    """Top-k SAE with untied (default) or tied weights and optional per-sample LayerNorm."""

    def __init__(
        self, d: int, n_latents: int, k: int, *, tied: bool = False, layernorm: bool = False
    ) -> None:
        super().__init__()
        if not 0 < k <= n_latents:
            raise ValueError(f"k={k} must be in [1, n_latents={n_latents}]")
        self.d, self.n_latents, self.k = d, n_latents, k
        self.tied, self.layernorm = tied, layernorm
        atoms = F.normalize(torch.randn(n_latents, d), dim=1)
        self.W_dec = nn.Parameter(atoms)  # (n, d): row j is atom j
        # Gao et al. 2024: initialise the encoder as the decoder's transpose.
        self.W_enc_untied = None if tied else nn.Parameter(atoms.clone())  # (n, d)
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.b_pre = nn.Parameter(torch.zeros(d))

    # -- structure -----------------------------------------------------------------------
    @property
    def W_enc(self) -> torch.Tensor:  # noqa: N802 (the paper's name)
        return self.W_dec if self.W_enc_untied is None else self.W_enc_untied

    def spec(self) -> dict:
        """Everything needed to rebuild this module (saved beside its weights)."""
        return {"d": self.d, "n_latents": self.n_latents, "k": self.k, "tied": self.tied,
                "layernorm": self.layernorm}

    @torch.no_grad()
    def init_b_pre_(self, x_sample: torch.Tensor) -> None:
        """Centre the pre-encoder bias on the data mean (in the space the SAE sees)."""
        x_in, _ = self.standardize(x_sample)
        self.b_pre.copy_(x_in.mean(0))

    @torch.no_grad()
    def calibrate_encoder_scale_(self, x_sample: torch.Tensor) -> float:
        """Scale the encoder so the initial Top-k reconstruction has the least-squares scale.

        With unit atoms and the encoder at the decoder's transpose, the k selected atoms of a
        random dictionary overshoot the input (their sum has norm ~ sqrt(k) times one
        activation), and at the paper's learning rate (1e-4) a small dataset ends training
        before Adam has shrunk the encoder (R^2 < 0). ReLU and Top-k commute with a positive
        scale c, so W_enc, b_enc <- c W_enc, c b_enc changes no support and gives the
        reconstruction c * D a whose scale best fits x. Untied only (scaling a tied matrix
        would leave the unit-norm atoms). Returns c (1.0 when skipped).
        """
        if self.tied:
            return 1.0
        x_in, _ = self.standardize(x_sample)
        target = x_in - self.b_pre
        code = self.select(F.linear(target, self.W_enc, self.b_enc))
        recon = F.embedding_bag(code.indices, self.W_dec, per_sample_weights=code.values,
                                mode="sum")
        scale = float((recon * target).sum() / recon.square().sum().clamp_min(1e-12))
        if not 0 < scale < float("inf"):
            return 1.0
        self.W_enc_untied.mul_(scale)
        self.b_enc.mul_(scale)
        return scale

    # -- encode / decode -------------------------------------------------------------------
    def standardize(self, x: torch.Tensor) -> tuple[torch.Tensor, InputStats | None]:
        if not self.layernorm:
            return x, None
        mean = x.mean(dim=1, keepdim=True)
        std = x.std(dim=1, keepdim=True, unbiased=False) + LAYERNORM_EPS
        return (x - mean) / std, InputStats(mean, std)

    def encode_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, InputStats | None]:
        """Pre-activations (B, n), and the statistics that ``decode`` needs to undo LayerNorm."""
        x_in, stats = self.standardize(x)
        pre = F.linear(x_in - self.b_pre, self.W_enc, self.b_enc)
        # Under autocast the product runs in bf16; everything after it (Top-k, ReLU, the
        # penalties, decoding) goes on in the parameters' dtype, as in sae.training.fast.
        return pre.to(self.W_enc.dtype), stats

    def select(self, pre: torch.Tensor, k: int | None = None) -> SparseCode:
        """Top-k of the pre-activations, then ReLU; ``k`` may differ from the training k."""
        k = self.k if k is None else min(k, self.n_latents)
        top = pre.topk(k, dim=1, sorted=False)
        return SparseCode(F.relu(top.values), top.indices)

    def decode(self, code: SparseCode, stats: InputStats | None = None) -> torch.Tensor:
        """x_hat = sum_j a_j W_dec[j] + b_pre, as an embedding-bag (no dense (B, n) codes)."""
        x_hat = F.embedding_bag(code.indices, self.W_dec, per_sample_weights=code.values,
                                mode="sum") + self.b_pre
        if stats is not None:
            x_hat = x_hat * stats.std + stats.mean
        return x_hat

    def encode(self, x: torch.Tensor, k: int | None = None) -> SparseCode:
        pre, _ = self.encode_pre(x)
        return self.select(pre, k)

    def forward(self, x: torch.Tensor, k: int | None = None) -> ForwardOutput:
        pre, stats = self.encode_pre(x)
        code = self.select(pre, k)
        return ForwardOutput(self.decode(code, stats), pre, code, stats)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        return self.forward(x, k).x_hat

    # -- the unit-norm decoder constraint ---------------------------------------------------
    @torch.no_grad()
    def project_decoder_grad_(self) -> None:
        """Remove the gradient component parallel to each atom (it would only change its norm)."""
        grad = self.W_dec.grad
        if grad is not None:
            parallel = torch.linalg.vecdot(grad, self.W_dec)  # (n,), no (n, d) temporary
            grad.addcmul_(parallel.unsqueeze(1), self.W_dec, value=-1)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(NORM_FLOOR))


# -- a saved SAE --------------------------------------------------------------------------------
def save_model(model: TopKSAE, path: Path, config: dict[str, Any] | None = None,
               **meta: Any) -> None:
    """The SAE alone: weights, its spec (incl. LayerNorm), the run config, the code version."""
    save_tensors(path, dict(model.state_dict()), {"spec": model.spec(), "config": config, **meta})


def load_model(path: Path, device: str | torch.device = "cpu") -> TopKSAE:
    """Rebuild a saved SAE; it reconstructs exactly as it did in training."""
    tensors, meta = load_tensors(path, device)
    spec = meta["spec"]
    model = TopKSAE(spec["d"], spec["n_latents"], spec["k"], tied=spec["tied"],
                    layernorm=spec["layernorm"]).to(device)
    model.load_state_dict(tensors)
    return model
