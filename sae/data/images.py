"""Image datasets in their real on-disk layouts (METHOD.md s1), read without loading pixels.

``dataset.layout`` picks the reader:

- ``imagenet``: ``<root>/<split>/<wnid>/*.JPEG`` (val reorganised into wnid folders, see
  scripts/prepare_imagenet.md). The class index is the position of the wnid among the sorted wnid
  folders of the *train* split, as torchvision's ImageFolder orders them, so train and val agree
  even when a subset of val lacks some classes. Class names come from
  ``<root>/LOC_synset_mapping.txt`` when present, else they are the wnids.
- ``openimages``: ``<root>/images/<split>/<ImageID>.jpg``, the class list
  ``<root>/oidv7-class-descriptions-boxable.csv`` (LabelName, DisplayName; with or without a header
  row) and ``<root>/<split>-annotations-human-imagelabels-boxable.csv`` (ImageID, Source,
  LabelName, Confidence). Rows with Confidence == 1 become a multi-hot (N, C) bool label; one
  sample per image file, images without a positive label included (all-zero row).
- ``digits_images``: scikit-learn's digits rendered as PNG files, written once under ``root`` in
  the imagenet layout (class folders ``0``..``9``), so the image path runs offline.

Every reader returns an :class:`ImageSplit`: the image files (ids relative to the split's image
directory), labels and class names. :class:`ImageFileDataset` turns it into a torch Dataset.
"""

from __future__ import annotations

import csv
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sae.config import ImagesDatasetConfig
from sae.data.errors import DataError

LAYOUTS = ("imagenet", "openimages", "digits_images")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
OI_CLASSES_CSV = "oidv7-class-descriptions-boxable.csv"
OI_LABELS_CSV = "{split}-annotations-human-imagelabels-boxable.csv"
OI_CLASS_COLUMNS = ("LabelName", "DisplayName")
OI_LABEL_COLUMNS = ("ImageID", "LabelName", "Confidence")  # Source is present but unused
DIGITS_IMAGE_SIZE = 32  # 8x8 digits upscaled 4x (nearest): big enough for any backbone resize


class UnreadableImageError(DataError):
    """An image file cannot be decoded and ``dataset.on_unreadable`` is ``fail``."""


@dataclass
class ImageSplit:
    """The images of one split of one dataset, and their labels; no pixels are loaded."""

    dataset: str  # dataset config name
    split: str  # split directory name (train, val, validation, ...)
    image_dir: Path  # ids are file paths relative to it
    ids: list[str]  # e.g. "n01440764/n01440764_10026.JPEG" or "000026e7ee790996.jpg"
    labels: np.ndarray | None  # (N,) int64 class ids or (N, C) bool multi-hot
    class_names: list[str]
    info: dict[str, Any] = field(default_factory=dict)  # counts for the manifest

    def __len__(self) -> int:
        return len(self.ids)

    def path(self, i: int) -> Path:
        return self.image_dir / self.ids[i]


def check_layout(cfg: ImagesDatasetConfig) -> str:
    """The layout of an images dataset, or an error naming the options."""
    if cfg.layout not in LAYOUTS:
        raise DataError(f"dataset.layout: {cfg.layout!r} is not a known layout. "
                        f"Fix: use one of {LAYOUTS}")
    return cfg.layout


def image_dir(cfg: ImagesDatasetConfig, split: str) -> Path:
    """Directory that a split's image ids are relative to (no listing, no checks)."""
    root = Path(str(cfg.root))
    if check_layout(cfg) == "openimages":
        return root / "images" / split
    return root / split


def open_split(cfg: ImagesDatasetConfig, split: str) -> ImageSplit:
    """List the images and read the labels of one split (``split`` = the directory name)."""
    layout = check_layout(cfg)
    if layout == "digits_images" and cfg.root:
        materialize_digits_images(Path(cfg.root), cfg.eval_fraction, cfg.split_seed)
    _check_root(cfg)
    if layout == "openimages":
        full = _open_openimages(cfg, split)
    else:
        full = _open_imagefolder(cfg, split)
    return _subsample(full, cfg.max_per_split, cfg.split_seed)


