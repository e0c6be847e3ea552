"""The fast step (sae.training.fast) against the reference objective (sae.training.losses.training_loss).

Values and the gradient of every parameter must agree to float tolerance, for each regularizer
x mask, tied and untied weights, LayerNorm on and off, with no dead latent, fewer dead latents
than aux_k and more, on both regularizer column paths (batch-active columns gathered, and all
columns), plus the edge cases: k = n, a batch of one, codes that are all zero. Every case also
checks that what it compares is not trivially zero, so a broken path cannot pass by vanishing.
``-k cuda`` selects the same checks on a CUDA device (skipped without one).
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from sae import regularizers
from sae.model import TopKSAE
from sae.regularizers import batch_active
from sae.training import fast
from sae.training.fast import (
    Formulation,
    active_capacity,
    fast_training_loss,
    make_plan,
    penalties,
    topk_by_chunks,
)
from sae.training.fast.sparse import support_dots, support_dots_gathered
from sae.training.fast.topk import group_size
from sae.training.losses import training_loss
from sae.training.trainer import dead_count_bound

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one CPU thread is faster

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device")]),
]
REGULARIZERS = ["none", "offsupport_l1", "l1l2"]
D, N, K, AUX_K = 16, 256, 4, 6
# The masked penalty's columns: B k <= n / 2 bounds |A| on the host ("gathered"; on the CPU the
# exact |A| is gathered, elsewhere B k columns, the active ones padded with inactive ones);
# "padded" forces the bound on the CPU too; on the CPU the exact |A| (~0.34 n at B = 48) is
# read too ("counted"); "dense" forbids gathering.
BATCH = {"gathered": 24, "padded": 24, "counted": 48, "dense": 96}
# The two formulations of the k-sparse parts (sae.training.fast.Formulation), each on any device:
# gathers / embedding-bags with Top-k by group maxima (the CPU's), and products with the dense
# code with torch.topk (CUDA's under bf16).
FORMULATIONS = {"sparse": Formulation("sparse", "chunks"), "dense": Formulation("dense", "plain")}


@pytest.fixture(params=list(FORMULATIONS))
def formulation(request) -> Formulation:
    """The formulation a test's fast steps are asked for (an explicit argument of each)."""
    return FORMULATIONS[request.param]


def make_model(*, d=D, n=N, k=K, tied=False, layernorm=False, device="cpu", seed=0) -> TopKSAE:
    """An SAE whose biases and (untied) encoder differ from the initialisation, so every
    parameter's gradient is exercised."""
    torch.manual_seed(seed)
    model = TopKSAE(d, n, k, tied=tied, layernorm=layernorm)
    with torch.no_grad():
        model.b_enc.normal_(0, 0.2)
        model.b_pre.normal_(0, 0.1)
        if not tied:
            model.W_enc_untied.add_(0.3 * torch.randn_like(model.W_enc_untied))
    return model.to(device)


def unit_batch(batch: int, d: int = D, device="cpu", seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(batch, d, generator=g), dim=1).to(device)


def dead_mask(n_dead: int, n: int = N, device="cpu", seed=2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dead = torch.zeros(n, dtype=torch.bool)
    dead[torch.randperm(n, generator=g)[:n_dead]] = True
    return dead.to(device)


def loss_kwargs(regularizer="none", mask=True, dead=None, strength=0.3, aux_alpha=1 / 32,
                aux_k=AUX_K, n=N, device="cpu") -> dict:
    dead = dead_mask(0, n, device) if dead is None else dead
    return {"regularizer": regularizer, "strength": strength, "mask": mask, "eps": 1e-8,
            "dead": dead, "aux_alpha": aux_alpha, "aux_k": aux_k}


def evaluate(loss_fn, model: TopKSAE, x: torch.Tensor, kwargs: dict, part: str = "total"):
    """(loss parts, output, gradient of every parameter) after ``part.backward()``."""
    model.zero_grad(set_to_none=True)
    parts, out = loss_fn(model, x, **kwargs)
    getattr(parts, part).backward()
    grads = {name: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
             for name, p in model.named_parameters()}
    return parts, out, grads


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rel: float = 2e-5):
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rel * 10, atol=rel * scale + 1e-6,
                               msg=lambda m: f"{what}: {m}")


