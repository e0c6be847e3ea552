"""No penalty: the plain Top-k SAE, the hard budget alone (the baseline)."""

from __future__ import annotations

import torch

from sae.regularizers.base import Regularizer


def no_penalty(pre: torch.Tensor, support: torch.Tensor, mask: bool = True) -> torch.Tensor:
    """An exact zero with no graph: the objective stays uniform, no gradient reaches ``pre``."""
    return pre.new_zeros(())


REGULARIZER = Regularizer(name="none", penalty=no_penalty, pack_term="zero")
