"""Issue 15's evaluation speed: the fast probe products against torch's embedding_bag and a
dense naive loss, the stored raw-embedding probe (reused, recomputed when an input changes),
and the ``eval`` benchmark's records."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from sae.benchmarks import eval as eval_bench
from sae.config import EvalConfig
from sae.data.types import EmbeddingSet
from sae.evaluation import probe_store
from sae.evaluation.evaluate import evaluate
from sae.metrics import _probe_kernels as kernels
from sae.metrics import probe
from sae.model import SparseCode, TopKSAE

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("block", [None, 64, 7])
def test_blocked_products_equal_embedding_bag_and_its_gradient(block):
    gen = torch.Generator().manual_seed(0)
    n_rows, width, n_latents, n_classes = 300, 5, 40, 150  # 150 classes: 3 blocks of 64
    indices = torch.randint(0, n_latents - 5, (n_rows, width), generator=gen)  # 5 never used
    weights = torch.rand(n_rows, width, generator=gen)
    weights[::7, 0] = 0.0  # selected entries whose ReLU value is 0, as Top-k leaves them
    weight = torch.randn(n_latents, n_classes, generator=gen, requires_grad=True)
    grad_out = torch.randn(n_rows, n_classes, generator=gen)
    out = kernels.blocked_bag(indices, weights, weight.detach(), None, block)
    grad = kernels.transposed_bag(kernels.columns_of(indices, weights, n_latents), grad_out, block)
    reference = F.embedding_bag(indices, weight, per_sample_weights=weights, mode="sum")
    (reference_grad,) = torch.autograd.grad(reference, weight, grad_out)
    torch.testing.assert_close(out, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-5, atol=1e-5)
    assert grad[n_latents - 5:].abs().max() == 0  # unused latents get no gradient


@pytest.mark.parametrize("multi_label", [False, True])
def test_fused_losses_equal_autograd(multi_label):
    gen = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(50, 7, generator=gen)
    if multi_label:
        targets = (torch.rand(50, 7, generator=gen) < 0.3).float()
        loss_fn, fused = F.binary_cross_entropy_with_logits, kernels.binary_cross_entropy_and_grad_
    else:
        targets = torch.randint(0, 7, (50,), generator=gen)
        loss_fn, fused = F.cross_entropy, kernels.cross_entropy_and_grad_
    leaf = logits.clone().requires_grad_()
    reference = loss_fn(leaf, targets, reduction="sum")
    reference.backward()
    buffer = logits.clone()
    assert fused(buffer, targets) == pytest.approx(float(reference.detach()), rel=1e-6)
    torch.testing.assert_close(buffer, leaf.grad, rtol=1e-5, atol=1e-6)


def _clustered_codes(n_train: int, n_eval: int, n_classes: int):
    """Codes of a random SAE on clustered embeddings, split in train and evaluation rows."""
    x, y = eval_bench.clustered_embeddings(n_train + n_eval, 24, n_classes,
                                           torch.Generator().manual_seed(2))
    torch.manual_seed(1)
    code = eval_bench.encode_all(TopKSAE(24, 256, 16).eval(), x, 16)
    return (SparseCode(code.values[:n_train], code.indices[:n_train]), y[:n_train],
            SparseCode(code.values[n_train:], code.indices[n_train:]), y[n_train:])


def _naive_loss(code: SparseCode, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                weight_decay: float) -> float:
    """The probe's objective (probe.py docstring) on dense features, in float64."""
    dense = code.to_dense(weight.shape[0]).double()
    logits = dense @ weight.double() + bias.double()
    return float(F.cross_entropy(logits, y) + 0.5 * weight_decay * weight.double().square().sum())


def test_fast_probe_reaches_the_reference_optimum():
    """Same L-BFGS from zero with the fused objective and with the previous autograd path: the
    iterates differ only by float rounding, so the final loss agrees to 1e-4 relative and the
    accuracy to one evaluation sample (1/400)."""
    n_classes, max_iter, weight_decay = 100, 25, 1e-4  # 100 classes: two column blocks
    code_train, y_train, code_eval, y_eval = _clustered_codes(1200, 400, n_classes)
    for m in (1, 4, 16):
        train_m = probe.truncate_top_m(code_train, m)
        scale = probe._sparse_scale(train_m, 256)
        scaled = probe._scaled_sparse(train_m, scale)
        fits = {fast: probe._fit(probe._Features(None, scaled, 256, fast), y_train,
                                    n_classes, weight_decay, max_iter, chunk_size=500)
                for fast in (True, False)}
        losses = {b: _naive_loss(scaled, y_train, *fit, weight_decay) for b, fit in fits.items()}
        assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    scores = {fast: probe.truncated_probe(tuple(code_train), y_train, tuple(code_eval), y_eval,
                                             (1, 4, 16), n_latents=256, n_classes=n_classes,
                                             max_iter=max_iter, chunk_size=500, fast=fast)
              for fast in (True, False)}
    for m in (1, 4, 16):
        assert abs(scores[True][m] - scores[False][m]) <= 1 / 400 + 1e-12
    assert scores[True][16] > 3 / n_classes  # learnt something: the comparison is not vacuous