def assert_same_step(model: TopKSAE, x: torch.Tensor, kwargs: dict, part: str = "total",
                     rel: float = 2e-5, formulation: Formulation = fast.AUTO,
                     compiled: bool = False) -> tuple:
    """Fast (in ``formulation``, kernels ``compiled`` or not) and reference agree on every loss
    part and every parameter gradient."""
    ref_parts, ref_out, ref_grads = evaluate(training_loss, model, x, kwargs, part)
    fast_kwargs = {**kwargs, "formulation": formulation, "compiled": compiled}
    parts, out, grads = evaluate(fast_training_loss, model, x, fast_kwargs, part)
    ref_parts = type(ref_parts)(*(p.detach() for p in ref_parts))
    for name in ("total", "nmse", "auxk", "penalty"):
        assert_close(getattr(parts, name).detach(), getattr(ref_parts, name).detach(), name, rel)
    assert_close(out.x_hat, ref_out.x_hat.detach(), "x_hat", rel)
    assert out.code.indices.shape == ref_out.code.indices.shape
    assert out.code.indices.dtype == torch.int64
    for name, g in ref_grads.items():
        assert_close(grads[name], g, f"grad {name}", rel)
    return ref_parts, ref_grads


# -- equivalence over the grid ----------------------------------------------------------------
def check_case(regularizer, mask, tied, layernorm, n_dead, path, device, monkeypatch,
               formulation=fast.AUTO):
    if path == "dense":
        monkeypatch.setattr(penalties, "GATHER_FRACTION", -1.0)
    if path == "padded":
        monkeypatch.setattr(penalties, "READ_COUNT_ON_CPU", False)
    model = make_model(tied=tied, layernorm=layernorm, device=device)
    x = unit_batch(BATCH[path], device=device)
    kwargs = loss_kwargs(regularizer, mask, dead_mask(n_dead, device=device), device=device)
    plan = make_plan(model, x, dead_bound=None, formulation=formulation, **kwargs)
    if formulation.decoder != "auto":  # the formulation asked for is the one tested
        assert plan.dense_decoder == (formulation.decoder == "dense")
        assert plan.chunked_topk == (formulation.topk == "chunks")
    assert (plan.active_cols < N) == (mask and regularizer != "none"
                                      and path in ("gathered", "padded"))
    ref_parts, ref_grads = assert_same_step(model, x, kwargs, formulation=formulation)
    if mask and regularizer != "none":  # which columns the masked penalty works on
        active = batch_active(training_loss(model, x, **kwargs)[1].code.indices, N)
        capacity = active_capacity(plan, active)
        assert (capacity is not None) == (path in ("gathered", "padded")
                                          or (path == "counted" and device == "cpu"))
        if path == "padded":  # inactive columns really are among the gathered ones
            assert capacity > int(active.sum())
    # Non-trivial: each part that should act does, and every parameter gets a gradient.
    assert (float(ref_parts.penalty) > 0) == (regularizer != "none")
    assert (float(ref_parts.auxk) > 0) == (n_dead > 0)
    assert all(float(g.abs().max()) > 0 for g in ref_grads.values())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layernorm", [False, True], ids=["noln", "ln"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("mask", [True, False], ids=["mask", "nomask"])
@pytest.mark.parametrize("regularizer", REGULARIZERS)
def test_matches_reference(regularizer, mask, tied, layernorm, device, monkeypatch, formulation):
    """Every regularizer x mask x tied x LayerNorm; 3 dead latents (< aux_k: AuxK on all of
    them); masked penalties on the gathered batch-active columns."""
    check_case(regularizer, mask, tied, layernorm, 3, "gathered", device, monkeypatch,
               formulation)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_dead", [0, 20], ids=["nodead", "dead>aux_k"])
@pytest.mark.parametrize("mask", [True, False], ids=["mask", "nomask"])
@pytest.mark.parametrize("regularizer", REGULARIZERS)
@pytest.mark.parametrize("path", ["counted", "dense"])
def test_matches_reference_more_columns(regularizer, mask, n_dead, path, device, monkeypatch,
                                        formulation):
    """No dead latent (AuxK an exact zero, skipped) and more dead latents than aux_k (a Top-k
    among them); masked penalties on the counted active columns, or on all n."""
    check_case(regularizer, mask, False, False, n_dead, path, device, monkeypatch, formulation)


