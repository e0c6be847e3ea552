"""Run identity: :func:`run_id` is the one function that names a run.

It hashes the *semantic* part of the resolved config -- what changes the numbers -- and nothing
about where or how the run executes (device, paths, logging, launcher, progress bars). Settings
with no effect are normalised away first: without a regularizer, ``mask``, ``strength`` and
``eps`` are dropped, so the two mask twins of a baseline cell are one run. The W&B run id, the
run directory name and the "already done" check all use it.

The identity of the data is part of it (:func:`data_identity`): the content digests of a files
dataset's embedding, label and class-name files, of the weights ``backbone.checkpoint_path``
leads to (``sae.io.fingerprint.weights_id``), and, for an
image dataset, what its embedding cache key holds beyond the config. Generated data (synthetic,
digits) is named by its config alone.

This module imports no torch: the sweeper plans a grid and the report reads runs through it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sae import regularizers
from sae.config import RootConfig, to_dict
from sae.io.fingerprint import content_identity, weights_id

# Keys that never change a run's numbers: how and where it runs, and how it is logged.
NON_SEMANTIC_KEYS = {
    "paths", "logger", "extract", "launcher", "sweep_name", "dry_run", "force", "run", "pack",
    "pack_members",
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
    if cfg.regularizer.name == regularizers.BASELINE:
        config.pop("mask")
        config["regularizer"] = {"name": regularizers.BASELINE}
    if cfg.backbone.library == "none":
        config["backbone"] = {"name": "none"}
    config["dataset"] = cfg.dataset.identity()
    if data := data_identity(cfg):
        config["data"] = data
    if cfg.backbone.library != "none" and cfg.backbone.checkpoint_path:
        # The files the loader reads, never the folder's other contents nor its path (the
        # embedding cache key uses the same identity).
        config["backbone"]["weights"] = weights_id(cfg.backbone)
    return config


FILES_DATA_FIELDS = ("train_path", "eval_path", "train_labels", "eval_labels", "class_names")


def data_identity(cfg: RootConfig) -> dict[str, Any]:
    """What names the data beyond the config: the digest of every file a files dataset reads;
    for an image dataset, the fields its embedding cache key (``sae.data.cache.key_fields``)
    holds that the run's config does not (the weights digest comes with the backbone). Empty for
    generated data, so the demo's run ids stay as they were."""
    dataset = cfg.dataset
    if dataset.kind == "files":
        cache = digest_cache_dir(cfg)
        return {name: content_identity(getattr(dataset, name), cache)
                for name in FILES_DATA_FIELDS if getattr(dataset, name)}
    if dataset.kind == "images":
        cache_fields: dict[str, Any] = {"layout": dataset.layout}
        if dataset.max_per_split is not None:
            cache_fields["subset_seed"] = dataset.split_seed
        if dataset.layout == "digits_images":
            cache_fields["generated_split"] = {"eval_fraction": dataset.eval_fraction,
                                               "seed": dataset.split_seed}
        return {"embedding_cache": cache_fields}
    return {}


def digest_cache_dir(cfg: RootConfig) -> str | None:
    """Where file digests are cached when a file's own directory is not writable (None when the
    output root is not resolved, as in a config built without Hydra)."""
    cache = str(cfg.paths.cache)
    return None if "${" in cache else cache


# The readable part of a run id stays within SLUG_LIMIT characters (with the hash, a W&B id must
# stay under 64) by shortening names through this fixed table (regularizers: their registry
# entries, sae.regularizers.abbreviation), never by cutting: a cut dropped the seed of 15 of the
# paper's 270 runs. Slugs within the limit are left as they are, so the ids of finished runs
# (the demo's among them) do not change.
SLUG_LIMIT = 48
ABBREVIATIONS = {
    "openimages": "oi", "imagenet": "in1k", "digits_images": "digitsimg", "synthetic": "syn",
    "clip_vitl14": "clipL14", "siglip2_openclip": "siglip2oc", "siglip2": "siglip2",
    "vit_l16_timm": "vitL16timm", "vit_l16": "vitL16", "dinov2_vitl14": "dinoL14",
}


def readable_slug(parts: list[str | None]) -> str:
    """``parts`` joined by ``-``; each name shortened through ABBREVIATIONS (a regularizer's
    through the registry) when the whole would exceed SLUG_LIMIT (a part ``name-suffix`` is
    shortened on its name)."""
    slug = "-".join(p for p in parts if p)
    if len(slug) <= SLUG_LIMIT:
        return slug
    short = []
    for part in filter(None, parts):
        name, dash, rest = part.partition("-")
        short.append((ABBREVIATIONS.get(name) or regularizers.abbreviation(name)) + dash + rest)
    return "-".join(short)


def run_id(cfg: RootConfig) -> str:
    """``<readable slug>-<10 hex of the semantic hash>``: stable, W&B-safe, every axis value in
    the slug (names abbreviated when long, see ABBREVIATIONS)."""
    payload = json.dumps(semantic_config(cfg), sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(payload.encode()).hexdigest()[:10]
    reg = cfg.regularizer.name
    mask = "" if reg == regularizers.BASELINE else ("-mask" if cfg.mask else "-nomask")
    parts = [cfg.dataset.name, cfg.backbone.name if cfg.backbone.library != "none" else None,
             f"k{cfg.k}", f"{reg}{mask}", f"s{cfg.seed}"]
    return f"{readable_slug(parts)}-{digest}"
