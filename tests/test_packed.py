"""The packed trainer: a pack of mixed cells equals the same cells trained one by one.

Tolerance. The pack computes each member's objective with batched float32 products and
reductions (a different summation order than the lone step), so the values agree to rounding,
not bit for bit, and Adam amplifies rounding: with eps 6.25e-10 a gradient entry near zero
whose rounding differs moves its weight by up to lr per step either way. The trainer's own two
paths (the fused step, train.fast_path=true, and the reference, false) differ by up to 1.3e-4
on these cells after 40 steps at lr 1e-3; the pack is held to the same bound, WEIGHT_ATOL =
3e-4 (max absolute difference of any weight). A real difference for one member moves its
weights by far more (measured: another k 0.13, batch order 1.0, mask off 0.043, strength x2
0.020; the perturbation tests require > 10 x WEIGHT_ATOL). Logged losses: LOSS_RTOL = 1e-4.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from sae.data.synthetic import load_synthetic
from sae.model import TopKSAE
from sae.tracking import NullTracker
from sae.training.loop import TrainingLoop
from sae.training.loop import train_alone as train_one
from sae.training.packed import MemberSpec, PackCoefficients, PackedSAE, packed_training_loss
from sae.training.trainer import Trainer
from tests.helpers import synthetic_cfg

WEIGHT_ATOL = 3e-4
LOSS_RTOL = 1e-4
# Two k, three regularizers, mask on and off, two seeds; n = 512 with k <= 4 on 2,000 samples
# leaves latents dead after the 2-epoch window (16 steps), so AuxK is exercised too.
CELLS = (
    dict(k=4, reg="none", seed=0, mask=True),
    dict(k=2, reg="offsupport_l1", seed=1, mask=True),
    dict(k=4, reg="l1l2", seed=0, mask=False),
    dict(k=2, reg="l1l2", seed=1, mask=True),
    dict(k=2, reg="offsupport_l1", seed=0, mask=False),
    dict(k=4, reg="none", seed=1, mask=True),
)
BASE = dict(n_train=2000, batch=256, n_latents=512, max_steps=40, log_every=10)


def cell_cfg(cell: dict, **overrides):
    strength = 0.05 if cell["reg"] != "none" else 0.0
    cfg = synthetic_cfg(k=cell["k"], reg=cell["reg"], strength=strength, mask=cell["mask"],
                        **{**BASE, **overrides})
    return dataclasses.replace(cfg, seed=cell["seed"])


@pytest.fixture(scope="module")
def x():
    return load_synthetic(cell_cfg(CELLS[0]).dataset)[0].x


def make_trainer(cfg, x, path) -> Trainer:
    torch.manual_seed(cfg.seed)  # as sae.training.cell.build_model
    model = TopKSAE(x.shape[1], cfg.sae.n_latents, cfg.k)
    return Trainer(cfg, model, x, path, NullTracker(), {})


def train_alone(cfgs, x, tmp_path):
    out = []
    for index, cfg in enumerate(cfgs):
        trainer = make_trainer(cfg, x, tmp_path / f"alone{index}.safetensors")
        out.append((trainer.model, train_one(trainer)))
    return out


def train_packed(cfgs, x, tmp_path, name="pack"):
    trainers = [make_trainer(cfg, x, tmp_path / f"{name}{i}.safetensors")
                for i, cfg in enumerate(cfgs)]
    results = TrainingLoop(trainers).run()
    return [(t.model, results[i].state) for i, t in enumerate(trainers)]


def max_weight_difference(a: TopKSAE, b: TopKSAE) -> float:
    return max(float((value - b.state_dict()[name]).abs().max())
               for name, value in a.state_dict().items())


def assert_same_runs(alone, packed):
    for index, ((model_a, state_a), (model_p, state_p)) in enumerate(zip(alone, packed)):
        assert state_p.step == state_a.step
        assert max_weight_difference(model_a, model_p) <= WEIGHT_ATOL, (index, CELLS[index])
        assert len(state_p.history) == len(state_a.history)
        for point_a, point_p in zip(state_a.history, state_p.history):
            assert point_p["dead"] == point_a["dead"], (index, point_a["step"])
            for key in ("loss", "nmse", "auxk", "penalty"):
                assert point_p[key] == pytest.approx(point_a[key], rel=LOSS_RTOL, abs=1e-7), (
                    index, point_a["step"], key)


@pytest.mark.parametrize("fast_path", [True, False])
def test_pack_of_mixed_cells_equals_cells_trained_alone(x, tmp_path, fast_path):
    cfgs = [cell_cfg(cell, fast_path=fast_path) for cell in CELLS]
    alone = train_alone(cfgs, x, tmp_path)
    packed = train_packed(cfgs, x, tmp_path)
    # AuxK and the penalties did work in the comparison (not all zeros).
    histories = [state.history for _, state in alone]
    assert any(point["auxk"] > 0 for history in histories for point in history)
    assert all(point["penalty"] > 0 for history, cell in zip(histories, CELLS)
               if cell["reg"] != "none" for point in history)
    assert_same_runs(alone, packed)


@pytest.fixture(scope="module")
def cell1_alone(x, tmp_path_factory):
    return train_alone([cell_cfg(CELLS[1])], x, tmp_path_factory.mktemp("alone"))[0][0]


@pytest.mark.parametrize("change", [
    dict(k=4), dict(seed=0), dict(mask=False), dict(strength=0.1)])
def test_a_changed_member_is_detected(x, tmp_path, change, cell1_alone):
    """The tolerance is tight enough: member 1 trained with one setting changed (k, batch
    order, mask or strength) differs from its lone run by far more than WEIGHT_ATOL."""
    cell, alone = CELLS[1], cell1_alone
    changed = {**cell, **{k: v for k, v in change.items() if k != "strength"}}
    cfg = cell_cfg(changed)
    if "strength" in change:
        cfg = dataclasses.replace(cfg, regularizer=dataclasses.replace(
            cfg.regularizer, strength=change["strength"]))
    packed = train_packed([cell_cfg(CELLS[0]), cfg], x, tmp_path)[1][0]
    assert max_weight_difference(alone, packed) > 10 * WEIGHT_ATOL


def assert_pack_matches_lone_objectives(models: list[TopKSAE], specs: list[MemberSpec],
                                        batch: torch.Tensor, dead: torch.Tensor):
    """One packed step's objective against sae.training.losses.training_loss of each lone model: each
    member's (total, nmse, auxk, penalty), its batch-active units, and the gradients of its
    total. Returns the packed output."""
    from sae.training.losses import training_loss

    pack = PackedSAE(models)
    out = packed_training_loss(pack, batch, PackCoefficients.build(specs, batch.device),
                               dead_gn=dead, aux_alpha=1 / 32, aux_k=16)
    n = models[0].n_latents
    for g, (model, spec) in enumerate(zip(models, specs)):
        parts, ref = training_loss(model, batch[g], regularizer=spec.regularizer,
                                   strength=spec.strength, mask=spec.mask, eps=spec.eps,
                                   dead=dead[g], aux_alpha=1 / 32, aux_k=16)
        for name in ("total", "nmse", "auxk", "penalty"):
            assert float(getattr(out.parts, name)[g].detach()) == pytest.approx(
                float(getattr(parts, name).detach()), rel=1e-5, abs=1e-7), (g, name)
        active = torch.zeros(n, dtype=torch.bool).index_fill_(0, ref.code.indices.reshape(-1),
                                                              True)
        assert torch.equal(out.fired[g], active)
        parts.total.backward()
    out.parts.total.sum().backward()
    for g, model in enumerate(models):
        for name in PackedSAE.PARAMETERS:
            expected = getattr(model, name).grad
            got = getattr(pack, name).grad[g]
            scale = float(expected.abs().max())
            assert scale > 0, (g, name)
            assert float((got - expected).abs().max()) <= 1e-5 * scale, (g, name)
    return out


def test_packed_loss_equals_reference_loss_per_member(x):
    """One step's objective, before any training: each member's (total, nmse, auxk, penalty)
    and the gradients of its total equal sae.training.losses.training_loss of its lone model, with some
    latents marked dead."""
    torch.manual_seed(3)
    models, specs = [], []
    for cell in CELLS:
        models.append(TopKSAE(x.shape[1], 128, cell["k"]))
        specs.append(MemberSpec(cell["k"], cell["reg"], 0.05, cell["mask"], 1e-8))
    batch = torch.stack([x[i * 64:(i + 1) * 64] for i in range(len(models))])
    dead = torch.rand(len(models), 128) < 0.3
    assert_pack_matches_lone_objectives(models, specs, batch, dead)


def test_pack_resumes_exactly(x, tmp_path):
    """2N packed steps == N packed steps, stop, resume from the members' checkpoints, N more:
    the same weights bit for bit."""
    cfgs = [cell_cfg(cell) for cell in CELLS[:3]]
    straight = train_packed(cfgs, x, tmp_path, "straight")
    half = [dataclasses.replace(c, train=dataclasses.replace(c.train, max_steps=20))
            for c in cfgs]
    train_packed(half, x, tmp_path, "resumed")
    resumed = train_packed(cfgs, x, tmp_path, "resumed")
    for (model_s, state_s), (model_r, state_r) in zip(straight, resumed):
        assert state_r.step == state_s.step == 40
        for name, value in model_s.state_dict().items():
            assert torch.equal(value, model_r.state_dict()[name]), name
        assert state_r.history == state_s.history


def test_member_checkpoint_resumes_unpacked(x, tmp_path):
    """A member's checkpoint is the lone run's: the cell resumes from it unpacked."""
    cfg = cell_cfg(CELLS[3])
    half = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=20))
    train_packed([cell_cfg(CELLS[0], max_steps=20), half], x, tmp_path, "mixed")
    trainer = make_trainer(cfg, x, tmp_path / "mixed1.safetensors")
    state = train_one(trainer)
    alone = train_alone([cfg], x, tmp_path)[0][0]
    assert trainer.resumed_from == 20 and state.step == 40
    assert max_weight_difference(alone, trainer.model) <= WEIGHT_ATOL


def test_diverging_member_fails_and_the_others_go_on(x, tmp_path):
    """Member 1's loss overflows (lambda 3e38 times an L1/L2 ratio > 1 is inf in float32): it
    fails with the trainer's reason and writes no checkpoint; members 0 and 2 train on as alone."""
    cfgs = [cell_cfg(CELLS[0]), cell_cfg(CELLS[2]), cell_cfg(CELLS[3])]
    cfgs[1] = dataclasses.replace(cfgs[1], regularizer=dataclasses.replace(
        cfgs[1].regularizer, strength=3e38))
    trainers = [make_trainer(cfg, x, tmp_path / f"d{i}.safetensors")
                for i, cfg in enumerate(cfgs)]
    results = TrainingLoop(trainers).run()
    assert results[1].state is None and "regularizer.strength" in results[1].reason
    assert not (tmp_path / "d1.safetensors").exists()
    assert (tmp_path / "d0.safetensors").exists() and (tmp_path / "d2.safetensors").exists()
    alone = train_alone([cfgs[0], cfgs[2]], x, tmp_path)
    for (model, state), member in zip(alone, (0, 2)):
        assert results[member].state.step == state.step
        assert max_weight_difference(model, trainers[member].model) <= WEIGHT_ATOL


