"""Workers send uint8, the device normalises (sae/backbones/inputs.py): the split equals each
library's whole transform bit for bit, falls back to float32 where it cannot, and quarters the
bytes a batch takes in shared memory. (tests/test_backbones_reference.py checks the embeddings
of every backbone option through the split against the libraries' recipes.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from sae.backbones import Backbone, load_backbone
from sae.backbones.inputs import torchvision_split, with_uint8_inputs
from sae.data.images import ImageFileDataset, collate_skipping
from tests.fixtures_images import make_imagenet
from tests.test_extract import backbone_cfg, imagenet_cfg


def varied_images() -> list[Image.Image]:
    """RGB, grayscale, CMYK and RGBA images of varied sizes, converted to RGB as the loader does."""
    rng = np.random.default_rng(1)
    out = []
    for mode, size in (("RGB", (40, 30)), ("L", (17, 53)), ("CMYK", (64, 64)), ("RGBA", (9, 12))):
        channels = {"RGB": 3, "L": 1, "CMYK": 4, "RGBA": 4}[mode]
        pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
        out.append(Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode)
                   .convert("RGB"))
    return out


@pytest.mark.parametrize("name", ["clip_tiny", "vit_tiny"])
def test_split_equals_the_library_transform_and_embeds_alike(name):
    split = load_backbone(backbone_cfg(name))
    assert split.info["worker_dtype"] == "uint8"
    # the same network with the library's whole transform in the workers (the naive reference)
    whole = load_backbone(backbone_cfg(name))
    library_transform = _library_transform(name, whole)
    with torch.inference_mode():
        for image in varied_images():
            raw = split.preprocess(image)
            assert raw.dtype == torch.uint8
            expected = library_transform(image).unsqueeze(0)
            torch.testing.assert_close(split.embed(raw.unsqueeze(0)),
                                       _float_embed(whole)(expected), rtol=0, atol=0)


def _library_transform(name: str, backbone: Backbone):
    import open_clip
    import timm

    cfg = backbone_cfg(name)
    if cfg.library == "open_clip":
        return open_clip.create_model_and_transforms(cfg.model, pretrained=None,
                                                     **cfg.model_kwargs)[2]
    data_cfg = dict(timm.data.resolve_model_data_config(backbone.model))
    data_cfg["input_size"] = (3, 32, 32)  # vit_tiny's img_size override
    return timm.data.create_transform(**data_cfg, is_training=False)


def _float_embed(backbone: Backbone):
    """The model's own forward on float pixels (what embed ran before the split)."""
    if backbone.info["library"] == "open_clip":
        return lambda x: backbone.model.encode_image(x).float()
    model = backbone.model
    return lambda x: model.forward_head(model.forward_features(x), pre_logits=True).float()


def test_an_unsplittable_transform_keeps_the_float_path():
    odd = transforms.Compose([transforms.Resize(8), transforms.ToTensor(),
                              transforms.Lambda(lambda x: x * 2)])
    reason = torchvision_split(odd)
    assert isinstance(reason, str) and "other than Normalize" in reason
    backbone = Backbone(torch.nn.Identity(), odd, lambda x: x.flatten(1), 192, {})
    kept = with_uint8_inputs(backbone, reason)
    assert kept.preprocess is odd and kept.info["worker_dtype"] == "float32"
    # a split that is not exact is refused too (here a head that drops the resize)
    wrong = (transforms.Compose([transforms.PILToTensor()]), lambda x: x.float() / 255)
    assert with_uint8_inputs(backbone, wrong).info["worker_dtype"] == "float32"


def test_worker_batches_take_a_quarter_of_the_bytes(tmp_path):
    root = make_imagenet(tmp_path, train_per_class=2, val_per_class=1)
    from sae.data.images import open_split

    split = open_split(imagenet_cfg(root), "train")
    uint8 = load_backbone(backbone_cfg("clip_tiny"))
    float_path = with_uint8_inputs(uint8, "forced")  # info only: preprocess is uint8 here
    batches = {}
    for label, preprocess in (("uint8", uint8.preprocess), ("float32", _library_transform(
            "clip_tiny", float_path))):
        images, _, _ = collate_skipping([ImageFileDataset(split, preprocess)[i]
                                         for i in range(len(split))])
        batches[label] = images
    assert batches["uint8"].dtype == torch.uint8
    nbytes = {k: b.untyped_storage().nbytes() for k, b in batches.items()}
    assert nbytes["float32"] == 4 * nbytes["uint8"]
    with torch.inference_mode():
        torch.testing.assert_close(uint8.embed(batches["uint8"]),
                                   _float_embed(uint8)(batches["float32"]), rtol=0, atol=0)
