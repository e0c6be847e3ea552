"""Tiny image datasets written in the real on-disk layouts (ImageNet folders, Open Images V7).

Used by tests/test_extract.py and tests/test_datasets.py; small on purpose (2 CPU cores): a few dozen 40x30 JPEGs.
"""

from __future__ import annotations

import json
import shutil
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


# Localized Narratives of the Open Images fixture, in file order: (image_id, annotator_id).
# Image 1 comes first (samples are sorted by image); image 0 has two narratives (two samples);
# images 2 and 3 have no positive label (dropped); the last image is not on disk (dropped).
OI_NARRATIVES = [
    ("000062a39995e348", 7), ("000026e7ee790996", 3), ("0000c64e1253d68f", 3),
    ("000026e7ee790996", 9), ("0000d67245642c5f", 1), ("ffff21932da3ed01", 2),
]
OI_NARRATIVE_SAMPLES = [0, 0, 1]  # the fixture images of the narratives protocol, in order


def write_narratives(root: Path, split: str = "validation", shards: int = 1,
                     captions_only: bool = False) -> list[Path]:
    """The official file names and JSON-lines records (``shards`` > 1: train's -0000k-of-n;
    ``captions_only``: the smaller ``open_images_<split>_captions.jsonl`` form)."""
    if captions_only:
        names = [f"open_images_{split}_captions.jsonl"]
    elif shards == 1:
        names = [f"open_images_{split}_localized_narratives.jsonl"]
    else:
        names = [f"open_images_{split}_v6_localized_narratives-{k:05d}-of-{shards:05d}.jsonl"
                 for k in range(shards)]
    lines = [json.dumps({"dataset_id": "open_images", "image_id": image_id,
                         "annotator_id": annotator, "caption": f"In this image {n} ...",
                         "timed_caption": [], "traces": [], "voice_recording": f"{n}.ogg"})
             for n, (image_id, annotator) in enumerate(OI_NARRATIVES)]
    paths = []
    for k, name in enumerate(names):
        shard = lines[k::shards] if shards > 1 else lines
        (root / name).write_text("".join(line + "\n" for line in shard))
        paths.append(root / name)
    return paths


# ImageNet as a Hugging Face dataset: the ClassLabel names of imagenet-1k (the sorted wnids'
# readable names), a few labelled images per split.
HF_LABELS = {"train": [0, 1, 2, 0, 1], "validation": [2, 0]}


def hf_imagenet_splits() -> dict[str, object]:
    """{split: datasets.Dataset} with an ``image`` (PNG bytes) and a ``label`` column."""
    import datasets

    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=list(WNIDS.values()))})
    out = {}
    for s, (split, labels) in enumerate(HF_LABELS.items()):
        images = [Image.fromarray(np.random.default_rng(10 * s + i).integers(
            0, 256, size=(30 + i, 40, 3), dtype=np.uint8)) for i in range(len(labels))]
        out[split] = datasets.Dataset.from_dict({"image": images, "label": labels},
                                                features=features)
    return out


def make_imagenet_hf(root: Path, form: str) -> Path:
    """``save_to_disk`` (a DatasetDict), ``parquet`` (the hub's ``data/<split>-0000k-of-n``
    files) or ``arrow`` (a prepared ``datasets`` cache: ``imagenet-1k-<split>-0000k-of-n``)."""
    import datasets

    splits = hf_imagenet_splits()
    if form == "save_to_disk":
        datasets.DatasetDict(splits).save_to_disk(str(root))
        return root
    folder = root / ("data" if form == "parquet" else "default/0.0.0/abc123")
    folder.mkdir(parents=True)
    for split, dataset in splits.items():
        half = len(dataset) // 2  # two shards per split: their order must be kept
        for k, part in enumerate((dataset.select(range(half)),
                                  dataset.select(range(half, len(dataset))))):
            stem = f"{split}-{k:05d}-of-00002"
            if form == "parquet":
                part.to_parquet(str(folder / f"{stem}.parquet"))
            else:  # an arrow stream file, as the datasets cache holds
                part.flatten_indices().save_to_disk(str(root / "tmp" / stem))
                arrow = next((root / "tmp" / stem).glob("*.arrow"))
                arrow.rename(folder / f"imagenet-1k-{stem}.arrow")
    shutil.rmtree(root / "tmp", ignore_errors=True)
    return root
