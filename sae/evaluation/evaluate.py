"""The evaluation stage: every metric of METHOD.md s4 for one trained SAE, streamed.

The evaluation split goes through the SAE once, in chunks of ``cfg.chunk_size`` under
``torch.no_grad``: per chunk one encoder pass, then Top-k' + decode for every inference budget
k' (k robustness), and at the training k the firing counts, MonoScore, class purity, the top
activations (contact sheets, top-N purity) and the codes of the probe's evaluation rows. Only
one chunk of pre-activations and codes exists at a time; the state kept across chunks is
O(n d + n C) (plus at most ``probe_max_train`` codes of width k for the probe).

Then: the truncated-code and raw-embedding probes on a seeded probe-train subsample of the
train split, planted recovery (planted atoms), and contact sheets (images). The result is a dict
with flat scalar keys (the final numbers, NaN written as null), nested ``curves``,
``protocols`` (the conventions, in words, for the method card) and ``inspection``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sae.config import EvalConfig, parse_similarity
from sae.data.cache import open_cache
from sae.data.types import EmbeddingSet
from sae.evaluation.inspect import inspect_latents
from sae.evaluation.probe_store import stored_linear_probe
from sae.grid.runs import PER_LATENT_FILE
from sae.metrics import (
    FiringCounter,
    MonoAccumulator,
    PurityAccumulator,
    PurityScores,
    R2Accumulator,
    TopActivations,
    inference_ks,
    k_robustness_from,
    monosemanticity_summary,
    n_classes_of,
    planted_recovery,
    probe_metric,
    purity_of_top,
    truncated_probe,
)
from sae.model import SparseCode, TopKSAE

log = logging.getLogger(__name__)

# Rows per probe chunk: (rows, classes) logits, 256 MB at 1000 classes; bigger = fewer launches.
PROBE_CHUNK_ROWS = 65_536

SMALL_M = (1, 2, 4)  # claim 4's small probe budgets (the report's --small-m default)
PROTOCOLS = {
    "r2": "per-dimension R^2 = 1 - SS_res,d / SS_tot,d averaged uniformly over dimensions with "
          "SS_tot > 0 (scikit-learn uniform average), float64, on the evaluation split's inputs "
          "as the SAE sees them",
    "nmse": "sum_i ||x_hat_i - x_i||^2 / sum_i ||x_i - mean(x)||^2 over the evaluation split "
            "(total-variance normalisation, the training loss's with the split for the batch); "
            "fvu is the same number; r2_variance_weighted is scikit-learn's variance-weighted "
            "R^2 (= 1 - nmse without constant dimensions), robust to near-constant dimensions",
    "l0": "mean number of latents with a > 0 per sample, at the training k",
    "dead": "latents that never fire (a > 0) on the evaluation split at the training k",
    "monosemanticity": "MonoSemanticity score (Pach et al. 2025): per latent, min-max scaled "
                       "activations t, MS = sum_{i<l} t_i t_l cos(e_i, e_l) / sum_{i<l} t_i t_l, "
                       "exact linear form from the nonzeros; undefined (never fires, constant, "
                       "or fewer than two weighted samples) counts as 0 in mono_dead0 (MonoLoss's "
                       "convention) and is left out of mono_live / median / p90",
    "k_robustness": "R^2 with Top-k' at inference, k' = round(multiple * k) clamped to "
                    "[1, n], one encoder pass per chunk; ratio = R^2(k') / R^2(k) (null when "
                    "R^2(k) <= 0)",
    "seed_stability": "not per run: mean max cosine between decoder atoms of two seeds, both "
                      "directions averaged (sae.metrics.seed_stability), computed by the report",
}


@dataclass
class _Stream:
    """Accumulators fed by the single pass over the evaluation split."""

    r2_by_k: dict[int, R2Accumulator]
    firing: FiringCounter
    mono: MonoAccumulator
    top_inspect: TopActivations | None
    top_purity: TopActivations | None
    purity: PurityAccumulator | None
    probe_rows: torch.Tensor | None  # (N,) bool: evaluation rows kept for the probe
    probe_values: list[torch.Tensor] = field(default_factory=list)
    probe_indices: list[torch.Tensor] = field(default_factory=list)


def _json_safe(value: Any) -> Any:
    """NaN and infinities become null: metrics.json stays strict JSON."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _nanmean(values_n: torch.Tensor) -> float:
    finite = values_n[~torch.isnan(values_n)]
    return float(finite.mean()) if finite.numel() else float("nan")


