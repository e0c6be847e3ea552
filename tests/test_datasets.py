"""Dataset layouts and sampling protocols of issue 14 (METHOD.md s1), on tiny fixtures:
ImageNet from a Hugging Face ``datasets`` copy (save_to_disk, parquet, arrow) and Open Images V7
sampled ``per_image`` or by Localized Narratives (one sample per (image, caption))."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from sae.config import ConfigError, ImagesDatasetConfig, validate
from sae.data.errors import DataError
from sae.data.images import ImageFileDataset, UnreadableImageError, cached_images, open_split
from sae.evaluation.method_card import run_card
from sae.identity import run_id
from tests.fixtures_images import (
    HF_LABELS,
    OI_EXPECTED,
    OI_IMAGE_IDS,
    OI_NARRATIVE_SAMPLES,
    WNIDS,
    hf_imagenet_splits,
    make_imagenet_hf,
    make_openimages,
    write_narratives,
)
from tests.test_config import compose_train

HF_FORMS = ("save_to_disk", "parquet", "arrow")


def hf_cfg(root, **overrides) -> ImagesDatasetConfig:
    return ImagesDatasetConfig(name="imagenet", kind="images", layout="imagenet_hf",
                               root=str(root), **overrides)


def oi_cfg(root, sampling: str, **overrides) -> ImagesDatasetConfig:
    return ImagesDatasetConfig(name="openimages", kind="images", layout="openimages",
                               root=str(root), train_split="train", eval_split="validation",
                               multi_label=True, sampling=sampling, **overrides)


@pytest.fixture(autouse=True)
def datasets_cache_in_tmp(tmp_path, monkeypatch):
    """parquet is converted into the datasets cache: keep it out of the home directory."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


# ---------------------------------------------------------------- ImageNet, Hugging Face copy

def expected_pixels(split: str) -> list[np.ndarray]:
    """The fixture's images as the library decodes them (the naive reference)."""
    return [np.asarray(row["image"].convert("RGB")) for row in hf_imagenet_splits()[split]]


@pytest.mark.parametrize("form", HF_FORMS)
def test_hf_imagenet_labels_ids_and_images_match_the_dataset(tmp_path, form):
    root = make_imagenet_hf(tmp_path / "imagenet", form)
    for split, folder_name in (("train", "train"), ("validation", "val")):
        # "val", the folder layout's name, falls back to the Hugging Face "validation"
        listed = open_split(hf_cfg(root), folder_name)
        assert listed.labels.dtype == np.int64
        assert listed.labels.tolist() == HF_LABELS[split]
        assert listed.ids == [str(i) for i in range(len(HF_LABELS[split]))]
        assert listed.class_names == ["tench", "goldfish", "great white shark"]
        for i, pixels in enumerate(expected_pixels(split)):
            np.testing.assert_array_equal(np.asarray(listed.load(i)), pixels)


def test_hf_imagenet_subset_workers_and_cached_images(tmp_path):
    root = make_imagenet_hf(tmp_path / "imagenet", "parquet")
    cfg = hf_cfg(root, max_per_split=3)
    listed = open_split(cfg, "train")
    assert len(listed) == 3 and listed.reader is not None
    # the split travels to DataLoader workers by pickle
    again = pickle.loads(pickle.dumps(listed))
    rows = [int(i) for i in listed.ids]
    np.testing.assert_array_equal(listed.labels, np.asarray(HF_LABELS["train"])[rows])
    reference = expected_pixels("train")
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(np.asarray(again.load(i)), reference[row])
    loader = torch.utils.data.DataLoader(
        ImageFileDataset(listed, lambda im: torch.tensor(np.asarray(im).shape)), batch_size=2,
        num_workers=1, collate_fn=lambda b: b)
    shapes = [tuple(x.tolist()) for batch in loader for x, _ in batch]
    assert shapes == [reference[r].shape for r in rows]
    getter = cached_images(cfg, "train", listed.ids)  # what contact sheets read
    np.testing.assert_array_equal(np.asarray(getter(1)), reference[rows[1]])


