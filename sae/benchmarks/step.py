"""Training-step benchmark: the fast step against one dense encoder product and the reference.

    python -m sae.bench step [--quick] [--device cuda] [--batch B --dim D --latents N --k K]
    python -m sae.bench step --train --device cuda [--bf16] [--cuda-graph] [--max-seconds 60]

One JSON line per case. A step is what the trainer does: zero_grad, loss, backward, decoder
gradient projection, Adam, decoder normalisation, dead-latent counters; the fast step uses
``sae.fast.fast_training_loss``, the reference step ``sae.losses.training_loss``. The encoder
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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from sae import fast
from sae.fast import (
    dead_count_bound,
    fast_training_loss,
    tune_cpu_allocator,
    use_compiled_kernels,
)
from sae.losses import training_loss
from sae.model import TopKSAE
from sae.trainer import TrainState, autocast, train_step


@dataclass(frozen=True)
class Case:
    name: str
    regularizer: str
    mask: bool
    dead_fraction: float = 0.0  # latents marked dead (AuxK does work when > 0)


CASES = (
    Case("none", "none", False),
    Case("offsupport_l1+mask", "offsupport_l1", True),
    Case("l1l2+mask", "l1l2", True),
    Case("l1l2-nomask", "l1l2", False),
    Case("none+dead2%", "none", False, 0.02),
    Case("l1l2+mask+dead2%", "l1l2", True, 0.02),
)
DEFAULT = {"batch": 1024, "dim": 768, "latents": 12288, "k": 32}
QUICK = {"batch": 512, "dim": 384, "latents": 6144, "k": 32}
STRENGTH = 1e-2  # any positive lambda costs the same
WINDOW = 10_000_000  # dead window of the config (samples)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
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
                   + ", ".join(c.name for c in CASES).replace("%", "%%"))
    p.add_argument("--no-reference", action="store_true", help="skip the reference step")
    p.add_argument("--bf16", action="store_true",
                   help="autocast bf16 around the fast step and the product (the reference runs "
                        "in float32)")
    p.add_argument("--compile", action="store_true",
                   help="fuse the regularizers' elementwise passes (sae.fast.use_compiled_kernels)")
    p.add_argument("--decoder", choices=fast.DECODER_MODES, default="auto",
                   help="formulation of the k-sparse parts: gathers (sparse) or products with "
                        "the dense code (dense); auto = by device (sae.fast.set_formulation)")
    p.add_argument("--topk", choices=fast.TOPK_MODES, default="auto",
                   help="Top-k by group maxima (chunks) or torch.topk (plain); auto = by device")
    p.add_argument("--no-dead-bound", action="store_true",
                   help="call the fast step without dead_bound, as a trainer that does not "
                        "pass one (on CUDA AuxK then looks at all n columns)")
    p.add_argument("--no-tune-allocator", action="store_true",
                   help="leave glibc's allocator as it is (see sae.fast.tune_cpu_allocator)")
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
        unknown = sorted(set(args.cases) - {c.name for c in CASES})
        if unknown:
            p.error(f"unknown case(s) {', '.join(unknown)}; choose from "
                    + ", ".join(c.name for c in CASES))
    size = QUICK if args.quick else DEFAULT
    if args.train:
        size = {"batch": 4096, "dim": 1024, "latents": 8192, "k": 64}
    for key, value in size.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    return args


# -- one step ---------------------------------------------------------------------------------
@dataclass
class Trainee:
    """A model, its optimizer and its training state (dead-latent counters), as the trainer
    holds them; each step is the trainer's own (sae.trainer.train_step)."""

    model: TopKSAE
    optimizer: torch.optim.Optimizer
    state: TrainState

    @property
    def samples_since_fired(self) -> torch.Tensor:  # (n,) int64
        return self.state.samples_since_fired

    def step(self, x: torch.Tensor, loss_fn: Callable, loss_kwargs: dict, window: int,
             bf16: bool) -> torch.Tensor:
        """One trainer step; (total, nmse, auxk, penalty) on the device, no host sync."""
        return train_step(self.model, self.optimizer, x, self.state, loss_fn, loss_kwargs,
                          window, bf16)


def make_trainee(args: argparse.Namespace, seed: int, capturable: bool = False) -> Trainee:
    torch.manual_seed(seed)
    model = TopKSAE(args.dim, args.latents, args.k).to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, eps=6.25e-10, fused=True,
                                 capturable=capturable)
    counters = torch.zeros(args.latents, dtype=torch.int64, device=args.device)
    return Trainee(model, optimizer, TrainState(0, counters))


def with_dead_mask(loss_fn: Callable, fixed_dead: torch.Tensor, **extra) -> Callable:
    """``loss_fn`` with a fixed dead mask in place of the one the trainer derives from its
    counters (the step benchmark's cases fix which latents are dead)."""
    def loss(model: TopKSAE, x: torch.Tensor, *, dead: torch.Tensor, **kwargs):
        return loss_fn(model, x, dead=fixed_dead, **extra, **kwargs)

    return loss


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn: Callable[[], object], device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


