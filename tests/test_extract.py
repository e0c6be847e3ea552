"""Stage 1 on CPU, offline: image layouts, random-weight open_clip / timm backbones, the cache.

Fixture datasets are written in the real on-disk layouts (tests/fixtures_images.py); backbones
are the real tiny architectures with seeded random weights (conf/backbone/{clip,vit}_tiny.yaml).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sae.backbones import load_backbone, weights_id
from sae.config import BackboneConfig, ConfigError, ImagesDatasetConfig, RootConfig
from sae.data.cache import (
    CacheError,
    cache_path,
    config_fields,
    ensure_cache,
    load_image_split,
    open_cache,
)
from sae.data.embedded import DataError
from sae.data.images import (
    ImageFileDataset,
    UnreadableImageError,
    materialize_digits_images,
    open_split,
)
from sae.data.similarity import find_eval_cache, resolve_similarity
from sae.evaluation.evaluate import load_similarity
from sae.extract import validate_extract
from sae.grid.sweep import preflight
from tests.fixtures_images import (
    OI_CLASSES,
    OI_EXPECTED,
    OI_IMAGE_IDS,
    WNIDS,
    make_imagenet,
    make_openimages,
)

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"


def backbone_cfg(name: str, **overrides) -> BackboneConfig:
    """A conf/backbone option as a typed config (what Hydra would compose)."""
    node = OmegaConf.merge(OmegaConf.structured(BackboneConfig),
                           OmegaConf.load(CONF / "backbone" / f"{name}.yaml"), overrides)
    return OmegaConf.to_object(node)


def imagenet_cfg(root: Path, **overrides) -> ImagesDatasetConfig:
    return ImagesDatasetConfig(name="imagenet", kind="images", layout="imagenet", root=str(root),
                         train_split="train", eval_split="val", **overrides)


def openimages_cfg(root: Path, **overrides) -> ImagesDatasetConfig:
    return ImagesDatasetConfig(name="openimages", kind="images", layout="openimages", root=str(root),
                         train_split="validation", eval_split="validation", multi_label=True,
                         **overrides)


def root_cfg(tmp: Path, backbone: BackboneConfig, dataset: ImagesDatasetConfig) -> RootConfig:
    cfg = RootConfig(backbone=backbone, dataset=dataset, k=4)
    cfg.paths.cache = str(tmp / "cache")
    cfg.train.device = "cpu"
    cfg.train.progress = False
    return cfg


def load_split(cfg: RootConfig, split: str):
    """The image split of a run's config, as training loads it."""
    return load_image_split(cfg.backbone, cfg.dataset, cfg.paths.cache, split,
                            device=cfg.train.device, progress=cfg.train.progress)


# Tiny models on 2 shared cores run 3-5x faster on one thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory) -> Path:
    return make_imagenet(tmp_path_factory.mktemp("imagenet"))


@pytest.fixture(scope="module")
def clip_cache(tmp_path_factory, imagenet_root):
    """ImageNet fixture train split extracted once through the random-weight open_clip model."""
    tmp = tmp_path_factory.mktemp("clip_cache")
    cfg = root_cfg(tmp, backbone_cfg("clip_tiny"), imagenet_cfg(imagenet_root))
    return cfg, load_split(cfg, "train")


# ---------------------------------------------------------------- layouts, no backbone

def test_imagenet_layout_class_index_from_sorted_train_wnids(tmp_path):
    # val lacks the second class: indices must still be those of the train folders.
    root = make_imagenet(tmp_path, val_classes=["n01440764", "n01484850"])
    train = open_split(imagenet_cfg(root), "train")
    val = open_split(imagenet_cfg(root), "val")
    assert train.class_names == ["tench", "goldfish", "great white shark"]
    assert train.ids[0] == "n01440764/n01440764_0.JPEG" and len(train) == 12
    assert train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert val.labels.tolist() == [0, 0, 2, 2]
    assert val.path(0).is_file()


