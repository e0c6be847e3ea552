"""Run identity: pinned ids of the demo sweep (a refactor must not rename a finished run), the
dataset fields each kind contributes, and no torch on import."""

import pytest

from sae.config import validate
from sae.dataset_schemas import (
    DATASET_SCHEMAS,
    ImagesDatasetConfig,
    SyntheticDatasetConfig,
    identity_field,
)
from sae.identity import run_id, semantic_config
from tests.test_config import compose_train

# From `python -m sae.train -m +sweep=demo dry_run=true` before the layering refactor.
DEMO_IDS = {
    ("synthetic", 8, "none", True, 0): "synthetic-k8-none-s0-1f30b82bd8",
    ("synthetic", 8, "offsupport_l1", True, 1): "synthetic-k8-offsupport_l1-mask-s1-ff1eea76d3",
    ("synthetic", 8, "offsupport_l1", False, 0):
        "synthetic-k8-offsupport_l1-nomask-s0-296c96acff",
    ("digits", 8, "none", True, 0): "digits-k8-none-s0-874e132c23",
    ("digits", 16, "l1l2", False, 0): "digits-k16-l1l2-nomask-s0-65e8216ede",
}


@pytest.mark.parametrize(("cell", "expected"), DEMO_IDS.items())
def test_demo_sweep_run_ids_are_pinned(cell, expected):
    dataset, k, reg, mask, seed = cell
    cfg = validate(compose_train(["+sweep=demo", f"dataset={dataset}", f"k={k}",
                                  f"regularizer={reg}", f"mask={mask}", f"seed={seed}"]))
    assert run_id(cfg) == expected


def test_each_kind_names_its_runs_by_its_own_schema():
    images = ImagesDatasetConfig(name="imagenet", root="/a", on_unreadable="skip")
    moved = ImagesDatasetConfig(name="imagenet", root="/b", on_unreadable="fail")
    assert images.identity() == moved.identity()  # where the images lie names no run
    assert "root" not in images.identity()
    assert ImagesDatasetConfig(name="imagenet", max_per_split=10).identity() != images.identity()
    synthetic = SyntheticDatasetConfig(name="synthetic")
    assert {"dim", "n_atoms", "data_seed"} <= synthetic.identity().keys()
    assert "eval_fraction" not in synthetic.identity()  # a field of another kind
    assert set(DATASET_SCHEMAS) == {"synthetic", "digits", "files", "images"}


def test_a_new_kind_needs_no_second_list():
    """A schema's fields name its runs unless marked otherwise (no KeyError on a new kind)."""
    from dataclasses import dataclass

    @dataclass
    class ToyDataset(SyntheticDatasetConfig):
        shards: int = 3
        scratch: str = identity_field("/tmp", identity=False)

    toy = ToyDataset(name="toy")
    assert toy.identity()["shards"] == 3 and "scratch" not in toy.identity()


def test_semantic_config_drops_how_a_run_executes():
    cfg = validate(compose_train(["dataset=synthetic", "train.device=cpu"]))
    semantic = semantic_config(cfg)
    assert "device" not in semantic["train"] and "paths" not in semantic
    assert semantic["dataset"] == cfg.dataset.identity()


PAPER_AXES = {"backbone": ("clip_vitl14", "siglip2", "vit_l16"),
              "dataset": ("imagenet", "openimages"), "k": (32, 64, 128),
              "regularizer": ("none", "offsupport_l1", "l1l2"), "mask": (True, False),
              "seed": (0, 1, 2)}


def test_paper_run_ids_keep_every_axis_value():
    """Before: the slug was cut at 48 characters, dropping the seed of 15 paper runs."""
    import dataclasses
    import itertools

    ids = set()
    for backbone, dataset in itertools.product(PAPER_AXES["backbone"], PAPER_AXES["dataset"]):
        base = validate(compose_train(["+sweep=paper", f"dataset={dataset}",
                                       f"backbone={backbone}"]))
        for k, reg, mask, seed in itertools.product(*list(PAPER_AXES.values())[2:]):
            regularizer = dataclasses.replace(base.regularizer, name=reg,
                                              strength=0.0 if reg == "none" else 1e-3)
            cfg = dataclasses.replace(base, k=k, mask=mask, seed=seed, regularizer=regularizer)
            rid = run_id(cfg)
            slug = rid.rsplit("-", 1)[0]
            assert slug.endswith(f"-s{seed}") and f"-k{k}-" in slug, rid
            if reg != "none":
                assert ("-mask-" if mask else "-nomask-") in slug, rid
            assert len(rid) <= 64, rid
            ids.add(rid)
    assert len(ids) == 270


def test_the_abbreviation_table_leaves_short_slugs_alone():
    from sae.identity import readable_slug

    assert readable_slug(["synthetic", None, "k8", "offsupport_l1-mask", "s1"]) == (
        "synthetic-k8-offsupport_l1-mask-s1")
    assert readable_slug(["openimages", "clip_vitl14", "k128", "offsupport_l1-nomask", "s2"]) \
        == "oi-clipL14-k128-offl1-nomask-s2"