@pytest.mark.parametrize("n_dead", [3, 20], ids=["dead<aux_k", "dead>aux_k"])
@pytest.mark.parametrize("regularizer", ["offsupport_l1", "l1l2"])
def test_matches_reference_on_padded_columns_on_the_cpu(regularizer, n_dead, monkeypatch,
                                                         formulation):
    """The masked penalty on B k gathered columns, the inactive ones among them held at 0 (the
    CUDA path), run on the CPU."""
    check_case(regularizer, True, False, False, n_dead, "padded", "cpu", monkeypatch,
               formulation)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("regularizer", REGULARIZERS)
def test_matches_reference_tied_layernorm_many_dead(regularizer, device, monkeypatch, formulation):
    check_case(regularizer, True, True, True, 20, "dense", device, monkeypatch, formulation)


@pytest.mark.parametrize("folded", [True, False], ids=["folded", "unfolded"])
@pytest.mark.parametrize("path,mask", [("gathered", True), ("dense", True), ("dense", False)])
@pytest.mark.parametrize("regularizer", ["offsupport_l1", "l1l2"])
def test_penalty_row_scale_paths(regularizer, path, mask, folded, monkeypatch):
    """The penalty gradient's row scale factored into the product's (B, d) input (the CPU's
    default) or applied on the (B, m) pass (other devices, compiled kernels, a scale out of
    range); with AuxK folded into the penalised columns or added apart."""
    if not folded:
        monkeypatch.setattr(penalties, "FOLD_RANGE", (float("inf"), float("inf")))
    assert penalties.foldable(torch.tensor([0.01])) == folded
    check_case(regularizer, mask, False, False, 20, path, "cpu", monkeypatch)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("part", ["nmse", "auxk", "penalty"])
def test_gradient_of_each_part(part, device, formulation):
    """Backward from one part alone (the others' gradients are None in the Function)."""
    model = make_model(device=device)
    kwargs = loss_kwargs("l1l2", True, dead_mask(3, device=device), device=device)
    assert_same_step(model, unit_batch(40, device=device), kwargs, part=part,
                     formulation=formulation)


@pytest.mark.parametrize("regularizer", REGULARIZERS)
def test_k_equals_n(regularizer, formulation):
    model = make_model(n=32, k=32)
    x = unit_batch(16)
    kwargs = loss_kwargs(regularizer, True, dead_mask(2, n=32), n=32, aux_k=8)
    assert_same_step(model, x, kwargs, formulation=formulation)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("regularizer", REGULARIZERS)
def test_batch_of_one(regularizer, tied, formulation):
    """The batch variance is 0 (floored): huge but finite values, still equal."""
    model = make_model(tied=tied)
    kwargs = loss_kwargs(regularizer, True, dead_mask(3))
    assert_same_step(model, unit_batch(1), kwargs, formulation=formulation)


@pytest.mark.parametrize("regularizer", REGULARIZERS)
def test_all_zero_codes(regularizer, formulation):
    """Every pre-activation negative: the codes and the penalties are 0 (AuxK is not: it
    predicts a zero residual)."""
    model = make_model()
    with torch.no_grad():
        model.b_enc.fill_(-10.0)
    x = unit_batch(24)
    kwargs = loss_kwargs(regularizer, True, dead_mask(3))
    ref_parts, ref_grads = assert_same_step(model, x, kwargs, formulation=formulation)
    assert float(ref_parts.penalty) == 0 and float(ref_parts.auxk) > 0
    assert float(ref_grads["b_pre"].abs().max()) > 0  # the reconstruction still pulls b_pre


def test_zero_input_and_biases(formulation):
    """x = 0 and zero biases: pre is exactly 0 everywhere (all ties); every value is 0."""
    model = make_model()
    with torch.no_grad():
        model.b_enc.zero_()
        model.b_pre.zero_()
    x = torch.zeros(8, D)
    assert_same_step(model, x, loss_kwargs("l1l2", True, dead_mask(3)), formulation=formulation)