def test_imagenet_without_mapping_uses_wnids_and_subsample_is_seeded(tmp_path):
    root = make_imagenet(tmp_path, mapping=False)
    cfg = imagenet_cfg(root, max_per_split=5)
    first, again = open_split(cfg, "train"), open_split(cfg, "train")
    assert first.class_names == sorted(WNIDS)
    assert len(first) == 5 and first.ids == again.ids and first.ids == sorted(first.ids)


@pytest.mark.parametrize("class_header", [True, False])
def test_openimages_multi_hot_confidence_one_one_sample_per_image(tmp_path, class_header):
    root = make_openimages(tmp_path, class_header=class_header)
    split = open_split(openimages_cfg(root), "validation")
    assert split.ids == [f"{i}.jpg" for i in OI_IMAGE_IDS]
    assert split.class_names == [name for _, name in OI_CLASSES]
    assert split.labels.dtype == bool
    np.testing.assert_array_equal(split.labels, OI_EXPECTED)
    assert split.info["label_rows_confidence_0"] == 2
    assert split.info["label_rows_without_image"] == 1
    assert split.info["images_without_label"] == 2


def test_digits_images_written_once_with_the_digits_split(tmp_path):
    root = tmp_path / "digits_images"
    materialize_digits_images(root, 0.2, 0)
    stamp = (root / ".complete").stat().st_mtime_ns
    materialize_digits_images(root, 0.2, 0)  # second call: nothing rewritten
    assert (root / ".complete").stat().st_mtime_ns == stamp
    cfg = ImagesDatasetConfig(name="digits_images", kind="images", layout="digits_images",
                        root=str(root), eval_split="val")
    train, val = open_split(cfg, "train"), open_split(cfg, "val")
    assert len(train) + len(val) == 1797 and len(val) == 359
    assert train.class_names == [str(d) for d in range(10)]


# ---------------------------------------------------------------- bad input

def test_missing_root_names_the_fix(tmp_path):
    with pytest.raises(DataError, match="IMAGENET_ROOT"):
        open_split(imagenet_cfg(tmp_path / "nowhere"), "train")
    with pytest.raises(DataError, match="not set"):
        open_split(ImagesDatasetConfig(name="imagenet", kind="images", root=None), "train")


def test_missing_split_and_empty_class_folder(tmp_path):
    root = make_imagenet(tmp_path, train_per_class=1, val_per_class=1)
    with pytest.raises(DataError, match="split directory 'test' is missing"):
        open_split(imagenet_cfg(root), "test")
    (root / "val" / "n01443537" / "ILSVRC2012_val_00000004.JPEG").unlink()
    with pytest.raises(DataError, match=r"val/n01443537: class folder holds no images"):
        open_split(imagenet_cfg(root), "val")


def test_csv_without_expected_columns(tmp_path):
    root = make_openimages(tmp_path)
    labels = root / "validation-annotations-human-imagelabels-boxable.csv"
    labels.write_text("ImageID,Source,Label,Score\n000026e7ee790996,x,/m/011k07,1\n")
    with pytest.raises(DataError, match=r"columns \['LabelName', 'Confidence'\] are missing"):
        open_split(openimages_cfg(root), "validation")
    (root / "oidv7-class-descriptions-boxable.csv").write_text("Id,Name\n/m/1,A\n")
    with pytest.raises(DataError, match="oidv7-class-descriptions-boxable.csv: expected"):
        open_split(openimages_cfg(root), "validation")


def test_label_outside_the_class_list_fails(tmp_path):
    root = make_openimages(tmp_path)
    labels = root / "validation-annotations-human-imagelabels-boxable.csv"
    labels.write_text(labels.read_text() + "000026e7ee790996,verification,/m/0zzz,1\n")
    with pytest.raises(DataError, match="/m/0zzz"):
        open_split(openimages_cfg(root), "validation")


def test_unreadable_image_fails_with_its_path_or_is_skipped(tmp_path):
    root = make_imagenet(tmp_path, train_per_class=1, val_per_class=1)
    bad = root / "train" / "n01443537" / "n01443537_0.JPEG"
    bad.write_bytes(bad.read_bytes()[:100])  # truncated JPEG
    split = open_split(imagenet_cfg(root), "train")
    with pytest.raises(UnreadableImageError, match="n01443537_0.JPEG: cannot be decoded"):
        ImageFileDataset(split, lambda im: torch.zeros(1), "fail")[1]
    assert ImageFileDataset(split, lambda im: torch.zeros(1), "skip")[1] == (None, 1)


