"""Stage 1 throughput, one JSON line per backbone: decode-only, model-only and pipeline images/s.

- ``decode_img_s``: the DataLoader alone -- JPEG decode, RGB, the backbone's own preprocessing,
  collation -- with the extraction's workers (``backbone.num_workers``, default the job's CPUs
  minus one), no model;
- ``model_img_s``: the embed function alone on preprocessed batches already on the device
  (autocast on GPU, as in extraction);
- ``pipeline_img_s``: ``sae.data.embedding.embed_split`` end to end (loader, transfer, model,
  shards written), the model loaded beforehand.

Images are random-colour JPEGs written once to a temporary directory. Backbones have random
weights (no network): on CPU the tiny test backbones, on a GPU the three paper backbones
(clip_vitl14, siglip2, vit_l16) at full size; transformers configs are written locally with the
reference checkpoints' architecture and preprocessing.

    python -m sae.bench extract                          # CPU: clip_tiny, vit_tiny
    python -m sae.bench extract --device cuda            # GPU: the paper backbones
    python -m sae.bench extract --backbones clip_tiny --images 64
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from sae.config import BackboneConfig
from sae.data.embedding import _embed_batch, _loader, embed_split, resolve_num_workers
from sae.data.images import ImageFileDataset, ImageSplit
from sae.runtime.device import resolve_device

CONF = Path(__file__).resolve().parent.parent.parent / "conf"
CPU_BACKBONES = ("clip_tiny", "vit_tiny")
GPU_BACKBONES = ("clip_vitl14", "siglip2", "vit_l16")
# The reference checkpoints' architectures and preprocessor configs (google/siglip2-so400m-
# patch14-384: SigLIP vision tower So400m/14 at 384 px; google/vit-large-patch16-224).
SIGLIP2_VISION = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                  "num_attention_heads": 16, "image_size": 384, "patch_size": 14}
SIGLIP2_PREPROCESSOR = {"do_normalize": True, "do_rescale": True, "do_resize": True,
                        "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 2,
                        "image_processor_type": "SiglipImageProcessor",
                        "rescale_factor": 1 / 255, "size": {"height": 384, "width": 384}}
VIT_L16 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
           "num_attention_heads": 16, "image_size": 224, "patch_size": 16}
VIT_PREPROCESSOR = {"do_normalize": True, "do_resize": True, "image_mean": [0.5] * 3,
                    "image_std": [0.5] * 3, "resample": 2,
                    "image_processor_type": "ViTImageProcessor", "size": 224}


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sae.bench extract",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--backbones", default=None,
                        help="comma-separated conf/backbone options (default: by device)")
    parser.add_argument("--images", type=int, default=None, help="images (CPU 128, GPU 2048)")
    parser.add_argument("--image-size", default="500x375", help="WxH of the JPEGs (ImageNet-like)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the backbone's")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="default: the job's CPUs minus one")
    parser.add_argument("--model-batches", type=int, default=5, help="timed model-only batches")
    return parser.parse_args(argv)


def write_images(folder: Path, n: int, size: tuple[int, int]) -> ImageSplit:
    rng = np.random.default_rng(0)
    ids = []
    for i in range(n):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)
        ids.append(f"{i:06d}.jpg")
    return ImageSplit("bench", "bench", folder, ids, None, [])


def backbone_config(name: str, args: argparse.Namespace, scratch: Path) -> BackboneConfig:
    """The conf/backbone option with random weights (a local transformers config for the
    reference checkpoints, which would otherwise come from the hub)."""
    node = OmegaConf.merge(OmegaConf.structured(BackboneConfig),
                           OmegaConf.load(CONF / "backbone" / f"{name}.yaml"))
    node.pretrained = None
    node.checkpoint_path = None
    node.num_workers = args.num_workers
    if args.batch_size:
        node.batch_size = args.batch_size
    if node.library == "transformers":
        node.checkpoint_path = str(write_transformers_config(name, scratch))
    return OmegaConf.to_object(node)


def write_transformers_config(name: str, scratch: Path) -> Path:
    from transformers import SiglipConfig, ViTConfig

    folder = scratch / name
    folder.mkdir(parents=True, exist_ok=True)
    if name.startswith("siglip2"):
        text = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 1,
                "num_attention_heads": 16, "vocab_size": 1000}  # unused by image features
        SiglipConfig(vision_config=SIGLIP2_VISION, text_config=text).save_pretrained(folder)
        preprocessor = SIGLIP2_PREPROCESSOR
    else:
        ViTConfig(**VIT_L16).save_pretrained(folder)
        preprocessor = VIT_PREPROCESSOR
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def decode_rate(cfg: BackboneConfig, split: ImageSplit, preprocess, dev: torch.device) -> float:
    loader = _loader(ImageFileDataset(split, preprocess), cfg, dev)
    start = time.perf_counter()
    count = sum(len(indices) for _, indices, _ in loader)
    return count / (time.perf_counter() - start)


def model_rate(cfg: BackboneConfig, backbone, split: ImageSplit, dev: torch.device,
               batches: int) -> float:
    image = backbone.preprocess(Image.open(split.path(0)).convert("RGB"))
    batch = image.unsqueeze(0).repeat(cfg.batch_size, 1, 1, 1).to(dev)
    with torch.inference_mode():
        _embed_batch(backbone.embed, batch, dev)  # warm-up (cuDNN / kernels chosen)
        _sync(dev)
        start = time.perf_counter()
        for _ in range(batches):
            _embed_batch(backbone.embed, batch, dev)
        _sync(dev)
    return batches * cfg.batch_size / (time.perf_counter() - start)


def bench_backbone(name: str, args: argparse.Namespace, split: ImageSplit, scratch: Path,
                   dev: torch.device) -> dict:
    from sae.backbones import load_backbone

    cfg = backbone_config(name, args, scratch)
    backbone = load_backbone(cfg, dev)
    decode = decode_rate(cfg, split, backbone.preprocess, dev)
    model = model_rate(cfg, backbone, split, dev, args.model_batches)
    result = embed_split(cfg, split, scratch / f"{name}.npy", device=str(dev), progress=False)
    return {"bench": "extract", "backbone": name, "library": cfg.library, "model": cfg.model,
            "device": str(dev), "gpu": result.stats["gpu"], "dim": result.dim,
            "images": len(split), "image_size": args.image_size, "batch_size": cfg.batch_size,
            "num_workers": resolve_num_workers(cfg.num_workers),
            "decode_img_s": round(decode, 1), "model_img_s": round(model, 1),
            "pipeline_img_s": result.stats["images_per_s"]}


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    dev = resolve_device(args.device)
    gpu = dev.type == "cuda"
    names = args.backbones.split(",") if args.backbones else (GPU_BACKBONES if gpu
                                                              else CPU_BACKBONES)
    n_images = args.images or (2048 if gpu else 128)
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    with tempfile.TemporaryDirectory(prefix="sae-bench-extract-") as tmp:
        scratch = Path(tmp)
        (scratch / "images").mkdir()
        split = write_images(scratch / "images", n_images, (width, height))
        for name in names:
            print(json.dumps(bench_backbone(name, args, split, scratch, dev)), flush=True)
