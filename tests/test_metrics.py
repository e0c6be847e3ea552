"""sae.metrics against naive references written here (METHOD.md s4: each metric must match one).

The references are deliberately slow and literal: explicit i < l loops for the MonoScore of
Pach et al., scikit-learn for R^2 and average precision, per-latent loops for purity.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score
from sklearn.metrics import r2_score as sk_r2_score

from sae import metrics as M
from sae.model import SparseCode, TopKSAE

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# naive references


def naive_monoscore(codes_nn: np.ndarray, emb_nd: np.ndarray) -> np.ndarray:
    """Pach et al.: min-max scale each latent; sum_{i<l} t_i t_l cos(e_i, e_l) / sum t_i t_l."""
    n_samples, n_latents = codes_nn.shape
    unit = emb_nd / np.linalg.norm(emb_nd, axis=1, keepdims=True)
    scores = np.full(n_latents, np.nan)
    for j in range(n_latents):
        a = codes_nn[:, j].astype(np.float64)
        lo, hi = a.min(), a.max()
        if not a.any() or hi == lo:
            continue  # never fires, or t is 0/0
        t = (a - lo) / (hi - lo)
        num = den = 0.0
        for i in range(n_samples):
            for m in range(i + 1, n_samples):
                weight = t[i] * t[m]
                num += weight * float(unit[i] @ unit[m])
                den += weight
        if den > 0:
            scores[j] = num / den
    return scores


def naive_purity(codes_nn: np.ndarray, labels: np.ndarray, weighted: bool,
                 top_n: int | None = None) -> np.ndarray:
    """Loop over latents and their firing samples; labels (N,) ids (<0 = none) or (N, C) bool."""
    n_samples, n_latents = codes_nn.shape
    out = np.full(n_latents, np.nan)
    for j in range(n_latents):
        firing = [i for i in range(n_samples) if codes_nn[i, j] > 0]
        if top_n is not None:
            firing = sorted(firing, key=lambda i: -codes_nn[i, j])[:top_n]
        if not firing:
            continue
        per_class: dict[int, float] = {}
        total = 0.0
        for i in firing:
            w = float(codes_nn[i, j]) if weighted else 1.0
            total += w
            classes = (list(np.flatnonzero(labels[i])) if labels.ndim == 2
                       else ([int(labels[i])] if labels[i] >= 0 else []))
            for c in classes:
                per_class[c] = per_class.get(c, 0.0) + w
        out[j] = max(per_class.values(), default=0.0) / total
    return out


def special_codes(seed: int, n_samples: int = 24, n_latents: int = 12) -> np.ndarray:
    """Random sparse non-negative codes with every edge case METHOD.md's metrics must survive.

    column 0: never fires; 1: fires on every sample (min > 0, the min-max shift matters);
    2: constant value on a subset; 3: constant on every sample (MonoScore undefined);
    4: fires on exactly one sample (no pair, MonoScore undefined); the rest: random sparse.
    """
    rng = np.random.default_rng(seed)
    shape = (n_samples, n_latents)
    codes = rng.exponential(1.0, shape) * (rng.random(shape) < 0.4)
    codes[:, 0] = 0.0
    codes[:, 1] = 0.5 + rng.random(n_samples)
    codes[:, 2] = np.where(rng.random(n_samples) < 0.5, 0.7, 0.0)
    codes[: 2, 2] = 0.7  # at least two firing samples
    codes[:, 3] = 1.3
    codes[:, 4] = 0.0
    codes[n_samples // 2, 4] = 2.0
    return codes.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# reconstruction


def test_r2_matches_sklearn_uniform_average():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=gen) * torch.linspace(0.1, 3, 16)
    x_hat = x + 0.4 * torch.randn(300, 16, generator=gen)
    expected = sk_r2_score(x.double().numpy(), x_hat.double().numpy())
    assert M.r2_score(x, x_hat) == pytest.approx(expected, abs=1e-12)


def test_r2_leaves_out_constant_dimensions_nmse_uses_total_variance():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(200, 6, generator=gen)
    x[:, 2] = 0.25  # constant: excluded from R^2 (scikit-learn would score it 0 here)
    x_hat = x + 0.3 * torch.randn(200, 6, generator=gen)
    varying = [0, 1, 3, 4, 5]
    expected = sk_r2_score(x[:, varying].double().numpy(), x_hat[:, varying].double().numpy())
    scores = M.reconstruction_scores(x, x_hat)
    assert scores.r2 == pytest.approx(expected, abs=1e-12)
    assert scores.n_constant_dims == 1
    xd, xhd = x.double(), x_hat.double()
    nmse_ref = float((xhd - xd).square().sum() / (xd - xd.mean(0)).square().sum())
    assert scores.nmse == pytest.approx(nmse_ref, rel=1e-12)
    assert M.nmse(x, x_hat) == M.fvu(x, x_hat) == scores.nmse
    weighted = sk_r2_score(x.double().numpy(), x_hat.double().numpy(),
                           multioutput="variance_weighted")
    assert scores.r2_variance_weighted == pytest.approx(weighted, abs=1e-12)


def test_r2_accumulator_streaming_equals_one_shot():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(101, 8, generator=gen) + 5.0  # an offset makes naive sum-of-squares cancel
    x_hat = x + 0.1 * torch.randn(101, 8, generator=gen)
    acc = M.R2Accumulator()
    for start, stop in [(0, 1), (1, 40), (40, 41), (41, 101)]:
        acc.update(x[start:stop], x_hat[start:stop])
    streamed, one_shot = acc.result(), M.reconstruction_scores(x, x_hat)
    assert streamed.r2 == pytest.approx(one_shot.r2, abs=1e-12)
    assert streamed.nmse == pytest.approx(one_shot.nmse, rel=1e-10)


def test_l0_and_dead_latents_dense_and_sparse():
    codes = torch.from_numpy(special_codes(3))
    expected_l0 = float((codes > 0).sum()) / codes.shape[0]
    expected_dead = [not codes[:, j].any() for j in range(codes.shape[1])]
    sparse, n = M.as_sparse(codes)
    assert torch.equal(sparse.to_dense(n), codes)
    for form, n_latents in [(codes, None), (tuple(sparse), n)]:
        assert M.l0(form, n_latents) == pytest.approx(expected_l0)
        assert M.dead_latents(form, n_latents).tolist() == expected_dead
    assert expected_dead[0] and sum(expected_dead) == 1


def test_sparse_codes_need_n_latents():
    with pytest.raises(ValueError, match="n_latents"):
        M.l0((torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long)))


# ---------------------------------------------------------------------------------------------
# MonoScore


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_monoscore_matches_pairwise_reference(seed):
    codes = special_codes(seed)
    emb = np.random.default_rng(100 + seed).normal(size=(codes.shape[0], 5))
    expected = naive_monoscore(codes, emb)
    got = M.monosemanticity(torch.from_numpy(codes), torch.from_numpy(emb)).numpy()
    assert np.array_equal(np.isnan(got), np.isnan(expected))
    assert np.isnan(expected[[0, 3, 4]]).all() and not np.isnan(expected[[1, 2]]).any()
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)


def test_monoscore_shift_matters_for_a_latent_firing_everywhere():
    codes = special_codes(4)
    rng = np.random.default_rng(7)
    high = codes[:, 1] > np.median(codes[:, 1])  # strong and weak activations point apart
    emb = np.where(high[:, None], [1.0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0])
    emb = emb + 0.1 * rng.normal(size=(codes.shape[0], 5))
    got = M.monosemanticity(torch.from_numpy(codes), torch.from_numpy(emb))
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    a = codes[:, 1].astype(np.float64)  # without the shift: t = a / max(a)
    t = a / a.max()
    gram = unit @ unit.T
    upper = np.triu(np.ones_like(gram), 1)
    unshifted = (np.outer(t, t) * gram * upper).sum() / (np.outer(t, t) * upper).sum()
    assert abs(float(got[1]) - unshifted) > 0.05
    assert float(got[1]) == pytest.approx(naive_monoscore(codes, emb)[1], abs=1e-10)


def test_monoscore_sparse_streamed_equals_dense():
    codes = torch.from_numpy(special_codes(5, n_samples=40))
    emb = torch.randn(40, 6, generator=torch.Generator().manual_seed(5))
    dense = M.monosemanticity(codes, emb)
    sparse, n = M.as_sparse(codes)
    streamed = M.monosemanticity(tuple(sparse), emb, n_latents=n, chunk_size=7)
    torch.testing.assert_close(streamed, dense, rtol=1e-10, atol=1e-12, equal_nan=True)


def test_monoscore_single_sample_is_undefined():
    scores = M.monosemanticity(torch.tensor([[0.0, 1.0, 2.0]]), torch.randn(1, 4))
    assert torch.isnan(scores).all()


def test_monoscore_identical_embeddings_give_one():
    codes = torch.from_numpy(special_codes(6))
    emb = torch.ones(codes.shape[0], 3)  # every pair has cosine 1
    scores = M.monosemanticity(codes, emb)
    defined = ~torch.isnan(scores)
    torch.testing.assert_close(scores[defined], torch.ones(int(defined.sum()), dtype=torch.float64))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), latent=st.integers(0, 11),
       scale=st.floats(1e-3, 1e3, allow_nan=False))
def test_monoscore_invariant_to_positive_scaling(seed, latent, scale):
    codes = torch.from_numpy(special_codes(seed)).double()
    emb = torch.randn(codes.shape[0], 4, generator=torch.Generator().manual_seed(seed))
    scaled = codes.clone()
    scaled[:, latent] *= scale
    torch.testing.assert_close(M.monosemanticity(scaled, emb), M.monosemanticity(codes, emb),
                               rtol=1e-8, atol=1e-10, equal_nan=True)


def test_monoscore_summary():
    scores = torch.tensor([float("nan"), 0.2, 0.4, 1.0, float("nan")], dtype=torch.float64)
    summary = M.monosemanticity_summary(scores)
    assert summary.mean_live == pytest.approx(1.6 / 3)
    assert summary.mean_dead0 == pytest.approx(1.6 / 5)
    assert summary.median == pytest.approx(0.4)
    assert summary.p90 == pytest.approx(np.percentile([0.2, 0.4, 1.0], 90))
    assert summary.n_scored == 3


# ---------------------------------------------------------------------------------------------
# class purity


def _labels_single(seed: int, n: int) -> np.ndarray:
    labels = np.random.default_rng(seed).integers(0, 4, n)
    labels[::7] = -1  # unlabelled: denominator only
    return labels


def _labels_multi(seed: int, n: int) -> np.ndarray:
    labels = np.random.default_rng(seed).random((n, 5)) < 0.35
    labels[0] = False  # a row with no label
    labels[1] = True  # a row with every label
    return labels


@pytest.mark.parametrize("multi", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("top_n", [None, 3])
def test_purity_matches_loop_reference(multi, weighted, top_n):
    codes = special_codes(8, n_samples=30)
    labels = _labels_multi(9, 30) if multi else _labels_single(9, 30)
    expected = naive_purity(codes, labels, weighted, top_n)
    got = M.class_purity(torch.from_numpy(codes), torch.from_numpy(labels), weighted=weighted,
                         top_n=top_n).numpy()
    assert np.isnan(got[0]) and np.isnan(expected[0])
    np.testing.assert_allclose(got, expected, rtol=1e-12, equal_nan=True)


@pytest.mark.parametrize("multi", [False, True])
def test_purity_top_class_is_the_class_behind_binary_purity(multi):
    codes = special_codes(8, n_samples=30)
    labels = _labels_multi(9, 30) if multi else _labels_single(9, 30)
    sparse, n = M.as_sparse(torch.from_numpy(codes))
    acc = M.PurityAccumulator(n, labels.shape[1] if multi else int(labels.max()) + 1)
    acc.update(sparse, torch.from_numpy(labels))
    scores = acc.result()
    for j in range(n):  # naive: count each class over the images where latent j fires
        firing = np.flatnonzero(codes[:, j] > 0)
        if firing.size == 0:
            assert scores.top_class[j] == -1
            continue
        rows = labels[firing].astype(int) if multi else np.eye(labels.max() + 1)[
            labels[firing][labels[firing] >= 0]]
        counts = rows.sum(0) if rows.size else np.zeros(1)
        assert scores.top_class[j] == int(np.argmax(counts)), j
        assert scores.binary[j] == pytest.approx(counts.max() / firing.size)


def test_purity_streamed_equals_one_shot():
    codes = torch.from_numpy(special_codes(10, n_samples=50))
    labels = torch.from_numpy(_labels_multi(11, 50))
    sparse, n = M.as_sparse(codes)
    acc = M.PurityAccumulator(n, labels.shape[1])
    for start in range(0, 50, 9):
        acc.update(SparseCode(sparse.values[start:start + 9], sparse.indices[start:start + 9]),
                   labels[start:start + 9])
    result = acc.result()
    torch.testing.assert_close(result.binary, M.class_purity(codes, labels), equal_nan=True)
    torch.testing.assert_close(result.weighted, M.class_purity(codes, labels, weighted=True),
                               equal_nan=True)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), cls=st.integers(0, 3), multi=st.booleans())
def test_purity_is_one_inside_one_class(seed, cls, multi):
    rng = np.random.default_rng(seed)
    n = 40
    ids = rng.integers(0, 4, n)
    ids[0] = cls
    codes = rng.exponential(1.0, (n, 3)) * (rng.random((n, 3)) < 0.5)
    codes[:, 1] = np.where(ids == cls, rng.exponential(1.0, n) + 1e-3, 0.0)
    labels = np.eye(4, dtype=bool)[ids] if multi else ids
    if multi:
        labels[:, (cls + 1) % 4] |= rng.random(n) < 0.5  # extra labels do not break purity
    for weighted in (False, True):
        got = M.class_purity(torch.from_numpy(codes), torch.from_numpy(labels), weighted=weighted)
        assert float(got[1]) == pytest.approx(1.0)


def test_top_activations_equal_a_full_sort():
    codes = torch.from_numpy(special_codes(12, n_samples=60))
    sparse, n = M.as_sparse(codes)
    top = M.TopActivations(n, 4)
    for start in range(0, 60, 11):
        top.update(SparseCode(sparse.values[start:start + 11], sparse.indices[start:start + 11]),
                   offset=start)
    for j in range(n):
        firing = torch.nonzero(codes[:, j] > 0).flatten().tolist()
        expected = sorted(firing, key=lambda i: -float(codes[i, j]))[:4]
        got = [i for i in top.samples_nt[j].tolist() if i >= 0]
        assert got == expected, j
        torch.testing.assert_close(top.values_nt[j, :len(got)],
                                   codes[expected, j].double())


# ---------------------------------------------------------------------------------------------
# k robustness


def _tiny_sae(seed: int = 0, d: int = 8, n: int = 32, k: int = 4, layernorm: bool = False
              ) -> TopKSAE:
    torch.manual_seed(seed)
    sae = TopKSAE(d, n, k, layernorm=layernorm)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_pre.normal_(0, 0.1)
    return sae


@pytest.mark.parametrize("layernorm", [False, True])
def test_k_robustness_matches_per_k_reference_with_one_encoder_pass(layernorm, monkeypatch):
    sae = _tiny_sae(layernorm=layernorm)
    x = F.normalize(torch.randn(70, 8, generator=torch.Generator().manual_seed(3)), dim=1)
    calls = []
    original = sae.encode_pre
    monkeypatch.setattr(sae, "encode_pre", lambda x_bd: calls.append(1) or original(x_bd))
    result = M.k_robustness(sae, x, multiples=(0.25, 0.5, 1, 2, 4), chunk_size=32)
    assert len(calls) == 3  # one encoder pass per chunk, not one per k'
    assert sorted(result.r2) == [1, 2, 4, 8, 16]
    with torch.no_grad():
        for k in result.r2:
            x_hat = original.__self__(x, k).x_hat
            expected = sk_r2_score(x.double().numpy(), x_hat.double().numpy())
            assert result.r2[k] == pytest.approx(expected, abs=1e-6)
    for k, ratio in result.ratio.items():  # an untrained SAE may have R^2(4) <= 0: no ratio
        expected = result.r2[k] / result.r2[4] if result.r2[4] > 0 else float("nan")
        assert ratio == pytest.approx(expected, nan_ok=True)


def test_inference_ks_are_clamped_and_include_train_k():
    assert M.inference_ks(64, [0.25, 0.5, 1, 2, 4], 8192) == [16, 32, 64, 128, 256]
    assert M.inference_ks(3, [0.1, 100], 10) == [1, 3, 10]


def test_k_robustness_ratio_is_undefined_for_a_non_positive_base():
    accumulators = {k: M.R2Accumulator() for k in (2, 4)}
    x = torch.randn(20, 3, generator=torch.Generator().manual_seed(0))
    x = x - x.mean(dim=0)  # then x_hat = x / 2 has R^2 = 1 - 1/4 exactly
    accumulators[2].update(x, x * 0.5)  # R^2 = 0.75
    accumulators[4].update(x, -x)  # R^2 = -3
    result = M.k_robustness_from(4, accumulators)
    assert math.isnan(result.ratio[2]) and math.isnan(result.min_ratio())
    assert result.r2[2] == pytest.approx(0.75, abs=1e-9)
    flipped = M.k_robustness_from(2, accumulators)
    assert flipped.ratio == pytest.approx({2: 1.0, 4: -3 / 0.75})
    assert flipped.min_ratio() == pytest.approx(-4.0)


# ---------------------------------------------------------------------------------------------
# truncated probe


def _sparse_problem(seed: int, n_samples: int, n_latents: int = 40, k: int = 6
                    ) -> tuple[SparseCode, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    indices = torch.rand(n_samples, n_latents, generator=gen).argsort(dim=1)[:, :k]
    values = torch.rand(n_samples, k, generator=gen) + 0.05
    return SparseCode(values, indices), SparseCode(values, indices).to_dense(n_latents)


def test_truncated_probe_recovers_a_linear_rule():
    n_latents, n_classes = 40, 4
    w_true = torch.randn(n_latents, n_classes, generator=torch.Generator().manual_seed(9))
    code_tr, dense_tr = _sparse_problem(0, 3000, n_latents)
    code_ev, dense_ev = _sparse_problem(1, 1000, n_latents)
    y_tr, y_ev = (dense_tr @ w_true).argmax(1), (dense_ev @ w_true).argmax(1)
    scores = M.truncated_probe(tuple(code_tr), y_tr, tuple(code_ev), y_ev, m_values=(1, 6),
                               n_latents=n_latents, weight_decay=1e-6, max_iter=200)
    assert scores[6] > 0.95  # the full code holds the rule
    assert scores[1] < scores[6] - 0.1  # one activation is not enough for a 6-term rule
    dense_scores = M.truncated_probe(dense_tr, y_tr, dense_ev, y_ev, m_values=(6,),
                                     weight_decay=1e-6, max_iter=200)
    assert dense_scores[6] == pytest.approx(scores[6], abs=0.02)


def test_truncation_keeps_the_largest_activation():
    n_latents = 30
    code_tr, _ = _sparse_problem(2, 2000, n_latents)
    code_ev, _ = _sparse_problem(3, 800, n_latents)

    def top_latent_class(code: SparseCode) -> torch.Tensor:
        return code.indices.gather(1, code.values.argmax(1, keepdim=True)).squeeze(1) % 3

    scores = M.truncated_probe(tuple(code_tr), top_latent_class(code_tr), tuple(code_ev),
                               top_latent_class(code_ev), m_values=(1,), n_latents=n_latents,
                               weight_decay=1e-6, max_iter=200)
    assert scores[1] > 0.97


def test_multilabel_probe_reports_map():
    n_latents = 40
    w_true = torch.randn(n_latents, 5, generator=torch.Generator().manual_seed(4))
    code_tr, dense_tr = _sparse_problem(5, 3000, n_latents)
    code_ev, dense_ev = _sparse_problem(6, 1000, n_latents)
    y_tr, y_ev = (dense_tr @ w_true) > 0.5, (dense_ev @ w_true) > 0.5
    assert M.probe_metric(y_ev) == "mAP"
    scores = M.truncated_probe(tuple(code_tr), y_tr, tuple(code_ev), y_ev, m_values=(6,),
                               n_latents=n_latents, weight_decay=1e-6, max_iter=200)
    assert scores[6] > 0.95
    shuffled = y_ev[torch.randperm(1000, generator=torch.Generator().manual_seed(0))]
    chance = M.truncated_probe(tuple(code_tr), y_tr, tuple(code_ev), shuffled, m_values=(6,),
                               n_latents=n_latents, max_iter=50)
    assert chance[6] < 0.7


def test_linear_probe_ceiling_on_raw_embeddings():
    gen = torch.Generator().manual_seed(7)
    centers = 2.0 * torch.randn(3, 10, generator=gen)
    y_tr, y_ev = torch.randint(3, (600,), generator=gen), torch.randint(3, (300,), generator=gen)
    x_tr = centers[y_tr] + torch.randn(600, 10, generator=gen)
    x_ev = centers[y_ev] + torch.randn(300, 10, generator=gen)
    accuracy = M.linear_probe(x_tr, y_tr, x_ev, y_ev, max_iter=100)
    nearest = torch.cdist(x_ev, centers).argmin(1)  # the Bayes rule for equal isotropic blobs
    bayes = float((nearest == y_ev).double().mean())
    assert accuracy > bayes - 0.03
    assert accuracy > 0.9


def test_mean_average_precision_matches_sklearn_per_class():
    rng = np.random.default_rng(0)
    y = rng.random((50, 4)) < 0.3
    y[:, 3] = False  # no positive: left out
    scores = rng.normal(size=(50, 4))
    expected = np.mean([average_precision_score(y[:, c], scores[:, c]) for c in range(3)])
    got = M.mean_average_precision(torch.from_numpy(y), torch.from_numpy(scores))
    assert got == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------
# dictionaries


def test_seed_stability_matches_full_cosine_matrix():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 8, generator=gen), torch.randn(37, 8, generator=gen)
    cos = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
    expected = 0.5 * (float(cos.max(1).values.mean()) + float(cos.max(0).values.mean()))
    assert M.seed_stability(a, b, chunk_size=7) == pytest.approx(expected, abs=1e-6)
    assert M.seed_stability(a, 3 * a[torch.randperm(50)]) == pytest.approx(1.0, abs=1e-6)
    assert M.seed_stability(a, -a) < 1.0  # signed: a negated atom is a different feature


def test_planted_recovery():
    gen = torch.Generator().manual_seed(1)
    planted = F.normalize(torch.randn(10, 16, generator=gen), dim=1)
    decoder = torch.cat([planted[:6] + 0.05 * torch.randn(6, 16, generator=gen),
                         torch.randn(20, 16, generator=gen)])
    best = (planted @ F.normalize(decoder, dim=1).T).max(1).values
    result = M.planted_recovery(decoder, planted, threshold=0.9)
    assert result.fraction == pytest.approx(float((best >= 0.9).double().mean()))
    assert result.fraction == pytest.approx(0.6)
    assert result.mean_max_cos == pytest.approx(float(best.mean()), abs=1e-6)
    assert not math.isnan(result.mean_max_cos)
