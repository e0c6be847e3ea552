"""The method card of METHOD.md s7: what an auditor needs to read a run's numbers.

One card per run (``method_card.md`` + ``method_card.json`` in the run directory); the report
assembles the sweep's card from them. Claims are worded in proportion: a card states what was
measured under which conditions, nothing more.
"""

from __future__ import annotations

from typing import Any

from sae.config import RootConfig

# How training's NMSE is normalised (sae.training.losses.nmse), stated on every card.
NMSE_CONVENTION = "batch: sum_i ||x_hat_i - x_i||^2 / sum_i ||x_i - mean_batch(x)||^2"
# How every card asks to be read (METHOD.md s7: claims worded in proportion).
PROPORTION_NOTE = (
    "Read these numbers as: under these conditions (backbone, data, budget, regularizer, mask, "
    "seeds), this configuration produced the values above. They are proxies for feature "
    "coherence, not proof that a latent captures a human concept.")

CARD_FIELDS = (
    "source_model", "dataset", "embedding_preprocessing", "dictionary_size", "topk_budget",
    "regularizer", "active_unit_mask_rule", "reconstruction", "monosemanticity",
    "class_purity", "dead_latents", "qualitative_inspection", "inference_k_sensitivity",
    "seed_stability", "code_version", "reproduce",
)


# How each library turns an image (converted to RGB first) into the network's input, and what
# each embedding rule takes (METHOD.md s1; the loaders are in sae/backbones*.py).
PREPROCESSING = {
    "open_clip": "open_clip's inference transform for the model and tag (resize, centre crop, "
                 "the tag's mean / std)",
    "timm": "timm's eval transform from the model's pretrained data config "
            "(resolve_model_data_config + create_transform)",
    "transformers": "the checkpoint's own AutoImageProcessor (its preprocessor_config.json)",
}
# How an image dataset's split becomes samples (dataset.sampling, METHOD.md s1).
SAMPLING = {
    None: "one sample per image file of the split",
    "per_image": "every image of the split once",
    "narratives": "the reference code's: one sample per (image, caption) pair of "
                  "the Localized Narratives files, images with a positive boxable label only",
}
OUTPUTS = {
    "image_projected": "encode_image, the projected image embedding",
    "cls_pre_logits": "the CLS token after the final norm, before the classifier",
    "image_features": "get_image_features(pixel_values), pooled and projected",
    "cls_last_hidden_state": "the CLS token of last_hidden_state, after the final LayerNorm",
}


def _source_model(cfg: RootConfig) -> str:
    b = cfg.backbone
    if b.library == "none":
        return f"none: the dataset {cfg.dataset.name!r} is already an embedding set"
    return (f"checkpoint: {b.checkpoint}; library: {b.library}; preprocessing: RGB, then "
            f"{PREPROCESSING.get(b.library, b.library)}; layer: {b.embedding} = "
            f"{OUTPUTS.get(b.embedding, b.embedding)} (one embedding per image, no patch tokens)")


def _sampling(cfg: RootConfig) -> str:
    """The sampling protocol: which samples the SAE sees (METHOD.md s1)."""
    if cfg.dataset.kind != "images":
        return f"the {cfg.dataset.kind} dataset's samples, as stored"
    protocol = getattr(cfg.dataset, "sampling", None)
    description = SAMPLING.get(protocol, str(protocol))
    return description if protocol is None else f"{protocol}: {description}"


def _mask_rule(cfg: RootConfig) -> str:
    if cfg.regularizer.name == "none":
        return "not applicable (no regularizer)"
    if cfg.mask:
        return ("on: the penalty covers only batch-active units (selected by Top-k for at least "
                "one sample of the batch), recomputed every step, no gradient through the mask")
    return "off: the penalty covers all n units (ablation)"


def _get(metrics: dict[str, Any], key: str) -> Any:
    value = metrics.get(key)
    return round(value, 4) if isinstance(value, float) else value


