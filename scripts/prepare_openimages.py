#!/usr/bin/env python
"""Open Images V7 for dataset=openimages: write the download list of a split, and check a root.

    python scripts/prepare_openimages.py list $OPENIMAGES_ROOT validation > validation_ids.txt
    python downloader.py validation_ids.txt --download_folder=$OPENIMAGES_ROOT/images/validation
    python scripts/prepare_openimages.py check $OPENIMAGES_ROOT validation train

``list`` prints ``<split>/<ImageID>`` for every image with a row in the split's boxable
image-label CSV (the input format of Open Images' downloader.py). See
scripts/prepare_openimages.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def image_list(root: Path, split: str, max_images: int | None) -> None:
    import pandas as pd

    from sae.data.images import OI_LABELS_CSV

    path = root / OI_LABELS_CSV.format(split=split)
    if not path.is_file():
        raise SystemExit(f"{path} is missing: download the CSV files first (prepare_openimages.md)")
    ids = pd.read_csv(path, usecols=["ImageID"], dtype=str)["ImageID"].drop_duplicates()
    for image_id in ids.iloc[:max_images]:
        print(f"{split}/{image_id}")


def check(root: Path, splits: list[str]) -> None:
    """Read each split as dataset=openimages would and print its label statistics."""
    from sae.config import ImagesDatasetConfig
    from sae.data.images import open_split

    cfg = ImagesDatasetConfig(name="openimages", kind="images", layout="openimages", root=str(root),
                        multi_label=True)
    for split in splits:
        listed = open_split(cfg, split)
        per_image = listed.labels.sum(axis=1)
        print(f"{split}: {len(listed)} images, {len(listed.class_names)} classes, "
              f"{per_image.mean():.2f} positive labels per image; {listed.info}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list")
    listing.add_argument("root", type=Path)
    listing.add_argument("split")
    listing.add_argument("--max-images", type=int, default=None)
    checking = sub.add_parser("check")
    checking.add_argument("root", type=Path)
    checking.add_argument("splits", nargs="+")
    args = parser.parse_args()
    if args.command == "list":
        image_list(args.root, args.split, args.max_images)
    else:
        check(args.root, args.splits)


if __name__ == "__main__":
    main()