@pytest.mark.slow
@pytest.mark.parametrize("mask", [True, False], ids=["mask", "nomask"])
@pytest.mark.parametrize("regularizer", ["offsupport_l1", "l1l2"])
def test_compiled_kernels_match_reference(regularizer, mask):
    """``compiled=True`` (train.compile): the fused kernels through torch.compile (the first
    call compiles, ~70 s on 2 cores)."""
    model = make_model()
    kwargs = loss_kwargs(regularizer, mask, dead_mask(3))
    plan = make_plan(model, unit_batch(48), dead_bound=None, compiled=True, **kwargs)
    assert plan.kernels is not regularizers.get(regularizer).kernels
    assert_same_step(model, unit_batch(48), kwargs, compiled=True)


def test_strength_zero_still_reports_the_penalty():
    model = make_model()
    kwargs = loss_kwargs("offsupport_l1", True, strength=0.0)
    ref_parts, _ = assert_same_step(model, unit_batch(24), kwargs)
    assert float(ref_parts.penalty) > 0


def test_dead_bound_paths():
    """A host bound above the dead count (CUDA's case) and all n columns (CUDA's default)."""
    model = make_model()
    x = unit_batch(40)
    dead = dead_mask(3)
    for bound in (3, 10, N):
        kwargs = loss_kwargs("l1l2", True, dead)
        ref_parts = evaluate(training_loss, model, x, kwargs)[0]
        parts, _ = fast_training_loss(model, x, dead_bound=bound, **kwargs)
        assert_close(parts.auxk.detach(), ref_parts.auxk.detach(), f"auxk (bound {bound})")
    kwargs = loss_kwargs("none", True, dead_mask(0))
    parts, _ = fast_training_loss(model, x, dead_bound=0, **kwargs)
    assert float(parts.auxk.detach()) == 0


def test_second_backward_is_refused():
    model = make_model()
    parts, _ = fast_training_loss(model, unit_batch(8), **loss_kwargs("offsupport_l1"))
    parts.total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once"):
        parts.total.backward()


def test_input_with_gradient_falls_back_to_the_reference():
    model = make_model()
    x = unit_batch(8).requires_grad_()
    parts, _ = fast_training_loss(model, x, **loss_kwargs("l1l2"))
    parts.total.backward()
    assert x.grad is not None and float(x.grad.abs().max()) > 0