# -- the step benchmark ---------------------------------------------------------------------------
def loss_kwargs(args: argparse.Namespace, case: Case) -> dict:
    return {"regularizer": case.regularizer, "strength": STRENGTH, "mask": case.mask,
            "eps": 1e-8, "aux_alpha": 1 / 32, "aux_k": min(args.dim // 2, args.latents)}


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
    # Host-known, as at a trainer's log step (sae.fast.dead_count_bound).
    n_dead = None if args.no_dead_bound else round(case.dead_fraction * args.latents)
    fast = make_trainee(args, args.seed)
    # With --bf16 the reference still runs in float32: the speedup is what a user gains by
    # switching from the plain float32 step to the fast step in bf16.
    ref = None if args.no_reference else make_trainee(args, args.seed)
    W_enc, b_enc = fast.model.W_enc.detach(), fast.model.b_enc.detach()

    device_type = torch.device(args.device).type
    fast_loss = with_dead_mask(fast_training_loss, dead, dead_bound=n_dead)
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
        times["product"].append(_timed(lambda: product(x), args.device))  # noqa: B023
        times["fast"].append(_timed(lambda: fast_step(x), args.device))  # noqa: B023
        if ref is not None:
            times["ref"].append(_timed(lambda: ref_step(x), args.device))  # noqa: B023
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
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return round((torch.cuda.max_memory_allocated(device) - before) / 2**20, 1)


def profile_table(fn: Callable[[], object], device: str, rows: int) -> str:
    """The costliest ops of ``fn`` by self time: where a step's time goes, op by op."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    on_cuda = device.startswith("cuda")
    if on_cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        _sync(device)
    sort_by = "self_device_time_total" if on_cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=rows)


def _case_record(args: argparse.Namespace, case: Case, kwargs: dict,
                 times: dict[str, list[float]]) -> dict:
    """Times are the best of the repeats (as timeit: the least disturbed by other processes);
    ``ratio`` = best step / best product. ``ratio_paired_median``: the median over repeats of
    step / product timed side by side, a check that the two agree."""
    def best_ms(key: str) -> float | None:
        return round(1e3 * min(times[key]), 2) if times[key] else None

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
    return record


# -- the timed training run ------------------------------------------------------------------------
def unit_embeddings(n: int, d: int, device: str, seed: int) -> torch.Tensor:
    """(n, d) random unit vectors made on the device in chunks (no host copy of 5 GB)."""
    g = torch.Generator(device=device).manual_seed(seed)
    data = torch.empty(n, d, device=device)
    for start in range(0, n, 65536):
        chunk = data[start:start + 65536]
        chunk.normal_(generator=g)
        chunk.div_(chunk.norm(dim=1, keepdim=True))
    return data


class EagerStep:
    """The trainer's step, op by op."""

    def __init__(self, trainee: Trainee, kwargs: dict, window: int, autocast: bool) -> None:
        self.trainee, self.kwargs, self.window, self.autocast = trainee, kwargs, window, autocast

    def __call__(self, x: torch.Tensor, dead_bound: int) -> torch.Tensor:
        return self.trainee.step(x, lambda *a, **kw: fast_training_loss(
            *a, **kw, dead_bound=dead_bound), self.kwargs, self.window, self.autocast)


class GraphStep(EagerStep):
    """The same step captured once as a CUDA graph and replayed: possible because the fast
    step never synchronises and its shapes depend only on host integers. The AuxK column
    count is baked in, so the graph is captured again when the dead-count bound outgrows it
    (capacities are powers of two). A capture leaves the training state as it found it: its
    warm-up steps run on a snapshot that is restored afterwards (tests/test_bench.py checks
    that replays train exactly as the eager step)."""

    def __init__(self, trainee: Trainee, kwargs: dict, window: int, autocast: bool,
                 batch: int, dim: int) -> None:
        super().__init__(trainee, kwargs, window, autocast)
        self.x = torch.zeros(batch, dim, device="cuda")
        self.capacity, self.graph, self.loss = -1, None, None
        self.captures = 0

    def __call__(self, x: torch.Tensor, dead_bound: int) -> torch.Tensor:
        self.x.copy_(x)
        if dead_bound > self.capacity:
            n = self.trainee.model.n_latents
            self._capture(0 if dead_bound == 0 else min(n, 1 << (dead_bound - 1).bit_length()))
        self.graph.replay()
        return self.loss.clone()

    def _body(self, capacity: int) -> torch.Tensor:
        """The eager step on the static input (its zero_grad is a no-op here: the grads are
        already None, and the graph allocates them)."""
        return EagerStep.__call__(self, self.x, capacity)

    def _capture(self, capacity: int) -> None:
        saved = self._state_tensors()
        with torch.no_grad():  # a clone in the autograd graph would keep a stale
            snapshot = [tensor.clone() for tensor in saved]  # AccumulateGrad node alive
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs asks
            for _ in range(3):
                self.trainee.optimizer.zero_grad(set_to_none=True)
                self._body(capacity)
        torch.cuda.current_stream().wait_stream(side)
        self._restore(saved, snapshot)
        self.trainee.optimizer.zero_grad(set_to_none=True)  # grads: allocated in the graph
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = self._body(capacity)
        self.capacity = capacity
        self.captures += 1

    def _state_tensors(self) -> list[torch.Tensor]:
        t = self.trainee
        optimizer_state = [value for state in t.optimizer.state.values()
                           for value in state.values() if torch.is_tensor(value)]
        return [*t.model.parameters(), t.samples_since_fired, *optimizer_state]

    def _restore(self, saved: list[torch.Tensor], snapshot: list[torch.Tensor]) -> None:
        """Undo the warm-up steps. Optimizer state they created (Adam's moments and step
        count, made at the first step) goes back to its initial value, zero."""
        known = {id(tensor) for tensor in saved}
        with torch.no_grad():
            for tensor, value in zip(saved, snapshot):
                tensor.copy_(value)
            for tensor in self._state_tensors():
                if id(tensor) not in known:
                    tensor.zero_()


def bench_train(args: argparse.Namespace) -> dict:
    data = unit_embeddings(args.samples, args.dim, args.device, args.seed)
    trainee = make_trainee(args, args.seed, capturable=args.cuda_graph)
    trainee.model.init_b_pre_(data[:65536])
    kwargs = loss_kwargs(args, Case("l1l2+mask", "l1l2", True))
    steps_per_epoch = args.samples // args.batch  # the last partial batch is dropped
    total_steps = math.ceil(args.epochs * steps_per_epoch)
    window = min(WINDOW, max(args.batch, 2 * args.samples))  # the trainer's dead window
    horizon = args.log_every * args.batch
    if args.cuda_graph:
        step = GraphStep(trainee, kwargs, window, args.bf16, args.batch, args.dim)
    else:
        step = EagerStep(trainee, kwargs, window, args.bf16)
    bound = 0
    perm = torch.randperm(args.samples, device=args.device)
    for i in range(5):  # warm-up (kernels, allocator); not timed, not counted
        step(data[perm[i * args.batch:(i + 1) * args.batch]], bound)
    trainee.samples_since_fired.zero_()
    _sync(args.device)
    start, done, losses = time.perf_counter(), 0, []
    while done < total_steps:
        position = done % steps_per_epoch
        if position == 0:
            perm = torch.randperm(args.samples, device=args.device)  # on-device shuffle
        losses.append(step(data[perm[position * args.batch:(position + 1) * args.batch]],
                           bound))
        done += 1
        if done % args.log_every == 0:  # the only host read-out, as in the trainer
            bound = dead_count_bound(trainee.samples_since_fired, window, horizon)
            losses = [torch.stack(losses).mean(dim=0)]
            if time.perf_counter() - start > args.max_seconds:
                break
    _sync(args.device)
    seconds = time.perf_counter() - start
    epochs_done = done / steps_per_epoch
    finished = done >= total_steps
    return {
        "bench": "train", "device": args.device, "samples": args.samples, "dim": args.dim,
        "latents": args.latents, "k": args.k, "batch": args.batch, "regularizer": "l1l2+mask",
        "bf16": args.bf16, "compiled": args.compile, "cuda_graph": args.cuda_graph,
        **formulation(args),
        "graph_captures": getattr(step, "captures", None), "steps": done,
        "epochs_done": round(epochs_done, 3), "epochs_target": args.epochs,
        "seconds": round(seconds, 2), "epochs_per_s": round(epochs_done / seconds, 4),
        "step_ms": round(1e3 * seconds / done, 3),
        "total_s_actual": round(seconds, 2) if finished else None,
        "total_s_extrapolated": round(seconds * args.epochs / epochs_done, 1),
        "dead_at_end": int((trainee.samples_since_fired >= window).sum()),
        **dict(zip(("last_loss", "last_nmse"),
                   (round(v, 5) for v in torch.stack(losses).mean(dim=0).tolist()))),
    }


def formulation(args: argparse.Namespace) -> dict:
    """The formulation the fast step took (what "auto" resolved to)."""
    return fast.resolved_formulation(torch.device(args.device).type,
                                     torch.bfloat16 if args.bf16 else None)


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
    fast.set_formulation(args.decoder, args.topk)
    if args.compile:
        use_compiled_kernels()
    if args.train:
        records = [bench_train(args)]
        emit(records[0], args.out)
        return records
    chosen = CASES if args.cases is None else [c for c in CASES if c.name in args.cases]
    records = []
    for case in chosen:
        records.append(bench_case(args, case))
        emit(records[-1], args.out)
    return records


if __name__ == "__main__":
    main(sys.argv[1:])