# -- a pack as a job: every member writes the run a lone cell writes --------------------------
PACK_CELLS = (["k=8", "regularizer=none", "seed=0"],
              ["k=16", "regularizer=l1l2", "mask=true", "seed=1"],
              ["k=8", "regularizer=offsupport_l1", "mask=false", "seed=0"])
RUN_FILES = ("config.yaml", "identity.json", "status.json", "model.safetensors",
             "checkpoints/last.safetensors", "metrics.json", "method_card.md",
             "method_card.json")


def compose_cell(root, axes, logger="none"):
    from hydra import compose, initialize_config_dir

    from sae.config import register_configs
    from tests.helpers import REPO

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=[
            "dataset=digits", "sae=tiny", "train.batch_size=256", "train.max_steps=20",
            "train.lr=1e-3", "train.log_every=10", "train.progress=false", "train.device=cpu",
            "eval.probe_max_train=500", "eval.probe_epochs=5", f"logger={logger}",
            f"paths.root={root}", *axes])


def test_run_pack_writes_each_members_lone_run(tmp_path, monkeypatch):
    import json

    from sae.io.tensors import load_tensors
    from sae.train import run_cell
    from sae.training.job import run_cells

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    lone = [run_cell(compose_cell(tmp_path / "lone", axes), "cmd") for axes in PACK_CELLS]
    packed = run_cells([(compose_cell(tmp_path / "pack", axes, "wandb"), f"cmd{i}")
                       for i, axes in enumerate(PACK_CELLS)])
    assert [o["state"] for o in packed] == ["done"] * 3
    assert [o["run_id"] for o in packed] == [o["run_id"] for o in lone]
    for outcome_lone, outcome_pack in zip(lone, packed):
        directory = tmp_path / "pack" / "runs" / outcome_pack["run_id"]
        for name in RUN_FILES:
            assert (directory / name).is_file(), name
        assert list(directory.glob(f"wandb/offline-run-*-{outcome_pack['run_id']}/*.wandb"))
        m_lone = json.loads((Path(outcome_lone["run_dir"]) / "metrics.json").read_text())
        m_pack = json.loads((directory / "metrics.json").read_text())
        assert sorted(m_pack) == sorted(m_lone)
        assert m_pack["train"]["steps"] == m_lone["train"]["steps"] == 20
        assert m_pack["train"]["final_loss"] == pytest.approx(m_lone["train"]["final_loss"],
                                                             rel=LOSS_RTOL)
        lone_ckpt, lone_meta = load_tensors(Path(outcome_lone["run_dir"]) / RUN_FILES[4])
        pack_ckpt, pack_meta = load_tensors(directory / RUN_FILES[4])
        assert sorted(pack_ckpt) == sorted(lone_ckpt) and pack_meta["step"] == lone_meta["step"]
        assert torch.equal(pack_ckpt["torch_rng"], lone_ckpt["torch_rng"])
        assert pack_meta["param_groups"] == lone_meta["param_groups"]
        for name, value in lone_ckpt.items():
            if value.is_floating_point():
                assert float((pack_ckpt[name] - value).abs().max()) <= WEIGHT_ATOL, name
        card = json.loads((directory / "method_card.json").read_text())
        assert sorted(card) == sorted(json.loads(
            (Path(outcome_lone["run_dir"]) / "method_card.json").read_text()))
    again = run_cells([(compose_cell(tmp_path / "pack", axes), "cmd") for axes in PACK_CELLS])
    assert [o["state"] for o in again] == ["skipped"] * 3


