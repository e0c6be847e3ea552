"""Packed-step benchmark: the step time per member of a pack of G, against one unpacked step.

    python -m sae.bench pack [--sizes demo,mid] [--device cuda] [--bf16] [--packs 1,2,4,8,16]

One JSON line per (size, G). The unpacked step is the trainer's own
(``sae.training.trainer.train_step`` with the fused loss of ``sae.training.fast``, as a lone run with the default
``train.fast_path``); the packed step is ``sae.training.packed.packed_train_step``. Both gather their
batches from embeddings held on the device (the unpacked one batch, the pack one per member) and
run L1/L2 with the mask; the pack's members differ in seed (initialisation and batch order).
The unpacked step is timed in the same process, interleaved with the packs, so load from other
processes hits both alike; each time is the best of the repeats of ``--steps`` steps, and
``ratio`` = (packed time / G) / unpacked time. On CUDA the ``imagenet`` size (n 8192, d 1024,
batch 2048, k 64) is added with G = 1, 15 and 45; its records carry the extrapolated time of 50
epochs of ImageNet-1k (1,281,167 samples) for the pack, and of the paper grid's 270 runs
trained in packs of that size. On CUDA each G is timed twice: ``eager`` (op by op) and
``graph`` (replayed as the packed trainer's CUDA graphs, ``sae.training.packed_graph``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from sae.benchmarks.common import profile_table, tune_cpu_allocator
from sae.model import TopKSAE
from sae.training.fast import fast_training_loss
from sae.training.packed import MemberSpec, PackCoefficients, PackedSAE, packed_train_step
from sae.training.packed_graph import PackedGraphStep
from sae.training.trainer import TrainState, train_step

SIZES = {
    "demo": {"batch": 256, "dim": 64, "latents": 512, "k": 8},  # sweeps/demo.yaml, sae=tiny
    "mid": {"batch": 1024, "dim": 256, "latents": 2048, "k": 32},
    "imagenet": {"batch": 2048, "dim": 1024, "latents": 8192, "k": 64},  # CUDA only
}
IMAGENET_SAMPLES = 1_281_167
PAPER_GRID_RUNS = 270  # sweeps/paper.yaml's training runs (issue 21's figure)
EPOCHS = 50
WINDOW = 10_000_000  # the paper's dead window (samples)
STRENGTH = 1e-2
LR, ADAM_EPS = 1e-4, 6.25e-10


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sae.bench pack", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--sizes", help=f"comma-separated, from {', '.join(SIZES)} (default: demo,"
                   "mid; plus imagenet on CUDA)")
    p.add_argument("--packs", default=None,
                   help="comma-separated pack sizes G (default 1,2,4,8,16; plus 15 for imagenet)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (best is kept)")
    p.add_argument("--steps", type=int, default=5, help="steps per timed repeat")
    p.add_argument("--samples", type=int, default=32768,
                   help="on-device embeddings the batches are gathered from")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast in both steps")
    p.add_argument("--dead-fraction", type=float, default=0.0,
                   help="latents marked dead at the start in every model (AuxK does work)")
    p.add_argument("--modes", default=None,
                   help="comma-separated: eager (op by op), graph (the packed trainer's CUDA "
                   "graph replay, CUDA only); default eager on the CPU, eager,graph on CUDA")
    p.add_argument("--profile", type=int, metavar="ROWS", default=0,
                   help="after the timings, print the op-by-op profile (costliest ROWS ops) of "
                   "3 eager steps of the largest pack of each size")
    p.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.sizes = (args.sizes.split(",") if args.sizes
                  else ["demo", "mid", *(["imagenet"] if cuda else [])])
    unknown = sorted(set(args.sizes) - set(SIZES))
    if unknown:
        p.error(f"unknown size(s) {', '.join(unknown)}; choose from {', '.join(SIZES)}")
    args.packs = [int(g) for g in args.packs.split(",")] if args.packs else None
    args.modes = args.modes.split(",") if args.modes else ["eager", *(["graph"] if cuda else [])]
    if set(args.modes) - {"eager", "graph"} or ("graph" in args.modes and not cuda):
        p.error("--modes takes eager and graph (graph on CUDA only)")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(fn: Callable[[], object], device: torch.device, steps: int) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / steps


def make_models(size: dict, count: int, device: torch.device, seed: int) -> list[TopKSAE]:
    models = []
    for member in range(count):
        torch.manual_seed(seed + member)
        models.append(TopKSAE(size["dim"], size["latents"], size["k"]).to(device))
    return models


def initial_counters(size: dict, fraction: float, device: torch.device) -> torch.Tensor:
    """(n,) samples-since-fired: a leading fraction of the latents already past the window."""
    counters = torch.zeros(size["latents"], dtype=torch.int64, device=device)
    counters[: round(fraction * size["latents"])] = WINDOW
    return counters


class Unpacked:
    """One lone cell: the trainer's step on its own batch gather."""

    def __init__(self, args, size, x, device) -> None:
        self.model = make_models(size, 1, device, args.seed)[0]
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=LR, eps=ADAM_EPS,
                                          fused=True)
        self.state = TrainState(0, initial_counters(size, args.dead_fraction, device))
        self.kwargs = {"regularizer": "l1l2", "strength": STRENGTH, "mask": True, "eps": 1e-8,
                       "aux_alpha": 1 / 32, "aux_k": min(size["dim"] // 2, size["latents"])}
        if device.type != "cpu":  # as the trainer: a host bound on the dead count
            self.kwargs["dead_bound"] = round(args.dead_fraction * size["latents"])
        self.x, self.batch, self.bf16 = x, size["batch"], args.bf16
        self.order = torch.randperm(x.shape[0], device=device)

    def step(self) -> None:
        start = (self.state.step * self.batch) % (self.x.shape[0] - self.batch)
        x = self.x[self.order[start:start + self.batch]]
        train_step(self.model, self.optimizer, x, self.state, fast_training_loss, self.kwargs,
                   WINDOW, self.bf16)


class Packed:
    """G cells of one shape, differing in seed: the packed step on G batch gathers, op by op
    or (``graph``) replayed as the packed trainer's CUDA graph."""

    def __init__(self, args, size, x, device, count: int, graph: bool = False) -> None:
        self.pack = PackedSAE(make_models(size, count, device, args.seed))
        self.optimizer = torch.optim.Adam(self.pack.parameters(), lr=LR, eps=ADAM_EPS,
                                          fused=True)
        counters = initial_counters(size, args.dead_fraction, device)
        self.counters = counters.unsqueeze(0).repeat(count, 1)
        spec = MemberSpec(size["k"], "l1l2", STRENGTH, True, 1e-8)
        self.coeffs = PackCoefficients.build([spec] * count, device)
        self.aux_k = min(size["dim"] // 2, size["latents"])
        # As the trainer on an accelerator: AuxK for the members that may have dead latents.
        self.aux_members = list(range(count)) if args.dead_fraction > 0 else []
        self.x, self.batch, self.bf16 = x, size["batch"], args.bf16
        self.orders = torch.stack([torch.randperm(x.shape[0], device=device)
                                   for _ in range(count)])
        self.steps = 0
        self.graph = (PackedGraphStep(self.pack, self.optimizer, self.counters, self.coeffs,
                                      WINDOW, 1 / 32, self.aux_k, self.bf16, self.batch)
                      if graph else None)

    def step(self) -> None:
        start = (self.steps * self.batch) % (self.x.shape[0] - self.batch)
        index_gb = self.orders[:, start:start + self.batch]
        x = self.x[index_gb.reshape(-1)].view(*index_gb.shape, -1)
        if self.graph is not None:
            self.graph(x, self.aux_members)
        else:
            packed_train_step(self.pack, self.optimizer, x, self.counters, self.coeffs, WINDOW,
                              1 / 32, self.aux_k, self.bf16, aux_members=None
                              if self.x.device.type == "cpu" else self.aux_members)
        self.steps += 1


def bench_size(args: argparse.Namespace, name: str, device: torch.device) -> list[dict]:
    size = SIZES[name]
    packs = args.packs or ([1, 15, 45] if name == "imagenet" else [1, 2, 4, 8, 16])
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    samples = max(args.samples, 4 * size["batch"])
    x = F.normalize(torch.randn(samples, size["dim"], generator=g), dim=1).to(device)
    lone = Unpacked(args, size, x, device)
    keys = [(count, mode) for count in sorted(set(packs)) for mode in args.modes]
    best = {"lone": math.inf}
    for key in keys:  # one pack at a time on the device: the G = 45 ones are large
        runner = Packed(args, size, x, device, key[0], graph=key[1] == "graph")
        for _ in range(2):  # warm-up: allocator, kernels, the graph's capture
            runner.step()
            lone.step()
        best[key] = math.inf
        for _ in range(args.repeats):  # the lone step interleaved: the same load hits both
            best["lone"] = min(best["lone"], _best_seconds(lone.step, device, args.steps))
            best[key] = min(best[key], _best_seconds(runner.step, device, args.steps))
        del runner
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.profile:
        runner = Packed(args, size, x, device, max(packs))
        runner.step()
        print(f"profile: {name}, G = {max(packs)}, 3 eager steps", flush=True)
        print(profile_table(lambda: [runner.step() for _ in range(3)], args.device,
                            args.profile), flush=True)
        del runner
    return [_record(args, name, size, count, mode, best[(count, mode)], best["lone"])
            for count in packs for mode in args.modes]


def _record(args, name: str, size: dict, count: int, mode: str, packed_s: float,
            lone_s: float) -> dict:
    record = {"bench": "pack", "size": name, **size, "device": args.device, "bf16": args.bf16,
              "regularizer": "l1l2+mask", "dead_fraction": args.dead_fraction, "G": count,
              "mode": mode,
              "unpacked_step_ms": round(1e3 * lone_s, 4),
              "packed_step_ms": round(1e3 * packed_s, 4),
              "per_member_ms": round(1e3 * packed_s / count, 4),
              "ratio": round(packed_s / count / lone_s, 4),
              "threads": torch.get_num_threads()}
    if name == "imagenet":
        steps = math.ceil(IMAGENET_SAMPLES / size["batch"]) * EPOCHS
        record["epochs"] = EPOCHS
        record["pack_train_s_extrapolated"] = round(steps * packed_s, 1)
        record["unpacked_train_s_extrapolated"] = round(steps * lone_s * count, 1)
        # The paper grid's training (PAPER_GRID_RUNS ImageNet-size runs) in packs like this one.
        record["paper_grid_gpu_h_extrapolated"] = round(
            PAPER_GRID_RUNS * steps * packed_s / count / 3600, 3)
    return record


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cpu":
        tune_cpu_allocator()
        torch.set_flush_denormal(True)  # as the trainers
    records = []
    for name in args.sizes:
        for record in bench_size(args, name, device):
            line = json.dumps(record)
            print(line, flush=True)
            if args.out:
                with args.out.open("a") as handle:
                    handle.write(line + "\n")
            records.append(record)
    return records
