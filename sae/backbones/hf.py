"""The transformers backbones (``library: transformers``): the reference code's exact recipe.

The same lab's public extraction code (MonoLoss, METHOD.md s1) loads ``AutoModel`` and
``AutoImageProcessor`` from one Hugging Face checkpoint and takes

- ``embedding: image_features``: ``model.get_image_features(pixel_values)`` (SigLIP2);
- ``embedding: cls_last_hidden_state``: ``model(pixel_values).last_hidden_state[:, 0]`` (ViT).

Preprocessing is the processor's own: its resize in the DataLoader workers (uint8), its own
``rescale_and_normalize`` on the device (:mod:`sae.backbones.inputs`; :class:`ProcessorTransform`,
the whole processor in the workers, where that split is not exact). Where the checkpoint comes from:

- ``checkpoint_path`` holding ``config.json``: a snapshot directory, loaded as is (no network);
- ``checkpoint_path`` another directory: the Hugging Face hub cache to read (``cache_dir``), the
  layout ``scripts/download_weights.py`` fills (``models--org--name/snapshots/<rev>/``);
- neither: the default Hugging Face cache (``HF_HOME``). With ``HF_HUB_OFFLINE=1`` (compute
  nodes) nothing is downloaded in any case.

``pretrained: null`` builds the checkpoint's architecture (its ``config.json``) with random,
seeded weights, as the other libraries do.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from sae.backbones.base import Backbone, output_dim
from sae.backbones.inputs import processor_split, with_uint8_inputs
from sae.config import BackboneConfig
from sae.io.plain import plain

# ``from_pretrained`` in transformers 5 keeps the checkpoint's stored dtype ("auto"); float32
# weights are what the other libraries load, and what autocast expects on GPU.
LOAD_DTYPE = torch.float32


class ProcessorTransform:
    """PIL image -> (3, H, W) float tensor through a Hugging Face image processor (picklable, so
    DataLoader workers can run it)."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        return f"{type(self.processor).__name__}({self.processor.to_json_string()})"


def checkpoint_source(cfg: BackboneConfig) -> tuple[str, dict[str, Any]]:
    """What ``from_pretrained`` reads: (a snapshot directory or the model id, its kwargs)."""
    path = Path(cfg.checkpoint_path) if cfg.checkpoint_path else None
    if path is not None and (path / "config.json").is_file():
        return str(path), {"local_files_only": True}
    if path is not None and path.is_dir():
        return cfg.model, {"cache_dir": str(path)}
    return cfg.model, {}


def load_transformers(cfg: BackboneConfig, random_init: bool) -> Backbone:
    """``AutoModel`` + ``AutoImageProcessor`` of ``cfg.model`` with the output rule of
    ``cfg.embedding``. The caller seeds the RNG (random init) and sets eval mode."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    source, kwargs = checkpoint_source(cfg)
    try:
        processor = AutoImageProcessor.from_pretrained(source, **kwargs)
        if random_init:
            config = AutoConfig.from_pretrained(source, **kwargs)
            model = AutoModel.from_config(config, dtype=LOAD_DTYPE, **cfg.model_kwargs)
        else:
            model = AutoModel.from_pretrained(source, dtype=LOAD_DTYPE, **kwargs,
                                              **cfg.model_kwargs)
    except OSError as exc:  # transformers raises OSError for a checkpoint it cannot find
        raise RuntimeError(
            f"transformers could not load {source!r}: {exc}. Fix: on a machine with network, run "
            f"`python scripts/download_weights.py {cfg.name}` into $SAE_WEIGHTS_DIR, then set "
            "SAE_WEIGHTS_DIR (and HF_HUB_OFFLINE=1) on the compute node, or point "
            "backbone.checkpoint_path to a snapshot directory"
        ) from exc
    embed = _embed_function(model, cfg.embedding)
    preprocess = ProcessorTransform(processor)
    info = {"preprocess": plain(processor.to_dict()), "transform": type(processor).__name__,
            "source": source if source != cfg.model else f"hub:{cfg.model}"}
    backbone = Backbone(model, preprocess, embed, output_dim(embed, preprocess), info)
    return with_uint8_inputs(backbone, processor_split(processor))


def _embed_function(model: torch.nn.Module, embedding: str
                    ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The reference output rule: (B, 3, H, W) pixel values -> (B, d) float32."""
    if embedding == "image_features":
        def embed(images: torch.Tensor) -> torch.Tensor:
            out = model.get_image_features(pixel_values=images)
            # transformers 5 returns a ModelOutput whose pooler_output is what 4.x returned
            features = out if isinstance(out, torch.Tensor) else out.pooler_output
            return features.float()
    else:
        def embed(images: torch.Tensor) -> torch.Tensor:
            return model(pixel_values=images).last_hidden_state[:, 0].float()
    return embed