def test_fast_and_reference_probes_converge_to_the_same_optimum():
    """Run to convergence, both formulations reach one loss (the objective is convex)."""
    code_train, y_train, _, _ = _clustered_codes(500, 0, 10)
    scaled = probe._scaled_sparse(probe.truncate_top_m(code_train, 1),
                                  probe._sparse_scale(probe.truncate_top_m(code_train, 1), 256))
    losses = [_naive_loss(scaled, y_train, *probe._fit(probe._Features(None, scaled, 256, fast),
                                                       y_train, 10, 1e-4, 200, 500), 1e-4)
              for fast in (True, False)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_fast_multilabel_probe_matches_the_reference():
    code_train, y_train, code_eval, y_eval = _clustered_codes(600, 200, 70)
    gen = torch.Generator().manual_seed(4)
    multi_hot = [F.one_hot(y, 70).bool() | (torch.rand(y.shape[0], 70, generator=gen) < 0.02)
                 for y in (y_train, y_eval)]
    scores = {fast: probe.truncated_probe(tuple(code_train), multi_hot[0], tuple(code_eval),
                                          multi_hot[1], (2, 16), n_latents=256, max_iter=15,
                                          chunk_size=250, fast=fast)
              for fast in (True, False)}
    for m in (2, 16):
        assert scores[True][m] == pytest.approx(scores[False][m], abs=2e-3)  # mAP
    assert scores[True][16] > 0.1  # far above chance (about 0.03): not vacuous


def _probe_inputs():
    x, y = eval_bench.clustered_embeddings(400, 16, 4, torch.Generator().manual_seed(0))
    return [x[:300], y[:300], x[300:], y[300:]]


SETTINGS = {"n_classes": 4, "weight_decay": 1e-4, "max_iter": 15, "chunk_size": 128}


@pytest.fixture
def probe_calls(monkeypatch):
    calls = []
    real = probe_store.linear_probe

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(probe_store, "linear_probe", counted)
    return calls


def test_stored_probe_is_computed_once_then_reused(tmp_path, probe_calls):
    inputs = _probe_inputs()
    first, reused_first = probe_store.stored_linear_probe(tmp_path, *inputs, **SETTINGS)
    second, reused_second = probe_store.stored_linear_probe(tmp_path, *inputs, **SETTINGS)
    assert (reused_first, reused_second) == (False, True) and len(probe_calls) == 1
    assert second == first == probe.linear_probe(*inputs, **SETTINGS)
    files = list(tmp_path.glob("*.json"))  # one record, no temporary left behind
    assert len(files) == 1 and {f.suffix for f in tmp_path.iterdir()} <= {".json", ".lock"}
    record = json.loads(files[0].read_text())
    assert record["value"] == first and record["settings"]["max_iter"] == 15
    assert record["inputs"]["x_train"]["shape"] == [300, 16]


def _changed_x_train(inputs):
    inputs[0] = inputs[0].clone()
    inputs[0][5, 3] += 1e-3
    return inputs, SETTINGS


def _changed_labels(inputs):
    inputs[3] = inputs[3].clone()
    inputs[3][0] = (inputs[3][0] + 1) % 4
    return inputs, SETTINGS


def _fewer_rows(inputs):
    return [inputs[0][:-1], inputs[1][:-1], inputs[2], inputs[3]], SETTINGS


@pytest.mark.parametrize("change", [
    _changed_x_train, _changed_labels, _fewer_rows,
    lambda inputs: (inputs, SETTINGS | {"weight_decay": 1e-3}),
    lambda inputs: (inputs, SETTINGS | {"max_iter": 16}),
    lambda inputs: (inputs, SETTINGS | {"n_classes": 5}),
], ids=["x_train", "labels", "rows", "weight_decay", "max_iter", "n_classes"])
def test_stored_probe_is_recomputed_when_an_input_changes(tmp_path, probe_calls, change):
    probe_store.stored_linear_probe(tmp_path, *_probe_inputs(), **SETTINGS)
    inputs, settings = change(_probe_inputs())
    value, reused = probe_store.stored_linear_probe(tmp_path, *inputs, **settings)
    assert not reused and len(probe_calls) == 2 and len(list(tmp_path.glob("*.json"))) == 2
    assert value == probe.linear_probe(*inputs, **settings)


def test_unreadable_record_is_recomputed_and_no_store_always_computes(tmp_path, probe_calls):
    inputs = _probe_inputs()
    value, _ = probe_store.stored_linear_probe(tmp_path, *inputs, **SETTINGS)
    (record,) = tmp_path.glob("*.json")
    record.write_text("{truncated")
    assert probe_store.stored_linear_probe(tmp_path, *inputs, **SETTINGS) == (value, False)
    assert probe_store.stored_linear_probe(tmp_path, *inputs, **SETTINGS) == (value, True)
    assert probe_store.stored_linear_probe(None, *inputs, **SETTINGS) == (value, False)
    assert len(probe_calls) == 3


def _splits(n_train: int, n_eval: int) -> tuple[EmbeddingSet, EmbeddingSet]:
    x, y = eval_bench.clustered_embeddings(n_train + n_eval, 16, 3,
                                           torch.Generator().manual_seed(1))
    return tuple(EmbeddingSet(name=name, x=x[rows], labels=y[rows], class_names=["a", "b", "c"])
                 for name, rows in (("t", slice(0, n_train)), ("e", slice(n_train, None))))


def test_cells_sharing_embeddings_share_the_stored_ceiling(tmp_path, probe_calls):
    train, evaluation = _splits(200, 80)
    cfg = EvalConfig(chunk_size=64, probe_m=[1, 2], probe_epochs=10, inspect_latents=0)
    store = tmp_path / "store"
    metrics = []
    for seed in (0, 1):  # two cells: different SAEs, the same embeddings
        torch.manual_seed(seed)
        metrics.append(evaluate(TopKSAE(16, 32, 4), train, evaluation, cfg, 4,
                                tmp_path / f"run{seed}", torch.device("cpu"), seed=0,
                                probe_store=store))
    assert len(probe_calls) == 1 and len(list(store.glob("*.json"))) == 1
    assert metrics[0]["probe_raw"] == metrics[1]["probe_raw"]
    assert metrics[0]["probe_m1"] != metrics[1]["probe_m1"] or \
        metrics[0]["r2"] != metrics[1]["r2"]  # the cells differ; only the ceiling is shared


def test_eval_bench_prints_one_line_per_family(capsys):
    lines = eval_bench.main(["--size", "demo", "--sample-scale", "0.1", "--reference"])
    families = [line["family"] for line in lines]
    assert families == ["encode", "reconstruction", "robustness", "dead", "monoscore", "purity",
                        "probe_encode", "probes_truncated", "probes_truncated_reference",
                        "probe_raw_reference", "probe_raw_first_cell", "probe_raw", "total"]
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == lines
    total = lines[-1]
    assert total["n_train"] == 500 and total["n_eval"] == 205 and total["n_latents"] == 512
    by_family = {line["family"]: line["seconds"] for line in lines[:-1]}
    shared = sum(v for f, v in by_family.items() if not f.startswith("probe"))
    shared += by_family["probe_encode"]
    assert total["seconds"] == pytest.approx(
        shared + by_family["probes_truncated"] + by_family["probe_raw"], abs=0.01)
    assert total["ceiling_reused"] == total["ceiling"]
    assert abs(total["ceiling"] - total["ceiling_reference"]) <= 1 / 205 + 1e-12
    # 5 of 205 samples: on this 500-sample toy the m = 1 probe is not converged after the demo's
    # 20 iterations (loss 0.4165 fast, 0.4183 reference, optimum 0.4147 reached by both at 50),
    # so the two float roundings stop at different points of the same descent.
    assert total["probe_max_abs_diff_vs_reference"] <= 5 / 205 + 1e-12


def test_bench_cli_routes_eval(capsys):
    from sae.bench import cli

    cli(["eval", "--size", "demo", "--sample-scale", "0.05"])
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["benchmark"] for r in records} == {"eval"} and records[-1]["family"] == "total"
    assert "reference_seconds" not in records[-1]  # the reference runs only when asked