def _check_root(cfg: ImagesDatasetConfig) -> None:
    env = {"imagenet": "IMAGENET_ROOT", "openimages": "OPENIMAGES_ROOT"}.get(cfg.layout)
    fix = (f"Fix: set dataset.root=/path/to/{cfg.name}"
           + (f" or export {env}" if env else "")
           + f" (expected layout: {_layout_doc(cfg.layout)})")
    if not cfg.root:
        raise DataError(f"dataset.root: not set for the image dataset {cfg.name!r}. {fix}")
    if not Path(cfg.root).is_dir():
        raise DataError(f"dataset.root: {cfg.root} is not a directory. {fix}")


def _layout_doc(layout: str) -> str:
    """Where a layout is documented, for error messages."""
    if layout in ("imagenet", "openimages"):
        return f"scripts/prepare_{layout}.md"
    return "sae/data/images.py"


def _split_dir(path: Path, split: str, root: Path) -> Path:
    if not path.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise DataError(f"{path}: split directory {split!r} is missing (found {present} in "
                        f"{root}). Fix: check dataset.train_split / dataset.eval_split")
    return path


def _image_files(folder: Path) -> list[str]:
    """Sorted image file names of one folder (extensions as torchvision's, any case)."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries
                      if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))


# ---------------------------------------------------------------- imagenet-style class folders

def _open_imagefolder(cfg: ImagesDatasetConfig, split: str) -> ImageSplit:
    root = Path(str(cfg.root))
    folder = _split_dir(root / split, split, root)
    classes = _class_folders(_split_dir(root / cfg.train_split, cfg.train_split, root))
    index = {wnid: i for i, wnid in enumerate(classes)}
    ids: list[str] = []
    labels: list[int] = []
    for wnid in _class_folders(folder):
        if wnid not in index:
            raise DataError(f"{folder / wnid}: class folder absent from the train split "
                            f"{root / cfg.train_split}, so it has no class index. Fix: remove it "
                            "or add the class to the train split")
        files = _image_files(folder / wnid)
        if not files:
            raise DataError(f"{folder / wnid}: class folder holds no images "
                            f"({', '.join(IMAGE_EXTENSIONS)}). Fix: restore its images (an "
                            "interrupted copy?) or delete the empty folder")
        ids.extend(f"{wnid}/{name}" for name in files)
        labels.extend([index[wnid]] * len(files))
    if not ids:
        raise DataError(f"{folder}: no class folders with images. Fix: expect "
                        f"{folder}/<class>/<image> ({_layout_doc(cfg.layout)})")
    return ImageSplit(cfg.name, split, folder, ids, np.asarray(labels, dtype=np.int64),
                      _class_names(root, classes), {"n_listed": len(ids)})


def _class_folders(folder: Path) -> list[str]:
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _class_names(root: Path, wnids: list[str]) -> list[str]:
    """Readable ImageNet names from LOC_synset_mapping.txt ("n01440764 tench, Tinca tinca")."""
    mapping_file = root / "LOC_synset_mapping.txt"
    if not mapping_file.is_file():
        return list(wnids)
    mapping: dict[str, str] = {}
    for line in mapping_file.read_text().splitlines():
        wnid, _, text = line.strip().partition(" ")
        if wnid:
            mapping[wnid] = text.split(",")[0].strip() or wnid
    names = [mapping.get(w, w) for w in wnids]
    # A few ImageNet names repeat (two "crane"s, two "maillot"s): keep names unique.
    seen = {n for n in names if names.count(n) > 1}
    return [f"{n} ({w})" if n in seen else n for n, w in zip(names, wnids)]


# ---------------------------------------------------------------- open images v7

def _open_openimages(cfg: ImagesDatasetConfig, split: str) -> ImageSplit:
    root = Path(str(cfg.root))
    folder = _split_dir(root / "images" / split, split, root / "images")
    label_names, display_names = read_oi_classes(root / OI_CLASSES_CSV)
    files = [f for f in _image_files(folder) if f.lower().endswith(".jpg")]
    if not files:
        raise DataError(f"{folder}: no <ImageID>.jpg files. Fix: download the {split} images "
                        "there (scripts/prepare_openimages.md)")
    labels, info = read_oi_labels(root / OI_LABELS_CSV.format(split=split),
                                  [Path(f).stem for f in files], label_names)
    info["n_listed"] = len(files)
    return ImageSplit(cfg.name, split, folder, files, labels, display_names, info)


def read_oi_classes(path: Path) -> tuple[list[str], list[str]]:
    """(LabelName, DisplayName) lists of the boxable class file, in file order."""
    if not path.is_file():
        raise DataError(f"{path}: class description file is missing. Fix: download "
                        f"{OI_CLASSES_CSV} into the dataset root (scripts/prepare_openimages.md)")
    with open(path, newline="", encoding="utf-8") as f:
        rows = [row for row in csv.reader(f) if row]
    if rows and tuple(rows[0][:2]) == OI_CLASS_COLUMNS:
        rows = rows[1:]  # the file is distributed with and without this header row
    elif not rows or len(rows[0]) < 2 or not rows[0][0].startswith("/m/"):
        raise DataError(f"{path}: expected the columns {OI_CLASS_COLUMNS} (or header-less rows "
                        f"'/m/...,Name'), found {rows[0] if rows else 'an empty file'}. Fix: use "
                        f"Open Images' {OI_CLASSES_CSV}")
    return [r[0] for r in rows], [r[1] for r in rows]


def read_oi_labels(path: Path, image_ids: list[str], label_names: list[str]
                   ) -> tuple[np.ndarray, dict[str, int]]:
    """Multi-hot (N, C) bool labels of ``image_ids`` from the human image-label CSV.

    Keeps rows with Confidence == 1 (0 means a human verified the class is absent); rows of
    images that are not on disk are ignored and counted (a partial download).
    """
    import pandas as pd

    if not path.is_file():
        raise DataError(f"{path}: image-label file is missing. Fix: download it into the dataset "
                        "root (scripts/prepare_openimages.md)")
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    missing = [c for c in OI_LABEL_COLUMNS if c not in header]
    if missing:
        raise DataError(f"{path}: columns {missing} are missing (found {header}). Fix: use Open "
                        "Images' <split>-annotations-human-imagelabels-boxable.csv, whose header "
                        "is ImageID,Source,LabelName,Confidence")
    table = pd.read_csv(path, usecols=list(OI_LABEL_COLUMNS), dtype={"ImageID": str,
                        "LabelName": str, "Confidence": float})
    positive = table["Confidence"] == 1
    rows = table[positive]
    image_pos = pd.Index(image_ids).get_indexer(rows["ImageID"])
    class_pos = pd.Index(label_names).get_indexer(rows["LabelName"])
    unknown = rows["LabelName"][class_pos < 0].unique()
    if len(unknown):
        raise DataError(f"{path}: labels {list(unknown[:5])} are not in {OI_CLASSES_CSV}. Fix: use "
                        "the *boxable* image-label file, which matches the boxable class list")
    on_disk = image_pos >= 0
    labels = np.zeros((len(image_ids), len(label_names)), dtype=bool)
    labels[image_pos[on_disk], class_pos[on_disk]] = True
    info = {"label_rows": len(table), "label_rows_confidence_0": int((~positive).sum()),
            "label_rows_without_image": int((~on_disk).sum()),
            "images_without_label": int((~labels.any(axis=1)).sum())}
    return labels, info


# ---------------------------------------------------------------- digits rendered as images

def materialize_digits_images(root: Path, eval_fraction: float, split_seed: int) -> None:
    """Write scikit-learn's digits as PNGs under ``root``/{train,val}/<digit>/ once.

    The split is the embedded ``digits`` dataset's (same fraction and seed), so the two are
    comparable. Written into a temporary directory and renamed, under a file lock.
    """
    from filelock import FileLock

    marker = root / ".complete"
    if marker.is_file():
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        if marker.is_file():
            return
        if root.exists():  # an earlier interrupted write left a tree without its marker
            shutil.rmtree(root)
        tmp = root.parent / f".tmp-{root.name}-{uuid.uuid4().hex[:8]}"
        try:
            _write_digits(tmp, eval_fraction, split_seed)
            (tmp / ".complete").write_text("scikit-learn load_digits rendered as PNG\n")
            os.rename(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _write_digits(out: Path, eval_fraction: float, split_seed: int) -> None:
    from sklearn.datasets import load_digits

    from sae.data.embedded import _stratified_split  # the digits dataset's own split

    bunch = load_digits()
    train_idx, eval_idx = _stratified_split(bunch.target, eval_fraction, split_seed)
    for split, indices in (("train", train_idx), ("val", eval_idx)):
        for i in indices:
            folder = out / split / str(bunch.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (255 - bunch.images[i] * (255 / 16)).astype(np.uint8)  # dark ink on white
            image = Image.fromarray(pixels, mode="L").resize(
                (DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE), Image.NEAREST)
            image.convert("RGB").save(folder / f"digit_{i}.png")


# ---------------------------------------------------------------- subsets and torch datasets

def _subsample(split: ImageSplit, max_images: int | None, seed: int) -> ImageSplit:
    """At most ``max_images`` images, a seeded random subset kept in listing order (so a
    smoke test sees every class, not the first few)."""
    if max_images is None or len(split) <= max_images:
        return split
    keep = np.sort(np.random.default_rng(seed).choice(len(split), max_images, replace=False))
    labels = None if split.labels is None else split.labels[keep]
    info = {**split.info, "subsampled_from": len(split)}
    return ImageSplit(split.dataset, split.split, split.image_dir, [split.ids[i] for i in keep],
                      labels, split.class_names, info)


def load_rgb(path: Path) -> Image.Image:
    """Decode an image fully (truncated files fail here, not later) as RGB."""
    with Image.open(path) as image:
        return image.convert("RGB")


class ImageFileDataset(torch.utils.data.Dataset):
    """(preprocessed image, index) per file; an undecodable file gives (None, index) when
    ``on_unreadable`` is ``skip`` and raises :class:`UnreadableImageError` when ``fail``."""

    def __init__(self, split: ImageSplit, transform: Callable[[Image.Image], torch.Tensor],
                 on_unreadable: str = "fail") -> None:
        if on_unreadable not in ("fail", "skip"):
            raise DataError(f"dataset.on_unreadable: {on_unreadable!r}. Fix: use fail or skip")
        self.split = split
        self.transform = transform
        self.on_unreadable = on_unreadable

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int]:
        path = self.split.path(index)
        try:
            image = load_rgb(path)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            if self.on_unreadable == "skip":
                return None, index
            raise UnreadableImageError(
                f"{path}: cannot be decoded ({type(exc).__name__}: {exc}). Fix: replace or delete "
                "the file, or set dataset.on_unreadable=skip to skip it and count it"
            ) from exc
        return self.transform(image), index


def collate_skipping(batch: list[tuple[torch.Tensor | None, int]]
                     ) -> tuple[torch.Tensor | None, torch.Tensor, list[int]]:
    """Stack the decodable images; return (images or None, their indices, skipped indices)."""
    good = [(image, i) for image, i in batch if image is not None]
    skipped = [i for image, i in batch if image is None]
    images = torch.stack([image for image, _ in good]) if good else None
    return images, torch.tensor([i for _, i in good], dtype=torch.int64), skipped
