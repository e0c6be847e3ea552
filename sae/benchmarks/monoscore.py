"""MonoScore cost next to one encoder pass, in one process (issue 3's performance target).

Streams N random unit embeddings in chunks through a random encoder: ``pre = x W_enc^T``
(timed: the encoder pass), Top-k + ReLU (timed apart), then the exact sparse MonoScore update
(timed: O(N k d), float64 state) and its finalisation. A dense O(N n d) implementation of the
same linear form (dense codes, ``W += codes^T e`` in float32 -- the faster dtype, which favours
it) runs on the first ``--dense-samples`` samples only; its time is extrapolated linearly to N
and reported as such, together with its largest difference from the sparse scores there.

    python -m sae.benchmarks.monoscore            # N=200,000, n=8,192, k=64, d=768 (about a minute)
    python -m sae.benchmarks.monoscore --quick    # same shapes, N=16,384 (seconds)

Target: monoscore_s <= encoder_pass_s, and the dense form about 10x slower than the sparse one.
Only one chunk of embeddings, pre-activations and codes exists at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from sae.metrics import MonoAccumulator
from sae.model import SparseCode

FULL = {"n_samples": 200_000, "n_latents": 8192, "k": 64, "dim": 768, "dense_samples": 8192}
QUICK = {"n_samples": 16_384, "n_latents": 8192, "k": 64, "dim": 768, "dense_samples": 4096}


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sae.benchmarks.monoscore",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    for key in FULL:
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None)
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's, one per core)")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


class DenseMono:
    """The O(N n d) way: dense (B, n) codes and a dense ``codes^T e`` product per chunk."""

    def __init__(self, n_latents: int, dim: int) -> None:
        self.sparse_twin = MonoAccumulator(n_latents, dim)  # reuses its finalisation

    def update(self, codes_bn: torch.Tensor, e_bd: torch.Tensor) -> None:
        acc = self.sparse_twin
        e_bd = F.normalize(e_bd, dim=1)
        fires = codes_bn > 0
        acc.count_n += fires.sum(dim=0)
        acc.sum_a_n += codes_bn.sum(dim=0, dtype=torch.float64)
        acc.sum_a2_n += codes_bn.square().sum(dim=0, dtype=torch.float64)
        acc.min_n = torch.minimum(acc.min_n, codes_bn.masked_fill(~fires, float("inf"))
                                  .amin(dim=0).double())
        acc.max_n = torch.maximum(acc.max_n, codes_bn.amax(dim=0).double())
        acc.w_nd += (codes_bn.T @ e_bd).double()
        acc.e_sum_d += e_bd.sum(dim=0, dtype=torch.float64)
        acc.n_samples += codes_bn.shape[0]


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    n, k, d = args.n_latents, args.k, args.dim
    w_enc_nd = F.normalize(torch.randn(n, d), dim=1)
    mono = MonoAccumulator(n, d)
    dense = DenseMono(n, d)
    mono_subsample = MonoAccumulator(n, d)  # the sparse form on the dense form's samples
    times = {"encoder": 0.0, "topk": 0.0, "mono": 0.0, "dense": 0.0}
    per_chunk: dict[str, list[float]] = {"encoder": [], "mono": []}
    dense_rows = 0
    generator = torch.Generator().manual_seed(args.seed + 1)
    for start in range(0, args.n_samples, args.chunk_size):
        b = min(args.chunk_size, args.n_samples - start)
        x_bd = F.normalize(torch.randn(b, d, generator=generator), dim=1)  # untimed: the data
        t0 = time.perf_counter()
        pre_bn = x_bd @ w_enc_nd.T
        t1 = time.perf_counter()
        top = pre_bn.topk(k, dim=1, sorted=False)
        code = SparseCode(F.relu(top.values), top.indices)
        t2 = time.perf_counter()
        mono.update(code, x_bd)
        t3 = time.perf_counter()
        times["encoder"] += t1 - t0
        times["topk"] += t2 - t1
        times["mono"] += t3 - t2
        per_chunk["encoder"].append(t1 - t0)
        per_chunk["mono"].append(t3 - t2)
        if dense_rows < args.dense_samples:
            codes_bn = code.to_dense(n)  # the dense form materialises this; untimed here
            t4 = time.perf_counter()
            dense.update(codes_bn, x_bd)
            times["dense"] += time.perf_counter() - t4
            mono_subsample.update(code, x_bd)
            dense_rows += b
    t5 = time.perf_counter()
    scores = mono.scores()
    times["mono"] += time.perf_counter() - t5
    t6 = time.perf_counter()
    dense_scores = dense.sparse_twin.scores()
    times["dense"] += time.perf_counter() - t6
    agreement = (dense_scores - mono_subsample.scores()).abs().nan_to_num(0.0).max()
    return _report(args, times, per_chunk, dense_rows, scores, float(agreement))


def _report(args: argparse.Namespace, times: dict, per_chunk: dict[str, list[float]],
            dense_rows: int, scores: torch.Tensor, dense_vs_sparse: float) -> dict:
    # Medians resist bursts of load from other processes on a shared machine.
    median_ms = {key: round(1000 * statistics.median(values), 2)
                 for key, values in per_chunk.items()}
    dense_extrapolated = (times["dense"] * args.n_samples / dense_rows if dense_rows
                          else float("nan"))
    return {
        "benchmark": "monoscore",
        "n_samples": args.n_samples, "n_latents": args.n_latents, "k": args.k, "dim": args.dim,
        "chunk_size": args.chunk_size, "torch_threads": torch.get_num_threads(),
        "encoder_pass_s": round(times["encoder"], 3),
        "topk_s": round(times["topk"], 3),
        "monoscore_s": round(times["mono"], 3),
        "monoscore_over_encoder": round(times["mono"] / times["encoder"], 4),
        "target_monoscore_le_encoder": times["mono"] <= times["encoder"],
        "encoder_chunk_median_ms": median_ms["encoder"],
        "monoscore_chunk_median_ms": median_ms["mono"],
        "monoscore_over_encoder_median": round(median_ms["mono"] / median_ms["encoder"], 4),
        "dense_measured_samples": dense_rows,
        "dense_measured_s": round(times["dense"], 3),
        "dense_extrapolated_s": round(dense_extrapolated, 3),
        "dense_note": f"dense O(N n d) form timed on the first {dense_rows} samples, "
                      f"extrapolated linearly to N={args.n_samples}",
        "dense_over_monoscore": round(dense_extrapolated / times["mono"], 2),
        "dense_vs_sparse_max_abs_diff": dense_vs_sparse,
        "scored_latents": int((~torch.isnan(scores)).sum()),
        "mono_live": float(scores[~torch.isnan(scores)].mean()),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "load_average_1min": round(os.getloadavg()[0], 2),  # other processes skew timings
    }


def main(argv: Sequence[str] | None = None) -> dict:
    result = run(parse(argv))
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