def test_pack_checkpoints_when_a_lone_run_would(x, tmp_path, monkeypatch):
    """The members' own policy (sae.training.trainer.Trainer._checkpoint_due): by steps, by training
    time at log steps, and at the end; one file per member each time."""
    import itertools
    import time
    import types

    saved_at = []
    monkeypatch.setattr("sae.training.loop.save_checkpoint",
                        lambda path, model, opt, state, config: saved_at.append(state.step))
    # A clock far from 0 that advances 1 ms a reading: a timer left at 0 would fire at once.
    ticks = itertools.count()
    clock = types.SimpleNamespace(monotonic=lambda: 1e6 + 1e-3 * next(ticks),
                                  perf_counter=time.perf_counter)
    monkeypatch.setattr("sae.training.trainer.time", clock)
    monkeypatch.setattr("sae.training.loop.time", clock)
    for every, every_s, expected in ((0, 0.0, [12]), (4, 0.0, [4, 8, 12]),
                                     (0, 1e-9, [5, 10, 12]), (0, 3600.0, [12])):
        saved_at.clear()
        overrides = dict(max_steps=12, log_every=5, checkpoint_every=every,
                         checkpoint_every_s=every_s)
        train_packed([cell_cfg(cell, **overrides) for cell in CELLS[:2]], x, tmp_path,
                     f"c{every}-{every_s}")
        assert saved_at == [step for step in expected for _ in range(2)], (every, every_s)