# ---------------------------------------------------------------- backbones

def test_backbone_configs_carry_the_method_identifiers():
    expected = {
        "clip_vitl14": ("open_clip", "ViT-L-14", "datacomp_xl_s13b_b90k", "image_projected"),
        "siglip2": ("transformers", "google/siglip2-so400m-patch14-384", "true",
                    "image_features"),
        "vit_l16": ("transformers", "google/vit-large-patch16-224", "true",
                    "cls_last_hidden_state"),
        "siglip2_openclip": ("open_clip", "ViT-SO400M-14-SigLIP2-378", "webli",
                             "image_projected"),
        "vit_l16_timm": ("timm", "vit_large_patch16_224.augreg_in21k_ft_in1k", "true",
                         "cls_pre_logits"),
        "dinov2_vitl14": ("timm", "vit_large_patch14_dinov2.lvd142m", "true", "cls_pre_logits"),
    }
    for name, (library, _, tag, _) in expected.items():
        cfg = backbone_cfg(name, checkpoint_path=None)
        assert (cfg.library, cfg.model, cfg.pretrained, cfg.embedding) == expected[name]
        assert weights_id(cfg) == f"{library}:{tag if library == 'open_clip' else 'default'}"
    assert weights_id(backbone_cfg("clip_tiny")) == "random:seed0"


def test_local_checkpoint_file_is_loaded(tmp_path):
    """A weights file (compute nodes without network) replaces the random init, for both
    libraries; its identity in the cache key is the sha256 of its bytes (not its name)."""
    for name in ("vit_tiny", "clip_tiny"):
        reference = load_backbone(backbone_cfg(name))
        with torch.no_grad():
            for p in reference.model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        ckpt = tmp_path / f"{name}.pt"
        torch.save(reference.model.state_dict(), ckpt)
        loaded = load_backbone(backbone_cfg(name, checkpoint_path=str(ckpt)))
        batch = torch.randn(2, 3, 32, 32)
        with torch.inference_mode():
            torch.testing.assert_close(loaded.embed(batch), reference.embed(batch))
        digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
        assert weights_id(backbone_cfg(name, checkpoint_path=str(ckpt))) == f"sha256:{digest}"
    with pytest.raises(ConfigError, match="does not exist"):
        load_backbone(backbone_cfg("vit_tiny", checkpoint_path=str(tmp_path / "missing.pt")))
    with pytest.raises(ConfigError, match="embedding"):
        load_backbone(backbone_cfg("vit_tiny", embedding="image_projected"))


def test_checkpoint_file_with_a_tag_keeps_the_tag_preprocessing():
    """open_clip applies a tag's mean/std/resize only when loading by tag; a local file of
    that tag must get them explicitly (SigLIP2: mean 0.5, squash; OpenAI: QuickGELU)."""
    from sae.backbones import _open_clip_tag_preprocess

    siglip = _open_clip_tag_preprocess("ViT-SO400M-14-SigLIP2-378", "webli")
    assert siglip["image_mean"] == (0.5, 0.5, 0.5) and siglip["image_resize_mode"] == "squash"
    assert _open_clip_tag_preprocess("ViT-B-32", "openai")["force_quick_gelu"] is True
    with pytest.raises(ConfigError, match="not an open_clip tag"):
        _open_clip_tag_preprocess("ViT-L-14", "no_such_tag")


def test_cache_key_ignores_paths_and_speed_settings(tmp_path, imagenet_root):
    base = backbone_cfg("clip_tiny")
    data = imagenet_cfg(imagenet_root)
    key = cache_path("c", base, data, "train").name
    copy = shutil.copytree(imagenet_root, tmp_path / "elsewhere")  # same images, another path
    assert cache_path("c", backbone_cfg("clip_tiny", batch_size=7, num_workers=3),
                      imagenet_cfg(copy), "train").name == key
    for other in (backbone_cfg("clip_tiny", storage_dtype="float16"),
                  backbone_cfg("clip_tiny", model_kwargs={"force_image_size": 64})):
        assert cache_path("c", other, data, "train").name != key
    assert cache_path("c", base, imagenet_cfg(imagenet_root, max_per_split=3), "train").name != key
    assert cache_path("c", base, data, "eval").name.startswith("imagenet__clip_tiny__val__")
    assert config_fields(base, data, "train")["backbone"]["weights"] == "random:seed0"


