"""Every backbone option against its library's own recommended recipe (issue 14, METHOD.md s1).

Seeded random weights are written in the Hugging Face hub cache layout
(``models--org--name/snapshots/<rev>/`` + ``refs/main``) under the real checkpoint ids, so that
``from_pretrained("<org>/<name>")``, open_clip's tags / ``hf-hub:`` names and timm's
``pretrained=True`` resolve offline to them. The project's extraction path
(``sae.extract.embed_split``: file -> RGB -> transform in the DataLoader -> batched embed) must
then give, to 1e-5, what each library's documented recipe gives image by image:

- transformers: ``load_image(path)`` -> ``AutoImageProcessor`` -> ``get_image_features`` /
  ``last_hidden_state[:, 0]`` of ``AutoModel.from_pretrained(<id>)``;
- open_clip: ``create_model_and_transforms(name, pretrained=tag)`` -> ``preprocess`` of the RGB
  image -> ``encode_image``; clip_vitl14 also against the reference code's
  ``hf-hub:laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K``;
- timm: ``create_model(name, pretrained=True, num_classes=0)`` (the model card's "image
  embeddings" recipe) -> its data config's transform of the RGB image -> ``model(x)``.

Reduced size, to stay within the CI budget on 2 cores: the networks are the same architectures
(same classes, image size, patch size, pooling, processor / transform) with 2 blocks and a
64-wide residual stream instead of 24-27 blocks of width 1024-1152. A full ViT-L / SO400M costs
about 1 s per image per forward here and gigabytes of random weights to write.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file

from sae.backbones import load_backbone
from sae.config import BackboneConfig
from sae.data.embedding import embed_split
from sae.data.images import ImageSplit

CONF = Path(__file__).resolve().parent.parent / "conf"
REVISION = "0123456789abcdef0123456789abcdef01234567"  # any 40-hex commit id
SMALL = {"depth": 2, "embed_dim": 64, "num_heads": 2}  # timm ViT kwargs of the reduced networks
TIMM_ENTRYPOINTS = ("vit_large_patch16_224", "vit_large_patch14_dinov2",
                    "vit_so400m_patch14_siglip_378")
OPEN_CLIP_HUB = {"clip_vitl14": "laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K",
                 "siglip2_openclip": "timm/ViT-SO400M-14-SigLIP2-378"}
TIMM_HUB = {"vit_l16_timm": "timm/vit_large_patch16_224.augreg_in21k_ft_in1k",
            "dinov2_vitl14": "timm/vit_large_patch14_dinov2.lvd142m"}
OPTIONS = ("clip_vitl14", "siglip2", "vit_l16", "siglip2_openclip", "vit_l16_timm",
           "dinov2_vitl14")
TOLERANCE = 1e-5

# The real checkpoints' preprocessor_config.json (google/siglip2-so400m-patch14-384 and
# google/vit-large-patch16-224, the latter in its legacy feature-extractor form).
SIGLIP2_PREPROCESSOR = {
    "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5],
    "processor_class": "SiglipProcessor", "resample": 2, "rescale_factor": 1 / 255,
    "size": {"height": 384, "width": 384}}
VIT_PREPROCESSOR = {
    "do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2, "size": 224}
# Reduced transformer width / depth; image and patch sizes are the real ones.
HF_SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
            "num_hidden_layers": 2}


def backbone_cfg(name: str, **overrides) -> BackboneConfig:
    node = OmegaConf.merge(OmegaConf.structured(BackboneConfig),
                           OmegaConf.load(CONF / "backbone" / f"{name}.yaml"), overrides)
    return OmegaConf.to_object(node)


# ---------------------------------------------------------------- the fake hub cache

def snapshot_dir(hub: Path, repo_id: str) -> Path:
    """Create ``models--org--name/snapshots/<rev>`` with ``refs/main`` naming it."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


def write_transformers_checkpoints(hub: Path) -> None:
    from transformers import SiglipConfig, SiglipModel, ViTConfig, ViTForImageClassification

    vision = {**HF_SMALL, "image_size": 384, "patch_size": 14}
    text = {**HF_SMALL, "num_hidden_layers": 1, "vocab_size": 1000}
    siglip = SiglipModel(SiglipConfig(vision_config=vision, text_config=text))
    snapshot = snapshot_dir(hub, "google/siglip2-so400m-patch14-384")
    siglip.save_pretrained(snapshot)
    (snapshot / "preprocessor_config.json").write_text(json.dumps(SIGLIP2_PREPROCESSOR))
    # The real checkpoint is a classifier; AutoModel drops the head, as it does on the real one.
    vit = ViTForImageClassification(ViTConfig(**HF_SMALL, image_size=224, patch_size=16,
                                              num_labels=10))
    snapshot = snapshot_dir(hub, "google/vit-large-patch16-224")
    vit.save_pretrained(snapshot)
    (snapshot / "preprocessor_config.json").write_text(json.dumps(VIT_PREPROCESSOR))


