"""Every decision of one fast step, taken on the host from shapes, config and host integers."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

import torch

from sae import regularizers
from sae.model import TopKSAE
from sae.regularizers import FusedKernels

# The k-sparse parts (decoding, grad W_dec, the support's dot products, grad W_enc without a
# regularizer) have two exact formulations: "sparse" gathers and embedding-bags over the
# support (B k d work, bandwidth-bound) and "dense" products with the (B, n) code (B n d work,
# on tensor cores). Sparse wins on the CPU by n / k; dense wins on CUDA under 16-bit autocast
# or TF32, where PyTorch's gather kernels are far slower than a tensor-core product (figures:
# docs/performance.md). Top-k by group maxima is the default on every device.
DecoderMode = Literal["auto", "sparse", "dense"]
TopkMode = Literal["auto", "chunks", "plain"]
DECODER_MODES: tuple[DecoderMode, ...] = ("auto", "sparse", "dense")
TOPK_MODES: tuple[TopkMode, ...] = ("auto", "chunks", "plain")


@dataclass(frozen=True)
class Formulation:
    """How the fast step computes its k-sparse parts and its Top-k; "auto" = by device.
    Both choices give the same values (tests/test_fast.py runs every case under both)."""

    decoder: DecoderMode = "auto"
    topk: TopkMode = "auto"

    def __post_init__(self) -> None:
        if self.decoder not in DECODER_MODES or self.topk not in TOPK_MODES:
            raise ValueError(f"decoder must be one of {DECODER_MODES} and topk one of "
                             f"{TOPK_MODES}, got {self.decoder!r} and {self.topk!r}")

    def dense_decoder(self, device: str, compute_dtype: torch.dtype | None) -> bool:
        if self.decoder != "auto":
            return self.decoder == "dense"
        tensor_cores = compute_dtype in (torch.bfloat16, torch.float16) or (
            torch.get_float32_matmul_precision() != "highest")
        return device == "cuda" and tensor_cores

    def chunked_topk(self) -> bool:
        return self.topk != "plain"  # "auto": group maxima on every device

    def resolved(self, device: str, compute_dtype: torch.dtype | None) -> dict[str, str]:
        """What a step on ``device`` ("cpu", "cuda") under ``compute_dtype`` (autocast's, or
        None) runs: {"decoder": "sparse" | "dense", "topk": "chunks" | "plain"}."""
        return {"decoder": "dense" if self.dense_decoder(device, compute_dtype) else "sparse",
                "topk": "chunks" if self.chunked_topk() else "plain"}


AUTO = Formulation()


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast gives the products on ``device_type`` ("cpu", "cuda"), None when
    autocast is off there."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def resolved_formulation(device: str, compute_dtype: torch.dtype | None,
                         formulation: Formulation = AUTO) -> dict[str, str]:
    """``formulation.resolved(device, compute_dtype)``."""
    return formulation.resolved(device, compute_dtype)


@dataclass(frozen=True)
class StepPlan:
    """What one step computes and how; nothing in it needs a device read-out."""

    k: int
    regularizer: str
    # The penalty's fused kernels (compiled or not); None = no fused penalty: the step leaves
    # the penalty to autograd on ``pre`` (sae.training.fast.loss).
    kernels: FusedKernels | None
    params: dict[str, Any]  # the penalty's config fields (e.g. eps)
    mask: bool
    strength: float
    aux_alpha: float
    aux_k: int
    aux_cols: int  # C: dead-first columns AuxK looks at (an upper bound on the dead count); 0 = none
    active_cols: int  # host bound on the batch-active count: n, or B k when B k <= n / 2
    compute_dtype: torch.dtype | None  # dtype of the dense products; None = float32
    dense_decoder: bool  # the k-sparse parts as products with the dense (B, n) code
    chunked_topk: bool  # Top-k by group maxima (topk_by_chunks) rather than torch.topk


def make_plan(
    model: TopKSAE, x: torch.Tensor, *, regularizer: str, strength: float, mask: bool,
    eps: float, dead: torch.Tensor, aux_alpha: float, aux_k: int, dead_bound: int | None,
    formulation: Formulation = AUTO, compiled: bool = False,
) -> StepPlan:
    """``compiled``: the penalty's kernels through ``torch.compile``."""
    reg = regularizers.get(regularizer)
    kernels = reg.kernels
    if kernels is not None and compiled:
        kernels = compiled_kernels(kernels)
    batch, n = x.shape[0], model.n_latents
    aux_cols = _aux_columns(dead, dead_bound, n) if aux_alpha > 0 else 0
    # A holds at most B k distinct units: a bound known without looking at the data. Gathering
    # the columns pays off when it halves the work (B k <= n / 2); typical sizes are dense.
    gather = mask and kernels is not None and batch * model.k <= n // 2
    device = x.device.type
    compute_dtype = autocast_dtype(device)
    return StepPlan(
        k=model.k, regularizer=regularizer, kernels=kernels, params=reg.params(eps=eps),
        mask=mask, strength=float(strength), aux_alpha=float(aux_alpha), aux_k=min(aux_k, n),
        aux_cols=aux_cols, active_cols=batch * model.k if gather else n,
        compute_dtype=compute_dtype,
        dense_decoder=formulation.dense_decoder(device, compute_dtype),
        chunked_topk=formulation.chunked_topk(),
    )


@functools.cache
def compiled_kernels(kernels: FusedKernels) -> FusedKernels:
    """``kernels`` through ``torch.compile`` (fewer passes over (B, m); the first step of each
    shape pays the compilation, tens of seconds). Cached: one compilation per kernel set."""
    return FusedKernels(forward=torch.compile(kernels.forward), grad=torch.compile(kernels.grad),
                        zero_on_support=kernels.zero_on_support)


def _aux_columns(dead: torch.Tensor, dead_bound: int | None, n: int) -> int:
    """C >= the dead count, from host knowledge only (0: AuxK is an exact zero, skip it)."""
    if dead_bound is not None:
        return max(0, min(int(dead_bound), n))
    if dead.device.type == "cpu":  # the mask lives in host memory: counting waits for nothing
        return int(dead.sum())
    return n