# ---------------------------------------------------------------- extraction and the cache

def test_open_clip_extraction_manifest_labels_and_images(clip_cache):
    cfg, data = clip_cache
    assert data.x.shape == (12, 384) and data.x.dtype == torch.float32
    torch.testing.assert_close(data.x.norm(dim=1), torch.ones(12))
    assert data.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert data.class_names[0] == "tench" and data.ids[5] == "n01443537/n01443537_1.JPEG"
    assert data.image_getter(5).size == (40, 30)
    cached = open_cache(data.info["cache"])
    manifest = cached.manifest
    assert (manifest["count"], manifest["dim"], manifest["dtype"]) == (12, 384, "float32")
    assert manifest["key_fields"]["backbone"]["model"] == "ViT-S-32"
    assert manifest["backbone"]["embedding"] == "image_projected"
    assert manifest["backbone"]["preprocess"]["size"] == [32, 32]
    assert manifest["labels"] == {"kind": "class_ids", "n_classes": 3}
    assert {"torch", "open_clip_torch", "timm"} <= set(manifest["versions"])
    assert manifest["extraction"]["images_per_s"] > 0
    raw = torch.from_numpy(np.array(cached.embeddings))
    torch.testing.assert_close(data.x, raw / raw.norm(dim=1, keepdim=True))
    # the same images through the backbone directly give the same embeddings (row order)
    backbone = load_backbone(cfg.backbone)
    image = backbone.preprocess(data.image_getter(7)).unsqueeze(0)
    with torch.inference_mode():
        torch.testing.assert_close(backbone.embed(image)[0], raw[7], rtol=1e-4, atol=1e-4)


def test_second_run_reuses_the_cache(clip_cache, monkeypatch):
    cfg, first = clip_cache

    def no_extraction(*args, **kwargs):
        raise AssertionError("extracted again although the cache exists")

    monkeypatch.setattr("sae.data.cache.embed_split", no_extraction)
    again = load_split(cfg, "train")
    torch.testing.assert_close(again.x, first.x)
    # a cache used where the images are not (another cluster): embeddings, but no images
    moved = root_cfg(Path(cfg.paths.cache).parent, cfg.backbone,
                     imagenet_cfg(Path("/nonexistent/imagenet")))
    elsewhere = load_split(moved, "train")
    assert elsewhere.image_getter is None and torch.equal(elsewhere.x, first.x)


def test_timm_openimages_float16_skips_and_counts_unreadable(tmp_path):
    root = make_openimages(tmp_path / "oi")
    broken = root / "images" / "validation" / f"{OI_IMAGE_IDS[2]}.jpg"
    broken.write_bytes(b"not a jpeg")
    dataset = openimages_cfg(root, on_unreadable="skip")
    cfg = root_cfg(tmp_path, backbone_cfg("vit_tiny", storage_dtype="float16"), dataset)
    data = load_split(cfg, "eval")
    assert data.x.shape == (3, 192) and data.multi_label
    np.testing.assert_array_equal(data.labels.numpy(), OI_EXPECTED[[0, 1, 3]])
    assert data.ids == [f"{i}.jpg" for i in np.array(OI_IMAGE_IDS)[[0, 1, 3]]]
    manifest = json.loads((Path(data.info["cache"]) / "manifest.json").read_text())
    assert manifest["dtype"] == "float16" and manifest["dataset"]["n_skipped"] == 1
    assert manifest["dataset"]["skipped"] == [f"{OI_IMAGE_IDS[2]}.jpg"]
    assert manifest["labels"]["kind"] == "multi_hot"
    assert np.load(Path(data.info["cache"]) / "embeddings.npy").dtype == np.float16
    # fail mode names the file, and leaves no cache that looks complete
    cfg.dataset.on_unreadable = "fail"
    cfg.backbone.storage_dtype = "float32"
    with pytest.raises(UnreadableImageError, match=OI_IMAGE_IDS[2]):
        load_split(cfg, "eval")
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp-")]
    assert not cache_path(cfg.paths.cache, cfg.backbone, cfg.dataset, "eval").exists()