def _seeded_rows(n_total: int, n_keep: int, seed: int) -> torch.Tensor:
    """Sorted row ids of a seeded subsample (all rows when n_keep >= n_total)."""
    if n_keep >= n_total:
        return torch.arange(n_total)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=generator)[:n_keep].sort().values


def load_similarity(cfg: EvalConfig, eval_set: EmbeddingSet,
                    similarity_x: torch.Tensor | np.ndarray | None) -> tuple[Any, str]:
    """The MonoScore similarity embeddings (one row per evaluation sample) and their protocol.

    ``similarity_x`` given by the caller wins; else ``cfg.similarity``: ``input`` (the SAE's
    own input embeddings, MonoLoss's default), ``cache:DIR`` (the embeddings of the same
    images by another backbone; ``sae.data.similarity.resolve_similarity`` turns
    ``backbone:NAME`` into one), or ``file:PATH``, a ``.npy`` (memory-mapped) or
    ``.safetensors`` (single tensor) array aligned with the evaluation split.
    """
    similarity = parse_similarity(cfg.similarity)
    if similarity_x is not None:
        source, array = "embeddings given by the caller", similarity_x
    elif similarity.kind == "input":
        return eval_set.x, "input: the SAE's own input embeddings (MonoLoss), cosine similarity"
    elif similarity.kind == "backbone":
        raise ValueError(f"eval.similarity={cfg.similarity!r} names a backbone; resolve it to "
                         "its cache first (sae.data.similarity.resolve_similarity)")
    elif similarity.kind == "cache":
        array, source = _similarity_cache(Path(similarity.target), eval_set)
    else:
        array, source = _similarity_file(Path(similarity.target))
    if array.shape[0] != eval_set.n:
        raise ValueError(f"similarity embeddings have {array.shape[0]} rows for {eval_set.n} "
                         "evaluation samples. Fix: embed the same evaluation split, same order")
    return array, f"{source}, cosine similarity"


def _similarity_cache(path: Path, eval_set: EmbeddingSet) -> tuple[Any, str]:
    cached = open_cache(path, verify_checksums=False)  # sizes and shapes still checked
    if eval_set.ids is not None and cached.ids != eval_set.ids:
        raise ValueError(f"similarity cache {path} holds other images, or the same in another "
                         "order, than the evaluation split. Fix: extract the same dataset "
                         "and split (same dataset.max_per_split and split_seed)")
    return cached.embeddings, f"cache {path} ({cached.manifest['backbone'].get('model')})"


def _similarity_file(path: Path) -> tuple[Any, str]:
    if path.suffix == ".npy":
        return np.load(path, mmap_mode="r"), f"file {path}"
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if len(tensors) != 1:
            raise ValueError(f"{path} holds {len(tensors)} tensors. Fix: save one (N, d) array")
        return next(iter(tensors.values())), f"file {path}"
    raise ValueError(f"eval.similarity=file:{path}: neither .npy nor .safetensors. Fix: point it "
                     "to an (N_eval, d) array file in one of these formats")


def _chunk_rows(array: Any, start: int, stop: int) -> torch.Tensor:
    rows = array[start:stop]
    # torch.tensor copies: a memory-mapped slice is read-only and must not be aliased.
    return rows if isinstance(rows, torch.Tensor) else torch.tensor(np.asarray(rows))


def _make_stream(sae: TopKSAE, eval_set: EmbeddingSet, sim_dim: int, cfg: EvalConfig,
                 ks: list[int], device: torch.device, seed: int) -> _Stream:
    n = sae.n_latents
    labels = eval_set.labels
    with_images = (eval_set.image_getter is not None and cfg.inspect_latents > 0
                   and cfg.inspect_top_images > 0)
    probe_rows = None
    if labels is not None:
        probe_rows = torch.zeros(eval_set.n, dtype=torch.bool)
        probe_rows[_seeded_rows(eval_set.n, cfg.probe_max_train, seed + 1)] = True
    return _Stream(
        r2_by_k={k: R2Accumulator() for k in ks},
        firing=FiringCounter(n, device),
        mono=MonoAccumulator(n, sim_dim, device),
        top_inspect=TopActivations(n, cfg.inspect_top_images, device) if with_images else None,
        top_purity=(TopActivations(n, cfg.purity_top_n, device)
                    if labels is not None and cfg.purity_top_n else None),
        purity=(PurityAccumulator(n, _n_classes(eval_set, None), device)
                if labels is not None and not cfg.purity_top_n else None),
        probe_rows=probe_rows,
    )


