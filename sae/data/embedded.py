"""Embedded, offline datasets: scikit-learn's digits and user-supplied embedding files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sae.config import DatasetConfig, DigitsDatasetConfig, FilesDatasetConfig
from sae.data.errors import DataError
from sae.data.formats import is_table, read_matrix, read_table_labels
from sae.data.types import EmbeddingSet


def _finish(x: np.ndarray | torch.Tensor, cfg: DatasetConfig, source: str) -> torch.Tensor:
    """float32 tensor, checked finite, unit-normalised when the config says so."""
    if isinstance(x, torch.Tensor):  # a .pt file's (possibly bf16 / fp16) tensor
        x = x.detach().to(torch.float32).cpu().numpy()
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


def read_array(path: str | Path, what: str, key: str | None = None) -> np.ndarray:
    """An (N, d) array in any format of ``sae.data.formats`` (``key``: the tensor or column)."""
    return read_matrix(Path(path), what, key)


def read_class_names(path: str | None) -> list[str] | None:
    """dataset.class_names: one name per line (blank lines ignored)."""
    if not path:
        return None
    if not Path(path).is_file():
        raise DataError(f"class_names: file {path} does not exist. Fix: check dataset.class_names")
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def _labels(path: str | None, n: int, what: str, class_names: list[str] | None,
            class_file: str | None, key: str | None = None) -> torch.Tensor | None:
    if not path:
        return None
    if is_table(Path(path)):
        labels = read_table_labels(Path(path), what, key)
        if labels is None:
            raise DataError(f"{what}: {path} has no label column. Fix: set "
                            "dataset.label_key=<column>")
    else:
        labels = np.asarray(read_array(path, what))
    return _label_tensor(labels, n, path, what, class_names, class_file)


def _label_tensor(labels: np.ndarray, n: int, path: str | Path, what: str,
                  class_names: list[str] | None, class_file: str | None) -> torch.Tensor:
    if labels.shape[0] != n:
        raise DataError(f"{what}: {path} holds {labels.shape[0]} labels for {n} embeddings. "
                        "Fix: give one label row per embedding")
    if labels.ndim == 2:
        return torch.as_tensor(labels != 0)
    source = f"{what}: {path}"
    if labels.dtype.kind in "US":
        return torch.as_tensor(_ids_of_names(labels, source, class_names, class_file))
    return torch.as_tensor(_integral_ids(labels, source))


def _integral_ids(labels: np.ndarray, source: str) -> np.ndarray:
    """(N,) class ids as int64: integers, or floats that are whole numbers (2.0, -1.0)."""
    if labels.dtype.kind in "iub":
        return labels.astype(np.int64)
    if labels.dtype.kind != "f":
        raise DataError(f"{source} has dtype {labels.dtype}. Fix: save integer class ids")
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(labels) | (labels != np.round(labels))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"{source}: row {row} holds {labels[row]!r}, not a class id "
                        f"({int(bad.sum())} such rows). Fix: save integer class ids (negative = "
                        "unlabelled); scores or probabilities are not labels")
    return labels.astype(np.int64)


def _ids_of_names(labels: np.ndarray, source: str, class_names: list[str] | None,
                  class_file: str | None) -> np.ndarray:
    if class_names is None:
        raise DataError(f"{source} holds strings ({labels[0]!r}, ...). Fix: list the classes, "
                        "one per line, in a text file and set dataset.class_names=<that file>")
    index = {name: i for i, name in enumerate(class_names)}
    ids = np.array([index.get(str(name), -1) for name in labels], dtype=np.int64)
    unknown = np.flatnonzero(ids < 0)
    if unknown.size:
        row = int(unknown[0])
        raise DataError(f"{source}: row {row} holds {str(labels[row])!r}, which is not in "
                        f"{class_file} ({unknown.size} such rows). Fix: add it to that file")
    return ids


def _split_labels(cfg: FilesDatasetConfig, split: str, n: int, names: list[str] | None
                  ) -> torch.Tensor | None:
    """A split's labels: its label file, else the label column of its embeddings' table."""
    label_path, data_path = getattr(cfg, f"{split}_labels"), getattr(cfg, f"{split}_path")
    if label_path:
        return _labels(label_path, n, f"{split}_labels", names, cfg.class_names, cfg.label_key)
    if not is_table(Path(data_path)):
        return None
    labels = read_table_labels(Path(data_path), f"{split}_path", cfg.label_key)
    if labels is None:
        return None
    return _label_tensor(labels, n, data_path, f"{split}_path", names, cfg.class_names)


def load_files(cfg: FilesDatasetConfig) -> tuple[EmbeddingSet, EmbeddingSet]:
    key = cfg.embedding_key
    x = _finish(read_array(cfg.train_path, "train_path", key), cfg, str(cfg.train_path))
    names = read_class_names(cfg.class_names)
    y = _split_labels(cfg, "train", x.shape[0], names)
    if cfg.eval_path:
        x_eval = _finish(read_array(cfg.eval_path, "eval_path", key), cfg, str(cfg.eval_path))
        y_eval = _split_labels(cfg, "eval", x_eval.shape[0], names)
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
    return (EmbeddingSet("files/train", x, y, class_names=names, info=info),
            EmbeddingSet("files/eval", x_eval, y_eval, class_names=names, info=info))
