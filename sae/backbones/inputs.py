"""uint8 images from the DataLoader workers, scaling and normalisation on the device.

Every library's preprocessing is geometric work on 8-bit pixels (convert, resize, crop: the
output is still uint8) followed by float arithmetic (scale by 1/255, subtract the mean, divide by
the std). The workers run the first part and send uint8 tensors through shared memory -- a
quarter of the bytes of float32 -- and :attr:`Backbone.embed` starts with the second part, on the
device, with the library's own float operations:

- open_clip and timm (torchvision ``Compose``): the steps before ``ToTensor`` then
  ``PILToTensor`` in the workers; ``x.float().div(255)`` (what ``ToTensor`` does to uint8) and
  the ``Normalize`` steps on the device;
- transformers (the torchvision backend of the image processors): the processor called with
  ``do_rescale=False, do_normalize=False`` in the workers; its own ``rescale_and_normalize`` on
  the device.

A split is kept only when it reproduces the library's full transform *exactly* on a probe image
(checked at load); otherwise, e.g. a processor of the PIL/numpy backend or a transform with an
unknown step after ``ToTensor``, the workers run the float path as before and the backbone's
info says why (``worker_dtype``, ``device_preprocess``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from sae.backbones.base import Backbone

log = logging.getLogger(__name__)

Transform = Callable[[Image.Image], torch.Tensor]


class TorchvisionHead:
    """The geometric steps of a torchvision ``Compose``, then ``PILToTensor`` (uint8, CHW)."""

    def __init__(self, steps: list[Any]) -> None:
        from torchvision.transforms import Compose, PILToTensor

        self.transform = Compose([*steps, PILToTensor()])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image)

    def __repr__(self) -> str:
        return repr(self.transform)


class TorchvisionTail:
    """(B, 3, H, W) uint8 -> float, as ``ToTensor`` scales uint8, then the ``Normalize`` steps."""

    def __init__(self, steps: list[Any]) -> None:
        self.steps = steps

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(dtype=torch.get_default_dtype()).div(255)
        for step in self.steps:
            x = step(x)
        return x

    def __repr__(self) -> str:
        return "ToFloat(div=255) -> " + " -> ".join(repr(s) for s in self.steps)


class ProcessorTail:
    """(B, 3, H, W) uint8 -> float by the image processor's own ``rescale_and_normalize``."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        p = self.processor
        return p.rescale_and_normalize(images, p.do_rescale, p.rescale_factor, p.do_normalize,
                                       p.image_mean, p.image_std)

    def __repr__(self) -> str:
        return f"{type(self.processor).__name__}.rescale_and_normalize"


def torchvision_split(transform: Any) -> tuple[Transform, Callable] | str:
    """(uint8 head, device tail) of a torchvision ``Compose``, or why it cannot be split."""
    from torchvision.transforms import Compose, Normalize, ToTensor

    if not isinstance(transform, Compose):
        return f"not a torchvision Compose ({type(transform).__name__})"
    steps = list(transform.transforms)
    at = [i for i, step in enumerate(steps) if isinstance(step, ToTensor)]  # timm's Maybe* too
    if len(at) != 1:
        return f"{len(at)} ToTensor steps"
    tail = steps[at[0] + 1:]
    if not all(isinstance(step, Normalize) for step in tail):
        return f"steps after ToTensor other than Normalize: {tail}"
    return TorchvisionHead(steps[:at[0]]), TorchvisionTail(tail)


def processor_split(processor: Any) -> tuple[Transform, Callable] | str:
    """(uint8 head, device tail) of a transformers image processor, or why it cannot be split."""
    if not hasattr(processor, "rescale_and_normalize"):
        return (f"{type(processor).__name__} has no rescale_and_normalize (not the torchvision "
                "backend): rescale and normalise stay in the workers")
    return UInt8Processor(processor), ProcessorTail(processor)


class UInt8Processor:
    """PIL image -> (3, H, W) uint8: the processor without its rescale and normalisation."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.processor(images=image, do_rescale=False, do_normalize=False,
                              return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        return f"{type(self.processor).__name__}(do_rescale=False, do_normalize=False)"


def with_uint8_inputs(backbone: Backbone, split: tuple[Transform, Callable] | str) -> Backbone:
    """``backbone`` with workers sending uint8 and ``embed`` normalising on the device, when the
    split equals the full transform exactly on a probe image; unchanged otherwise."""
    reason = split if isinstance(split, str) else _mismatch(backbone.preprocess, *split)
    if reason:
        log.info("preprocessing stays float32 in the workers: %s", reason)
        info = {**backbone.info, "worker_dtype": "float32", "device_preprocess": f"none ({reason})"}
        return replace(backbone, info=info)
    head, tail = split  # type: ignore[misc]
    embed = backbone.embed

    def embed_uint8(images: torch.Tensor) -> torch.Tensor:
        return embed(tail(images))

    info = {**backbone.info, "worker_dtype": "uint8", "worker_preprocess": repr(head),
            "device_preprocess": repr(tail)}
    return replace(backbone, preprocess=head, embed=embed_uint8, info=info)


def _mismatch(full: Transform, head: Transform, tail: Callable) -> str | None:
    """Why ``tail(head(x))`` is not ``full(x)`` bit for bit on probe images (None: it is)."""
    rng = np.random.default_rng(0)
    for size in ((70, 50), (23, 31)):  # landscape, and smaller than any crop
        probe = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        raw, expected = head(probe), full(probe)
        if raw.dtype != torch.uint8:
            return f"the geometric part returns {raw.dtype}, not uint8"
        got = tail(raw.unsqueeze(0))[0]
        if got.shape != expected.shape or not torch.equal(got, expected):
            return "the uint8 split differs from the library's transform on a probe image"
    return None
