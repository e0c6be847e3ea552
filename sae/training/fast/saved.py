"""What the fast step's forward keeps for its backward."""

from __future__ import annotations

from typing import NamedTuple

import torch

from sae.model import SparseCode
from sae.training.fast.auxk import AuxState
from sae.training.fast.penalties import PenaltyState


class Saved(NamedTuple):
    x_centered_bd: torch.Tensor  # (B, d) x_in - b_pre: the encoder's input
    code: SparseCode
    error_bd: torch.Tensor  # (B, d) x_hat - x
    variance: torch.Tensor  # () batch variance of x
    std_b1: torch.Tensor | None  # LayerNorm scale, None without LayerNorm
    aux: AuxState | None
    penalty: PenaltyState | None
    code_bn: torch.Tensor | None  # (B, n) the code, dense (dense_decoder only)