@torch.no_grad()
def _stream_eval_split(sae: TopKSAE, eval_set: EmbeddingSet, similarity: Any, cfg: EvalConfig,
                       train_k: int, stream: _Stream, device: torch.device) -> None:
    for start in range(0, eval_set.n, cfg.chunk_size):
        stop = min(start + cfg.chunk_size, eval_set.n)
        x_bd = eval_set.x[start:stop].to(device, torch.float32)
        pre_bn, stats = sae.encode_pre(x_bd)  # the one encoder pass of this chunk
        code = sae.select(pre_bn, train_k)
        for k, acc in stream.r2_by_k.items():
            acc.update(x_bd, sae.decode(code if k == train_k else sae.select(pre_bn, k), stats))
        del pre_bn
        stream.firing.update(code)
        stream.mono.update(code, _chunk_rows(similarity, start, stop).to(device))
        if stream.top_inspect is not None:
            stream.top_inspect.update(code, offset=start)
        if stream.top_purity is not None:
            stream.top_purity.update(code, offset=start)
        if stream.purity is not None:
            stream.purity.update(code, eval_set.labels[start:stop].to(device))
        if stream.probe_rows is not None:
            keep = stream.probe_rows[start:stop].to(device)
            stream.probe_values.append(code.values[keep].cpu())
            stream.probe_indices.append(code.indices[keep].cpu())


@torch.no_grad()
def _encode_rows(sae: TopKSAE, x_nd: torch.Tensor, rows: torch.Tensor, k: int, chunk_size: int,
                 device: torch.device) -> SparseCode:
    values, indices = [], []
    for start in range(0, rows.numel(), chunk_size):
        code = sae.encode(x_nd[rows[start:start + chunk_size]].to(device, torch.float32), k)
        values.append(code.values.cpu())
        indices.append(code.indices.cpu())
    return SparseCode(torch.cat(values), torch.cat(indices))


def _n_classes(eval_set: EmbeddingSet, train_set: EmbeddingSet | None) -> int:
    if eval_set.class_names:
        return len(eval_set.class_names)
    sets = [s for s in (eval_set, train_set) if s is not None and s.labels is not None]
    return max(n_classes_of(s.labels) for s in sets)


def _reconstruction_metrics(stream: _Stream, train_k: int, multiples: list) -> tuple[dict, dict]:
    base = stream.r2_by_k[train_k].result()
    robust = k_robustness_from(train_k, stream.r2_by_k)
    dead = stream.firing.dead()
    flat = {"r2": base.r2, "r2_variance_weighted": base.r2_variance_weighted,
            "nmse": base.nmse, "fvu": base.fvu,
            "r2_constant_dims": base.n_constant_dims, "l0": stream.firing.l0(),
            "dead_count": int(dead.sum()), "dead_fraction": float(dead.double().mean()),
            "k_robust_r2_ratio_min": robust.min_ratio(),
            "k_robustness_mean_ratio": robust.mean_ratio(), **robust.by_multiple(multiples)}
    curves = {"k_robustness": {str(k): v for k, v in robust.r2.items()},
              "k_robustness_ratio": {str(k): v for k, v in robust.ratio.items()}}
    return flat, curves


def _mono_metrics(scores_n: torch.Tensor) -> dict:
    summary = monosemanticity_summary(scores_n)
    return {"mono_live": summary.mean_live, "mono_dead0": summary.mean_dead0,
            "mono_median": summary.median, "mono_p90": summary.p90,
            "mono_scored": summary.n_scored}


def _purity_metrics(stream: _Stream, eval_set: EmbeddingSet, cfg: EvalConfig
                    ) -> tuple[dict, str, PurityScores | None]:
    if eval_set.labels is None:
        return {}, "skipped: the evaluation split has no labels", None
    if stream.top_purity is not None:
        scores = purity_of_top(stream.top_purity, eval_set.labels, _n_classes(eval_set, None))
        scope = f"each latent's top-{cfg.purity_top_n} activating images"
    else:
        scores = stream.purity.result()
        scope = "all images where the latent fires (a > 0)"
    rule = ("an image counts once for each of its labels (multi-label)" if eval_set.multi_label
            else "one label per image")
    protocol = (f"over {scope}: binary = max_c #{{i: c in y_i}} / #{{i}}, weighted = max_c "
                f"sum_i a_i [c in y_i] / sum_i a_i; {rule}; mean over latents that fire")
    flat = {"purity_binary": _nanmean(scores.binary), "purity_weighted": _nanmean(scores.weighted)}
    return flat, protocol, scores


