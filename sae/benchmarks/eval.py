"""Evaluation cost per metric family, in one process: ``python -m sae.bench eval``.

A random Top-k SAE (untrained: evaluation cost does not depend on training) encodes synthetic
clustered unit embeddings (class prototypes plus noise, so the probes have something to learn).
The evaluation split streams through the same accumulators as ``sae.evaluation.evaluate``, each family
timed apart; then the probes: the truncated-code probes (``eval.probe_m`` plus k) and the
raw-embedding probe, computed into an empty store and then read back, as every later cell
that shares the embeddings does. One JSON line per family, then a ``total`` line.

    python -m sae.bench eval --size demo              # digits-like: n 512, k 16, d 64 (seconds)
    python -m sae.bench eval --size paper             # n 8192, k 64, d 768, 1000 classes,
                                                      # 100k probe-train, 50k eval (minutes)
    python -m sae.bench eval --size paper --quick     # the paper's shapes, samples / 4
    python -m sae.bench eval --size paper --reference # also time the pre-issue-15 probes

``--reference`` times the previous probe path in the same process (torch's full-width
``embedding_bag`` with autograd, the raw-embedding probe recomputed for every cell) and reports the
largest accuracy difference between the two. With ``--sample-scale s`` the sample counts are
scaled by s; the probe costs are linear in the sample count (full-batch passes), so
``total_extrapolated_s`` divides by s.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from sae.evaluation.probe_store import stored_linear_probe
from sae.metrics import (
    FiringCounter,
    MonoAccumulator,
    PurityAccumulator,
    R2Accumulator,
    inference_ks,
    linear_probe,
    truncated_probe,
)
from sae.model import SparseCode, TopKSAE

SIZES = {
    "demo": {"n_train": 5_000, "n_eval": 2_048, "dim": 64, "n_latents": 512, "k": 16,
             "n_classes": 10, "probe_epochs": 20},
    "paper": {"n_train": 100_000, "n_eval": 50_000, "dim": 768, "n_latents": 8192, "k": 64,
              "n_classes": 1000, "probe_epochs": 30},
}
K_MULTIPLES = (0.25, 0.5, 1.0, 2.0, 4.0)  # EvalConfig's defaults
PROBE_M = (1, 2, 4, 8, 16, 32)
CHUNK_SIZE = 8192
PROBE_CHUNK_ROWS = 65_536  # sae.evaluation.evaluate's


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sae.bench eval",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="demo")
    parser.add_argument("--quick", action="store_true", help="sample counts / 4")
    parser.add_argument("--sample-scale", type=float, default=None,
                        help="multiply the probe-train and eval sample counts (default 1)")
    parser.add_argument("--reference", action="store_true",
                        help="also time the previous probe path (full-width embedding_bag, "
                             "raw-embedding probe recomputed per cell)")
    parser.add_argument("--device", default="cpu",
                        help="cpu (default) or cuda: where the SAE, the data and the probes live, "
                             "as sae.evaluation.evaluate on the training device")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's, one per core)")
    args = parser.parse_args(argv)
    if args.sample_scale is None:
        args.sample_scale = 0.25 if args.quick else 1.0
    shape = SIZES[args.size]
    args.shape = shape | {"n_train": max(64, round(shape["n_train"] * args.sample_scale)),
                          "n_eval": max(64, round(shape["n_eval"] * args.sample_scale))}
    return args


def clustered_embeddings(n_samples: int, dim: int, n_classes: int, generator: torch.Generator
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit embeddings around one random prototype per class, and their labels (N,)."""
    prototypes_cd = F.normalize(torch.randn(n_classes, dim, generator=generator), dim=1)
    labels_n = torch.randint(0, n_classes, (n_samples,), generator=generator)
    # Noise of 0.3 per coordinate against prototypes 1.4 apart: classes overlap, so the probes
    # on codes stay below 100 % (a separable problem would also end L-BFGS early).
    noise_nd = 0.3 * torch.randn(n_samples, dim, generator=generator)
    return F.normalize(prototypes_cd[labels_n] + noise_nd, dim=1), labels_n


