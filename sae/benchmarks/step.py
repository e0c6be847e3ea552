"""Training-step benchmark: the fast step against one dense encoder product and the reference.

    python -m sae.bench step [--quick] [--device cuda] [--batch B --dim D --latents N --k K]
    python -m sae.bench step --train --device cuda [--bf16] [--cuda-graph] [--max-seconds 60]

One JSON line per case. A step is what the trainer does: zero_grad, loss, backward, decoder
gradient projection, Adam, decoder normalisation, dead-latent counters; the fast step uses
``sae.training.fast.fast_training_loss``, the reference step ``sae.training.losses.training_loss``. The encoder
product ``F.linear(x, W_enc, b_enc)`` (B x d x n, the cost floor of any step) is timed in the
same process, interleaved with the steps, so load from other processes hits all three alike;
each time is the best of the repeats and each ratio a ratio of best times. On CUDA a record
also gives the device memory one step allocates at its peak (``step_peak_mb``, and the
reference's): the fast step keeps no (B, n) temporary it does not need.

``--train``: an ImageNet-sized run (1.28 M x 1024 random unit embeddings held on the device,
n = 8192, k = 64, batch 4096, L1/L2 with mask) with on-device shuffling and on-device
dead-latent bookkeeping; it prints epochs/s and the total time (actual, or extrapolated when
``--max-seconds`` stops it first).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from sae.benchmarks.common import (
    WINDOW,
    Case,
    default_cases,
    fast_options,
    formulation,
    loss_kwargs,
    make_trainee,
    profile_table,
    sync,
    timed,
    tune_cpu_allocator,
    with_dead_mask,
)
from sae.benchmarks.train_run import bench_train
from sae.training.fast import DECODER_MODES, TOPK_MODES, fast_training_loss
from sae.training.losses import training_loss
from sae.training.trainer import autocast

DEFAULT = {"batch": 1024, "dim": 768, "latents": 12288, "k": 32}
QUICK = {"batch": 512, "dim": 384, "latents": 6144, "k": 32}


IMAGENET_SAMPLES = 1_281_167


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    cases = default_cases()
    p = argparse.ArgumentParser(prog="python -m sae.bench step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sizes = "(default {}; --quick {}; --train {})"
    for name, train_value in (("batch", 4096), ("dim", 1024), ("latents", 8192), ("k", 64)):
        p.add_argument(f"--{name}", type=int,
                       help=sizes.format(DEFAULT[name], QUICK[name], train_value))
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--repeats", type=int, help="timed steps per case (default 5, quick 3)")
    p.add_argument("--quick", action="store_true", help=f"small size {QUICK}, < 1 min on 2 cores")
    p.add_argument("--cases", help="comma-separated, from: "
                   + ", ".join(c.name for c in cases).replace("%", "%%"))
    p.add_argument("--no-reference", action="store_true", help="skip the reference step")
    p.add_argument("--bf16", action="store_true",
                   help="autocast bf16 around the fast step and the product (the reference runs "
                        "in float32)")
    p.add_argument("--compile", action="store_true",
                   help="the penalties' fused kernels through torch.compile (the fast step's "
                        "compiled option, as train.compile)")
    p.add_argument("--decoder", choices=DECODER_MODES, default="auto",
                   help="formulation of the k-sparse parts: gathers (sparse) or products with "
                        "the dense code (dense); auto = by device (sae.training.fast.Formulation)")
    p.add_argument("--topk", choices=TOPK_MODES, default="auto",
                   help="Top-k by group maxima (chunks) or torch.topk (plain); auto = by device")
    p.add_argument("--no-dead-bound", action="store_true",
                   help="call the fast step without dead_bound, as a trainer that does not "
                        "pass one (on CUDA AuxK then looks at all n columns)")
    p.add_argument("--no-tune-allocator", action="store_true",
                   help="leave glibc's allocator as it is (sae.benchmarks.common.tune_cpu_allocator)")
    p.add_argument("--profile", type=int, metavar="ROWS", default=0,
                   help="also profile 3 fast steps per case and print the ROWS costliest ops "
                        "(device time on CUDA, CPU time otherwise) to stderr")
    p.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    t = p.add_argument_group("--train: a timed ImageNet-sized run")
    t.add_argument("--train", action="store_true")
    t.add_argument("--samples", type=int, default=1_281_167)
    t.add_argument("--epochs", type=float, default=50)
    t.add_argument("--max-seconds", type=float, default=math.inf,
                   help="stop after this long and extrapolate to --epochs")
    t.add_argument("--log-every", type=int, default=50, help="steps between host read-outs")
    t.add_argument("--cuda-graph", action="store_true",
                   help="replay the step as a CUDA graph (--device cuda)")
    args = p.parse_args(argv)
    if args.cuda_graph and not (args.train and args.device.startswith("cuda")):
        p.error("--cuda-graph needs --train and a CUDA --device")
    if args.cases is not None:
        args.cases = args.cases.split(",")
        unknown = sorted(set(args.cases) - {c.name for c in cases})
        if unknown:
            p.error(f"unknown case(s) {', '.join(unknown)}; choose from "
                    + ", ".join(c.name for c in cases))
    size = QUICK if args.quick else DEFAULT
    if args.train:
        size = {"batch": 4096, "dim": 1024, "latents": 8192, "k": 64}
    for key, value in size.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    return args


# -- the step benchmark ---------------------------------------------------------------------------
def unit_batches(args: argparse.Namespace, count: int) -> list[torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    return [F.normalize(torch.randn(args.batch, args.dim, generator=g), dim=1).to(args.device)
            for _ in range(count)]


def dead_mask(args: argparse.Namespace, fraction: float) -> torch.Tensor:
    """A fixed set of dead latents (a random fraction), as the trainer's window would mark."""
    g = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    dead = torch.zeros(args.latents, dtype=torch.bool)
    dead[torch.randperm(args.latents, generator=g)[: round(fraction * args.latents)]] = True
    return dead.to(args.device)


