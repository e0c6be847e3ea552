"""The regularizer registry (sae.regularizers), and a penalty added from outside the package.

A toy penalty -- the plain L1 of ReLU(pre) on the mask, no fused kernels -- is registered from
this file alone and trained through the real trainer: the fast step differentiates it by
autograd through its ``pre`` (Top-k, decoder and AuxK still fused) and must agree with autograd
through the reference objective, in values and in every parameter gradient.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sae import regularizers
from sae.config import ConfigError, RegularizerConfig
from sae.data.synthetic import load_synthetic
from sae.model import TopKSAE
from sae.regularizers import Regularizer, batch_active
from sae.tracking import NullTracker
from sae.training.fast import Formulation, fast_training_loss, make_plan
from sae.training.fast.function import FusedLoss
from sae.training.loop import train_alone
from sae.training.losses import training_loss
from sae.training.trainer import Trainer
from tests.helpers import synthetic_cfg
from tests.test_fast import (
    FORMULATIONS,
    N,
    assert_close,
    assert_same_step,
    dead_mask,
    loss_kwargs,
    make_model,
    unit_batch,
)

pytestmark = pytest.mark.usefixtures("one_thread")
BUILTIN = ("none", "offsupport_l1", "l1l2")


def relu_l1(pre: torch.Tensor, support: torch.Tensor, mask: bool = True) -> torch.Tensor:
    """Mean over the batch of the L1 of ReLU(pre) on M (the batch-active units, or all)."""
    z = F.relu(pre)
    if mask:
        z = z * batch_active(support, pre.shape[1]).to(z.dtype)
    return z.sum() / pre.shape[0]


TOY = Regularizer(name="toy_relu_l1", penalty=relu_l1)


@pytest.fixture
def toy(monkeypatch) -> Regularizer:
    """TOY registered for one test; the registry is restored afterwards."""
    monkeypatch.setattr(regularizers, "_registered", dict(regularizers._registered))
    return regularizers.register(TOY)


# -- the registry --------------------------------------------------------------------------------
def test_names_and_get_cover_the_built_in_regularizers():
    assert regularizers.names() == BUILTIN
    for name in BUILTIN:
        reg = regularizers.get(name)
        assert isinstance(reg, Regularizer) and reg.name == name
    assert regularizers.get("none").kernels is None  # nothing to fuse: an exact zero
    assert regularizers.get("l1l2").fields == ("eps",)
    assert regularizers.BASELINE in BUILTIN


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(KeyError, match="unknown regularizer 'nope'; known: none, offsupport_l1, "
                                       "l1l2"):
        regularizers.get("nope")
    with pytest.raises(ValueError, match="unknown regularizer"):  # also a ValueError
        regularizers.get("nope")


def test_register_adds_a_name_once(toy):
    assert regularizers.names() == (*BUILTIN, "toy_relu_l1")
    assert regularizers.get("toy_relu_l1") is toy
    assert regularizers.register(TOY) is TOY  # the same object again: a no-op
    with pytest.raises(ValueError, match="already registered"):
        regularizers.register(Regularizer(name="toy_relu_l1", penalty=relu_l1))
    with pytest.raises(ValueError, match="already registered"):
        regularizers.register(Regularizer(name="l1l2", penalty=relu_l1))
    with pytest.raises(TypeError):
        regularizers.register("toy")


def test_binding_takes_the_penalty_fields_from_the_config():
    l1l2 = regularizers.get("l1l2")
    assert l1l2.params(eps=0.5, strength=1.0) == {"eps": 0.5}
    pre, support = torch.zeros(2, 4), torch.tensor([[0], [1]])
    pre[:, 0] = 1.0
    assert float(l1l2.bind(eps=1.0)(pre, support, False)) == pytest.approx(0.5)  # 1 / (1 + 1)
    with pytest.raises(TypeError, match="eps"):
        l1l2.bind()


def test_the_registry_imports_no_torch():
    code = ("import sys, sae.regularizers; names = sae.regularizers.names(); "
            "assert 'torch' not in sys.modules, 'torch imported'; print(','.join(names))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ",".join(BUILTIN)


def test_config_validation_reads_the_registry(toy):
    with pytest.raises(ConfigError, match="unknown regularizer 'nope'.*toy_relu_l1"):
        RegularizerConfig(name="nope")
    assert RegularizerConfig(name="toy_relu_l1", strength=0.1).name == "toy_relu_l1"


# -- the toy penalty through the fast step ---------------------------------------------------------
@pytest.mark.parametrize("formulation", list(FORMULATIONS))
@pytest.mark.parametrize("mask", [True, False], ids=["mask", "nomask"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_toy_penalty_matches_autograd_through_the_reference(toy, tied, mask, formulation):
    model = make_model(tied=tied)
    x = unit_batch(48)
    kwargs = loss_kwargs("toy_relu_l1", mask, dead_mask(20))
    plan = make_plan(model, x, dead_bound=None, **kwargs)
    assert plan.kernels is None and plan.active_cols == N  # nothing fused for the penalty
    ref_parts, ref_grads = assert_same_step(model, x, kwargs,
                                            formulation=FORMULATIONS[formulation])
    assert float(ref_parts.penalty) > 0 and float(ref_parts.auxk) > 0
    assert all(float(g.abs().max()) > 0 for g in ref_grads.values())


@pytest.mark.parametrize("part", ["total", "penalty"])
def test_toy_penalty_gradient_alone(toy, part):
    """Backward from the penalty alone: only the incoming gradient of pre acts."""
    model = make_model()
    kwargs = loss_kwargs("toy_relu_l1", True, dead_mask(3))
    assert_same_step(model, unit_batch(40), kwargs, part=part)


@pytest.mark.parametrize("regularizer", ["offsupport_l1", "l1l2"])
def test_a_fused_penalty_with_an_incoming_gradient_of_pre(regularizer):
    """The Function's pre is differentiable even when the penalty is fused: a loss on it adds
    its gradient to the fused penalty's (which then stays unfolded)."""
    model, x = make_model(), unit_batch(48)
    kwargs = loss_kwargs(regularizer, True, dead_mask(3))
    ref_parts, ref_out = training_loss(model, x, **kwargs)
    extra = 0.1 * ref_out.pre.square().mean()
    ref_grads = torch.autograd.grad(ref_parts.total + extra, list(model.parameters()))
    plan = make_plan(model, x, dead_bound=None, **kwargs)
    x_in, stats = model.standardize(x)
    total, *_rest = outputs = FusedLoss.apply(plan, x, x_in, stats, kwargs["dead"], model.W_dec,
                                              model.b_enc, model.b_pre, model.W_enc_untied)
    pre = outputs[5]
    grads = torch.autograd.grad(total + 0.1 * pre.square().mean(), list(model.parameters()))
    assert_close(total.detach(), ref_parts.total.detach(), "total")
    for (name, _), g, ref in zip(model.named_parameters(), grads, ref_grads):
        assert_close(g, ref, f"grad {name}")


