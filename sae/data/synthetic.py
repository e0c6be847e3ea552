"""Embeddings generated from a planted sparse dictionary, so dictionary recovery is measurable.

Each class owns a contiguous block of the planted atoms. A sample of class c is a positive
combination of ``atoms_per_sample`` distinct atoms, each drawn from c's block with probability
``class_affinity`` (else from the whole dictionary), plus Gaussian noise, then unit-normalised.
The train and evaluation splits share the dictionary and differ in their samples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sae.config import SyntheticDatasetConfig
from sae.data.types import EmbeddingSet


def planted_dictionary(cfg: SyntheticDatasetConfig) -> torch.Tensor:
    """(n_atoms, dim) unit atoms, a pure function of ``data_seed``."""
    generator = torch.Generator().manual_seed(cfg.data_seed)
    return F.normalize(torch.randn(cfg.n_atoms, cfg.dim, generator=generator), dim=1)


def _draw_atoms(labels: torch.Tensor, cfg: SyntheticDatasetConfig, generator: torch.Generator
                ) -> torch.Tensor:
    """(N, atoms_per_sample) distinct atom ids per sample.

    Each of the m draws comes from the sample's class block with probability class_affinity:
    q ~ Binomial(m, affinity) atoms from the block, m - q from outside it. Ranking random scores
    with a large bonus on one side gives m distinct atoms of that side in random order.
    """
    n, m = labels.shape[0], cfg.atoms_per_sample
    block = max(cfg.n_atoms // cfg.n_classes, m)
    atom_ids = torch.arange(cfg.n_atoms)
    in_block = ((atom_ids[None, :] // block) == (labels[:, None] % cfg.n_classes)).float()
    scores = torch.rand(n, cfg.n_atoms, generator=generator)
    from_block = (scores + 10 * in_block).topk(m, dim=1).indices
    outside = (scores + 10 * (1 - in_block)).topk(m, dim=1).indices
    q = (torch.rand(n, m, generator=generator) < cfg.class_affinity).sum(dim=1, keepdim=True)
    return torch.where(torch.arange(m)[None, :] < q, from_block, outside)


def make_split(cfg: SyntheticDatasetConfig, atoms: torch.Tensor, n: int, seed: int, name: str
               ) -> EmbeddingSet:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(cfg.n_classes, (n,), generator=generator)
    atom_idx = _draw_atoms(labels, cfg, generator)
    # Positive coefficients with spread (0.5 .. ~3), so atoms differ in how strongly they fire.
    coeffs = 0.5 + torch.empty(n, cfg.atoms_per_sample).exponential_(1.0, generator=generator)
    x = torch.einsum("nm,nmd->nd", coeffs, atoms[atom_idx])
    x = x + cfg.noise * torch.randn(n, cfg.dim, generator=generator)
    if cfg.normalize:
        x = F.normalize(x, dim=1)
    return EmbeddingSet(
        name=name, x=x, labels=labels, class_names=[f"class_{c}" for c in range(cfg.n_classes)],
        planted_atoms=atoms,
        info={"source": "synthetic planted dictionary", "n_atoms": cfg.n_atoms,
              "atoms_per_sample": cfg.atoms_per_sample, "noise": cfg.noise},
    )


def load_synthetic(cfg: SyntheticDatasetConfig) -> tuple[EmbeddingSet, EmbeddingSet]:
    atoms = planted_dictionary(cfg)
    # Distinct seeds for the two splits, both derived from data_seed.
    train = make_split(cfg, atoms, cfg.n_train, cfg.data_seed * 2 + 1, "synthetic/train")
    evaluation = make_split(cfg, atoms, cfg.n_eval, cfg.data_seed * 2 + 2, "synthetic/eval")
    return train, evaluation
