"""The sparsity penalties of arXiv:2606.27321 (METHOD.md s3), one module each, and their registry.

Both paper penalties act on ``z = ReLU(pre)``, the activations *before* the Top-k selection, and
are restricted to the batch-active set ``A`` (units selected for at least one sample of the
batch) when ``mask`` is on. Why the mask: a unit outside ``A`` gets no reconstruction gradient
in this step, so a penalty on it can only push it further down -- towards a dead latent.

    R_off   = (1/B) sum_i sum_{j in M, j not in S_i} z_ij                 (offsupport_l1)
    R_ratio = (1/B) sum_i ||z_{i,M}||_1 / (||z_{i,M}||_2 + eps)           (l1l2)

with ``M = A`` (mask on) or all n units (mask off).

The registry: ``names()`` lists every regularizer, ``get(name)`` returns its
:class:`Regularizer` (importing its module on first use), ``register(reg)`` adds one defined
elsewhere. This module imports no torch: config validation and the report read ``names()``.
The penalty functions (``off_support_l1``, ``l1_l2_ratio``, ``batch_active``) are importable
from here; they load torch when first accessed.
"""

from __future__ import annotations

from importlib import import_module

from sae.regularizers.base import FusedKernels, Regularizer

BASELINE = "none"  # the plain Top-k SAE: the regularizer every other one is compared with
# The built-in regularizers: name -> module defining ``REGULARIZER`` (imported lazily).
_BUILTIN = {
    "none": "sae.regularizers.none",
    "offsupport_l1": "sae.regularizers.offsupport_l1",
    "l1l2": "sae.regularizers.l1l2",
}
# Short forms in long run ids (sae.identity), kept here so that reading them loads no torch;
# a registered regularizer gives its own (Regularizer.abbreviation).
_BUILTIN_ABBREVIATIONS = {"offsupport_l1": "offl1"}
_registered: dict[str, Regularizer] = {}  # user-registered and already-imported built-ins

_EXPORTS = {
    "off_support_l1": "sae.regularizers.offsupport_l1",
    "l1_l2_ratio": "sae.regularizers.l1l2",
    "DEFAULT_EPS": "sae.regularizers.l1l2",
    "batch_active": "sae.regularizers.common",
}
__all__ = ["BASELINE", "FusedKernels", "Regularizer", "UnknownRegularizerError", "abbreviation", "get", "names",
           "register", *_EXPORTS]


class UnknownRegularizerError(KeyError, ValueError):
    """No regularizer has this name (a KeyError for lookups, a ValueError for validation)."""

    def __str__(self) -> str:
        return str(self.args[0])


def names() -> tuple[str, ...]:
    """Every regularizer name: the built-in ones, then the registered ones in order."""
    return (*_BUILTIN, *(name for name in _registered if name not in _BUILTIN))


def abbreviation(name: str) -> str:
    """The short form of a regularizer's name where a run id must be shortened (the name
    itself when it has none, or is no regularizer's)."""
    if name in _BUILTIN_ABBREVIATIONS:
        return _BUILTIN_ABBREVIATIONS[name]
    reg = _registered.get(name)
    return (reg.abbreviation if reg is not None else None) or name


def register(reg: Regularizer) -> Regularizer:
    """Add ``reg`` under ``reg.name`` (registering the same object twice is a no-op)."""
    if not isinstance(reg, Regularizer):
        raise TypeError(f"register() takes a sae.regularizers.Regularizer, got {type(reg)!r}")
    known = _registered.get(reg.name)
    if (reg.name in _BUILTIN or known is not None) and known is not reg:
        raise ValueError(f"a regularizer named {reg.name!r} is already registered")
    _registered[reg.name] = reg
    return reg


def get(name: str) -> Regularizer:
    """The regularizer called ``name``; ``UnknownRegularizerError`` naming the known ones
    otherwise."""
    if name in _registered:
        return _registered[name]
    if name not in _BUILTIN:
        raise UnknownRegularizerError(f"unknown regularizer {name!r}; known: {', '.join(names())} "
                       "(sae.regularizers.register adds one)")
    reg = import_module(_BUILTIN[name]).REGULARIZER
    if reg.name != name:
        raise RuntimeError(f"{_BUILTIN[name]} defines {reg.name!r}, registered as {name!r}")
    _registered[name] = reg
    return reg


def __getattr__(attribute: str):
    if attribute in _EXPORTS:
        return getattr(import_module(_EXPORTS[attribute]), attribute)
    raise AttributeError(f"module 'sae.regularizers' has no attribute {attribute!r}")
