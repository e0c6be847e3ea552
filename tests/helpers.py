"""Small builders shared by the tests (no fixtures: plain functions, explicit arguments)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sae.config import (
    RegularizerConfig,
    RootConfig,
    SAEConfig,
    SyntheticDatasetConfig,
    TrainConfig,
)

REPO = Path(__file__).resolve().parent.parent


def synthetic_cfg(*, n_latents=256, k=4, reg="none", strength=0.0, mask=True, max_steps=None,
                  epochs=10.0, batch=256, lr=1e-3, n_train=8000, dim=32, n_atoms=128,
                  checkpoint_every=0, **train_kw) -> RootConfig:
    """A cell on a small planted dictionary that trains in seconds on 2 cores."""
    return RootConfig(
        dataset=SyntheticDatasetConfig(name="synthetic", dim=dim, n_atoms=n_atoms,
                              atoms_per_sample=3, n_train=n_train, n_eval=1000),
        sae=SAEConfig(n_latents=n_latents),
        regularizer=RegularizerConfig(name=reg, strength=strength),
        train=TrainConfig(batch_size=batch, epochs=epochs, lr=lr, max_steps=max_steps,
                          progress=False, checkpoint_every=checkpoint_every, **train_kw),
        k=k, mask=mask,
    )


def run_cli(args: list[str], *, env_extra: dict | None = None, timeout: float = 300,
            cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run ``python -m ...`` as a user would, with a timeout, capturing the output."""
    env = {**os.environ, "WANDB_SILENT": "true", **(env_extra or {})}
    env.pop("WANDB_API_KEY", None)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
