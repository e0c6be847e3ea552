"""Embedding an image split with a frozen backbone: the inference loop behind the cache.

:func:`embed_split` writes one (N, d) array of the storage dtype, row i the embedding of image i
of the split; undecodable images are skipped and counted, or raise. The cache
(:mod:`sae.data.cache`) calls it under its lock; ``python -m sae.extract`` and training on a
cache miss both go through the cache.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sae.config import BackboneConfig
from sae.data.images import ImageFileDataset, ImageSplit, collate_skipping
from sae.device import resolve_device
from sae.progress import Progress

log = logging.getLogger(__name__)

AUTOCAST_DTYPE = torch.float16  # GPU compute; a batch that overflows is redone in float32
LOG_EVERY_S = 30.0  # progress lines in a log file (stderr not a terminal): one per 30 s


@dataclass
class EmbedResult:
    """What :func:`embed_split` wrote: the kept rows and how the extraction went."""

    dim: int
    kept: list[int]  # indices into the ImageSplit of the rows in the array, in order
    skipped: list[int]  # indices of undecodable images (on_unreadable=skip)
    backbone_info: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)  # device, seconds, images/s, ...


def embed_split(backbone_cfg: BackboneConfig, images: ImageSplit, out_file: Path,
                on_unreadable: str = "fail", device: str = "auto", progress: bool = True
                ) -> EmbedResult:
    """Embed every image of ``images`` into ``out_file``, a (N, d) .npy of the storage dtype.

    Rows follow the split's order; undecodable images are skipped and counted, or raise,
    per ``on_unreadable``. Runs in inference mode, with autocast on GPU.
    """
    from sae.backbones import load_backbone

    dev = resolve_device(device)
    started = time.perf_counter()
    backbone = load_backbone(backbone_cfg, dev)
    loader = _loader(ImageFileDataset(images, backbone.preprocess, on_unreadable),
                     backbone_cfg, dev)
    dtype = np.dtype(backbone_cfg.storage_dtype)
    array = np.lib.format.open_memmap(out_file, mode="w+", dtype=dtype,
                                      shape=(len(images), backbone.dim))
    written = np.zeros(len(images), dtype=bool)
    skipped: list[int] = []
    fallbacks = 0
    bar = Progress(len(images), f"extract {images.dataset}/{images.split}", "img",
                   enabled=progress, every_s=LOG_EVERY_S)
    loop_start = time.perf_counter()
    with torch.inference_mode():
        for batch, indices, bad in loader:
            skipped.extend(bad)
            if batch is not None:
                emb, redone = _embed_batch(backbone.embed, batch, dev)
                fallbacks += redone
                rows = emb.to(_torch_dtype(dtype)).cpu().numpy()
                if not np.isfinite(rows).all():
                    raise RuntimeError(
                        f"embeddings of {images.path(int(indices[0]))} and its batch overflow "
                        f"{dtype}. Fix: set backbone.storage_dtype=float32")
                array[indices.numpy()] = rows
                written[indices.numpy()] = True
            bar.update(len(indices) + len(bad))
    bar.close()
    array.flush()
    del array
    kept = np.flatnonzero(written).tolist()
    if skipped:
        _compact(out_file, kept)
        log.warning("%d unreadable images skipped (dataset.on_unreadable=skip), e.g. %s",
                    len(skipped), images.path(skipped[0]))
    loop_s = time.perf_counter() - loop_start
    stats = {"device": str(dev), "gpu": _gpu_name(dev),
             "autocast": str(AUTOCAST_DTYPE) if dev.type == "cuda" else "none",
             "autocast_fallbacks": fallbacks, "batch_size": backbone_cfg.batch_size,
             "num_workers": backbone_cfg.num_workers, "seconds_total": round(
                 time.perf_counter() - started, 3), "seconds_inference": round(loop_s, 3),
             "images_per_s": round(len(images) / max(loop_s, 1e-9), 2),
             "host": socket.gethostname()}
    return EmbedResult(backbone.dim, kept, skipped, backbone.info, stats)


def _loader(dataset: ImageFileDataset, cfg: BackboneConfig, dev: torch.device
            ) -> torch.utils.data.DataLoader:
    workers = max(0, cfg.num_workers)
    return torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=workers,
        collate_fn=collate_skipping, pin_memory=dev.type == "cuda",
        prefetch_factor=4 if workers else None, persistent_workers=False,
    )


def _embed_batch(embed: Any, batch: torch.Tensor, dev: torch.device) -> tuple[torch.Tensor, int]:
    """(B, d) float32 embeddings; on GPU under autocast, redone in float32 if they overflow."""
    batch = batch.to(dev, non_blocking=True)
    if dev.type != "cuda":
        return embed(batch), 0
    with torch.autocast("cuda", dtype=AUTOCAST_DTYPE):
        out = embed(batch).float()
    if torch.isfinite(out).all():
        return out, 0
    return embed(batch).float(), 1


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.float16 if dtype == np.float16 else torch.float32


def _compact(out_file: Path, kept: list[int]) -> None:
    """Rewrite the array with only the kept rows (skipped images left holes)."""
    full = np.load(out_file, mmap_mode="r")
    tmp = out_file.with_suffix(".compact.npy")
    compact = np.lib.format.open_memmap(tmp, mode="w+", dtype=full.dtype,
                                        shape=(len(kept), full.shape[1]))
    chunk = 65536
    for start in range(0, len(kept), chunk):
        compact[start:start + chunk] = full[kept[start:start + chunk]]
    compact.flush()
    del compact, full
    tmp.replace(out_file)


def _gpu_name(dev: torch.device) -> str | None:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
