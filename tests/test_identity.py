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
