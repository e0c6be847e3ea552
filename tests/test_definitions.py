"""Every training path and metric against its definition, by plain loops (issue 24).

The other tests compare paths with each other (fast == reference == packed); a bug planted in
all of them at once passes those. Here each path is held to a naive loop written from METHOD.md:

- AuxK (Gao et al. 2024): per row, the top-``aux_k`` *dead* latents by pre-activation, ReLU,
  decoded; NMSE of the residual, normalised by the residual's batch variance; exactly 0 without
  dead latents; no gradient reaches a live latent's encoder or decoder row.
- Firing means a > 0: an activation of 1e-6 fires, a selected 0 does not (l0, dead latents,
  firing counts, purity, and the evaluation's numbers).
- The regularizers with a large eps (0.5) as well as the default, where eps changes the value.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sae.model import TopKSAE
from sae.training.fast import fast_training_loss
from sae.training.losses import training_loss
from sae.training.packed import MemberSpec, PackCoefficients, PackedSAE, packed_training_loss

D, N, K, AUX_K, B = 12, 48, 3, 5, 40


def naive_auxk(model: TopKSAE, x: torch.Tensor, dead: torch.Tensor, aux_k: int) -> torch.Tensor:
    """AuxK by loops: the residual after the Top-k reconstruction, rebuilt from each row's
    largest dead pre-activations (at most aux_k of them, ReLU'd), as an NMSE."""
    with torch.no_grad():
        pre = (x - model.b_pre) @ model.W_enc.T + model.b_enc
        x_hat = model(x).x_hat
    residual = x - x_hat
    rebuilt = torch.zeros_like(residual)
    dead_ids = [j for j in range(model.n_latents) if dead[j]]
    if not dead_ids:
        return torch.zeros(())
    for i in range(x.shape[0]):
        ranked = sorted(dead_ids, key=lambda j: -float(pre[i, j]))[:aux_k]
        for j in ranked:
            rebuilt[i] += max(float(pre[i, j]), 0.0) * model.W_dec[j].detach()
    variance = ((residual - residual.mean(dim=0)) ** 2).sum()
    return ((rebuilt - residual) ** 2).sum() / variance


def naive_penalty(name: str, pre: torch.Tensor, support: torch.Tensor, mask: bool,
                  eps: float) -> float:
    """METHOD.md s3 by loops: z = ReLU(pre) on the penalised units (with the mask, those
    selected in the batch), off-support L1 = sum of z off each row's support / B, L1/L2 =
    mean over rows of ||z||_1 / (||z||_2 + eps)."""
    rows, n = pre.shape
    active = {int(j) for j in support.reshape(-1)}
    total = 0.0
    for i in range(rows):
        z = [max(float(pre[i, j]), 0.0) if (not mask or j in active) else 0.0 for j in range(n)]
        if name == "offsupport_l1":
            own = {int(j) for j in support[i]}
            total += sum(v for j, v in enumerate(z) if j not in own)
        else:
            l1, l2 = sum(z), sum(v * v for v in z) ** 0.5
            total += l1 / (l2 + eps) if l2 > 0 else 0.0
    return total / rows


def make_model(seed: int = 0) -> tuple[TopKSAE, torch.Tensor]:
    torch.manual_seed(seed)
    model = TopKSAE(D, N, K)
    x = F.normalize(torch.randn(B, D), dim=1)
    model.init_b_pre_(x)
    return model, x


def dead_mask(count: int) -> torch.Tensor:
    dead = torch.zeros(N, dtype=torch.bool)
    dead[torch.randperm(N, generator=torch.Generator().manual_seed(1))[:count]] = True
    return dead


def auxk_of_paths(model: TopKSAE, x: torch.Tensor, dead: torch.Tensor
                  ) -> dict[str, torch.Tensor]:
    """The AuxK value of the reference step, the fast step and a pack of one."""
    kwargs = dict(regularizer="none", strength=0.0, mask=True, eps=1e-8, dead=dead,
                  aux_alpha=1 / 32, aux_k=AUX_K)
    values = {"reference": training_loss(model, x, **kwargs)[0].auxk,
              "fast": fast_training_loss(model, x, **kwargs)[0].auxk,
              # A host bound above the dead count (what CUDA steps get): live columns among
              # the ones AuxK looks at, which it must hold at -inf.
              "fast, bound n": fast_training_loss(model, x, dead_bound=N, **kwargs)[0].auxk}
    pack = PackedSAE([model])
    coeffs = PackCoefficients.build([MemberSpec(K, "none", 0.0, True, 1e-8)], x.device)
    out = packed_training_loss(pack, x.unsqueeze(0), coeffs, dead_gn=dead.unsqueeze(0),
                               aux_alpha=1 / 32, aux_k=AUX_K)
    values["packed"] = out.parts.auxk[0]
    return values


@pytest.mark.parametrize("dead_count", [0, 2, 20])
def test_auxk_of_every_path_equals_its_definition(dead_count):
    """2 dead latents: fewer than aux_k (all of them are used); 20: the top aux_k of them."""
    model, x = make_model()
    dead = dead_mask(dead_count)
    expected = float(naive_auxk(model, x, dead, AUX_K))
    for path, value in auxk_of_paths(model, x, dead).items():
        assert float(value.detach()) == pytest.approx(expected, rel=1e-5, abs=1e-9), path
    if dead_count == 0:
        assert expected == 0.0
    else:
        assert expected > 0  # the comparison is not between zeros


def test_auxk_sends_no_gradient_to_live_latents():
    """The AuxK part of the gradient (total with alpha = 1 minus total with alpha = 0) is zero
    on every live latent's encoder and decoder rows, in every path, and not zero elsewhere."""
    model, x = make_model()
    dead = dead_mask(20)

    def grads(path: str, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        kwargs = dict(regularizer="none", strength=0.0, mask=True, eps=1e-8, dead=dead,
                      aux_alpha=alpha, aux_k=AUX_K)
        if path == "packed":
            pack = PackedSAE([model])
            coeffs = PackCoefficients.build([MemberSpec(K, "none", 0.0, True, 1e-8)], x.device)
            out = packed_training_loss(pack, x.unsqueeze(0), coeffs,
                                       dead_gn=dead.unsqueeze(0), aux_alpha=alpha, aux_k=AUX_K)
            out.parts.total.sum().backward()
            return pack.W_enc_untied.grad[0].clone(), pack.W_dec.grad[0].clone()
        loss = training_loss if path == "reference" else fast_training_loss
        loss(model, x, **kwargs)[0].total.backward()
        return model.W_enc_untied.grad.clone(), model.W_dec.grad.clone()

    for path in ("reference", "fast", "packed"):
        with_aux, without = grads(path, 1.0), grads(path, 0.0)
        for name, a, b in zip(("W_enc", "W_dec"), with_aux, without):
            aux_part = a - b
            assert float(aux_part[~dead].abs().max()) <= 1e-6, (path, name)
            assert float(aux_part[dead].abs().max()) > 1e-4, (path, name)


# -- firing means > 0 -----------------------------------------------------------------------------
def tiny_activation_model() -> TopKSAE:
    """Every sample selects latent 1 (0.5), latent 0 (1e-6) and latent 2 (exactly 0: selected
    by Top-k but not firing)."""
    model = TopKSAE(D, N, 3)
    with torch.no_grad():
        model.W_enc_untied.zero_()
        model.b_enc.fill_(-1.0)
        model.b_enc[:3] = torch.tensor([1e-6, 0.5, 0.0])
        model.b_pre.zero_()
    return model


def test_firing_means_positive_in_the_metrics_against_a_dense_loop():
    from sae.metrics import FiringCounter, class_purity, dead_latents, l0

    model = tiny_activation_model()
    x = F.normalize(torch.randn(30, D, generator=torch.Generator().manual_seed(0)), dim=1)
    code = model.encode(x)
    dense = code.to_dense(N)
    fires = [[float(dense[i, j]) > 0 for j in range(N)] for i in range(30)]
    naive_l0 = sum(sum(row) for row in fires) / 30
    naive_dead = [not any(row[j] for row in fires) for j in range(N)]
    assert naive_l0 == 2 and naive_dead[0] is False and naive_dead[2] is True
    assert l0(tuple(code), N) == naive_l0
    assert dead_latents(tuple(code), N).tolist() == naive_dead
    counter = FiringCounter(N)
    counter.update(code)
    assert counter.counts_n.tolist() == [sum(row[j] for row in fires) for j in range(N)]
    labels = torch.arange(30) % 3
    purity = class_purity(tuple(code), labels, n_latents=N)
    for j in range(N):  # binary purity over the images where latent j fires
        images = [i for i in range(30) if fires[i][j]]
        if images:
            best = max(sum(1 for i in images if labels[i] == c) for c in range(3)) / len(images)
            assert float(purity[j]) == pytest.approx(best), j
        else:
            assert torch.isnan(purity[j]), j


def test_firing_means_positive_in_the_evaluation(tmp_path, caplog):
    from sae.config import EvalConfig
    from sae.data.types import EmbeddingSet
    from sae.evaluation.evaluate import evaluate

    model = tiny_activation_model()
    x = F.normalize(torch.randn(64, D, generator=torch.Generator().manual_seed(0)), dim=1)
    labels = torch.arange(64) % 4
    split = EmbeddingSet("t", x, labels)
    cfg = EvalConfig(probe_max_train=64, probe_epochs=2, inspect_top_images=0)
    with caplog.at_level("INFO", logger="sae.evaluation.evaluate"):
        metrics = evaluate(model, split, split, cfg, 3, tmp_path, torch.device("cpu"))
    families = [r.message for r in caplog.records if r.message.startswith("evaluation: ")]
    assert len(families) == 4 and all(" s" in line for line in families)  # one per family
    assert metrics["l0"] == 2.0  # latent 0 at 1e-6 fires, latent 2 at 0 does not
    assert metrics["dead_count"] == N - 2


# -- eps ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("eps", [1e-8, 0.5])
@pytest.mark.parametrize("mask", [True, False])
@pytest.mark.parametrize("name", ["offsupport_l1", "l1l2"])
def test_penalties_of_every_path_equal_the_definition(name, mask, eps):
    """eps = 0.5 moves the L1/L2 ratio by far more than rounding: a path that drops eps fails."""
    model, x = make_model(3)
    dead = torch.zeros(N, dtype=torch.bool)
    kwargs = dict(regularizer=name, strength=0.1, mask=mask, eps=eps, dead=dead,
                  aux_alpha=0.0, aux_k=AUX_K)
    parts, out = training_loss(model, x, **kwargs)
    expected = naive_penalty(name, out.pre.detach(), out.code.indices, mask, eps)
    values = {"reference": parts.penalty,
              "fast": fast_training_loss(model, x, **kwargs)[0].penalty}
    pack = PackedSAE([model])
    coeffs = PackCoefficients.build([MemberSpec(K, name, 0.1, mask, eps)], x.device)
    packed = packed_training_loss(pack, x.unsqueeze(0), coeffs, dead_gn=dead.unsqueeze(0),
                                  aux_alpha=0.0, aux_k=AUX_K)
    values["packed"] = packed.parts.penalty[0]
    for path, value in values.items():
        assert float(value.detach()) == pytest.approx(expected, rel=1e-5), path
    if name == "l1l2" and eps == 0.5:  # eps matters here: without it the value differs
        assert naive_penalty(name, out.pre.detach(), out.code.indices, mask, 0.0) > \
            expected * 1.05
