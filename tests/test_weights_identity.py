"""Weights identity is the weights (issue 20): the run id and the embedding cache key name a
backbone's weights by the files its loader reads, never by the rest of ``$SAE_WEIGHTS_DIR``
nor by the path that leads there.

Before: the run id hashed every file of the weights folder, so a Hugging Face ``.locks/`` file,
a second model downloaded into the folder or a README renamed every paper run; the cache key
named hub-cache weights by their tag alone, and digest sidecars were written into the folder.
"""

from __future__ import annotations

import dataclasses
import os

import pytest

from sae.config import validate
from sae.data.cache_key import config_fields
from sae.identity import run_id
from sae.io.digests import DIGEST_SUFFIX
from sae.io.fingerprint import hub_repository, weights_id
from tests.test_config import compose_train

PAPER_BACKBONES = ("clip_vitl14", "siglip2", "vit_l16")


def fake_snapshot(weights, repo: str, payload: bytes) -> None:
    """``models--org--name/snapshots/<rev>`` (files linked to blobs, as the hub writes them)
    with ``refs/main`` naming the revision."""
    folder = weights / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("rev1")
    (folder / "blobs").mkdir()
    snapshot = folder / "snapshots" / "rev1"
    snapshot.mkdir(parents=True)
    for name, data in (("config.json", b"{}"), ("model.safetensors", payload)):
        blob = folder / "blobs" / f"blob-{name}"
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))


@pytest.fixture
def paper_ids(tmp_path, monkeypatch):
    """Run ids of one paper cell per (backbone, dataset, regularizer), and the cache keys'
    weights, when ``SAE_WEIGHTS_DIR`` (every paper backbone's checkpoint_path) is a folder."""
    monkeypatch.setenv("SAE_DIGEST_CACHE", str(tmp_path / "digests"))
    cells = [validate(compose_train(["+sweep=paper", f"backbone={backbone}",
                                     f"dataset={dataset}"]))
             for backbone in PAPER_BACKBONES for dataset in ("imagenet", "openimages")]

    def ids(weights) -> dict[str, str]:
        found = {}
        for composed in cells:  # as composed with SAE_WEIGHTS_DIR=weights
            cfg = dataclasses.replace(composed, backbone=dataclasses.replace(
                composed.backbone, checkpoint_path=str(weights)))
            where = f"{cfg.backbone.name}/{cfg.dataset.name}"
            for reg in ("none", "l1l2"):
                cell = dataclasses.replace(cfg, regularizer=dataclasses.replace(
                    cfg.regularizer, name=reg, strength=0.0 if reg == "none" else 1e-3))
                found[f"{where}/{reg}"] = run_id(cell)
            found[f"{where}/cache"] = config_fields(
                cfg.backbone, cfg.dataset, "train")["backbone"]["weights"]
        return found

    return ids


def test_only_the_weights_the_loader_reads_name_the_runs(tmp_path, paper_ids):
    weights = tmp_path / "weights"
    for number, backbone in enumerate(PAPER_BACKBONES):
        cfg = validate(compose_train([f"backbone={backbone}", "dataset=digits_images"])).backbone
        fake_snapshot(weights, hub_repository(cfg), bytes([number]) * 64)
    before = paper_ids(weights)
    assert all(v.startswith("sha256:") for k, v in before.items() if k.endswith("/cache"))

    # What a download, a second model and a note leave in the folder: no run id changes.
    (weights / ".locks" / "models--google--vit-large-patch16-224").mkdir(parents=True)
    (weights / ".locks" / "models--google--vit-large-patch16-224" / "abc.lock").write_text("")
    fake_snapshot(weights, "google/siglip2-base-patch16-224", b"another model")
    (weights / "README.md").write_text("weights for the lab\n")
    assert paper_ids(weights) == before
    # The same bytes through a symlink, and copied under another path: the same ids.
    (tmp_path / "link").symlink_to(weights)
    assert paper_ids(tmp_path / "link") == before
    # Nothing was written into the weights folder (digests live in SAE_DIGEST_CACHE).
    assert not [p for p in weights.rglob(f"*{DIGEST_SUFFIX}")]

    # One changed byte in one model's file: its runs and caches get new ids, no other's.
    blob = weights / "models--google--vit-large-patch16-224" / "blobs" / "blob-model.safetensors"
    blob.write_bytes(b"\xff" + blob.read_bytes()[1:])
    after = paper_ids(weights)
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {k for k in before if k.startswith("vit_l16/")}


def test_a_cache_without_the_repository_names_the_tag(tmp_path, monkeypatch):
    """Not downloaded yet: the tag names the weights, and says so (the dry run warns)."""
    monkeypatch.setenv("SAE_DIGEST_CACHE", str(tmp_path / "digests"))
    (tmp_path / "empty").mkdir()
    cfg = validate(compose_train(["backbone=clip_vitl14", "dataset=digits_images",
                                  f"backbone.checkpoint_path={tmp_path / 'empty'}"])).backbone
    assert weights_id(cfg) == "open_clip:datacomp_xl_s13b_b90k (not downloaded)"


def test_a_weights_file_is_named_by_its_bytes_wherever_it_is(tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_DIGEST_CACHE", str(tmp_path / "digests"))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "w.bin").write_bytes(b"weights")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "copy.bin").write_bytes(b"weights")
    first, copy = (validate(compose_train(["backbone=clip_vitl14", "dataset=digits_images",
                                           f"backbone.checkpoint_path={p}"])).backbone
                   for p in (tmp_path / "a" / "w.bin", tmp_path / "b" / "copy.bin"))
    assert weights_id(first) == weights_id(copy)
    assert not list((tmp_path / "a").glob(f"*{DIGEST_SUFFIX}"))
