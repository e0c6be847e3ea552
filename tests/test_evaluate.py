"""The evaluation stage: streamed numbers equal the one-shot metrics; keys, files, skips."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import r2_score as sk_r2_score

from sae import metrics as M
from sae.config import EvalConfig
from sae.data.types import EmbeddingSet
from sae.evaluation.evaluate import evaluate
from sae.evaluation.inspect import select_latents
from sae.io.plain import multiple_name
from sae.model import TopKSAE

D, N_LATENTS, K = 8, 32, 4


pytestmark = pytest.mark.usefixtures("one_thread")


def _image(i: int) -> Image.Image:
    return Image.new("L", (8, 8), color=(37 * i) % 256)


def _split(name: str, n: int, seed: int, *, labels: str | None = "single", images: bool = False,
           planted: torch.Tensor | None = None) -> EmbeddingSet:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(3, (n,), generator=gen)
    centers = torch.randn(3, D, generator=torch.Generator().manual_seed(99))
    x = F.normalize(centers[y] + 0.7 * torch.randn(n, D, generator=gen), dim=1)
    label_tensor = None
    if labels == "single":
        label_tensor = y
    elif labels == "multi":
        label_tensor = F.one_hot(y, 3).bool() | (torch.rand(n, 3, generator=gen) < 0.2)
        label_tensor[0] = False  # a sample with no label
    return EmbeddingSet(name=name, x=x, labels=label_tensor,
                        class_names=["a", "b", "c"] if labels else None,
                        image_getter=_image if images else None, planted_atoms=planted)


def _sae(seed: int = 0, layernorm: bool = False) -> TopKSAE:
    torch.manual_seed(seed)
    sae = TopKSAE(D, N_LATENTS, K, layernorm=layernorm)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.05)
    return sae


def _cfg(**overrides) -> EvalConfig:
    values = {"chunk_size": 17, "probe_m": [1, 2], "probe_epochs": 20, "inspect_latents": 2,
              "inspect_top_images": 5} | overrides
    return EvalConfig(**values)


def _run(tmp_path, train, evaluation, cfg=None, sae=None, **kwargs) -> dict:
    return evaluate(sae or _sae(), train, evaluation, cfg or _cfg(), K, tmp_path,
                    torch.device("cpu"), seed=0, **kwargs)


FLAT_KEYS = {
    "r2", "nmse", "fvu", "l0", "dead_count", "dead_fraction", "mono_live", "mono_dead0",
    "mono_median", "mono_p90", "purity_binary", "purity_weighted", "k_robust_r2_ratio_min",
    "probe_m1", "probe_m2", "probe_m4", "probe_raw", "n_eval", "n_latents", "train_k",
}


def test_all_keys_contact_sheets_and_strict_json(tmp_path):
    train, evaluation = _split("t", 150, 1), _split("e", 90, 2, images=True)
    metrics = _run(tmp_path, train, evaluation)
    assert FLAT_KEYS <= metrics.keys()
    # Robustness is keyed by the multiple of the training k, not by the absolute k'.
    assert {f"r2_at_{m}" for m in ("k_div4", "k_div2", "k", "k_x2", "k_x4")} <= metrics.keys()
    assert not [key for key in metrics if key.startswith("k_robust_r2_k")]
    assert set(metrics["curves"]["k_robustness"]) == {"1", "2", "4", "8", "16"}
    assert set(metrics["curves"]["probe"]) == {"1", "2", "4"}
    assert {"nmse", "similarity", "purity", "probe", "inspection", "monosemanticity"} <= \
        metrics["protocols"].keys()
    json.dumps(metrics, allow_nan=False)  # strict JSON: NaN became null
    index = tmp_path / metrics["inspection"]["index"]
    assert index.exists()
    selection = metrics["inspection"]["selection"]
    latents = [j for rule in selection.values() for j in rule]
    assert len(latents) == len(set(latents)) == 6
    html = index.read_text()
    for j in latents:
        sheet = tmp_path / "inspect" / f"latent_{j:05d}.png"
        assert sheet.exists() and sheet.name in html
        assert Image.open(sheet).size[0] > 0
    assert 0.0 <= metrics["probe_m1"] <= 1.0 and metrics["probe_raw"] > 0.8


@pytest.mark.parametrize("layernorm", [False, True])
def test_streamed_numbers_equal_one_shot_metrics(tmp_path, layernorm):
    train, evaluation = _split("t", 120, 3), _split("e", 100, 4)
    sae = _sae(1, layernorm)
    metrics = _run(tmp_path, train, evaluation, sae=sae)
    with torch.no_grad():
        out = sae(evaluation.x)
    dense = out.code.to_dense(N_LATENTS)
    assert metrics["r2"] == pytest.approx(
        sk_r2_score(evaluation.x.double().numpy(), out.x_hat.double().numpy()), abs=1e-6)
    assert metrics["nmse"] == pytest.approx(M.nmse(evaluation.x, out.x_hat), rel=1e-6)
    assert metrics["l0"] == pytest.approx(M.l0(dense))
    assert metrics["dead_count"] == int(M.dead_latents(dense).sum())
    summary = M.monosemanticity_summary(M.monosemanticity(dense, evaluation.x))
    assert metrics["mono_dead0"] == pytest.approx(summary.mean_dead0, abs=1e-9)
    assert metrics["mono_p90"] == pytest.approx(summary.p90, abs=1e-9)
    for weighted, key in [(False, "purity_binary"), (True, "purity_weighted")]:
        purity = M.class_purity(dense, evaluation.labels, weighted=weighted, n_classes=3)
        assert metrics[key] == pytest.approx(float(purity[~purity.isnan()].mean()), abs=1e-12)
    from safetensors.torch import load_file

    per_latent = load_file(str(tmp_path / metrics["per_latent_file"]))
    torch.testing.assert_close(per_latent["monoscore"], M.monosemanticity(dense, evaluation.x),
                               equal_nan=True)
    assert per_latent["firing_count"].tolist() == (dense > 0).sum(0).tolist()
    robust = M.k_robustness(sae, evaluation.x, _cfg().k_multiples, chunk_size=50)
    for k, r2 in robust.r2.items():
        assert metrics["curves"]["k_robustness"][str(k)] == pytest.approx(r2, abs=1e-9)
    for multiple in _cfg().k_multiples:  # the same numbers under r2_at_<multiple_name>
        k = max(1, round(multiple * K))
        assert metrics[f"r2_at_{multiple_name(multiple)}"] == pytest.approx(robust.r2[k],
                                                                            abs=1e-9)
    others = [r / robust.r2[K] for k, r in robust.r2.items() if k != K and robust.r2[K] > 0]
    expected = sum(others) / len(others) if others else None  # NaN is written as null
    assert metrics["k_robustness_mean_ratio"] == pytest.approx(expected)
    small = [metrics[f"probe_m{m}"] for m in (1, 2, 4) if f"probe_m{m}" in metrics]
    assert metrics["probe_small_m_mean"] == pytest.approx(sum(small) / len(small), abs=1e-12)


def test_purity_top_n_and_multilabel_map(tmp_path):
    train, evaluation = _split("t", 150, 5, labels="multi"), _split("e", 90, 6, labels="multi")
    sae = _sae(2)
    metrics = _run(tmp_path, train, evaluation, cfg=_cfg(purity_top_n=6), sae=sae)
    with torch.no_grad():
        dense = sae.encode(evaluation.x).to_dense(N_LATENTS)
    purity = M.class_purity(dense, evaluation.labels, top_n=6)
    assert metrics["purity_binary"] == pytest.approx(float(purity[~purity.isnan()].mean()))
    assert "top-6" in metrics["protocols"]["purity"]
    assert metrics["protocols"]["probe"].startswith("mAP")
    assert 0.0 < metrics["probe_raw"] <= 1.0


def test_without_labels_or_images_the_metrics_are_skipped_and_said(tmp_path):
    train, evaluation = _split("t", 100, 7, labels=None), _split("e", 60, 8, labels=None)
    metrics = _run(tmp_path, train, evaluation)
    assert not any(key.startswith(("purity", "probe")) for key in metrics)
    assert metrics["protocols"]["purity"].startswith("skipped")
    assert metrics["protocols"]["probe"].startswith("skipped")
    assert metrics["protocols"]["inspection"].startswith("skipped")
    assert metrics["inspection"]["index"] is None
    assert not (tmp_path / "inspect").exists()
    assert "r2" in metrics and "mono_live" in metrics


def test_planted_recovery_when_atoms_exist(tmp_path):
    sae = _sae(3)
    planted = sae.W_dec.detach()[:5].clone()  # the SAE holds these atoms exactly
    train = _split("t", 100, 9, planted=planted)
    evaluation = _split("e", 60, 10, planted=planted)
    metrics = _run(tmp_path, train, evaluation, sae=sae)
    assert metrics["planted_recovery"] == pytest.approx(1.0)
    assert metrics["planted_mean_max_cos"] == pytest.approx(1.0, abs=1e-6)


def test_similarity_embeddings_from_a_file(tmp_path):
    train, evaluation = _split("t", 100, 11), _split("e", 60, 12)
    other = torch.randn(60, 5, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "dino.npy"
    np.save(path, other.numpy())
    from_file = _run(tmp_path, train, evaluation, cfg=_cfg(similarity=f"file:{path}"))
    given = _run(tmp_path, train, evaluation, similarity_x=other)
    own = _run(tmp_path, train, evaluation)
    assert from_file["mono_live"] == pytest.approx(given["mono_live"], abs=1e-12)
    assert from_file["mono_live"] != pytest.approx(own["mono_live"], abs=1e-6)
    with pytest.raises(ValueError, match="rows"):
        _run(tmp_path, train, evaluation, similarity_x=other[:10])


def test_latent_selection_follows_its_rules():
    counts = torch.tensor([0, 50, 3, 20, 20, 7, 1, 9])
    mono = torch.tensor([float("nan"), 0.1, 0.99, 0.2, 0.3, 0.8, float("nan"), 0.5],
                        dtype=torch.float64)
    selection = select_latents(counts, mono, n_per_rule=2, min_firing=5, seed=0)
    assert selection["most_frequent"] == [1, 3]  # ties (3, 4) broken by the lower id
    assert selection["highest_mono"] == [5, 7]  # latent 2 scores 0.99 but fires on 3 < 5
    assert len(selection["random"]) == 2
    assert set(selection["random"]) <= {2, 4, 6}  # live, not yet chosen
    assert select_latents(counts, mono, 2, 5, seed=0) == selection
