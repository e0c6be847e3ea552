"""Qualitative inspection (METHOD.md s4): contact sheets of top-activating images per latent.

Protocol (recorded verbatim in every run's metrics and method card, see ``PROTOCOL``):
three selection rules pick ``n_per_rule`` latents each, in this order, no latent twice --

1. ``most_frequent``: the live latents that fire on the most evaluation samples (ties: lower id);
2. ``highest_mono``: the highest MonoScore among latents firing on at least ``n_images``
   samples (a full sheet; a latent seen twice can score 1 by chance), falling back to any
   scored latent when too few qualify;
3. ``random``: uniformly among the remaining live latents, with a seeded generator.

For each, a PNG contact sheet of its ``n_images`` top-activating evaluation images (exact top
activations over the whole split, ``TopActivations``), each captioned with its activation and
class, and one ``inspect/index.html`` over all sheets.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageOps

from sae.grid.runs import INSPECT_DIR, INSPECT_PAGE
from sae.metrics import TopActivations

THUMB_PX = 96
CAPTION_PX = 14
GAP_PX = 4
HEADER_PX = 22
MAX_COLUMNS = 8
RULES = ("most_frequent", "highest_mono", "random")

PROTOCOL = (
    "Latents chosen on the evaluation split by three rules, {n} each, no latent twice, in "
    "order: most_frequent (largest firing count), highest_mono (highest MonoScore among latents "
    "firing on >= {m} samples), random (uniform over the remaining live latents, seed {seed}). "
    "Each sheet shows the latent's {m} top-activating evaluation images (exact over the split) "
    "with their activations; index: {index}."
)


def select_latents(counts_n: torch.Tensor, mono_n: torch.Tensor, n_per_rule: int,
                   min_firing: int, seed: int) -> dict[str, list[int]]:
    """The seeded three-rule selection of the module docstring: {rule: [latent ids]}."""
    counts = counts_n.cpu()
    mono = mono_n.cpu().double()
    live = counts > 0
    chosen: set[int] = set()

    def take(order: torch.Tensor, allowed: torch.Tensor) -> list[int]:
        picked = [int(j) for j in order if bool(allowed[j]) and int(j) not in chosen][:n_per_rule]
        chosen.update(picked)
        return picked

    ids = torch.arange(counts.numel())
    # Sort by (-count, id): a stable sort on -count keeps lower ids first among ties.
    most_frequent = take(torch.argsort(-counts, stable=True), live)
    scored = ~torch.isnan(mono)
    by_mono = torch.argsort(-mono.nan_to_num(-math.inf), stable=True)
    full = scored & (counts >= min_firing)
    enough = int(sum(1 for j in ids if bool(full[j]) and int(j) not in chosen)) >= n_per_rule
    highest_mono = take(by_mono, full if enough else scored)
    generator = torch.Generator().manual_seed(seed)
    random = take(torch.randperm(counts.numel(), generator=generator), live)
    return {"most_frequent": most_frequent, "highest_mono": highest_mono, "random": random}


def _thumbnail(image: Image.Image | None) -> Image.Image:
    if image is None:  # the source could not provide this image: a grey tile says so
        return Image.new("RGB", (THUMB_PX, THUMB_PX), (200, 200, 200))
    image = image.convert("RGB")
    small = max(image.size) < THUMB_PX  # tiny images (8x8 digits) stay crisp when enlarged
    method = Image.NEAREST if small else Image.BICUBIC
    return ImageOps.pad(image, (THUMB_PX, THUMB_PX), method=method, color=(255, 255, 255))


def contact_sheet(title: str, images: list[Image.Image | None], captions: list[str]) -> Image.Image:
    """A grid of thumbnails with a caption under each and a title on top."""
    columns = max(1, min(MAX_COLUMNS, len(images)))
    rows = max(1, math.ceil(len(images) / columns))
    cell_w, cell_h = THUMB_PX + GAP_PX, THUMB_PX + CAPTION_PX
    sheet = Image.new("RGB", (columns * cell_w, HEADER_PX + rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 4), title, fill=(0, 0, 0))
    for slot, (image, caption) in enumerate(zip(images, captions)):
        x, y = (slot % columns) * cell_w, HEADER_PX + (slot // columns) * cell_h
        sheet.paste(_thumbnail(image), (x, y))
        draw.text((x + 2, y + THUMB_PX + 1), caption[:16], fill=(0, 0, 0))
    return sheet


def _class_of(sample: int, labels: torch.Tensor | None, class_names: list[str] | None) -> str:
    if labels is None:
        return ""
    row = labels[sample]
    ids = row.nonzero().flatten().tolist() if row.ndim == 1 else [int(row)]
    names = [class_names[c] if class_names and 0 <= c < len(class_names) else str(c)
             for c in ids if c >= 0]
    return ",".join(names)


def _index_html(sections: dict[str, list[dict]], protocol: str) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>Latent inspection</title>",
             "<style>body{font-family:sans-serif;margin:1em}figure{display:inline-block;"
             "margin:.5em;vertical-align:top}figcaption{font-size:small;max-width:770px}</style>",
             "</head><body><h1>Latent inspection</h1>", f"<p>{html.escape(protocol)}</p>"]
    for rule, entries in sections.items():
        parts.append(f"<h2>{html.escape(rule)}</h2>")
        if not entries:
            parts.append("<p>(no latent qualified)</p>")
        for entry in entries:
            caption = html.escape(entry["caption"])
            parts.append(f"<figure><img src='{html.escape(entry['file'])}' alt='{caption}'>"
                         f"<figcaption>{caption}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def inspect_latents(
    top: TopActivations,
    counts_n: torch.Tensor,
    mono_n: torch.Tensor,
    image_getter: Callable[[int], Image.Image | None],
    out_dir: Path,
    n_per_rule: int,
    seed: int = 0,
    labels: torch.Tensor | None = None,
    class_names: list[str] | None = None,
    n_samples: int | None = None,
) -> dict:
    """Write ``out_dir/inspect/latent_<id>.png`` per selected latent and ``index.html``.

    ``top`` holds each latent's top activations over the split (its ``top_n`` images per
    sheet); ``counts_n`` firing counts; ``mono_n`` MonoScores (NaN = none). Returns the
    protocol, the selection and the index path relative to ``out_dir``.
    """
    n_images = top.top_n
    selection = select_latents(counts_n, mono_n, n_per_rule, n_images, seed)
    directory = Path(out_dir) / INSPECT_DIR
    directory.mkdir(parents=True, exist_ok=True)
    n_samples = n_samples or top.n_seen
    sections: dict[str, list[dict]] = {}
    for rule in RULES:
        sections[rule] = []
        for latent in selection[rule]:
            samples = [s for s in top.samples_nt[latent].tolist() if s >= 0]
            values = top.values_nt[latent, :len(samples)].tolist()
            captions = [f"{v:.3g} [{_class_of(s, labels, class_names)}]" if labels is not None
                        else f"{v:.3g}"
                        for s, v in zip(samples, values)]
            frequency = float(counts_n[latent]) / max(n_samples, 1)
            mono = float(mono_n[latent])
            title = (f"latent {latent} | {rule} | fires on {100 * frequency:.2f}% | "
                     f"MS {'n/a' if math.isnan(mono) else f'{mono:.3f}'}")
            sheet = contact_sheet(title, [image_getter(s) for s in samples], captions)
            name = f"latent_{latent:05d}.png"
            sheet.save(directory / name)
            sections[rule].append({"file": name, "caption": title})
    index = f"{INSPECT_DIR}/{INSPECT_PAGE}"
    protocol = PROTOCOL.format(n=n_per_rule, m=n_images, seed=seed, index=index)
    (Path(out_dir) / index).write_text(_index_html(sections, protocol), encoding="utf-8")
    return {"index": index, "protocol": protocol, "selection": selection,
            "sheets": sum(len(v) for v in sections.values())}
