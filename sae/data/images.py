"""Image datasets in their real on-disk layouts (METHOD.md s1), read without loading pixels.

``dataset.layout`` picks the reader:

- ``imagenet``: ``<root>/<split>/<wnid>/*.JPEG`` (val reorganised into wnid folders, see
  scripts/prepare_imagenet.md). The class index is the position of the wnid among the sorted wnid
  folders of the *train* split, as torchvision's ImageFolder orders them, so train and val agree
  even when a subset of val lacks some classes. Class names come from
  ``<root>/LOC_synset_mapping.txt`` when present, else they are the wnids.
- ``imagenet_hf``: a Hugging Face ``datasets`` copy of ImageNet-1K on disk (the reference code's
  source): :mod:`sae.data.images_hf`.
- ``openimages``: ``<root>/images/<split>/<ImageID>.jpg`` with the boxable class list and the
  human image labels, sampled per ``dataset.sampling``: :mod:`sae.data.openimages`.
- ``digits_images``: scikit-learn's digits rendered as PNG files, written once under ``root`` in
  the imagenet layout (class folders ``0``..``9``), so the image path runs offline.

Every reader returns an :class:`ImageSplit`: the sample ids (for files, paths relative to the
split's image directory), labels and class names. :class:`ImageFileDataset` turns it into a
torch Dataset.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sae.config import IMAGE_LAYOUTS as LAYOUTS
from sae.config import ImagesDatasetConfig
from sae.data.errors import DataError
from sae.data.image_split import ImageSplit, RowReader, load_rgb  # noqa: F401 -- re-exported
from sae.data.openimages import (
    OI_CLASSES_CSV,
    OI_LABELS_CSV,
    narrative_files,
    narrative_samples,
    read_narrative_image_ids,
    read_oi_classes,
    read_oi_labels,
)

__all__ = ["LAYOUTS", "OI_CLASSES_CSV", "OI_LABELS_CSV", "ImageFileDataset", "ImageSplit",
           "open_split", "read_oi_classes", "read_oi_labels"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DIGITS_IMAGE_SIZE = 32  # 8x8 digits upscaled 4x (nearest): big enough for any backbone resize


class UnreadableImageError(DataError):
    """An image file cannot be decoded and ``dataset.on_unreadable`` is ``fail``."""


def check_layout(cfg: ImagesDatasetConfig) -> str:
    """The layout of an images dataset, or an error naming the options."""
    if cfg.layout not in LAYOUTS:
        raise DataError(f"dataset.layout: {cfg.layout!r} is not a known layout. "
                        f"Fix: use one of {LAYOUTS}")
    return cfg.layout


def image_dir(cfg: ImagesDatasetConfig, split: str) -> Path:
    """Directory that a split's image ids are relative to (no listing, no checks)."""
    root = Path(str(cfg.root))
    layout = check_layout(cfg)
    if layout == "openimages":
        return root / "images" / split
    if layout == "imagenet_hf":
        return root
    return root / split


def open_split(cfg: ImagesDatasetConfig, split: str) -> ImageSplit:
    """List the images and read the labels of one split (``split`` = the directory name)."""
    layout = check_layout(cfg)
    if layout == "digits_images" and cfg.root:
        materialize_digits_images(Path(cfg.root), cfg.eval_fraction, cfg.split_seed)
    _check_root(cfg)
    if layout == "openimages":
        full = _open_openimages(cfg, split)
    elif layout == "imagenet_hf":
        from sae.data.images_hf import open_hf_split

        full = open_hf_split(cfg, split)
    else:
        full = _open_imagefolder(cfg, split)
    return _subsample(full, cfg.max_per_split, cfg.split_seed)


# The environment variable that conf/dataset/<layout>.yaml reads the root from.
ROOT_ENV = {"imagenet": "IMAGENET_ROOT", "imagenet_hf": "IMAGENET_ROOT", "openimages": "OPENIMAGES_ROOT"}


def _check_root(cfg: ImagesDatasetConfig) -> None:
    env = ROOT_ENV.get(cfg.layout)
    fix = (f"Fix: set dataset.root=/path/to/{cfg.name}"
           + (f" or export {env}" if env else "")
           + f" (expected layout: {_layout_doc(cfg.layout)})")
    if not cfg.root:
        raise DataError(f"dataset.root: not set for the image dataset {cfg.name!r}. {fix}")
    if not Path(cfg.root).is_dir():
        raise DataError(f"dataset.root: {cfg.root} is not a directory. {fix}")


def _layout_doc(layout: str) -> str:
    """Where a layout is documented, for error messages."""
    if layout in ("imagenet", "imagenet_hf", "openimages"):
        return f"scripts/prepare_{layout.removesuffix('_hf')}.md"
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
    mapping = [root / "LOC_synset_mapping.txt"]
    return ImageSplit(cfg.name, split, folder, ids, np.asarray(labels, dtype=np.int64),
                      _class_names(root, classes), {"n_listed": len(ids)},
                      [p for p in mapping if p.is_file()])


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
    narrative_sources: list[Path] = []
    if cfg.sampling == "narratives":  # fail before listing a million files
        narrative_sources = list(narrative_files(root, split))
        narratives = read_narrative_image_ids(narrative_sources)
    files = [f for f in _image_files(folder) if f.lower().endswith(".jpg")]
    if not files:
        raise DataError(f"{folder}: no <ImageID>.jpg files. Fix: download the {split} images "
                        "there (scripts/prepare_openimages.md)")
    image_ids = [Path(f).stem for f in files]
    labels, info = read_oi_labels(root / OI_LABELS_CSV.format(split=split), image_ids,
                                  label_names)
    info = {"sampling": cfg.sampling, "n_listed": len(files), **info}
    if cfg.sampling == "narratives":
        samples, counts = narrative_samples(image_ids, labels, narratives)
        if not len(samples):
            raise DataError(f"{folder}: none of the split's narratives names a labelled image on "
                            f"disk ({counts}). Fix: download the images of the narratives "
                            "(scripts/prepare_openimages.md)")
        files, labels = [files[i] for i in samples], labels[samples]
        info.update(counts, n_samples=len(files))
    sources = [root / OI_CLASSES_CSV, root / OI_LABELS_CSV.format(split=split),
               *narrative_sources]
    return ImageSplit(cfg.name, split, folder, files, labels, display_names, info, sources)


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
    return replace(split, ids=[split.ids[i] for i in keep], labels=labels, info=info)


def cached_images(cfg: ImagesDatasetConfig, split: str, ids: list[str]
                  ) -> Callable[[int], Image.Image] | None:
    """i -> the sample ``ids[i]`` as RGB, read from *this* config's root (a cache moved to
    another cluster still shows its images); None where the images are not."""
    if cfg.layout == "digits_images" and cfg.root:  # a cache copied here without its images
        materialize_digits_images(Path(cfg.root), cfg.eval_fraction, cfg.split_seed)
    if not cfg.root or not image_dir(cfg, split).is_dir():
        return None
    reader = None
    if cfg.layout == "imagenet_hf":
        from sae.data.images_hf import open_rows

        try:
            reader = open_rows(Path(cfg.root), split)
        except DataError:
            return None
    return ImageSplit(cfg.name, split, image_dir(cfg, split), ids, None, [], reader=reader).load


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
        try:
            image = self.split.load(index)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            if self.on_unreadable == "skip":
                return None, index
            raise UnreadableImageError(
                f"{self.split.describe(index)}: cannot be decoded ({type(exc).__name__}: {exc}). Fix: replace or delete "
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