# -- the decoder's two formulations, AuxK for some members, and the CUDA paths ------------------
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, CUDA])]


def _pack_and_batch(x, device, n=128):
    torch.manual_seed(3)
    models = [TopKSAE(x.shape[1], n, cell["k"]).to(device) for cell in CELLS]
    specs = [MemberSpec(cell["k"], cell["reg"], 0.05, cell["mask"], 1e-8) for cell in CELLS]
    batch = torch.stack([x[i * 64:(i + 1) * 64] for i in range(len(models))]).to(device)
    return PackedSAE(models), PackCoefficients.build(specs, torch.device(device)), batch


@pytest.mark.parametrize("device", DEVICES)
def test_dense_decoder_equals_the_embedding_bag(x, device):
    """The dense formulation (CUDA under bf16) decodes, for all members or a subset, what the
    embedding-bag does, with the same gradients (float32 here, so equal to rounding)."""
    pack, _, batch = _pack_and_batch(x, device)
    values = torch.rand(6, 64, 4, device=device, requires_grad=True)
    indices = torch.stack([torch.randperm(128, device=device)[:4] for _ in range(6 * 64)])
    indices = indices.view(6, 64, 4)
    for members in (None, torch.tensor([1, 4], device=device)):
        rows = slice(None) if members is None else members
        outputs, grads = [], []
        for dense in (False, True):
            pack.zero_grad(set_to_none=True)
            values.grad = None
            out = pack.decode(values[rows], indices[rows], members=members, dense=dense)
            out.square().sum().backward()
            outputs.append(out.detach())
            grads.append((values.grad.clone(), pack.W_dec.grad.clone()))
        torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
        for dense_grad, bag_grad in zip(grads[1], grads[0]):
            torch.testing.assert_close(dense_grad, bag_grad, rtol=1e-5, atol=1e-5)


