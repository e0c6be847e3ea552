#!/usr/bin/env python
"""Put ImageNet-1K (ILSVRC-2012) into the layout dataset=imagenet reads, and check it.

    python scripts/prepare_imagenet.py archives $IMAGENET_ROOT   # official tar files in ROOT
    python scripts/prepare_imagenet.py kaggle KAGGLE_DIR $IMAGENET_ROOT
    python scripts/prepare_imagenet.py check $IMAGENET_ROOT

See scripts/prepare_imagenet.md for where the files come from.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def from_archives(root: Path) -> None:
    """ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz in
    ``root`` -> root/train/<wnid>/*.JPEG and root/val/<wnid>/*.JPEG (torchvision's own parsers:
    they check the archives' md5 and sort val by the devkit's ground truth)."""
    from torchvision.datasets.imagenet import (
        parse_devkit_archive,
        parse_train_archive,
        parse_val_archive,
    )

    parse_devkit_archive(str(root))
    if not (root / "train").is_dir():
        parse_train_archive(str(root))
    if not (root / "val").is_dir():
        parse_val_archive(str(root))


def from_kaggle(kaggle: Path, root: Path, copy: bool) -> None:
    """Kaggle's imagenet-object-localization-challenge -> ``root`` (symlinks unless ``copy``):
    train is already in wnid folders; val is sorted by LOC_val_solution.csv."""
    source = kaggle / "ILSVRC" / "Data" / "CLS-LOC"
    solution = kaggle / "LOC_val_solution.csv"
    for needed in (source / "train", source / "val", solution):
        if not needed.exists():
            raise SystemExit(f"{needed} is missing: is {kaggle} the unpacked Kaggle download?")
    root.mkdir(parents=True, exist_ok=True)
    place = shutil.copy2 if copy else os.symlink
    if not (root / "train").exists():
        (shutil.copytree if copy else os.symlink)(source / "train", root / "train")
    with open(solution, newline="") as f:
        for row in csv.DictReader(f):  # ImageId, PredictionString ("n01751748 x y x y ...")
            wnid = row["PredictionString"].split()[0]
            target = root / "val" / wnid / f"{row['ImageId']}.JPEG"
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                place(source / "val" / target.name, target)
    mapping = kaggle / "LOC_synset_mapping.txt"
    if mapping.is_file():  # readable class names ("n01440764 tench, Tinca tinca")
        shutil.copy2(mapping, root / mapping.name)


def check(root: Path) -> None:
    """List both splits as dataset=imagenet would and print their sizes."""
    from sae.config import ImagesDatasetConfig
    from sae.data.images import open_split

    cfg = ImagesDatasetConfig(name="imagenet", kind="images", layout="imagenet", root=str(root))
    expected = {"train": 1_281_167, "val": 50_000}
    for split, count in expected.items():
        listed = open_split(cfg, split)
        classes = len(set(listed.labels.tolist()))
        note = "" if len(listed) == count else f"  (the full split has {count})"
        print(f"{split}: {len(listed)} images, {classes} classes{note}")
    print(f"class names: {listed.class_names[:3]} ...")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("archives").add_argument("root", type=Path)
    kaggle = sub.add_parser("kaggle")
    kaggle.add_argument("kaggle_dir", type=Path)
    kaggle.add_argument("root", type=Path)
    kaggle.add_argument("--copy", action="store_true", help="copy files instead of symlinks")
    sub.add_parser("check").add_argument("root", type=Path)
    args = parser.parse_args()
    if args.command == "archives":
        from_archives(args.root)
    elif args.command == "kaggle":
        from_kaggle(args.kaggle_dir, args.root, args.copy)
    check(args.root)


if __name__ == "__main__":
    main()
