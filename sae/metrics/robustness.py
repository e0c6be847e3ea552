"""Inference-time k robustness (METHOD.md s4): R^2 with Top-k' at inference, k' != training k.

    k'        = clamp(round(multiple * k_train), 1, n)      for each multiple (deduplicated)
    curve     = {k' : R^2(k')}        ratio = {k' : R^2(k') / R^2(k_train)}
    flat keys = r2_at_<m>, r2_ratio_at_<m>  (by the multiple m, named by sae.io.plain.multiple_name:
                k_div4, k_div2, k, k_x2, k_x4; comparable across training k, unlike the absolute
                k'; names a W&B dashboard can sort by)

The ratio is NaN when R^2(k_train) <= 0: a ratio of two negative R^2 reads backwards.

The encoder runs once per chunk: the pre-activations are computed once and each k' only
re-selects (Top-k') and decodes, so the cost is one encoder pass plus |k'| cheap decodes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch

from sae.io.plain import multiple_name
from sae.metrics.reconstruction import R2Accumulator
from sae.model import TopKSAE

DEFAULT_MULTIPLES = (0.25, 0.5, 1.0, 2.0, 4.0)


def inference_ks(train_k: int, multiples: Iterable[float], n_latents: int) -> list[int]:
    """Sorted, distinct inference budgets; the training k is always among them."""
    ks = {max(1, min(n_latents, round(m * train_k))) for m in multiples}
    ks.add(min(train_k, n_latents))
    return sorted(ks)


class KRobustness(NamedTuple):
    train_k: int
    r2: dict[int, float]  # k' -> R^2
    ratio: dict[int, float]  # k' -> R^2(k') / R^2(train_k)

    def min_ratio(self) -> float:
        """Worst ratio over k' != train_k (NaN if there is none)."""
        others = [v for k, v in self.ratio.items() if k != self.train_k and not math.isnan(v)]
        return min(others) if others else float("nan")

    def mean_ratio(self) -> float:
        """Mean ratio over k' != train_k (NaN if there is none): claim 3's number."""
        others = [v for k, v in self.ratio.items() if k != self.train_k and not math.isnan(v)]
        return sum(others) / len(others) if others else float("nan")

    def by_multiple(self, multiples: Iterable[float]) -> dict[str, float]:
        """``{"r2_at_k_x2": R^2(k'), "r2_ratio_at_k_x2": ratio, ...}`` for each multiple; k'
        is clamped as in :func:`inference_ks` (the largest measured k' is the clamp at n)."""
        flat = {}
        for multiple in multiples:
            k = max(1, min(max(self.r2), round(multiple * self.train_k)))
            flat[f"r2_at_{multiple_name(multiple)}"] = self.r2[k]
            flat[f"r2_ratio_at_{multiple_name(multiple)}"] = self.ratio[k]
        return flat


def k_robustness_from(train_k: int, accumulators: dict[int, R2Accumulator]) -> KRobustness:
    r2 = {k: accumulators[k].result().r2 for k in sorted(accumulators)}
    base = r2[train_k]
    ratio = {k: (v / base if base > 0 else float("nan")) for k, v in r2.items()}
    return KRobustness(train_k, r2, ratio)


@torch.no_grad()
def k_robustness(
    sae: TopKSAE,
    x_nd: torch.Tensor,
    multiples: Sequence[float] = DEFAULT_MULTIPLES,
    chunk_size: int = 8192,
    train_k: int | None = None,
) -> KRobustness:
    """R^2 per inference k' and its ratio to R^2 at the training k (default ``sae.k``).

    ``x_nd`` may live on the CPU; each chunk is moved to the SAE's device.
    """
    train_k = sae.k if train_k is None else train_k
    device = sae.W_dec.device
    accumulators = {k: R2Accumulator() for k in inference_ks(train_k, multiples, sae.n_latents)}
    for start in range(0, x_nd.shape[0], chunk_size):
        x_bd = x_nd[start:start + chunk_size].to(device, torch.float32)
        pre_bn, stats = sae.encode_pre(x_bd)
        for k, acc in accumulators.items():
            acc.update(x_bd, sae.decode(sae.select(pre_bn, k), stats))
    return k_robustness_from(train_k, accumulators)