def write_open_clip_checkpoints(hub: Path) -> None:
    import open_clip

    for option, repo_id in OPEN_CLIP_HUB.items():
        cfg = backbone_cfg(option)
        model = open_clip.create_model(cfg.model, pretrained=None)
        snapshot = snapshot_dir(hub, repo_id)
        save_file(model.state_dict(), snapshot / "open_clip_model.safetensors")
        tag = open_clip.get_pretrained_cfg(cfg.model, cfg.pretrained)
        preprocess = {key: tag[key] for key in ("mean", "std", "interpolation", "resize_mode")
                      if key in tag}
        hub_config = {"model_cfg": open_clip.get_model_config(cfg.model),
                      "preprocess_cfg": preprocess}
        (snapshot / "open_clip_config.json").write_text(json.dumps(hub_config))


def write_timm_checkpoints(hub: Path) -> None:
    import timm

    for option, repo_id in TIMM_HUB.items():
        model = timm.create_model(backbone_cfg(option).model, pretrained=False)
        with torch.no_grad():  # DINOv2's LayerScale starts at 1e-5: the image would barely count
            for name, parameter in model.named_parameters():
                if name.endswith(".gamma"):
                    parameter.fill_(1.0)
        save_file(model.state_dict(), snapshot_dir(hub, repo_id) / "model.safetensors")


def reduce_registries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the libraries' own registries build the reduced networks (see the module doc)."""
    import open_clip.factory
    from timm.models import _registry

    for name in TIMM_ENTRYPOINTS:
        original = _registry._model_entrypoints[name]
        monkeypatch.setitem(_registry._model_entrypoints, name,
                            functools.wraps(original)(functools.partial(original, **SMALL)))
    text = {"width": 64, "heads": 2, "layers": 1, "vocab_size": 1000}
    clip = open_clip.get_model_config("ViT-L-14")
    clip["vision_cfg"].update(width=64, layers=2, head_width=32)
    clip["text_cfg"].update(text)
    siglip = open_clip.get_model_config("ViT-SO400M-14-SigLIP2-378")
    siglip["embed_dim"] = SMALL["embed_dim"]  # no projection: the embedding is the trunk width
    siglip["text_cfg"].update(text)
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "ViT-L-14", clip)
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "ViT-SO400M-14-SigLIP2-378", siglip)


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Iterator[Path]:
    """The fake hub cache, offline. Module-scoped, not session-scoped: the registry patches
    must not outlive this module's tests."""
    import huggingface_hub.constants

    hub = tmp_path_factory.mktemp("hub")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        reduce_registries(monkeypatch)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)  # seeded, and not the backbones' own random-init seed
            write_transformers_checkpoints(hub)
            write_open_clip_checkpoints(hub)
            write_timm_checkpoints(hub)
        yield hub


# ---------------------------------------------------------------- images

IMAGES = {  # name -> (mode, size): the modes real datasets hold, sizes around every resize rule
    "rgb.jpg": ("RGB", (300, 200)),
    "gray.png": ("L", (97, 131)),
    "cmyk.jpg": ("CMYK", (64, 480)),
    "rgba.png": ("RGBA", (500, 333)),
}


@pytest.fixture(scope="module")
def image_split(tmp_path_factory) -> ImageSplit:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, (mode, (width, height)) in IMAGES.items():
        channels = len(Image.new(mode, (1, 1)).getbands())
        pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
        Image.frombytes(mode, (width, height), pixels.tobytes()).save(folder / name)
    return ImageSplit(dataset="fixture", split="test", image_dir=folder, ids=list(IMAGES),
                      labels=None, class_names=[])


def project_embeddings(option: str, hub: Path, split: ImageSplit, out: Path) -> np.ndarray:
    # The processor runs in a DataLoader worker for the transformers options, as in a real job;
    # batches of 3 make the last batch ragged.
    workers = 1 if backbone_cfg(option).library == "transformers" else 0
    cfg = backbone_cfg(option, checkpoint_path=str(hub), storage_dtype="float32", batch_size=3,
                       num_workers=workers)
    result = embed_split(cfg, split, out, device="cpu", progress=False)
    assert result.kept == list(range(len(split)))
    # the workers sent uint8 and the float part ran in embed (sae/backbones/inputs.py): the
    # equality below then covers the split, not a fallback to the float path
    assert result.backbone_info["worker_dtype"] == "uint8", result.backbone_info
    return np.load(out)


# ---------------------------------------------------------------- the libraries' own recipes

