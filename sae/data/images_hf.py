"""ImageNet-1K from a Hugging Face ``datasets`` copy on disk (layout ``imagenet_hf``): the
reference code's source (MonoLoss loads the ``imagenet-1k`` dataset).

``dataset.root`` points at one of (checked in this order for each split):

- a ``save_to_disk`` output: ``<root>/dataset_dict.json`` + ``<root>/<split>/`` (a DatasetDict),
  or ``<root>/<split>/state.json`` (one saved Dataset per split);
- prepared ``.arrow`` files, e.g. the ``datasets`` cache that ``load_dataset("ILSVRC/imagenet-1k")``
  filled (``.../imagenet-1k-<split>-00000-of-00257.arrow``): memory-mapped where they lie;
- ``.parquet`` files, e.g. the hub snapshot (``.../data/<split>-00000-of-00294.parquet``):
  converted once to arrow in the ``datasets`` cache (``HF_DATASETS_CACHE``), as ``load_dataset``
  does.

Files of a split are those whose name holds the split as a ``-``/``_`` separated word; they must
all lie in one directory (two prepared copies would double the split). The split ``val`` falls
back to ``validation`` (the Hugging Face name) when only the latter exists, so
``dataset=imagenet dataset.layout=imagenet_hf`` works as is.

Samples: the dataset's rows in order; a sample id is its row number (stable for one copy);
labels are the ``label`` column (the index of the sorted wnids, as the folder layout's); class
names are the ``label`` feature's names (first synonym, made unique). Images are decoded here from
the ``image`` column's bytes (or path), fully, as RGB.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sae.config import ImagesDatasetConfig
from sae.data.errors import DataError
from sae.data.image_split import ImageSplit

SPLIT_FALLBACK = {"val": "validation"}  # the folder layout's name -> the Hugging Face name
IMAGE_COLUMN, LABEL_COLUMN = "image", "label"


class HFRows:
    """Row -> RGB image of one split of a Hugging Face dataset (picklable: a memory-mapped
    ``datasets.Dataset`` pickles as its file paths, so DataLoader workers reopen it cheaply)."""

    def __init__(self, dataset: Any, where: str) -> None:
        from datasets import Image as ImageFeature

        # decode=False: the bytes come back raw, so a broken image fails in load() (and can be
        # skipped) like a broken file, and the label column is not decoded per row.
        self.dataset = dataset.cast_column(IMAGE_COLUMN, ImageFeature(decode=False))
        self.where = where

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, row: int) -> Image.Image:
        stored = self.dataset[row][IMAGE_COLUMN]
        source = io.BytesIO(stored["bytes"]) if stored.get("bytes") else stored.get("path")
        if source is None:
            raise ValueError("the image column holds neither bytes nor a path")
        with Image.open(source) as image:
            return image.convert("RGB")

    def describe(self, row: int) -> str:
        return f"{self.where} row {row}"

    def files(self) -> list[dict[str, Any]]:
        """The arrow files the rows are read from (names and sizes: what a cache key can hold
        of a Hugging Face copy; its row ids name no file)."""
        paths = [Path(f["filename"]) for f in self.dataset.cache_files]
        return [{"name": p.name, "bytes": p.stat().st_size} for p in paths]


def open_hf_split(cfg: ImagesDatasetConfig, split: str) -> ImageSplit:
    """The :class:`~sae.data.image_split.ImageSplit` of one split of the copy at ``cfg.root``."""

    root = Path(str(cfg.root))
    rows = open_rows(root, split)
    labels = _labels(rows)
    if (labels < 0).any():
        raise DataError(f"{rows.where}: {(labels < 0).sum()} rows have no label (-1: the "
                        "imagenet-1k test split). Fix: use train or validation")
    names = _class_names(rows.dataset.features[LABEL_COLUMN])
    ids = [str(i) for i in range(len(rows))]
    return ImageSplit(cfg.name, split, root, ids, labels, names,
                      {"n_listed": len(ids), "source": rows.where, "source_files": rows.files()},
                      sources=[Path(f["filename"]) for f in rows.dataset.cache_files], reader=rows)


def open_rows(root: Path, split: str) -> HFRows:
    """The split's rows, from a saved dataset or from arrow / parquet files under ``root``."""
    import datasets

    for name in _split_names(root, split):
        if (root / name / "state.json").is_file():  # save_to_disk (a DatasetDict's split)
            return _checked(HFRows(datasets.load_from_disk(str(root / name)), str(root / name)))
        arrow, parquet = _split_files(root, name, ".arrow"), _split_files(root, name, ".parquet")
        if arrow:
            tables = [datasets.Dataset.from_file(str(f)) for f in arrow]
            return _checked(HFRows(datasets.concatenate_datasets(tables), _where(arrow)))
        if parquet:
            dataset = datasets.Dataset.from_parquet([str(f) for f in parquet])
            return _checked(HFRows(dataset, _where(parquet)))
    raise DataError(
        f"{root}: no split {split!r} of a Hugging Face dataset (neither {root}/{split}/state.json "
        f"from save_to_disk nor *{split}*.arrow / *.parquet files below it). Fix: point "
        "dataset.root at the save_to_disk directory or at the imagenet-1k files "
        "(scripts/prepare_imagenet.md), or check dataset.train_split / dataset.eval_split")


def _split_names(root: Path, split: str) -> list[str]:
    """``split``, then its Hugging Face name when ``split`` itself is absent."""
    fallback = SPLIT_FALLBACK.get(split)
    if fallback and not (root / split).exists() and not _split_files(root, split, ".arrow") \
            and not _split_files(root, split, ".parquet"):
        return [split, fallback]
    return [split]


def _split_files(root: Path, split: str, suffix: str) -> list[Path]:
    """Files below ``root`` whose name holds ``split`` as a word (``train-00000-of-00294``,
    ``imagenet-1k-validation.arrow``), sorted; all from one directory."""
    word = re.compile(rf"(^|[-_.]){re.escape(split)}([-_.]|$)")
    files = sorted(p for p in root.rglob(f"*{suffix}") if word.search(p.stem))
    folders = sorted({str(f.parent) for f in files})
    if len(folders) > 1:
        raise DataError(f"{root}: {split} {suffix} files lie in {len(folders)} directories "
                        f"({folders[:3]}): two copies would double the split. Fix: point "
                        "dataset.root at the one to read")
    return files


def _where(files: list[Path]) -> str:
    return f"{files[0].parent}/{files[0].name}" + (f" (+{len(files) - 1})" if len(files) > 1
                                                  else "")


def _checked(rows: HFRows) -> HFRows:
    columns = rows.dataset.column_names
    if IMAGE_COLUMN not in columns or LABEL_COLUMN not in columns:
        raise DataError(f"{rows.where}: columns {columns}, expected {IMAGE_COLUMN!r} and "
                        f"{LABEL_COLUMN!r}. Fix: use the imagenet-1k dataset (ILSVRC/imagenet-1k)")
    return rows


def _labels(rows: HFRows) -> np.ndarray:
    return np.asarray(rows.dataset.select_columns([LABEL_COLUMN]).with_format("numpy")[:][
        LABEL_COLUMN], dtype=np.int64)


def _class_names(feature: Any) -> list[str]:
    """The label feature's names ("tench, Tinca tinca" -> "tench"), unique (two "crane"s)."""
    full = list(getattr(feature, "names", None) or [])
    names = [n.split(",")[0].strip() or n for n in full]
    repeated = {n for n in names if names.count(n) > 1}
    return [f"{n} ({i})" if n in repeated else n for i, n in enumerate(names)]
