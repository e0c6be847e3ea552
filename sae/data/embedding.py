"""Embedding an image split with a frozen backbone: the inference loop behind the cache.

:func:`embed_split` writes one (N, d) array of the storage dtype, row i the embedding of the
i-th readable image of the split; undecodable images are skipped and counted, or raise. It
embeds in shards (:mod:`sae.data.shards`), resuming after the last complete one, and stops
cleanly on SIGTERM / SIGUSR2. The cache (:mod:`sae.data.cache`) calls it under its lock;
``python -m sae.extract`` and training on a cache miss both go through the cache.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sae.config import BackboneConfig, ExtractOptions
from sae.data.images import ImageFileDataset, ImageSplit, collate_skipping
from sae.data.shards import ShardLog, StopSignals, ignore_stop_signals
from sae.runtime.device import resolve_device
from sae.runtime.progress import Progress

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


class ExtractionStopped(RuntimeError):
    """A stop signal arrived; the shards so far are saved and the next extraction resumes."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


def embed_split(backbone_cfg: BackboneConfig, images: ImageSplit, out_file: Path,
                on_unreadable: str = "fail", device: str = "auto", progress: bool = True,
                shards: ShardLog | None = None, shard_size: int = ExtractOptions.shard_size
                ) -> EmbedResult:
    """Embed every image of ``images`` into ``out_file``, a (N_kept, d) .npy of the storage dtype.

    Rows follow the split's order; undecodable images are skipped and counted, or raise, per
    ``on_unreadable``. Shards of ``shard_size`` images (rounded up to whole batches) are
    recorded in ``shards`` as they complete; a run finds the ones an earlier, killed run
    recorded and starts after them (without ``shards``: a fresh log beside ``out_file``, removed
    at the end). Runs in inference mode, with autocast on GPU.
    """
    if shards is None:
        with tempfile.TemporaryDirectory(dir=out_file.parent, prefix=".shards-") as folder:
            return embed_split(backbone_cfg, images, out_file, on_unreadable, device, progress,
                               ShardLog(Path(folder), {}), shard_size)
    started = time.perf_counter()
    n_images, first = len(images), shards.next_image
    loop_s, fallbacks = 0.0, 0
    dev = resolve_device(device)
    if first:
        log.info("resuming %s/%s at image %d of %d (%d shards complete)", images.dataset,
                 images.split, first, n_images, len(shards.shards))
    if first < n_images:
        fallbacks, loop_s = _embed_remaining(backbone_cfg, images, shards, shard_size,
                                             on_unreadable, dev, progress)
    kept, skipped = shards.assemble(out_file, n_images)
    if skipped:
        log.warning("%d unreadable images skipped (dataset.on_unreadable=skip), e.g. %s",
                    len(skipped), images.path(skipped[0]))
    done_now = n_images - first
    stats = {"device": str(dev), "gpu": _gpu_name(dev),
             "autocast": str(AUTOCAST_DTYPE) if dev.type == "cuda" else "none",
             "autocast_fallbacks": fallbacks, "batch_size": backbone_cfg.batch_size,
             "num_workers": resolve_num_workers(backbone_cfg.num_workers),
             "shards": len(shards.shards), "resumed_at_image": first,
             "seconds_total": round(time.perf_counter() - started, 3),
             "seconds_inference": round(loop_s, 3),
             "images_per_s": round(done_now / loop_s, 2) if loop_s > 0 else None,
             "host": socket.gethostname()}
    info = shards.backbone
    return EmbedResult(int(info["dim"]), kept, skipped, info["info"], stats)


def shard_rows(shard_size: int, batch_size: int) -> int:
    """Images per shard: whole batches, so a resumed run embeds the same batches."""
    return -(-shard_size // batch_size) * batch_size


def _embed_remaining(backbone_cfg: BackboneConfig, images: ImageSplit, shards: ShardLog,
                     shard_size: int, on_unreadable: str, dev: torch.device, progress: bool
                     ) -> tuple[int, float]:
    """Embed the images after the last complete shard; returns the autocast fallbacks and the
    seconds of the inference loop (the model loaded)."""
    from sae.backbones import load_backbone

    backbone = load_backbone(backbone_cfg, dev)
    meta = {"dim": backbone.dim, "info": backbone.info}
    dtype = np.dtype(backbone_cfg.storage_dtype)
    per_shard = shard_rows(shard_size, backbone_cfg.batch_size)
    start = shards.next_image
    todo = torch.utils.data.Subset(ImageFileDataset(images, backbone.preprocess, on_unreadable),
                                   range(start, len(images)))
    rows: list[np.ndarray] = []
    skipped: list[int] = []
    fallbacks, position = 0, start
    bar = Progress(len(images) - start, f"extract {images.dataset}/{images.split}", "img",
                   enabled=progress, every_s=LOG_EVERY_S)
    loop_start = time.perf_counter()
    with StopSignals() as stop, torch.inference_mode():
        for batch, indices, bad in _loader(todo, backbone_cfg, dev):
            skipped.extend(bad)
            if batch is not None:
                emb, redone = _embed_batch(backbone.embed, batch, dev)
                fallbacks += redone
                rows.append(_storage_rows(emb, dtype, images, int(indices[0])))
            position += len(indices) + len(bad)
            bar.update(len(indices) + len(bad))
            if position % per_shard == 0 or position == len(images) or stop.requested:
                shards.add(start, position, _stack(rows, backbone.dim, dtype), skipped, meta)
                start, rows, skipped = position, [], []
            if stop.requested and position < len(images):
                bar.close()
                stop.resend()
                raise ExtractionStopped(f"stopped by signal {stop.requested} at image "
                                        f"{position} of {len(images)}; run again to resume",
                                        stop.requested)
    bar.close()
    return fallbacks, time.perf_counter() - loop_start


def _storage_rows(emb: torch.Tensor, dtype: np.dtype, images: ImageSplit, first: int
                  ) -> np.ndarray:
    rows = emb.to(_torch_dtype(dtype)).cpu().numpy()
    if not np.isfinite(rows).all():
        raise RuntimeError(f"embeddings of {images.path(first)} and its batch overflow {dtype}. "
                           "Fix: set backbone.storage_dtype=float32")
    return rows


def _stack(rows: list[np.ndarray], dim: int, dtype: np.dtype) -> np.ndarray:
    return np.concatenate(rows) if rows else np.zeros((0, dim), dtype=dtype)


def resolve_num_workers(requested: int | None) -> int:
    """``backbone.num_workers``, or by default the CPUs allocated to the job minus one (the
    main process feeds the device): ``SLURM_CPUS_PER_TASK``, else the process's affinity."""
    if requested is not None:
        return max(0, requested)
    allocated = os.environ.get("SLURM_CPUS_PER_TASK", "")
    cpus = int(allocated) if allocated.isdigit() else len(os.sched_getaffinity(0))
    return max(0, cpus - 1)


def _loader(dataset: torch.utils.data.Dataset, cfg: BackboneConfig, dev: torch.device
            ) -> torch.utils.data.DataLoader:
    workers = resolve_num_workers(cfg.num_workers)
    return torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=workers,
        collate_fn=collate_skipping, pin_memory=dev.type == "cuda",
        prefetch_factor=4 if workers else None, persistent_workers=False,
        worker_init_fn=ignore_stop_signals if workers else None,
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


def _gpu_name(dev: torch.device) -> str | None:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