class Timer:
    """Wall and process-CPU seconds per family, summed over calls. On a shared machine the CPU
    seconds (all threads of this process) move less with the other processes' load. On CUDA
    each family ends with a synchronisation, so its kernels count where they were launched."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self.cuda = device is not None and device.type == "cuda"

    @contextmanager
    def __call__(self, family: str):
        if self.cuda:
            torch.cuda.synchronize()
        started, cpu_started = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            for store, now, then in ((self.seconds, time.perf_counter(), started),
                                     (self.cpu_seconds, time.process_time(), cpu_started)):
                store[family] = store.get(family, 0.0) + now - then


@torch.no_grad()
def stream_families(sae: TopKSAE, x_nd: torch.Tensor, labels_n: torch.Tensor, shape: dict,
                    timer: Timer) -> None:
    """The evaluation split's single pass (as ``sae.evaluation.evaluate``), each family timed apart."""
    k, n = shape["k"], shape["n_latents"]
    device = x_nd.device
    ks = inference_ks(k, K_MULTIPLES, n)
    r2_by_k = {kk: R2Accumulator() for kk in ks}
    firing, mono = FiringCounter(n, device), MonoAccumulator(n, shape["dim"], device)
    purity = PurityAccumulator(n, shape["n_classes"], device)
    for start in range(0, x_nd.shape[0], CHUNK_SIZE):
        x_bd = x_nd[start:start + CHUNK_SIZE]
        with timer("encode"):
            pre_bn, stats = sae.encode_pre(x_bd)
            code = sae.select(pre_bn, k)
        with timer("reconstruction"):
            r2_by_k[k].update(x_bd, sae.decode(code, stats))
        with timer("robustness"):
            for kk in ks:
                if kk != k:
                    r2_by_k[kk].update(x_bd, sae.decode(sae.select(pre_bn, kk), stats))
        with timer("dead"):
            firing.update(code)
        with timer("monoscore"):
            mono.update(code, x_bd)
        with timer("purity"):
            purity.update(code, labels_n[start:start + CHUNK_SIZE])
    with timer("reconstruction"):
        r2_by_k[k].result()
    with timer("dead"):
        firing.dead()
    with timer("monoscore"):
        mono.scores()
    with timer("purity"):
        purity.result()


@torch.no_grad()
def encode_all(sae: TopKSAE, x_nd: torch.Tensor, k: int) -> SparseCode:
    codes = [sae.encode(x_nd[s:s + CHUNK_SIZE], k) for s in range(0, x_nd.shape[0], CHUNK_SIZE)]
    return SparseCode(torch.cat([c.values for c in codes]), torch.cat([c.indices for c in codes]))


def probe_families(sae: TopKSAE, data: dict, shape: dict, reference: bool, timer: Timer
                   ) -> dict:
    k = shape["k"]
    with timer("probe_encode"):
        code_train, code_eval = encode_all(sae, data["x_train"], k), encode_all(sae, data["x_eval"], k)
    common = {"n_classes": shape["n_classes"], "weight_decay": 1e-4,
              "max_iter": shape["probe_epochs"], "chunk_size": PROBE_CHUNK_ROWS,
              "device": data["x_train"].device}
    m_values = sorted({min(m, k) for m in PROBE_M} | {k})
    probe_args = (tuple(code_train), data["y_train"], tuple(code_eval), data["y_eval"], m_values)
    with timer("probes_truncated"):
        scores = truncated_probe(*probe_args, n_latents=shape["n_latents"], **common)
    result = {"probe_m": scores}
    if reference:
        with timer("probes_truncated_reference"):
            result["probe_m_reference"] = truncated_probe(
                *probe_args, n_latents=shape["n_latents"], fast=False, **common)
    raw_args = (data["x_train"], data["y_train"], data["x_eval"], data["y_eval"])
    if reference:
        with timer("probe_raw_reference"):
            result["ceiling_reference"] = linear_probe(*raw_args, fast=False, **common)
    with tempfile.TemporaryDirectory() as store:
        with timer("probe_raw_first_cell"):
            result["ceiling"], _ = stored_linear_probe(Path(store), *raw_args, **common)
        with timer("probe_raw"):
            result["ceiling_reused"], reused = stored_linear_probe(Path(store), *raw_args, **common)
    assert reused, "the second call must read the stored raw-embedding probe"
    return result