def _copy_cache(clip_cache, tmp_path) -> Path:
    source = Path(clip_cache[1].info["cache"])
    target = tmp_path / source.name
    shutil.copytree(source, target)
    return target


def test_truncated_array_is_detected(clip_cache, tmp_path):
    path = _copy_cache(clip_cache, tmp_path)
    array = path / "embeddings.npy"
    array.write_bytes(array.read_bytes()[:-384 * 4])
    with pytest.raises(CacheError, match=rf"{path}: embeddings.npy has .* bytes.*rm -r"):
        open_cache(path)


def test_manifest_mismatch_and_bad_checksum_are_detected(clip_cache, tmp_path):
    path = _copy_cache(clip_cache, tmp_path)
    manifest_file = path / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest_file.write_text(json.dumps({**manifest, "dim": 512}))
    with pytest.raises(CacheError, match=r"manifest says \(12, 512\) float32"):
        open_cache(path)
    manifest_file.write_text(json.dumps({**manifest, "dtype": "float16"}))
    with pytest.raises(CacheError, match="float16"):
        open_cache(path)
    manifest_file.write_text(json.dumps(manifest))
    array = path / "embeddings.npy"
    data = bytearray(array.read_bytes())
    data[-1] ^= 0xFF  # same size, one flipped byte
    array.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="sha256"):
        open_cache(path)
    (path / "manifest.json").unlink()
    with pytest.raises(CacheError, match="not a complete cache"):
        open_cache(path)


def test_interrupted_extraction_leftovers_are_not_a_cache(clip_cache, tmp_path):
    cfg, _ = clip_cache
    cfg = root_cfg(tmp_path, cfg.backbone, cfg.dataset)
    final = cache_path(cfg.paths.cache, cfg.backbone, cfg.dataset, "eval")
    stale = final.parent / f".tmp-{final.name}-deadbeef"
    stale.mkdir(parents=True)
    (stale / "embeddings.npy").write_bytes(b"half")
    path = ensure_cache(cfg.backbone, cfg.dataset, "eval", cfg.paths.cache, device="cpu",
                        progress=False)
    assert path == final and not stale.exists()
    assert open_cache(path).manifest["count"] == 6


@pytest.mark.slow  # two extraction subprocesses: ~26 s on 2 cores (--durations)
def test_two_processes_extract_once(tmp_path, imagenet_root):
    """Two `python -m sae.extract` started together: one extracts, the other waits and reuses.

    The test holds the cache's lock until both processes are waiting on it, so the race is
    certain rather than left to start-up timing.
    """
    from filelock import FileLock

    final = cache_path(tmp_path / "cache", backbone_cfg("vit_tiny"), imagenet_cfg(imagenet_root),
                       "train")
    final.parent.mkdir(parents=True)
    env = {**os.environ, "SAE_OUTPUT_ROOT": str(tmp_path), "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "sae.extract", "backbone=vit_tiny", "dataset=imagenet",
            f"dataset.root={imagenet_root}", "split=train", "device=cpu"]
    logs = [tmp_path / f"proc{i}.log" for i in range(2)]
    lock = FileLock(str(final) + ".lock")
    lock.acquire()
    procs = []
    try:
        for log_file in logs:
            with open(log_file, "w") as out:
                procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=out,
                                              stderr=subprocess.STDOUT, text=True))
        deadline = time.monotonic() + 120
        while not all("waiting for another process" in f.read_text() for f in logs):
            assert all(p.poll() is None for p in procs), [f.read_text() for f in logs]
            assert time.monotonic() < deadline, [f.read_text() for f in logs]
            time.sleep(0.2)
        lock.release()
        for proc in procs:
            proc.wait(timeout=120)
    finally:
        lock.release()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    text = "\n".join(f.read_text() for f in logs)
    assert [p.returncode for p in procs] == [0, 0], text
    assert text.count("] - extracting imagenet__vit_tiny__train__") == 1, text
    assert text.count(str(final)) >= 2, text  # both report the same, Hydra-composed, key
    assert open_cache(final).manifest["count"] == 12


