"""Frozen vision backbones: a backbone config -> (model, preprocess transform, embed function).

Three libraries, each with the embeddings METHOD.md s1 names:

- open_clip, ``embedding: image_projected``: ``model.encode_image(x)``, the projected image
  embedding (CLIP ViT-L/14: 768-d, SigLIP2 SO400M: 1152-d), not normalised here;
- timm, ``embedding: cls_pre_logits``: ``model.forward_head(model.forward_features(x),
  pre_logits=True)``, the pooled token after the final norm, before the classifier (ViT-L/16:
  1024-d);
- transformers (``AutoModel`` + its ``AutoImageProcessor``, the reference code's library),
  ``embedding: image_features``: ``model.get_image_features(pixel_values)`` (SigLIP2: pooled and
  projected, 1152-d); ``embedding: cls_last_hidden_state``: the CLS token of
  ``model(pixel_values).last_hidden_state`` (ViT-L/16: after the final LayerNorm, 1024-d).

Weights, in order of precedence:

- ``checkpoint_path`` naming a *file*: load that file (compute nodes without network). With a
  pretrained tag as well, the tag's preprocessing (mean, std, resize mode) is kept, so the file
  must hold that tag's weights.
- ``checkpoint_path`` naming a *directory*: the libraries' download cache
  (``scripts/download_weights.py`` fills it on a login node); the tag is resolved from it.
- ``checkpoint_path`` naming a transformers *snapshot directory* (``config.json`` in it): loaded
  from there (``save_pretrained`` output, or ``models--org--name/snapshots/<rev>``).
- ``pretrained``: an open_clip tag, or ``"true"`` for timm and transformers (the model name
  names the weights); read from the Hugging Face cache, offline with ``HF_HUB_OFFLINE=1``.
- neither: the real architecture with random weights, seeded (``RANDOM_INIT_SEED``) so that every
  process -- the train and eval splits, two array tasks -- embeds with the same network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sae.backbones.base import Backbone, output_dim
from sae.backbones.inputs import torchvision_split, with_uint8_inputs
from sae.config import BackboneConfig, ConfigError
from sae.io.fingerprint import RANDOM_INIT_SEED, pretrained_flag, weights_id  # noqa: F401 -- re-exported
from sae.io.plain import plain

EMBEDDINGS = {"open_clip": ("image_projected",), "timm": ("cls_pre_logits",),
              "transformers": ("image_features", "cls_last_hidden_state")}




def check_backbone(cfg: BackboneConfig) -> None:
    """Explicit errors for a backbone config that cannot embed images."""
    if cfg.library not in EMBEDDINGS:
        raise ConfigError(
            f"backbone.library: {cfg.library!r} cannot embed images. "
            f"Fix: use a backbone of library {tuple(EMBEDDINGS)} (e.g. backbone=clip_vitl14)"
        )
    if cfg.embedding not in EMBEDDINGS[cfg.library]:
        raise ConfigError(
            f"backbone.embedding: {cfg.embedding!r} is not available for {cfg.library}. "
            f"Fix: use one of {EMBEDDINGS[cfg.library]}"
        )
    if cfg.checkpoint_path and not Path(cfg.checkpoint_path).exists():
        raise ConfigError(
            f"backbone.checkpoint_path: {cfg.checkpoint_path} does not exist. Fix: download the "
            "weights there (scripts/download_weights.py) or unset it (null)"
        )


def load_backbone(cfg: BackboneConfig, device: str | torch.device = "cpu") -> Backbone:
    """Build the model of ``cfg`` in eval mode on ``device`` with its inference transform."""
    check_backbone(cfg)
    random_init = not pretrained_flag(cfg.pretrained) and not _is_file(cfg.checkpoint_path)
    # fork_rng: seeding for the random variants must not disturb the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        if cfg.library == "open_clip":
            backbone = _load_open_clip(cfg)
        elif cfg.library == "transformers":
            from sae.backbones.hf import load_transformers

            backbone = load_transformers(cfg, random_init)
        else:
            backbone = _load_timm(cfg)
    backbone.model.eval().requires_grad_(False).to(device)
    backbone.info.update(weights=weights_id(cfg), random_init=random_init, library=cfg.library,
                         model=cfg.model, embedding=cfg.embedding, dim=backbone.dim)
    return backbone


def _is_file(path: str | None) -> bool:
    return bool(path) and Path(path).is_file()  # type: ignore[arg-type]


def _cache_dir(cfg: BackboneConfig) -> str | None:
    """The download cache directory, when checkpoint_path names one."""
    if cfg.checkpoint_path and Path(cfg.checkpoint_path).is_dir():
        return str(cfg.checkpoint_path)
    return None


def _load_open_clip(cfg: BackboneConfig) -> Backbone:
    import open_clip

    kwargs: dict[str, Any] = dict(cfg.model_kwargs)
    tag = str(cfg.pretrained) if pretrained_flag(cfg.pretrained) else None
    if _is_file(cfg.checkpoint_path):
        pretrained = cfg.checkpoint_path
        if tag:  # keep the tag's preprocessing, which open_clip only applies for a tag
            kwargs = {**_open_clip_tag_preprocess(cfg.model, tag), **kwargs}
    else:
        pretrained = tag
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            cfg.model, pretrained=pretrained, cache_dir=_cache_dir(cfg), **kwargs
        )
    except RuntimeError as exc:
        raise RuntimeError(
            f"open_clip could not build {cfg.model!r} with pretrained={pretrained!r}: {exc}. "
            "Fix: check backbone.model / backbone.pretrained against open_clip.list_pretrained(); "
            "without network, download the weights first (scripts/download_weights.py) and set "
            "SAE_WEIGHTS_DIR (and HF_HUB_OFFLINE=1) on the compute node"
        ) from exc

    def embed(images: torch.Tensor) -> torch.Tensor:
        return model.encode_image(images).float()

    info = {"preprocess": plain(model.visual.preprocess_cfg), "transform": _describe(preprocess)}
    backbone = Backbone(model, preprocess, embed, output_dim(embed, preprocess), info)
    return with_uint8_inputs(backbone, torchvision_split(preprocess))


def _open_clip_tag_preprocess(model_name: str, tag: str) -> dict[str, Any]:
    """The preprocessing and activation a pretrained tag implies, as factory kwargs."""
    import open_clip

    tag_cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not tag_cfg:
        raise ConfigError(
            f"backbone.pretrained: {tag!r} is not an open_clip tag of {model_name!r}. Fix: use one "
            f"of {open_clip.list_pretrained_tags_by_model(model_name)}"
        )
    names = {"mean": "image_mean", "std": "image_std", "interpolation": "image_interpolation",
             "resize_mode": "image_resize_mode"}
    out: dict[str, Any] = {arg: tag_cfg[key] for key, arg in names.items() if key in tag_cfg}
    if tag_cfg.get("quick_gelu"):
        out["force_quick_gelu"] = True
    return out


def _load_timm(cfg: BackboneConfig) -> Backbone:
    import timm

    kwargs: dict[str, Any] = dict(cfg.model_kwargs)
    overlay: dict[str, Any] = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    pretrained = pretrained_flag(cfg.pretrained)
    if _is_file(cfg.checkpoint_path):
        overlay["file"] = str(cfg.checkpoint_path)  # timm's documented way to load a local file
        pretrained = True
    try:
        model = timm.create_model(cfg.model, pretrained=pretrained, cache_dir=_cache_dir(cfg),
                                  pretrained_cfg_overlay=overlay or None, **kwargs)
    except (RuntimeError, OSError) as exc:
        raise RuntimeError(
            f"timm could not build {cfg.model!r} (pretrained={pretrained}): {exc}. Fix: check the "
            "name with timm.list_models(pretrained=True); without network, download the weights "
            "first (scripts/download_weights.py) and set SAE_WEIGHTS_DIR (and HF_HUB_OFFLINE=1)"
        ) from exc
    data_cfg = dict(timm.data.resolve_model_data_config(model))
    if "img_size" in kwargs:
        # timm keeps the pretrained input size in its data config when img_size is overridden;
        # the transform must produce what the network now expects.
        size = kwargs["img_size"]
        height, width = (size, size) if isinstance(size, int) else size
        data_cfg["input_size"] = (3, int(height), int(width))
    preprocess = timm.data.create_transform(**data_cfg, is_training=False)

    def embed(images: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.forward_features(images), pre_logits=True).float()

    info = {"preprocess": plain(data_cfg), "transform": _describe(preprocess)}
    backbone = Backbone(model, preprocess, embed, output_dim(embed, preprocess), info)
    return with_uint8_inputs(backbone, torchvision_split(preprocess))


def _describe(transform: Any) -> str:
    """The transform's repr without memory addresses, so it is stable across processes."""
    import re

    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(transform))