def test_auxk_for_the_named_members_equals_auxk_for_all(x):
    """AuxK restricted to the members that have dead latents is the full AuxK: the others'
    AuxK is an exact zero in the reference. A member left out though it has dead latents
    loses its AuxK (so the restriction is really applied)."""
    pack, coeffs, batch = _pack_and_batch(x, "cpu")
    dead = torch.zeros(6, 128, dtype=torch.bool)
    dead[1, :40] = dead[4, 10:90] = True
    full = packed_training_loss(pack, batch, coeffs, dead_gn=dead, aux_alpha=1 / 32, aux_k=16,
                                aux_members=None)
    some = packed_training_loss(pack, batch, coeffs, dead_gn=dead, aux_alpha=1 / 32, aux_k=16,
                                aux_members=[1, 4])
    assert float(full.parts.auxk[1]) > 0 and float(full.parts.auxk[4]) > 0
    torch.testing.assert_close(some.parts.auxk, full.parts.auxk, rtol=1e-6, atol=0)
    grads = []
    for out in (full, some):
        pack.zero_grad(set_to_none=True)
        out.parts.total.sum().backward()
        grads.append([p.grad.clone() for p in pack.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9)
    fewer = packed_training_loss(pack, batch, coeffs, dead_gn=dead, aux_alpha=1 / 32, aux_k=16,
                                 aux_members=[1])
    assert float(fewer.parts.auxk[4]) == 0 and float(fewer.parts.auxk[1]) > 0


@CUDA
@pytest.mark.gpu
def test_packed_loss_equals_reference_loss_per_member_on_cuda(x):
    """On CUDA in float32 (embedding-bag) and under bf16 autocast (the dense decoder): each
    member's losses equal its lone reference objective (bf16: to bf16 rounding)."""
    from sae.training.losses import training_loss
    from sae.training.trainer import autocast

    pack, coeffs, batch = _pack_and_batch(x, "cuda")
    models = []
    for index in range(pack.size):
        model = TopKSAE(x.shape[1], 128, CELLS[index]["k"]).cuda()
        pack.copy_member_to(index, model)
        models.append(model)
    dead = torch.rand(6, 128, device="cuda") < 0.3
    for bf16, rel in ((False, 1e-5), (True, 2e-2)):
        with autocast("cuda", bf16):
            out = packed_training_loss(pack, batch, coeffs, dead_gn=dead, aux_alpha=1 / 32,
                                       aux_k=16)
            for g, (model, cell) in enumerate(zip(models, CELLS)):
                parts, _ = training_loss(model, batch[g], regularizer=cell["reg"],
                                         strength=0.05, mask=cell["mask"], eps=1e-8,
                                         dead=dead[g], aux_alpha=1 / 32, aux_k=16)
                for name in ("nmse", "penalty"):
                    assert float(getattr(out.parts, name)[g]) == pytest.approx(
                        float(getattr(parts, name)), rel=rel, abs=1e-6), (bf16, g, name)


@CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("bf16", [False, True])
def test_cuda_graph_pack_trains_as_the_eager_pack(x, tmp_path, bf16):
    """The packed trainer's CUDA graphs (sae.training.packed_graph) train every member as its eager
    step does, through dead latents (AuxK member sets change, graphs are recaptured), logs and
    checkpoints; the captures themselves do not train."""
    overrides = dict(autocast_bf16=bf16, device="cuda")
    cfgs = [cell_cfg(cell, **overrides) for cell in CELLS]
    xc = x.cuda()
    runs = {}
    for graph in (False, True):
        trainers = []
        for index, cfg in enumerate(cfgs):
            torch.manual_seed(cfg.seed)
            model = TopKSAE(x.shape[1], cfg.sae.n_latents, cfg.k).cuda()
            trainers.append(Trainer(cfg, model, xc, tmp_path / f"g{graph}{index}.safetensors",
                                    NullTracker(), {}))
        packed = TrainingLoop(trainers, cuda_graph=graph)
        results = packed.run()
        runs[graph] = [(t.model, results[i].state) for i, t in enumerate(trainers)]
        if graph:
            assert packed.graph_step is not None and packed.graph_step.captures >= 2
    assert_same_runs(runs[False], runs[True])