# -- the toy penalty through the real trainer ------------------------------------------------------
def _train(cfg, x, path) -> tuple[TopKSAE, list[dict]]:
    torch.manual_seed(0)
    model = TopKSAE(x.shape[1], cfg.sae.n_latents, cfg.k)
    state = train_alone(Trainer(cfg, model, x, path, NullTracker(), {}))
    return model, state.history


def test_toy_penalty_trains_through_the_trainer_fast_and_reference_alike(toy, tmp_path):
    base = dict(reg="toy_relu_l1", strength=0.05, n_train=2000, batch=128, n_latents=256, k=4,
                max_steps=12, log_every=4)
    x = load_synthetic(synthetic_cfg(**base).dataset)[0].x
    fast, fast_history = _train(synthetic_cfg(**base), x, tmp_path / "fast.safetensors")
    ref, ref_history = _train(synthetic_cfg(fast_path=False, **base), x,
                              tmp_path / "ref.safetensors")
    assert len(fast_history) == len(ref_history) == 3
    for got, expected in zip(fast_history, ref_history):
        for key in ("loss", "nmse", "auxk", "penalty", "dead"):
            assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
    assert all(point["penalty"] > 0 for point in fast_history)  # the penalty did act
    start = TopKSAE(x.shape[1], 256, 4)
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        assert_close(p.detach(), q.detach(), name, rel=1e-4)
    assert not torch.equal(fast.b_enc.detach(), start.b_enc.detach())  # training moved it