def bench_case(args: argparse.Namespace, case: Case) -> dict:
    batches = unit_batches(args, 4)
    dead = dead_mask(args, case.dead_fraction)
    kwargs = loss_kwargs(args, case)
    # Host-known, as at a trainer's log step (sae.training.trainer.dead_count_bound).
    n_dead = None if args.no_dead_bound else round(case.dead_fraction * args.latents)
    fast = make_trainee(args, args.seed)
    # With --bf16 the reference still runs in float32: the speedup is what a user gains by
    # switching from the plain float32 step to the fast step in bf16.
    ref = None if args.no_reference else make_trainee(args, args.seed)
    W_enc, b_enc = fast.model.W_enc.detach(), fast.model.b_enc.detach()

    device_type = torch.device(args.device).type
    fast_loss = with_dead_mask(fast_training_loss, dead, dead_bound=n_dead,
                               **fast_options(args))
    ref_loss = with_dead_mask(training_loss, dead)

    def product(x: torch.Tensor):
        with autocast(device_type, args.bf16):
            return F.linear(x, W_enc, b_enc)

    def fast_step(x: torch.Tensor):
        return fast.step(x, fast_loss, kwargs, WINDOW, args.bf16)

    def ref_step(x: torch.Tensor):
        return ref.step(x, ref_loss, kwargs, WINDOW, bf16=False)

    for i in range(3):  # warm-up: allocator, kernels, the batch-active set of a trained model
        x = batches[i % len(batches)]
        product(x)
        fast_step(x)
        if ref is not None:
            ref_step(x)
    times: dict[str, list[float]] = {"product": [], "fast": [], "ref": []}
    for r in range(args.repeats):
        x = batches[r % len(batches)]
        times["product"].append(timed(lambda: product(x), args.device))  # noqa: B023
        times["fast"].append(timed(lambda: fast_step(x), args.device))  # noqa: B023
        if ref is not None:
            times["ref"].append(timed(lambda: ref_step(x), args.device))  # noqa: B023
    if args.profile:
        print(f"--- profile of 3 fast steps: {case.name}", file=sys.stderr)
        print(profile_table(lambda: [fast_step(x) for x in batches[:3]], args.device,
                            args.profile), file=sys.stderr, flush=True)
    record = _case_record(args, case, kwargs, times)
    record["step_peak_mb"] = peak_memory_mb(lambda: fast_step(batches[0]), args.device)
    record["reference_step_peak_mb"] = (None if ref is None else
                                        peak_memory_mb(lambda: ref_step(batches[0]), args.device))
    return record


def peak_memory_mb(fn: Callable[[], object], device: str) -> float | None:
    """Device memory a step allocates at its peak beyond what is held before it (CUDA's
    allocator statistics; None on the CPU, which keeps none)."""
    if not device.startswith("cuda"):
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return round((torch.cuda.max_memory_allocated(device) - before) / 2**20, 1)


def _case_record(args: argparse.Namespace, case: Case, kwargs: dict,
                 times: dict[str, list[float]]) -> dict:
    """Times are the best of the repeats (as timeit: the least disturbed by other processes);
    ``ratio`` = best step / best product. ``ratio_paired_median``: the median over repeats of
    step / product timed side by side, a check that the two agree."""
    def best_ms(key: str) -> float | None:  # 4 significant digits: a tiny product is 0.02 ms
        return float(f"{1e3 * min(times[key]):.4g}") if times[key] else None

    def ratio(key: str) -> float | None:
        return round(min(times[key]) / min(times["product"]), 3) if times[key] else None

    def paired(key: str) -> float | None:
        if not times[key]:
            return None
        return round(statistics.median(s / p for s, p in zip(times[key], times["product"])), 3)

    record = {
        "bench": "step", "case": case.name, "device": args.device,
        "batch": args.batch, "dim": args.dim, "latents": args.latents, "k": args.k,
        "aux_k": kwargs["aux_k"], "dead": round(case.dead_fraction * args.latents),
        "bf16": args.bf16, "compiled": args.compile, "dead_bound": not args.no_dead_bound,
        **formulation(args),
        "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "repeats": args.repeats,
        "step_ms": best_ms("fast"), "encoder_product_ms": best_ms("product"),
        "ratio": ratio("fast"), "ratio_paired_median": paired("fast"),
        "reference_step_ms": best_ms("ref"), "reference_ratio": ratio("ref"),
        "reference_dtype": "float32" if times["ref"] else None,
    }
    if times["ref"]:
        record["speedup_vs_reference"] = round(min(times["ref"]) / min(times["fast"]), 2)
    # One lone cell's 50 epochs of ImageNet-1k at this step time (batch args.batch).
    steps = math.ceil(IMAGENET_SAMPLES / args.batch) * 50
    record["imagenet_50_epochs_s_extrapolated"] = round(min(times["fast"]) * steps, 1)
    return record


def emit(record: dict, out: Path | None) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(line + "\n")


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cpu" and not args.no_tune_allocator:
        tune_cpu_allocator()
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 here
    if args.train:
        records = [bench_train(args)]
        emit(records[0], args.out)
        return records
    cases = default_cases()
    chosen = cases if args.cases is None else [c for c in cases if c.name in args.cases]
    records = []
    for case in chosen:
        records.append(bench_case(args, case))
        emit(records[-1], args.out)
    return records


if __name__ == "__main__":
    main(sys.argv[1:])