def warm_up(shape: dict, device: torch.device) -> None:
    """One tiny fit of each probe path, untimed: the first L-BFGS fit of a process pays about a
    CPU-second of one-time start-up (on CUDA: the context and kernel loads) that would
    otherwise land on whichever family runs first."""
    gen = torch.Generator().manual_seed(0)
    indices = torch.randint(0, shape["n_latents"], (64, 2), generator=gen).to(device)
    values = torch.rand(64, 2, generator=gen).to(device)
    labels = torch.randint(0, 2, (64,), generator=gen).to(device)
    for fast in (True, False):
        truncated_probe((values, indices), labels, (values, indices), labels, (1,),
                        n_latents=shape["n_latents"], max_iter=2, fast=fast, device=device)


def run(args: argparse.Namespace) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = args.shape
    generator = torch.Generator().manual_seed(args.seed)
    n_train = shape["n_train"]
    device = torch.device(args.device)
    x_nd, y_n = clustered_embeddings(n_train + shape["n_eval"], shape["dim"], shape["n_classes"],
                                     generator)  # one draw: both splits share the prototypes
    x_nd, y_n = x_nd.to(device), y_n.to(device)
    x_train, y_train, x_eval, y_eval = x_nd[:n_train], y_n[:n_train], x_nd[n_train:], y_n[n_train:]
    torch.manual_seed(args.seed)
    sae = TopKSAE(shape["dim"], shape["n_latents"], shape["k"]).eval()
    sae.init_b_pre_(x_train[:4096].cpu())
    sae = sae.to(device)
    warm_up(shape, device)
    timer = Timer(device)
    stream_families(sae, x_eval, y_eval, shape, timer)
    data = {"x_train": x_train, "y_train": y_train, "x_eval": x_eval, "y_eval": y_eval}
    probes = probe_families(sae, data, shape, args.reference, timer)
    return records(args, timer, probes)


def records(args: argparse.Namespace, timer: Timer, probes: dict) -> list[dict]:
    head = {"benchmark": "eval", "size": args.size, "device": args.device,
            "sample_scale": args.sample_scale,
            **args.shape, "torch_threads": torch.get_num_threads()}
    seconds = timer.seconds
    lines = [head | {"family": family, "seconds": round(value, 3),
                     "cpu_seconds": round(timer.cpu_seconds[family], 3)}
             for family, value in seconds.items()]
    shared = sum(v for f, v in seconds.items() if not f.startswith(("probes_", "probe_raw")))
    total = shared + seconds["probes_truncated"] + seconds["probe_raw"]
    first_cell = shared + seconds["probes_truncated"] + seconds["probe_raw_first_cell"]
    summary = head | {"family": "total", "seconds": round(total, 3),
                      "first_cell_seconds": round(first_cell, 3),
                      "total_extrapolated_s": round(total / args.sample_scale, 1),
                      "ceiling": probes["ceiling"], "ceiling_reused": probes["ceiling_reused"],
                      "probe_m": _str_keys(probes["probe_m"])}
    if "probe_m_reference" in probes:
        reference = (shared + seconds["probes_truncated_reference"]
                     + seconds["probe_raw_reference"])
        gap = max(abs(probes["probe_m"][m] - probes["probe_m_reference"][m])
                  for m in probes["probe_m"])
        summary |= {"reference_seconds": round(reference, 3),
                    "reference_extrapolated_s": round(reference / args.sample_scale, 1),
                    "total_over_reference": round(total / reference, 3),
                    "probe_m_reference": _str_keys(probes["probe_m_reference"]),
                    "probe_max_abs_diff_vs_reference": gap,
                    "ceiling_reference": probes["ceiling_reference"]}
    summary["load_average_1min"] = round(os.getloadavg()[0], 2)  # other processes skew timings
    return [*lines, summary]


def _str_keys(scores: dict[int, float]) -> dict[str, float]:
    return {str(m): v for m, v in scores.items()}


def main(argv: Sequence[str] | None = None) -> list[dict]:
    lines = run(parse(argv))
    for line in lines:
        print(json.dumps(line), flush=True)
    return lines


if __name__ == "__main__":
    main()