def _probe_metrics(sae: TopKSAE, train_set: EmbeddingSet, eval_set: EmbeddingSet, stream: _Stream,
                   cfg: EvalConfig, train_k: int, device: torch.device, seed: int,
                   probe_store: Path | None) -> tuple[dict, dict, str]:
    if eval_set.labels is None or train_set.labels is None:
        return {}, {}, "skipped: a split has no labels"
    if train_set.multi_label != eval_set.multi_label:
        return {}, {}, "skipped: train and evaluation labels differ in kind (single / multi)"
    train_rows = _seeded_rows(train_set.n, cfg.probe_max_train, seed)
    code_train = _encode_rows(sae, train_set.x, train_rows, train_k, cfg.chunk_size, device)
    code_eval = SparseCode(torch.cat(stream.probe_values), torch.cat(stream.probe_indices))
    eval_rows = stream.probe_rows.nonzero().flatten()
    y_train, y_eval = train_set.labels[train_rows], eval_set.labels[eval_rows]
    n_classes = _n_classes(eval_set, train_set)
    common = {"n_classes": n_classes, "weight_decay": cfg.probe_weight_decay,
              "max_iter": cfg.probe_epochs, "chunk_size": max(cfg.chunk_size, PROBE_CHUNK_ROWS),
              "device": device}
    m_values = sorted({min(m, train_k) for m in cfg.probe_m} | {train_k})
    scores = truncated_probe(tuple(code_train), y_train, tuple(code_eval), y_eval, m_values,
                             n_latents=sae.n_latents, **common)
    raw, _ = stored_linear_probe(probe_store, train_set.x[train_rows], y_train,
                                 eval_set.x[eval_rows], y_eval, **common)
    small = torch.tensor([v for m, v in scores.items() if m in SMALL_M], dtype=torch.float64)
    flat = {f"probe_m{m}": v for m, v in scores.items()} | {
        "probe_raw": raw, "probe_small_m_mean": _nanmean(small)}  # claim 4's number
    protocol = (f"{probe_metric(y_eval)} of a logistic-regression probe (multinomial; multi-label: "
                f"one-vs-rest, mAP) on codes truncated to their top-m activations, m in "
                f"{m_values}; full-batch L-BFGS ({cfg.probe_epochs} iterations, L2 "
                f"{cfg.probe_weight_decay}), latents scaled by their train RMS; trained on "
                f"{train_rows.numel()} seeded train samples, scored on {eval_rows.numel()} (seeded "
                f"subsamples above {cfg.probe_max_train}); raw-embedding probe (probe_raw, a "
                f"reference codes can beat): the same probe on standardised raw embeddings")
    return flat, {"probe": {str(m): v for m, v in scores.items()}}, protocol


def _planted_metrics(sae: TopKSAE, eval_set: EmbeddingSet, train_set: EmbeddingSet
                     ) -> tuple[dict, str]:
    atoms = eval_set.planted_atoms
    atoms = train_set.planted_atoms if atoms is None else atoms
    if atoms is None:
        return {}, "not applicable: no planted atoms"
    result = planted_recovery(sae.W_dec.detach(), atoms.to(sae.W_dec.device), threshold=0.9)
    protocol = ("fraction of planted atoms whose best decoder atom has signed cosine >= 0.9, and "
                "the mean best cosine")
    flat = {"planted_recovery": result.fraction, "planted_mean_max_cos": result.mean_max_cos}
    return flat, protocol


def _inspection(stream: _Stream, eval_set: EmbeddingSet, mono_n: torch.Tensor, cfg: EvalConfig,
                out_dir: Path, seed: int) -> dict:
    if stream.top_inspect is None:
        reason = ("the evaluation split has no images" if eval_set.image_getter is None
                  else "eval.inspect_latents or eval.inspect_top_images is 0")
        return {"index": None, "protocol": f"skipped: {reason}"}
    return inspect_latents(stream.top_inspect, stream.firing.counts_n, mono_n,
                           eval_set.image_getter, out_dir, cfg.inspect_latents, seed=seed,
                           labels=eval_set.labels, class_names=eval_set.class_names,
                           n_samples=eval_set.n)


