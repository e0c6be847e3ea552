#!/usr/bin/env python
"""Open Images V7 for dataset=openimages: fetch the narratives, write a download list, check.

    python scripts/prepare_openimages.py narratives $OPENIMAGES_ROOT validation train
    python scripts/prepare_openimages.py list $OPENIMAGES_ROOT validation > validation_ids.txt
    python downloader.py validation_ids.txt --download_folder=$OPENIMAGES_ROOT/images/validation
    python scripts/prepare_openimages.py check $OPENIMAGES_ROOT validation train

``narratives`` downloads the split's official Localized Narratives files into the root (skipping
those present; ``--captions-only``: the same records without mouse traces). ``list`` prints ``<split>/<ImageID>`` (the input format of Open Images'
downloader.py) for the images the protocol reads: with ``--sampling narratives`` (default) the
labelled images that have a narrative, with ``per_image`` every image with a row in the split's
boxable image-label CSV. See scripts/prepare_openimages.md.
"""

from __future__ import annotations

import argparse
import sys
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

NARRATIVES_URL = "https://storage.googleapis.com/localized-narratives/annotations/"
NARRATIVES_FILES = {  # as listed on https://google.github.io/localized-narratives/
    "train": [f"open_images_train_v6_localized_narratives-{k:05d}-of-00010.jsonl"
              for k in range(10)],
    "validation": ["open_images_validation_localized_narratives.jsonl"],
    "test": ["open_images_test_localized_narratives.jsonl"],
}
CAPTIONS_FILES = {  # the same records without mouse traces (a few MB)
    "train": ["open_images_train_v6_captions.jsonl"],
    "validation": ["open_images_validation_captions.jsonl"],
    "test": ["open_images_test_captions.jsonl"],
}


def fetch_narratives(root: Path, splits: list[str], captions_only: bool) -> None:
    for split in splits:
        for name in (CAPTIONS_FILES if captions_only else NARRATIVES_FILES)[split]:
            target = root / name
            if target.is_file():
                print(f"present: {target}")
                continue
            partial = target.with_suffix(".part")
            print(f"downloading {NARRATIVES_URL}{name}")
            urllib.request.urlretrieve(NARRATIVES_URL + name, partial)
            partial.rename(target)  # a killed download leaves only the .part file


def image_list(root: Path, split: str, sampling: str, max_images: int | None) -> None:
    import pandas as pd

    from sae.data.openimages import (
        OI_LABELS_CSV,
        narrative_files,
        read_narrative_image_ids,
    )

    path = root / OI_LABELS_CSV.format(split=split)
    if not path.is_file():
        raise SystemExit(f"{path} is missing: download the CSV files first (prepare_openimages.md)")
    table = pd.read_csv(path, usecols=["ImageID", "Confidence"], dtype={"ImageID": str})
    ids = table["ImageID"] if sampling == "per_image" else \
        table.loc[table["Confidence"] == 1, "ImageID"]
    ids = ids.drop_duplicates()
    if sampling == "narratives":
        ids = ids[ids.isin(set(read_narrative_image_ids(narrative_files(root, split))))]
    for image_id in ids.iloc[:max_images]:
        print(f"{split}/{image_id}")


def check(root: Path, splits: list[str], sampling: str) -> None:
    """Read each split as dataset=openimages would and print its label statistics."""
    from sae.config import ImagesDatasetConfig
    from sae.data.images import open_split

    cfg = ImagesDatasetConfig(name="openimages", kind="images", layout="openimages",
                              root=str(root), multi_label=True, sampling=sampling)
    for split in splits:
        listed = open_split(cfg, split)
        per_image = listed.labels.sum(axis=1)
        print(f"{split} ({sampling}): {len(listed)} samples, {len(listed.class_names)} classes, "
              f"{per_image.mean():.2f} positive labels per sample; {listed.info}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fetching = sub.add_parser("narratives")
    fetching.add_argument("root", type=Path)
    fetching.add_argument("splits", nargs="+", choices=sorted(NARRATIVES_FILES))
    fetching.add_argument("--captions-only", action="store_true",
                          help="the captions-only files (same records, no mouse traces)")
    listing = sub.add_parser("list")
    listing.add_argument("root", type=Path)
    listing.add_argument("split")
    listing.add_argument("--max-images", type=int, default=None)
    checking = sub.add_parser("check")
    checking.add_argument("root", type=Path)
    checking.add_argument("splits", nargs="+")
    for command in (listing, checking):
        command.add_argument("--sampling", choices=("narratives", "per_image"),
                             default="narratives")
    args = parser.parse_args()
    if args.command == "narratives":
        fetch_narratives(args.root, args.splits, args.captions_only)
    elif args.command == "list":
        image_list(args.root, args.split, args.sampling, args.max_images)
    else:
        check(args.root, args.splits, args.sampling)


if __name__ == "__main__":
    main()
