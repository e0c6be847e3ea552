"""Embedded, offline datasets: scikit-learn's digits and user-supplied embedding files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sae.config import DatasetConfig, DigitsDatasetConfig, FilesDatasetConfig
from sae.data.errors import DataError
from sae.data.types import EmbeddingSet


def _finish(x: np.ndarray | torch.Tensor, cfg: DatasetConfig, source: str) -> torch.Tensor:
    """float32 tensor, checked finite, unit-normalised when the config says so."""
    x = torch.from_numpy(np.array(x, dtype=np.float32))  # a copy: the source may be a read-only memmap
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise DataError(f"{source}: expected a non-empty (N, d) array, got shape "
                        f"{tuple(x.shape)}. Fix: save one embedding per row")
    bad = ~torch.isfinite(x).all(dim=1)
    if bad.any():
        rows = bad.nonzero().flatten()[:5].tolist()
        raise DataError(f"{source}: {int(bad.sum())} rows hold NaN or inf (first: {rows}). "
                        "Fix: drop or recompute those embeddings")
    if cfg.normalize:
        norms = x.norm(dim=1)
        if (norms == 0).any():
            raise DataError(f"{source}: {int((norms == 0).sum())} all-zero rows cannot be "
                            "unit-normalised. Fix: drop them or set dataset.normalize=false")
        x = F.normalize(x, dim=1)
    return x


def _stratified_split(labels: np.ndarray, fraction: float, seed: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Train / eval indices, the eval part ``fraction`` of every class (deterministic)."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        cut = max(1, round(len(idx) * fraction))
        held.append(idx[:cut])
        train.append(idx[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def _digit_image_getter(images: np.ndarray):
    """8x8 grey digits (0..16) as upscaled images for contact sheets."""
    def get(i: int) -> Image.Image:
        pixels = (255 - images[i] * (255 / 16)).astype(np.uint8)  # dark ink on white
        return Image.fromarray(pixels, mode="L").resize((32, 32), Image.NEAREST)
    return get


def load_digits(cfg: DigitsDatasetConfig) -> tuple[EmbeddingSet, EmbeddingSet]:
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    train_idx, eval_idx = _stratified_split(bunch.target, cfg.eval_fraction, cfg.split_seed)
    # Border pixels are blank in almost every image; their near-zero variance would dominate
    # the uniform per-dimension R^2 average (one stray stroke -> R^2 of -100 on that pixel).
    # 50 of the 64 pixels are inked in >= 5 % of the images.
    pixels = (bunch.data > 0).mean(axis=0) >= cfg.min_pixel_coverage
    names = [str(c) for c in bunch.target_names]

    def split(idx: np.ndarray, name: str) -> EmbeddingSet:
        return EmbeddingSet(
            name=name, x=_finish(bunch.data[idx][:, pixels], cfg, "sklearn digits"),
            labels=torch.as_tensor(bunch.target[idx], dtype=torch.int64), class_names=names,
            ids=[f"digit_{i}" for i in idx], image_getter=_digit_image_getter(bunch.images[idx]),
            info={"source": "scikit-learn load_digits (UCI optdigits test set)",
                  "pixels_kept": int(pixels.sum()), "min_pixel_coverage": cfg.min_pixel_coverage},
        )

    return split(train_idx, "digits/train"), split(eval_idx, "digits/eval")


def read_array(path: str | Path, what: str) -> np.ndarray:
    """A .npy or .safetensors array (the single tensor, or the one named ``embeddings``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what}: file {path} does not exist. Fix: check dataset.{what}")
    try:
        if path.suffix == ".npy":
            return np.load(path, mmap_mode="r", allow_pickle=False)
        if path.suffix == ".safetensors":
            from safetensors.numpy import load_file

            tensors = load_file(str(path))
            if len(tensors) == 1:
                return next(iter(tensors.values()))
            if "embeddings" in tensors:
                return tensors["embeddings"]
            raise DataError(f"{what}: {path} holds tensors {sorted(tensors)}. Fix: store one "
                            "tensor, or name the embeddings 'embeddings'")
    except DataError:
        raise
    except Exception as exc:  # corrupt or truncated file: say which one
        raise DataError(f"{what}: cannot read {path} ({exc}). Fix: re-export the file") from exc
    raise DataError(f"{what}: {path} is neither .npy nor .safetensors. Fix: convert it")


def _labels(path: str | None, n: int, what: str) -> torch.Tensor | None:
    if not path:
        return None
    labels = np.asarray(read_array(path, what))
    if labels.shape[0] != n:
        raise DataError(f"{what}: {path} holds {labels.shape[0]} labels for {n} embeddings. "
                        "Fix: give one label row per embedding")
    if labels.ndim == 2:
        return torch.as_tensor(labels != 0)
    return torch.as_tensor(labels.astype(np.int64))


def load_files(cfg: FilesDatasetConfig) -> tuple[EmbeddingSet, EmbeddingSet]:
    x = _finish(read_array(cfg.train_path, "train_path"), cfg, str(cfg.train_path))
    y = _labels(cfg.train_labels, x.shape[0], "train_labels")
    if cfg.eval_path:
        x_eval = _finish(read_array(cfg.eval_path, "eval_path"), cfg, str(cfg.eval_path))
        y_eval = _labels(cfg.eval_labels, x_eval.shape[0], "eval_labels")
        if x_eval.shape[1] != x.shape[1]:
            raise DataError(f"eval_path: {cfg.eval_path} has dim {x_eval.shape[1]}, train_path "
                            f"has {x.shape[1]}. Fix: embed both splits with the same backbone")
    else:  # hold out a seeded fraction
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(cfg.split_seed))
        cut = max(1, round(x.shape[0] * cfg.eval_fraction))
        held, kept = perm[:cut].sort().values, perm[cut:].sort().values
        x, x_eval = x[kept], x[held]
        y, y_eval = (None, None) if y is None else (y[kept], y[held])
    info = {"source": f"files {cfg.train_path} / {cfg.eval_path or 'held-out fraction'}"}
    return (EmbeddingSet("files/train", x, y, info=info),
            EmbeddingSet("files/eval", x_eval, y_eval, info=info))
