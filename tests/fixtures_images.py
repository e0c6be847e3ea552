"""Tiny image datasets written in the real on-disk layouts (ImageNet folders, Open Images V7).

Used by tests/test_extract.py; small on purpose (2 CPU cores): a few dozen 40x30 JPEGs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# Real ILSVRC-2012 wnids (tench, goldfish, great white shark) and names, as LOC_synset_mapping.txt.
WNIDS = {
    "n01440764": "tench, Tinca tinca",
    "n01443537": "goldfish, Carassius auratus",
    "n01484850": "great white shark, white shark, man-eater, Carcharodon carcharias",
}

# Three real boxable classes of Open Images V7.
OI_CLASSES = [("/m/011k07", "Tortoise"), ("/m/0120dh", "Sea turtle"), ("/m/01226z", "Football")]
OI_IMAGE_IDS = ["000026e7ee790996", "000062a39995e348", "0000c64e1253d68f", "0000d67245642c5f"]
# ImageID, Source, LabelName, Confidence. Image 0: two classes; image 1: one class plus a
# verified-absent one (Confidence 0, dropped); image 2: only verified-absent labels (no label);
# image 3: no row at all; the last row names an image that is not on disk (ignored, counted).
OI_LABEL_ROWS = [
    ("000026e7ee790996", "verification", "/m/011k07", "1"),
    ("000026e7ee790996", "crowdsource-verification", "/m/01226z", "1"),
    ("000062a39995e348", "verification", "/m/0120dh", "1"),
    ("000062a39995e348", "verification", "/m/01226z", "0"),
    ("0000c64e1253d68f", "verification", "/m/011k07", "0"),
    ("ffff21932da3ed01", "verification", "/m/0120dh", "1"),
]
OI_EXPECTED = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 0], [0, 0, 0]], dtype=bool)


def write_jpeg(path: Path, seed: int, size: tuple[int, int] = (40, 30)) -> None:
    """A small random-colour JPEG (distinct per seed, so embeddings differ)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=85)


def make_imagenet(root: Path, train_per_class: int = 4, val_per_class: int = 2,
                  val_classes: list[str] | None = None, mapping: bool = True) -> Path:
    """``root/{train,val}/<wnid>/<wnid>_<n>.JPEG`` (+ LOC_synset_mapping.txt)."""
    seed = 0
    for split, per_class, classes in (("train", train_per_class, list(WNIDS)),
                                      ("val", val_per_class, val_classes or list(WNIDS))):
        for wnid in classes:
            for n in range(per_class):
                name = f"{wnid}_{n}.JPEG" if split == "train" else f"ILSVRC2012_val_{seed:08d}.JPEG"
                write_jpeg(root / split / wnid / name, seed)
                seed += 1
    if mapping:
        (root / "LOC_synset_mapping.txt").write_text(
            "".join(f"{w} {name}\n" for w, name in WNIDS.items()))
    return root


def make_openimages(root: Path, split: str = "validation", class_header: bool = True) -> Path:
    """``root/images/<split>/<ImageID>.jpg`` and the two CSV files with their real headers."""
    for i, image_id in enumerate(OI_IMAGE_IDS):
        write_jpeg(root / "images" / split / f"{image_id}.jpg", 100 + i)
    classes = "".join(f"{label},{name}\n" for label, name in OI_CLASSES)
    header = "LabelName,DisplayName\n" if class_header else ""
    (root / "oidv7-class-descriptions-boxable.csv").write_text(header + classes)
    rows = "".join(",".join(row) + "\n" for row in OI_LABEL_ROWS)
    (root / f"{split}-annotations-human-imagelabels-boxable.csv").write_text(
        "ImageID,Source,LabelName,Confidence\n" + rows)
    return root