# ---------------------------------------------------------------- configs and progress

def test_similarity_embeddings_found_by_backbone_name(tmp_path, imagenet_root):
    """eval.similarity=backbone:<name>: the same evaluation images embedded by another backbone,
    found in the cache by name before any training, and checked image by image."""
    cfg = root_cfg(tmp_path, backbone_cfg("clip_tiny"), imagenet_cfg(imagenet_root))
    cfg.eval.similarity = "backbone:vit_tiny"
    with pytest.raises(ConfigError, match="python -m sae.extract backbone=vit_tiny "
                                          "dataset=imagenet split=eval"):
        preflight(cfg)  # the sweep's check, before anything is submitted
    eval_set = load_split(cfg, "eval")
    other = load_split(root_cfg(tmp_path, backbone_cfg("vit_tiny"),
                                      imagenet_cfg(imagenet_root)), "eval")
    preflight(cfg)
    similarity = resolve_similarity(cfg)
    resolved = similarity.target
    assert similarity.kind == "cache"
    assert Path(resolved).name.startswith("imagenet__vit_tiny__val__")
    eval_cfg = dataclasses.replace(cfg.eval, similarity=str(similarity))
    array, protocol = load_similarity(eval_cfg, eval_set, None)
    assert protocol.startswith(f"cache {resolved}")
    rows = F.normalize(torch.tensor(np.asarray(array, dtype=np.float32)), dim=1)
    torch.testing.assert_close(rows, other.x)  # the other backbone's rows, same order
    assert not torch.allclose(rows[:, :8], eval_set.x[:, :8])
    reordered = dataclasses.replace(eval_set, ids=eval_set.ids[::-1])
    with pytest.raises(ValueError, match="holds other images, or the same in another order"):
        load_similarity(eval_cfg, reordered, None)
    # A second cache by the same name (other settings) is ambiguous: the error lists both.
    second = Path(resolved).with_name(Path(resolved).name[:-16] + "0" * 16)
    shutil.copytree(resolved, second)
    with pytest.raises(CacheError, match="2 caches"):
        find_eval_cache(cfg.paths.cache, cfg.dataset, "vit_tiny")


def test_extract_configs_compose_and_validate(tmp_path, monkeypatch):
    monkeypatch.delenv("IMAGENET_ROOT", raising=False)
    monkeypatch.setenv("SAE_OUTPUT_ROOT", str(tmp_path))
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        node = compose("extract", overrides=["backbone=clip_tiny", "dataset=digits_images"])
        cfg = validate_extract(node)
        assert cfg.dataset.root == f"{tmp_path}/cache/datasets/digits_images"
        for backbone in ("clip_vitl14", "siglip2", "vit_l16", "siglip2_openclip",
                         "vit_l16_timm", "dinov2_vitl14", "vit_tiny"):
            for dataset in ("imagenet", "openimages"):
                validate_extract(compose("extract", overrides=[f"backbone={backbone}",
                                                               f"dataset={dataset}"]))
        with pytest.raises(ConfigError, match="nothing to extract"):
            validate_extract(compose("extract", overrides=["backbone=clip_tiny",
                                                           "dataset=digits"]))
        with pytest.raises(ConfigError, match="dataset: none chosen. Fix: add dataset="):
            validate_extract(compose("extract", overrides=["backbone=clip_tiny"]))
        with pytest.raises(ConfigError, match="backbone: is none. Fix: add backbone="):
            validate_extract(compose("extract", overrides=["dataset=imagenet"]))


def test_extract_help_needs_no_arguments():
    result = subprocess.run([sys.executable, "-m", "sae.extract", "--help"], capture_output=True,
                            text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    # the generated page (sae/cli/help.py): each group, then one option per line
    groups = result.stdout.split("== Config groups", 1)[1].split("== Fields", 1)[0]
    assert "backbone  (backbone=OPTION)" in groups and "\n    clip_vitl14 " in groups