def test_hf_imagenet_broken_image_and_missing_split(tmp_path):
    import datasets

    broken = hf_imagenet_splits()["train"].cast_column("image", datasets.Image(decode=False))
    broken = broken.map(lambda row, i: {"image": {"bytes": row["image"]["bytes"][:40]
                                                  if i == 1 else row["image"]["bytes"],
                                                  "path": None}}, with_indices=True)
    datasets.DatasetDict({"train": broken}).save_to_disk(str(tmp_path / "broken"))
    listed = open_split(hf_cfg(tmp_path / "broken"), "train")
    with pytest.raises(UnreadableImageError, match=r"broken/train row 1: cannot be decoded"):
        ImageFileDataset(listed, lambda im: torch.zeros(1), "fail")[1]
    assert ImageFileDataset(listed, lambda im: torch.zeros(1), "skip")[1] == (None, 1)
    with pytest.raises(DataError, match="no split 'test'"):
        open_split(hf_cfg(tmp_path / "broken"), "test")


def test_hf_imagenet_two_copies_of_a_split_are_refused(tmp_path):
    root = make_imagenet_hf(tmp_path / "imagenet", "parquet")
    (root / "copy").mkdir()
    for f in (root / "data").glob("train-*.parquet"):
        (root / "copy" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(DataError, match="2 directories"):
        open_split(hf_cfg(root), "train")


# ---------------------------------------------------------------- Open Images protocols

@pytest.mark.parametrize(("shards", "captions_only"), [(1, False), (2, False), (1, True)])
def test_narratives_one_sample_per_caption_of_labelled_images(tmp_path, shards, captions_only):
    root = make_openimages(tmp_path, split="train")
    write_narratives(root, "train", shards=shards, captions_only=captions_only)
    per_image = open_split(oi_cfg(root, "per_image"), "train")
    narratives = open_split(oi_cfg(root, "narratives"), "train")
    assert len(per_image) == len(OI_IMAGE_IDS) == 4  # every image once, unlabelled included
    np.testing.assert_array_equal(per_image.labels, OI_EXPECTED)
    assert narratives.ids == [f"{OI_IMAGE_IDS[i]}.jpg" for i in OI_NARRATIVE_SAMPLES]
    np.testing.assert_array_equal(narratives.labels, OI_EXPECTED[OI_NARRATIVE_SAMPLES])
    assert narratives.labels.any(axis=1).all()  # unlabelled images are dropped
    info = narratives.info
    assert (info["sampling"], info["narratives"], info["n_samples"]) == ("narratives", 6, 3)
    assert info["narratives_without_image"] == 1
    assert info["narratives_of_unlabelled_images"] == 2
    assert (info["images_with_narratives"], info["images_without_narrative"]) == (2, 0)
    assert per_image.info["sampling"] == "per_image" and "narratives" not in per_image.info


def test_narratives_subset_and_a_naive_reference(tmp_path):
    """The protocol recomputed line by line from the files, against the reader's vectorised one."""
    import json

    root = make_openimages(tmp_path, split="validation")
    files = write_narratives(root, "validation")
    labelled = {OI_IMAGE_IDS[i] for i in range(len(OI_IMAGE_IDS)) if OI_EXPECTED[i].any()}
    naive = sorted((json.loads(line)["image_id"] for f in files
                    for line in f.read_text().splitlines()), key=str)
    naive = [f"{image_id}.jpg" for image_id in naive if image_id in labelled]
    assert open_split(oi_cfg(root, "narratives"), "validation").ids == naive
    subset = open_split(oi_cfg(root, "narratives", max_per_split=2), "validation")
    assert len(subset) == 2 and set(subset.ids) <= set(naive)


def test_narratives_missing_or_malformed_files_name_the_fix(tmp_path):
    root = make_openimages(tmp_path, split="validation")
    with pytest.raises(DataError, match="sampling=per_image"):
        open_split(oi_cfg(root, "narratives"), "validation")
    (root / "open_images_validation_localized_narratives.jsonl").write_text('{"caption": "x"}\n')
    with pytest.raises(DataError, match="localized_narratives.jsonl:1: not a Localized"):
        open_split(oi_cfg(root, "narratives"), "validation")


def test_preflight_wants_the_narratives_of_both_splits(tmp_path):
    from sae.grid.sweep import preflight

    root = make_openimages(tmp_path, split="train")
    cfg = validate(compose_train(["dataset=openimages", "backbone=clip_tiny",
                                  f"dataset.root={root}"]))
    write_narratives(root, "train", shards=2)
    with pytest.raises(ConfigError, match="'validation'.*sampling=per_image"):
        preflight(cfg)  # the eval split's file is missing
    write_narratives(root, "validation")
    preflight(cfg)


def test_sampling_is_checked_and_names_the_run_and_the_card():
    with pytest.raises(ConfigError, match="dataset.sampling"):
        ImagesDatasetConfig(name="imagenet", kind="images", sampling="narratives")
    with pytest.raises(ConfigError, match="dataset.sampling"):
        oi_cfg("/x", "per_caption")
    cards, ids = {}, set()
    for sampling in ("per_image", "narratives"):
        cfg = validate(compose_train(["dataset=openimages", "backbone=clip_tiny",
                                      f"dataset.sampling={sampling}"]))
        ids.add(run_id(cfg))
        cards[sampling] = run_card(cfg, {}, {}, "v", "cmd")["dataset"]["sampling"]
    assert len(ids) == 2
    assert "one sample per (image, caption)" in cards["narratives"]
    assert "once" in cards["per_image"]


def test_openimages_config_defaults_to_the_reference_protocol():
    cfg = validate(compose_train(["dataset=openimages", "backbone=clip_tiny"]))
    assert cfg.dataset.sampling == "narratives"
    cfg = validate(compose_train(["dataset=imagenet", "backbone=clip_tiny",
                                  "dataset.layout=imagenet_hf"]))
    assert cfg.dataset.sampling == "per_image" and cfg.dataset.layout == "imagenet_hf"
    assert WNIDS  # the fixture's classes are those of the HF label feature


# ---------------------------------------------------------------- through the cache

def test_narratives_and_hf_splits_extract_into_the_cache(tmp_path):
    """End to end on the tiny random open_clip model: a caption's duplicate is embedded like its
    image, the two protocols never share a cache, a Hugging Face copy shows its images."""
    from sae.data.cache import cache_path, load_image_split
    from tests.test_extract import backbone_cfg

    torch.set_num_threads(1)
    backbone, cache = backbone_cfg("clip_tiny"), tmp_path / "cache"
    root = make_openimages(tmp_path / "oi", split="train")
    write_narratives(root, "train")
    narratives = load_image_split(backbone, oi_cfg(root, "narratives"), cache, "train",
                                  device="cpu", progress=False)
    assert len(narratives.x) == 3 and narratives.ids[0] == narratives.ids[1]
    torch.testing.assert_close(narratives.x[0], narratives.x[1])
    assert narratives.image_getter(0).size == (40, 30)
    assert cache_path(cache, backbone, oi_cfg(root, "narratives"), "train") != \
        cache_path(cache, backbone, oi_cfg(root, "per_image"), "train")

    hf_root = make_imagenet_hf(tmp_path / "imagenet", "save_to_disk")
    val = load_image_split(backbone, hf_cfg(hf_root), cache, "eval", device="cpu",
                           progress=False)
    assert val.labels.tolist() == HF_LABELS["validation"] and val.ids == ["0", "1"]
    np.testing.assert_array_equal(np.asarray(val.image_getter(1)), expected_pixels(
        "validation")[1])
