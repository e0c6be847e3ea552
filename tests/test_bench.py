"""The step benchmark (``python -m sae.bench step``): its records, its timed training run, and
(on CUDA) that the CUDA-graph replay of the training run trains exactly as the eager step."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sae.benchmarks import common, train_run
from sae.benchmarks import graph as graphs
from sae.benchmarks import step as bench
from sae.training.trainer import dead_count_bound

TINY = ["--batch", "64", "--dim", "32", "--latents", "512", "--k", "8", "--repeats", "2",
        "--no-tune-allocator"]
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_step_bench_prints_one_record_per_case_with_consistent_ratios(tmp_path, one_thread):
    out = tmp_path / "step.jsonl"
    records = bench.main([*TINY, "--cases", "none,l1l2+mask", "--out", str(out)])
    assert [r["case"] for r in records] == ["none", "l1l2+mask"]
    assert [json.loads(line) for line in out.read_text().splitlines()] == records
    for r in records:
        assert r["step_ms"] > 0 and r["encoder_product_ms"] > 0 and r["reference_step_ms"] > 0
        # Ratios are of the best times, rounded to 3 decimals (5e-4); the printed times carry
        # 4 significant digits (5e-4 relative each): recomputed, they agree to that rounding.
        for ratio, ms in (("ratio", "step_ms"), ("reference_ratio", "reference_step_ms")):
            recomputed = r[ms] / r["encoder_product_ms"]
            assert r[ratio] == pytest.approx(recomputed, abs=5e-4 + 1.1e-3 * recomputed), ratio


def test_step_bench_rejects_unknown_cases_and_graphs_off_cuda():
    with pytest.raises(SystemExit):
        bench.parse(["--cuda-graph"])
    with pytest.raises(SystemExit):
        bench.main([*TINY, "--cases", "l1l2+mask,nonsense"])


def test_train_bench_runs_the_requested_epochs_and_extrapolates(one_thread):
    args = ["--train", "--samples", "2048", "--batch", "256", "--dim", "32", "--latents", "256",
            "--k", "8", "--epochs", "2", "--log-every", "4", "--no-tune-allocator"]
    record = bench.main(args)[0]
    assert record["steps"] == 2 * (2048 // 256)
    assert record["epochs_done"] == 2.0 and record["total_s_actual"] > 0
    # All epochs ran: the extrapolation is the measured time itself, rounded to 0.1 s (the
    # actual to 0.01 s), and the step time times the steps gives it back (3 decimals of ms).
    assert record["total_s_extrapolated"] == pytest.approx(record["total_s_actual"], abs=0.056)
    assert record["step_ms"] * record["steps"] / 1e3 == pytest.approx(
        record["total_s_actual"], abs=0.005 + 5e-4 * record["steps"] / 1e3)
    assert 0 < record["last_nmse"] < 2


def _graph_and_eager(window: int):
    args = bench.parse(["--train", "--device", "cuda", "--samples", "4096", "--batch", "256",
                        "--dim", "64", "--latents", "512", "--k", "8"])
    data = train_run.unit_embeddings(args.samples, args.dim, "cuda", seed=0)
    kwargs = common.loss_kwargs(args, common.Case("l1l2+mask", "l1l2", True))
    trainee = common.make_trainee(args, seed=0, capturable=True)
    trainee.model.init_b_pre_(data[:1024])
    eager = graphs.EagerStep(copy.deepcopy(trainee), kwargs, window, autocast=False)
    replayed = graphs.GraphStep(trainee, kwargs, window, False, args.batch, args.dim)
    return data.split(args.batch), eager, replayed


def _assert_same_training_state(eager: graphs.EagerStep, graph: graphs.GraphStep) -> None:
    for (name, p_eager), p_graph in zip(eager.trainee.model.named_parameters(),
                                        graph.trainee.model.parameters()):
        torch.testing.assert_close(p_graph, p_eager, rtol=1e-4, atol=1e-6, msg=name)
    assert torch.equal(graph.trainee.samples_since_fired, eager.trainee.samples_since_fired)


@cuda_only
@pytest.mark.gpu
def test_cuda_graph_replay_trains_exactly_as_the_eager_step():
    batches, eager, graph = _graph_and_eager(window=10**9)
    for x in batches[:6]:
        torch.testing.assert_close(graph(x, 0), eager(x, 0), rtol=1e-4, atol=1e-6)
    assert graph.captures == 1
    _assert_same_training_state(eager, graph)


@cuda_only
@pytest.mark.gpu
def test_cuda_graph_recaptures_without_training_when_latents_die():
    # A window of 2 batches: latents that miss 2 batches are dead, AuxK wakes, the dead-count
    # bound grows and the graph is captured again; captures must not train.
    batches, eager, graph = _graph_and_eager(window=2 * 256)
    bound, most_dead = 0, 0
    for x in batches:
        torch.testing.assert_close(graph(x, bound), eager(x, bound), rtol=1e-4, atol=1e-5)
        counters = eager.trainee.samples_since_fired
        most_dead = max(most_dead, int((counters >= 2 * 256).sum()))
        bound = dead_count_bound(counters, 2 * 256, 256)
    _assert_same_training_state(eager, graph)
    assert graph.captures >= 2 and most_dead > 0  # latents died, AuxK woke, the graph grew


def test_the_step_benchmark_needs_torch_alone():
    """GPU machines lent for benchmarks hold torch but not our config stack: the benchmark (and
    the trainer's step it times) must import without OmegaConf, Hydra or W&B."""
    code = ("import sys, sae.benchmarks.step; "
            "print(sorted({'omegaconf', 'hydra', 'wandb'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_pack_bench_prints_one_record_per_pack_size(tmp_path, one_thread):
    from sae.benchmarks import pack as pack_bench

    out = tmp_path / "pack.jsonl"
    records = pack_bench.main(["--sizes", "demo", "--packs", "1,2", "--repeats", "1",
                               "--steps", "1", "--samples", "1024", "--out", str(out)])
    assert [r["G"] for r in records] == [1, 2]
    assert [json.loads(line) for line in out.read_text().splitlines()] == records
    for r in records:
        assert r["unpacked_step_ms"] > 0 and r["packed_step_ms"] > 0
        assert r["ratio"] == pytest.approx(r["per_member_ms"] / r["unpacked_step_ms"], rel=0.01)
    with pytest.raises(SystemExit):
        pack_bench.parse(["--sizes", "huge"])