def test_formulation_is_an_argument_not_a_setting():
    """Two calls with different formulations in one process: neither leaks into the other."""
    model, x = make_model(), unit_batch(24)
    kwargs = loss_kwargs("l1l2", True, dead_mask(3))
    dense = make_plan(model, x, dead_bound=None, formulation=Formulation("dense", "plain"),
                      **kwargs)
    auto = make_plan(model, x, dead_bound=None, **kwargs)
    assert dense.dense_decoder and not dense.chunked_topk
    assert not auto.dense_decoder and auto.chunked_topk
    parts, _ = fast_training_loss(model, x, formulation=Formulation("dense", "plain"), **kwargs)
    assert torch.isfinite(parts.total)


def test_the_step_benchmark_has_a_case_per_registered_regularizer(toy):
    from sae.benchmarks import step as bench

    record = bench.main(["--batch", "32", "--dim", "16", "--latents", "128", "--k", "4",
                         "--repeats", "1", "--no-tune-allocator", "--cases", "toy_relu_l1+mask"])
    assert [r["case"] for r in record] == ["toy_relu_l1+mask"]
    assert record[0]["step_ms"] > 0 and record[0]["reference_step_ms"] > 0


# -- a registered penalty trains packed (issue 19) -----------------------------------------------
def test_toy_penalty_packs_and_equals_its_lone_objective(toy):
    """Before: a regularizer registered outside the package could not join a pack (its name
    was not in sae.grid.packing's list). Now it packs beside the built-in ones, its penalty
    differentiated by autograd over its own member's block: each member's values and
    gradients equal sae.training.losses.training_loss of its lone model."""
    from sae.grid.packing import unpacked_reason
    from sae.training.packed import MemberSpec
    from tests.test_packed import assert_pack_matches_lone_objectives

    torch.manual_seed(5)
    x = unit_batch(4 * 48)
    cells = [(4, "toy_relu_l1", True), (2, "l1l2", True), (4, "toy_relu_l1", False),
             (2, "none", True)]
    models = [TopKSAE(x.shape[1], 128, k) for k, _, _ in cells]
    specs = [MemberSpec(k, reg, 0.0 if reg == "none" else 0.05, mask, 1e-8)
             for k, reg, mask in cells]
    dead = torch.rand(len(cells), 128) < 0.3
    out = assert_pack_matches_lone_objectives(models, specs, x.view(len(cells), 48, -1), dead)
    assert float(out.parts.penalty[0]) > 0 and float(out.parts.penalty[2]) > 0
    toy_cell = synthetic_cfg(k=4, reg="l1l2", strength=0.05)
    toy_cell.regularizer.name = "toy_relu_l1"
    assert unpacked_reason(toy_cell) is None


def test_toy_penalty_trains_in_a_pack_as_alone(toy, tmp_path):
    """Through the packed trainer: a pack of the toy cell and an l1l2 cell ends with the
    weights each cell reaches alone (tests/test_packed.py's tolerance)."""
    from tests.test_packed import (
        WEIGHT_ATOL,
        assert_same_runs,
        train_alone,
        train_packed,
    )

    base = dict(n_train=1000, batch=128, n_latents=128, max_steps=20, log_every=10)
    toy_cfg = synthetic_cfg(k=4, reg="l1l2", strength=0.05, **base)
    toy_cfg.regularizer.name = "toy_relu_l1"
    cfgs = [toy_cfg, synthetic_cfg(k=4, reg="l1l2", strength=0.05, **base)]
    x = load_synthetic(cfgs[0].dataset)[0].x
    assert WEIGHT_ATOL == 3e-4
    assert_same_runs(train_alone(cfgs, x, tmp_path), train_packed(cfgs, x, tmp_path))
