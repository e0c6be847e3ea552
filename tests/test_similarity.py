"""eval.similarity names its kind; backbone names resolve to caches (sae.data.similarity)."""

import pytest

from sae.config import ConfigError, Similarity, parse_similarity, validate
from sae.data.errors import CacheError
from sae.data.similarity import resolve_similarity
from tests.test_config import compose_train


@pytest.mark.parametrize(("value", "parsed"), [
    ("input", Similarity("input")),
    ("backbone:dinov2_vitl14", Similarity("backbone", "dinov2_vitl14")),
    ("cache:/c/imagenet__vit__val__0123", Similarity("cache", "/c/imagenet__vit__val__0123")),
    ("file:/data/dino.npy", Similarity("file", "/data/dino.npy")),
])
def test_the_four_kinds(value, parsed):
    assert parse_similarity(value) == parsed
    assert str(parsed) == value


@pytest.mark.parametrize("value", ["dinov2_vitl14", "/data/dino.npy", "backbone:", "url:x"])
def test_a_value_without_its_kind_fails_at_compose_time(value):
    with pytest.raises(ConfigError, match="eval.similarity: .* does not name its kind"):
        validate(compose_train([f"eval.similarity={value}"]))


def test_a_backbone_needs_an_image_dataset_and_its_cache(tmp_path):
    cfg = validate(compose_train(["eval.similarity=backbone:vit_tiny"]))
    with pytest.raises(CacheError, match="holds no images"):
        resolve_similarity(cfg)
    cfg = validate(compose_train(["dataset=imagenet", "backbone=clip_tiny",
                                  "eval.similarity=backbone:vit_tiny",
                                  f"paths.cache={tmp_path}"]))
    with pytest.raises(CacheError, match="python -m sae.extract backbone=vit_tiny"):
        resolve_similarity(cfg)
    assert resolve_similarity(validate(compose_train([]))) == Similarity("input")