def transformers_recipe(option: str, hub: Path, paths: list[Path]) -> np.ndarray:
    from transformers import AutoImageProcessor, AutoModel
    from transformers.image_utils import load_image

    model_id = backbone_cfg(option).model
    processor = AutoImageProcessor.from_pretrained(model_id, cache_dir=hub)
    model = AutoModel.from_pretrained(model_id, cache_dir=hub).eval()
    rows = []
    with torch.no_grad():
        for path in paths:
            inputs = processor(images=load_image(str(path)), return_tensors="pt")
            if option == "siglip2":
                rows.append(model.get_image_features(**inputs).pooler_output)
            else:
                rows.append(model(**inputs).last_hidden_state[:, 0])
    return torch.cat(rows).numpy()


def open_clip_recipe(model_name: str, pretrained: str | None, hub: Path, paths: list[Path]
                     ) -> np.ndarray:
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=pretrained, cache_dir=str(hub))
    model.eval()
    # RGB first (METHOD.md s1). open_clip's transform would also take the raw file, but it
    # converts after resizing: a CMYK or RGBA file then differs (by 0.1 here).
    with torch.no_grad():
        return torch.cat([model.encode_image(preprocess(rgb(path)).unsqueeze(0))
                          for path in paths]).numpy()


def rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def timm_recipe(option: str, hub: Path, paths: list[Path]) -> np.ndarray:
    import timm

    model = timm.create_model(backbone_cfg(option).model, pretrained=True, num_classes=0,
                              cache_dir=hub).eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model),
                                           is_training=False)
    with torch.no_grad():  # timm's transform expects RGB (METHOD.md s1: converted first)
        return torch.cat([model(transform(rgb(path)).unsqueeze(0))
                          for path in paths]).numpy()


def library_recipe(option: str, hub: Path, paths: list[Path]) -> np.ndarray:
    cfg = backbone_cfg(option)
    if cfg.library == "transformers":
        return transformers_recipe(option, hub, paths)
    if cfg.library == "open_clip":
        return open_clip_recipe(cfg.model, cfg.pretrained, hub, paths)
    return timm_recipe(option, hub, paths)


# ---------------------------------------------------------------- the tests

@pytest.mark.parametrize("option", OPTIONS)
def test_project_embeds_as_the_library_recipe(option, hub, image_split, tmp_path):
    paths = [image_split.path(i) for i in range(len(image_split))]
    ours = project_embeddings(option, hub, image_split, tmp_path / "emb.npy")
    reference = library_recipe(option, hub, paths)
    assert ours.shape == reference.shape == (len(IMAGES), ours.shape[1])
    assert np.abs(reference).max() > 1e-2  # a real output, not a zero that matches anything
    np.testing.assert_allclose(ours, reference, rtol=0, atol=TOLERANCE)
    # each image its own row: a pipeline that embedded one image for all would fail here
    assert np.abs(np.diff(ours, axis=0)).max() > 1e-3


def test_clip_vitl14_is_the_reference_codes_hf_hub_model(hub, image_split):
    """The reference code loads ``hf-hub:laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K``; the
    config's ``ViT-L-14`` + tag must read the same repository with the same preprocessing."""
    paths = [image_split.path(i) for i in range(len(image_split))]
    by_tag = library_recipe("clip_vitl14", hub, paths)
    by_hub = open_clip_recipe(f"hf-hub:{OPEN_CLIP_HUB['clip_vitl14']}", None, hub, paths)
    np.testing.assert_allclose(by_tag, by_hub, rtol=0, atol=TOLERANCE)


def test_transformers_snapshot_directory_and_output_rules(hub):
    """``checkpoint_path`` may name the snapshot itself; the info names the processor."""
    snapshot = next((hub / "models--google--vit-large-patch16-224" / "snapshots").iterdir())
    backbone = load_backbone(backbone_cfg("vit_l16", checkpoint_path=str(snapshot)))
    assert backbone.dim == HF_SMALL["hidden_size"]
    assert backbone.info["transform"].startswith("ViTImageProcessor")
    assert backbone.info["preprocess"]["size"] == {"height": 224, "width": 224}
    pixels = backbone.preprocess(Image.new("RGB", (50, 70)))
    assert pixels.shape == (3, 224, 224) and pixels.dtype == torch.uint8
    # pretrained: null builds the same architecture from config.json with random weights
    from sae.backbones.hf import load_transformers

    random = load_transformers(backbone_cfg("vit_l16", checkpoint_path=str(snapshot),
                                            pretrained=None), random_init=True)
    random.model.eval()
    batch = pixels.unsqueeze(0)
    with torch.inference_mode():
        ours, theirs = random.embed(batch), backbone.embed(batch)
    assert ours.shape == theirs.shape == (1, backbone.dim)
    assert not torch.allclose(ours, theirs)


def test_missing_weights_name_the_fix(hub, tmp_path):
    """Offline with an empty cache: the error says how to fill it."""
    with pytest.raises(RuntimeError, match="scripts/download_weights.py siglip2"):
        load_backbone(backbone_cfg("siglip2", checkpoint_path=str(tmp_path)))