def _write_per_latent(out_dir: Path, arrays: dict[str, torch.Tensor]) -> str:
    """Per-latent arrays (n,) for the report's distributions; written atomically."""
    from sae.io.tensors import save_tensor_file

    save_tensor_file(out_dir / PER_LATENT_FILE, arrays)
    return PER_LATENT_FILE


class _FamilyClock:
    """One log line per metric family with its seconds (evaluation used to print nothing)."""

    def __init__(self) -> None:
        self.last = time.perf_counter()

    def done(self, family: str, rows: int | None = None) -> None:
        now = time.perf_counter()
        where = f" ({rows} rows)" if rows is not None else ""
        log.info("evaluation: %s%s in %.2f s", family, where, now - self.last)
        self.last = now


def evaluate(
    sae: TopKSAE,
    train: EmbeddingSet,
    eval: EmbeddingSet,
    cfg: EvalConfig,
    train_k: int,
    out_dir: Path,
    device: torch.device,
    seed: int = 0,
    *,
    similarity_x: torch.Tensor | np.ndarray | None = None,
    probe_store: Path | None = None,
    check_stop: Callable[[], None] | None = None,
) -> dict:
    """Every METHOD.md s4 metric of ``sae`` on ``eval`` (probe-train data from ``train``).

    Writes contact sheets under ``out_dir/inspect/`` when ``eval`` has images. ``similarity_x``
    overrides ``cfg.similarity``; ``probe_store`` keeps raw-embedding probes (sae.evaluation.probe_store).
    ``check_stop`` is called between the metric families (it raises to stop the evaluation).
    Returns the dict of the module docstring (not written: the caller owns metrics.json).
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    was_training = sae.training
    sae = sae.to(device).eval()
    check_stop = check_stop or (lambda: None)
    family = _FamilyClock()
    try:
        similarity, similarity_protocol = load_similarity(cfg, eval, similarity_x)
        ks = inference_ks(train_k, cfg.k_multiples, sae.n_latents)
        stream = _make_stream(sae, eval, similarity.shape[1], cfg, ks, device, seed)
        _stream_eval_split(sae, eval, similarity, cfg, train_k, stream, device)
        flat, curves = _reconstruction_metrics(stream, train_k, list(cfg.k_multiples))
        family.done("the split's pass: encode, R^2 at every k', firing counts", eval.n)
        check_stop()
        mono_n = stream.mono.scores()
        flat |= _mono_metrics(mono_n)
        purity_flat, purity_protocol, purity_n = _purity_metrics(stream, eval, cfg)
        family.done("MonoScore and purity")
        check_stop()
        probe_flat, probe_curves, probe_protocol = _probe_metrics(
            sae, train, eval, stream, cfg, train_k, device, seed, probe_store)
        family.done("probes (truncated codes and raw embeddings)")
        check_stop()
        planted_flat, planted_protocol = _planted_metrics(sae, eval, train)
        inspection = _inspection(stream, eval, mono_n, cfg, out_dir, seed)
        per_latent = {"monoscore": mono_n, "firing_count": stream.firing.counts_n}
        if purity_n is not None:
            per_latent |= {f"purity_{k}": v for k, v in purity_n._asdict().items() if v is not None}
        per_latent_file = _write_per_latent(out_dir, per_latent)
        family.done("planted atoms, contact sheets, per-latent file")
    finally:
        sae.train(was_training)
    flat |= purity_flat | probe_flat | planted_flat
    protocols = PROTOCOLS | {"similarity": similarity_protocol, "purity": purity_protocol,
                             "probe": probe_protocol, "planted": planted_protocol,
                             "inspection": inspection["protocol"]}
    result = {"n_eval": eval.n, "n_latents": sae.n_latents, "train_k": train_k, **flat,
              "eval_seconds": round(time.perf_counter() - started, 3),
              "curves": curves | probe_curves, "protocols": protocols,
              "inspection": {k: v for k, v in inspection.items() if k != "protocol"},
              "per_latent_file": per_latent_file}
    return _json_safe(result)