def test_autocast_bf16_close_to_float32(formulation):
    """Autocast: the two dense products in bf16, the rest in float32 (loose tolerance)."""
    model = make_model(d=64, n=512, k=8)
    x = unit_batch(64, d=64)
    kwargs = loss_kwargs("l1l2", True, dead_mask(4, n=512), n=512)
    ref_parts, _, ref_grads = evaluate(training_loss, model, x, kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts, out = fast_training_loss(model, x, formulation=formulation, **kwargs)
    assert out.pre.dtype == torch.float32
    model.zero_grad(set_to_none=True)
    parts.total.backward()
    nmse, ref_nmse = float(parts.nmse.detach()), float(ref_parts.nmse.detach())
    assert abs(nmse - ref_nmse) < 0.02 * ref_nmse
    for name, g in ref_grads.items():
        cos = F.cosine_similarity(model.get_parameter(name).grad.flatten(), g.flatten(), dim=0)
        assert float(cos) > 0.95, name


# -- a whole optimizer step ---------------------------------------------------------------------
def trainer_step(model: TopKSAE, optimizer, x, loss_fn, kwargs) -> None:
    """What sae.training.trainer.train_step does around the loss."""
    optimizer.zero_grad(set_to_none=True)
    parts, _ = loss_fn(model, x, **kwargs)
    parts.total.backward()
    model.project_decoder_grad_()
    optimizer.step()
    model.normalize_decoder_()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("regularizer,tied", [("none", False), ("offsupport_l1", True),
                                              ("l1l2", False), ("l1l2", True)])
def test_optimizer_steps_give_the_same_weights(regularizer, tied, device, formulation):
    fast_model = make_model(tied=tied, device=device)
    ref_model = copy.deepcopy(fast_model)
    start = {name: p.detach().clone() for name, p in ref_model.named_parameters()}
    fast_opt = torch.optim.Adam(fast_model.parameters(), lr=1e-3)
    ref_opt = torch.optim.Adam(ref_model.parameters(), lr=1e-3)
    kwargs = loss_kwargs(regularizer, True, dead_mask(3, device=device), device=device)
    fast_kwargs = {**kwargs, "formulation": formulation}
    for step in range(3):
        x = unit_batch(48, device=device, seed=10 + step)
        trainer_step(fast_model, fast_opt, x, fast_training_loss, fast_kwargs)
        trainer_step(ref_model, ref_opt, x, training_loss, kwargs)
    for (name, p), (_, q) in zip(fast_model.named_parameters(), ref_model.named_parameters()):
        assert_close(p.detach(), q.detach(), name, rel=1e-4)
        assert not torch.equal(q.detach(), start[name]), f"{name} did not move"


# -- pieces -------------------------------------------------------------------------------------
@pytest.mark.parametrize("width,k", [(12288, 32), (8192, 64), (4096, 32), (256, 4), (96, 5),
                                     (64, 64), (7, 3)])
def test_topk_by_chunks_is_exact(width, k):
    g = torch.Generator().manual_seed(width + k)
    pre = torch.randn(37, width, generator=g)
    values, indices = topk_by_chunks(pre, k)
    assert torch.equal(pre.gather(1, indices), values)
    assert indices.unique(dim=1).shape[1] == k or k == 1
    expected = pre.topk(k, dim=1).values
    assert torch.equal(values.sort(dim=1).values, expected.sort(dim=1).values)


def test_topk_by_chunks_with_ties():
    """Integer-valued rows (many ties): the selected values are still the top k values."""
    g = torch.Generator().manual_seed(0)
    pre = torch.randint(-5, 6, (50, 4096), generator=g).float()
    values, indices = topk_by_chunks(pre, 32)
    assert torch.equal(pre.gather(1, indices), values)
    assert all(len(set(row.tolist())) == 32 for row in indices)
    assert torch.equal(values.sort(dim=1).values, pre.topk(32, dim=1).values.sort(dim=1).values)


def test_group_size_halves_the_work_or_declines():
    assert group_size(12288, 32) > 1 and group_size(8192, 64) > 1
    assert group_size(64, 32) == 1 and group_size(7, 3) == 1
    for width, k in itertools.product([256, 1024, 12288], [4, 32, 64]):
        c = group_size(width, k)
        assert c == 1 or 2 * (width // c + k * c) <= width


def test_support_dots_paths_agree():
    """The CPU sampled product and the gathered one used on other devices (in chunks)."""
    g = torch.Generator().manual_seed(0)
    grad, weight = torch.randn(50, 16, generator=g), torch.randn(300, 16, generator=g)
    indices = torch.rand(50, 300, generator=g).argsort(dim=1)[:, :7].sort(dim=1).values
    expected = (weight[indices] * grad.unsqueeze(1)).sum(dim=2)
    assert_close(support_dots(grad, weight, indices), expected, "sampled")
    assert_close(support_dots_gathered(grad, weight, indices, max_elements=1000), expected,
                 "gathered in chunks")


def test_dead_count_bound():
    counters = torch.tensor([0, 50, 90, 100, 120])
    assert dead_count_bound(counters, window=100, horizon_samples=0) == 2
    assert dead_count_bound(counters, window=100, horizon_samples=10) == 3
    assert dead_count_bound(counters, window=100, horizon_samples=100) == 5


def test_auto_formulation_by_device_and_dtype():
    """Dense products where tensor cores make them cheap (CUDA under 16-bit autocast or
    TF32); gathers elsewhere; a forced formulation wins everywhere."""
    resolved = fast.resolved_formulation
    assert resolved("cpu", None) == {"decoder": "sparse", "topk": "chunks"}
    assert resolved("cpu", torch.bfloat16)["decoder"] == "sparse"
    assert resolved("cuda", torch.bfloat16)["decoder"] == "dense"
    assert resolved("cuda", torch.float16)["decoder"] == "dense"
    assert resolved("cuda", None)["decoder"] == "sparse"  # float32 matmuls at full precision
    forced = Formulation("dense", "plain")
    assert resolved("cpu", None, forced) == {"decoder": "dense", "topk": "plain"}
    assert resolved("cuda", torch.bfloat16, Formulation(topk="plain"))["topk"] == "plain"
    with pytest.raises(ValueError, match="decoder must be one of"):
        Formulation("fused")