def run_card(cfg: RootConfig, metrics: dict[str, Any], split_sizes: dict[str, int],
             code_version: str, command: str, caches: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    """``caches``: per split, the inputs of its embedding cache key (image datasets)."""
    protocols = metrics.get("protocols", {})
    reg = cfg.regularizer
    dataset: dict[str, Any] = {"name": cfg.dataset.name, "sampling": _sampling(cfg),
                               **split_sizes}
    if cfg.dataset.kind == "images":
        dataset["layout"] = cfg.dataset.layout
    if caches:
        dataset["embedding_cache_key_inputs"] = caches
    return {
        "source_model": _source_model(cfg),
        "dataset": dataset,
        "embedding_preprocessing": (
            ("L2-normalised to unit norm" if cfg.dataset.normalize else "raw")
            + ("; per-sample LayerNorm inside the SAE, undone on the output"
               if cfg.sae.layernorm else "")),
        "dictionary_size": cfg.sae.n_latents,
        "topk_budget": cfg.k,
        "regularizer": ("none (hard Top-k budget only)" if reg.name == "none"
                        else f"{reg.name}, lambda = {reg.strength}"),
        "active_unit_mask_rule": _mask_rule(cfg),
        "reconstruction": {"metric": "R^2 (per-dimension, uniform average, float64) on the "
                                     "evaluation split", "value": _get(metrics, "r2"),
                           "r2_variance_weighted": _get(metrics, "r2_variance_weighted"),
                           "nmse": _get(metrics, "nmse"), "training_nmse": NMSE_CONVENTION,
                           "training_precision": (
                               "bf16 autocast for the matrix products, float32 weights and Adam"
                               if cfg.train.autocast_bf16 else "float32")},
        "monosemanticity": {"metric": "MonoSemanticity score (Pach et al. 2025): mono_dead0 = "
                                      "mean over all latents, dead = 0; mono_live = mean over "
                                      "live latents",
                            "similarity_embeddings": protocols.get("similarity",
                                                                   cfg.eval.similarity),
                            "mono_dead0": _get(metrics, "mono_dead0"),
                            "mono_live": _get(metrics, "mono_live")},
        "class_purity": {"method": protocols.get("purity", "max-class share over firing images"),
                         "binary": _get(metrics, "purity_binary"),
                         "weighted": _get(metrics, "purity_weighted")},
        "dead_latents": {"evaluation_count": _get(metrics, "dead_count"),
                         "evaluation_fraction": _get(metrics, "dead_fraction"),
                         "training_count_by_window": metrics.get("train", {}).get("dead_end")},
        "qualitative_inspection": protocols.get("inspection", "not run"),
        "inference_k_sensitivity": metrics.get("curves", {}).get("k_robustness"),
        "seed_stability": "per sweep: see the sweep's method card (mean max cosine of atoms "
                          "between seeds)",
        "cpu_threads": _threads(metrics),
        "warnings": metrics.get("warnings") or "none",
        "code_version": code_version,
        "reproduce": command,
    }


def _threads(metrics: dict[str, Any]) -> str | None:
    threads = metrics.get("threads")
    return f"{threads['count']} ({threads['source']})" if threads else None


def render_markdown(card: dict[str, Any], title: str) -> str:
    """A run's or a sweep's card as Markdown: ``CARD_FIELDS`` in order, then any other field."""
    lines = [f"# Method card: {title}", ""]
    for key in [*CARD_FIELDS, *(k for k in card if k not in CARD_FIELDS)]:
        value = card.get(key)
        label = key.replace("_", " ").capitalize()
        if isinstance(value, dict | list) and value:
            lines += [f"- **{label}**:", *_render_value(value, 1)]
        else:
            lines.append(f"- **{label}**: {value}")
    lines += ["", PROPORTION_NOTE, ""]
    return "\n".join(lines)


def _render_value(value: Any, indent: int) -> list[str]:
    """Nested Markdown bullets; a small dict of plain values stays on one line."""
    pad = "  " * indent
    if isinstance(value, dict):
        lines = []
        for key, item in value.items():
            if _flat_dict(item) and item:
                lines.append(f"{pad}- {key}: {_inline(item)}")
            elif isinstance(item, dict | list) and item:
                lines += [f"{pad}- {key}:", *_render_value(item, indent + 1)]
            else:
                lines.append(f"{pad}- {key}: {item}")
        return lines
    if isinstance(value, list):
        return [f"{pad}- {_inline(item) if _flat_dict(item) else item}" for item in value]
    return [f"{pad}{value}"]


def _flat_dict(value: Any) -> bool:
    return isinstance(value, dict) and all(not isinstance(v, dict | list) for v in value.values())


def _inline(value: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in value.items())
