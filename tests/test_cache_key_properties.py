"""The embedding cache key as properties (issue 24): each input that changes the cached numbers,
changed alone, changes the key -- sampling protocol, subset, layout, weights, preprocessing,
storage dtype, split -- and where things are (paths), batch size and workers do not."""

from __future__ import annotations

import dataclasses

import pytest

from sae.config import BackboneConfig, ImagesDatasetConfig
from sae.data.cache_key import cache_key, config_fields


def base(tmp_path):
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"weights A")
    backbone = BackboneConfig(name="clip_tiny", library="open_clip", model="ViT-S-32",
                              checkpoint_path=str(weights), embedding="image_projected",
                              model_kwargs={"force_image_size": 32}, storage_dtype="float16")
    dataset = ImagesDatasetConfig(name="openimages", kind="images", root=str(tmp_path / "oi"),
                                  layout="openimages", sampling="per_image")
    return backbone, dataset


def key(backbone, dataset, split="train"):
    return cache_key(config_fields(backbone, dataset, split))


def other_weights(tmp_path, content: bytes, name: str) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


CHANGES = {  # what the numbers depend on
    "sampling protocol": ("dataset", {"sampling": "narratives"}),
    "subset size": ("dataset", {"max_per_split": 100}),
    "layout": ("dataset", {"layout": "imagenet", "name": "imagenet"}),
    "preprocessing (model kwargs)": ("backbone", {"model_kwargs": {"force_image_size": 64}}),
    "model": ("backbone", {"model": "ViT-B-32"}),
    "embedding rule": ("backbone", {"embedding": "cls_pre_logits", "library": "timm"}),
    "storage dtype": ("backbone", {"storage_dtype": "float32"}),
}
SAME = {  # where and how it runs
    "dataset root": ("dataset", {"root": "/elsewhere/oi"}),
    "batch size": ("backbone", {"batch_size": 7}),
    "workers": ("backbone", {"num_workers": 3}),
    "broken-image policy": ("dataset", {"on_unreadable": "skip"}),
}


def keys_before_and_after(tmp_path, group: str, change: dict) -> tuple[str, str]:
    backbone, dataset = base(tmp_path)
    if group == "dataset":
        return key(backbone, dataset), key(backbone, dataset_replace(dataset, change))
    return key(backbone, dataset), key(dataclasses.replace(backbone, **change), dataset)


@pytest.mark.parametrize("what", sorted(CHANGES))
def test_an_input_of_the_numbers_changes_the_key(tmp_path, what):
    before, after = keys_before_and_after(tmp_path, *CHANGES[what])
    assert after != before, what


@pytest.mark.parametrize("what", sorted(SAME))
def test_where_and_how_it_runs_leave_the_key_alone(tmp_path, what):
    before, after = keys_before_and_after(tmp_path, *SAME[what])
    assert after == before, what


def test_weights_by_content_not_by_path(tmp_path):
    backbone, dataset = base(tmp_path)
    same = dataclasses.replace(backbone, checkpoint_path=other_weights(tmp_path, b"weights A",
                                                                       "copy.bin"))
    other = dataclasses.replace(backbone, checkpoint_path=other_weights(tmp_path, b"weights B",
                                                                        "other.bin"))
    assert key(same, dataset) == key(backbone, dataset)
    assert key(other, dataset) != key(backbone, dataset)


def test_subset_seed_matters_only_with_a_subset_and_the_split_always(tmp_path):
    backbone, dataset = base(tmp_path)
    assert key(backbone, dataset_replace(dataset, {"split_seed": 5})) == key(backbone, dataset)
    subset = dataset_replace(dataset, {"max_per_split": 100})
    assert key(backbone, dataset_replace(subset, {"split_seed": 5})) != key(backbone, subset)
    assert key(backbone, dataset, "val") != key(backbone, dataset, "train")


def dataset_replace(dataset, change):
    return dataclasses.replace(dataset, **change)
