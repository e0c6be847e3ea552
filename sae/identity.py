"""Run identity: :func:`run_id` is the one function that names a run.

It hashes the *semantic* part of the resolved config -- what changes the numbers -- and nothing
about where or how the run executes (device, paths, logging, launcher, progress bars). Settings
with no effect are normalised away first: without a regularizer, ``mask``, ``strength`` and
``eps`` are dropped, so the two mask twins of a baseline cell are one run. The W&B run id, the
run directory name and the "already done" check all use it.

This module imports no torch: the sweeper plans a grid and the report reads runs through it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sae.config import RootConfig, to_dict

# Keys that never change a run's numbers: how and where it runs, and how it is logged.
NON_SEMANTIC_KEYS = {
    "paths", "logger", "launcher", "sweep_name", "dry_run", "force", "pack", "pack_members",
    "train.device", "train.progress", "train.log_every", "train.checkpoint_every",
    "train.checkpoint_every_s",
    "train.compile", "train.fast_path",
    "backbone.batch_size", "backbone.num_workers", "backbone.checkpoint_path",
}


def semantic_config(cfg: RootConfig) -> dict[str, Any]:
    """The part of the config that determines the results, with no-effect settings removed."""
    config = to_dict(cfg)
    for dotted in NON_SEMANTIC_KEYS:
        *parents, leaf = dotted.split(".")
        node = config
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    if cfg.regularizer.name == "none":
        config.pop("mask")
        config["regularizer"] = {"name": "none"}
    if cfg.backbone.library == "none":
        config["backbone"] = {"name": "none"}
    config["dataset"] = cfg.dataset.identity()
    return config


def run_id(cfg: RootConfig) -> str:
    """``<readable slug>-<10 hex of the semantic hash>``: stable, W&B-safe, < 64 characters."""
    payload = json.dumps(semantic_config(cfg), sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(payload.encode()).hexdigest()[:10]
    reg = cfg.regularizer.name
    mask = "" if reg == "none" else ("-mask" if cfg.mask else "-nomask")
    parts = [cfg.dataset.name, cfg.backbone.name if cfg.backbone.library != "none" else None,
             f"k{cfg.k}", f"{reg}{mask}", f"s{cfg.seed}"]
    slug = "-".join(p for p in parts if p)[:48]
    return f"{slug}-{digest}"
