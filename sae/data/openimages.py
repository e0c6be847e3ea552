"""Open Images V7 (layout ``openimages``): the class list, the human image labels and the two
sampling protocols of ``dataset.sampling`` (METHOD.md s1).

Files under the dataset root (where each comes from: scripts/prepare_openimages.md):

- ``images/<split>/<ImageID>.jpg``;
- ``oidv7-class-descriptions-boxable.csv`` (LabelName, DisplayName; with or without a header):
  the 601 boxable classes, in file order;
- ``<split>-annotations-human-imagelabels-boxable.csv`` (ImageID, Source, LabelName,
  Confidence): rows with Confidence == 1 become a multi-hot (N, C) bool label;
- ``sampling: narratives`` only: the Localized Narratives files of the split,
  ``open_images_<split>*localized_narratives*.jsonl`` (train: ``open_images_train_v6_localized_
  narratives-0000k-of-00010.jsonl``; validation: ``open_images_validation_localized_narratives
  .jsonl``), one JSON object per line with ``image_id``, ``annotator_id``, ``caption``, ...;
  where they are absent, the captions-only version of the same records
  (``open_images_<split>*_captions.jsonl``, e.g. ``open_images_train_v6_captions.jsonl``).

Protocols:

- ``per_image``: one sample per image file on disk, sorted by ImageID; images without a positive
  label are kept (all-zero row).
- ``narratives`` (the reference code's): one sample per (image, caption) pair, so an image with
  several narratives appears once per narrative; only images with at least one positive boxable
  label and on disk. Samples are sorted by ImageID, the narratives of one image in file order.
  Sample ids are the image file names (``<ImageID>.jpg``, repeated per caption), so the cached
  images are found again like every other layout's.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from sae.data.errors import DataError

OI_CLASSES_CSV = "oidv7-class-descriptions-boxable.csv"
OI_LABELS_CSV = "{split}-annotations-human-imagelabels-boxable.csv"
OI_NARRATIVES_GLOB = "open_images_{split}*localized_narratives*.jsonl"
# The same records without the mouse traces (MBs instead of GBs), read when the above are absent.
OI_CAPTIONS_GLOB = "open_images_{split}*_captions.jsonl"
OI_CLASS_COLUMNS = ("LabelName", "DisplayName")
OI_LABEL_COLUMNS = ("ImageID", "LabelName", "Confidence")  # Source is present but unused


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


def narrative_files(root: Path, split: str) -> list[Path]:
    """The split's Localized Narratives files (sorted; else its captions-only files), or an
    error naming where they come from."""
    files = (sorted(root.glob(OI_NARRATIVES_GLOB.format(split=split)))
             or sorted(root.glob(OI_CAPTIONS_GLOB.format(split=split))))
    if not files:
        raise DataError(
            f"{root}: no Localized Narratives file of the split {split!r} "
            f"({OI_NARRATIVES_GLOB.format(split=split)}), which dataset.sampling=narratives "
            "reads. Fix: download them into the dataset root (scripts/prepare_openimages.md), "
            "or set dataset.sampling=per_image (every labelled image once, not the reference "
            "protocol)")
    return files


def read_narrative_image_ids(files: list[Path]) -> list[str]:
    """The ``image_id`` of every narrative, one per line, in file and line order."""
    image_ids: list[str] = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    image_ids.append(str(json.loads(line)["image_id"]))
                except (ValueError, KeyError, TypeError) as exc:
                    raise DataError(
                        f"{path}:{number}: not a Localized Narratives record ({exc}). Fix: use "
                        "the official open_images_*_localized_narratives*.jsonl files (JSON "
                        "lines with image_id, annotator_id, caption, ...)") from exc
    return image_ids


def narrative_samples(image_ids: list[str], labels: np.ndarray, narratives: list[str]
                      ) -> tuple[np.ndarray, dict[str, int]]:
    """Indices into ``image_ids`` (images on disk, with their ``labels``) of one sample per
    narrative, kept when its image is on disk and has a positive label; sorted by image, stable
    (an image's narratives keep their file order)."""
    import pandas as pd

    position = pd.Index(image_ids).get_indexer(pd.Index(narratives))
    on_disk = position >= 0
    labelled = np.zeros(len(narratives), dtype=bool)
    labelled[on_disk] = labels[position[on_disk]].any(axis=1)
    kept = position[labelled]
    order = np.argsort(kept, kind="stable")  # image_ids are sorted, so this sorts by ImageID
    per_image = np.bincount(kept, minlength=len(image_ids))
    info = {"narratives": len(narratives),
            "narratives_without_image": int((~on_disk).sum()),
            "narratives_of_unlabelled_images": int((on_disk & ~labelled).sum()),
            "images_with_narratives": int((per_image > 0).sum()),
            "images_without_narrative": int(((per_image == 0)
                                             & labels.any(axis=1)).sum())}
    return kept[order], info
