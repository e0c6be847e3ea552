"""What a regularizer is: one penalty on the pre-Top-k activations, as a value object.

Torch-free (the types only name tensors): the registry, the config validation and the report
read regularizers without loading torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

Tensor = Any  # torch.Tensor; not imported here so that this module stays torch-free
# The terms sae.training.packed fuses by hand for a whole pack (Regularizer.pack_term); None = autograd.
PACK_TERMS = (None, "zero", "off_support", "ratio")


@dataclass(frozen=True)
class FusedKernels:
    """Hand-written forward and backward of a penalty on the penalised (B, m) columns.

    The fast path (``sae.training.fast``) hands them the pre-activations of the columns the penalty
    sees (all n, or the gathered batch-active ones) and the clamp bound that applies the mask
    (``upper_m``: +inf on the mask, 0 off it; None without mask). Both must agree with the
    reference ``Regularizer.penalty`` to float tolerance (tests/test_fast.py checks the built-in
    ones; a new one adds its cases there).

    ``forward(pre_bm, upper_m, values_bk, **params) -> (R, z_bm, saved)``: the penalty R (a
    scalar, the batch mean), z = ReLU(pre) on the mask (kept for the backward) and whatever
    else the backward needs. ``values_bk`` are the Top-k code values (ReLU applied).

    ``grad(z_bm, saved, scale, **params) -> (h_bm, c_b1)``: scale * dR/dpre on the columns,
    factored as c_b1 * h_bm with c_b1 a per-row (B, 1) scale; it may overwrite ``z_bm``. The
    fast path either multiplies them out or folds c into the (B, d) side of the product.
    """

    forward: Callable[..., tuple[Tensor, Tensor, tuple]]
    grad: Callable[..., tuple[Tensor, Tensor]]
    # dR/dpre is 0 on each sample's support: the fast path writes the reconstruction's gradient
    # there instead of adding it to whatever ``grad`` left in those entries.
    zero_on_support: bool


@dataclass(frozen=True)
class Regularizer:
    """A sparsity penalty R(pre) of the training objective L = NMSE + alpha AuxK + lambda R.

    ``penalty(pre, support, mask, **params) -> scalar``: the reference, differentiated by
    autograd; ``pre`` (B, n) pre-activations, ``support`` (B, k) Top-k indices, ``mask``
    restricts it to the batch-active units. ``fields`` names the ``regularizer.*`` config
    fields passed to it as ``params`` (e.g. ``("eps",)``). ``kernels``: optional fused
    kernels for the fast path; without them the fast path differentiates ``penalty``.
    ``pack_term``: which term of the packed objective's hand-fused head (``sae.training.packed``)
    computes this penalty for a whole pack at once: ``"zero"`` (no penalty), ``"off_support"``
    (the off-support L1: the masked sum of z less the support's), ``"ratio"`` (the mean L1/L2
    ratio), or None: a pack differentiates ``penalty`` by autograd, member by member.
    ``abbreviation``: its short form in a run id too long to keep whole (default: the name).
    """

    name: str
    penalty: Callable[..., Tensor]
    fields: tuple[str, ...] = ()
    kernels: FusedKernels | None = None
    pack_term: str | None = None
    abbreviation: str | None = None

    def __post_init__(self) -> None:
        if self.pack_term not in PACK_TERMS:
            raise ValueError(f"regularizer {self.name!r}: pack_term {self.pack_term!r} is not "
                             f"one of {PACK_TERMS}")

    def params(self, **config: Any) -> dict[str, Any]:
        """The values of this penalty's fields among the ``regularizer.*`` config values."""
        missing = [f for f in self.fields if f not in config]
        if missing:
            raise TypeError(f"regularizer {self.name!r} needs the config field(s) {missing}")
        return {f: config[f] for f in self.fields}

    def bind(self, **config: Any) -> Callable[[Tensor, Tensor, bool], Tensor]:
        """``penalty(pre, support, mask)`` with this penalty's fields taken from ``config``."""
        return partial(self.penalty, **self.params(**config))
