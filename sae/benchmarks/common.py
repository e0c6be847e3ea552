"""What the benchmarks share: the cases, a trainee (model, Adam, training state) stepped by the
trainer's own ``train_step``, the loss options, and the benchmark-only process knobs.

Process-wide knobs (the glibc allocator) and the fast step's formulation overrides live here,
in the benchmarks, and nowhere in the product: the trainer takes the defaults.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sae import regularizers
from sae.model import TopKSAE
from sae.training.fast import Formulation, resolved_formulation
from sae.training.trainer import TrainState, train_step


@dataclass(frozen=True)
class Case:
    name: str
    regularizer: str
    mask: bool
    dead_fraction: float = 0.0  # latents marked dead (AuxK does work when > 0)


def default_cases() -> tuple[Case, ...]:
    """One case per registered regularizer (the baseline without mask, the others with), then
    L1/L2 without mask and two with dead latents (AuxK at work)."""
    per_regularizer = tuple(
        Case(name, name, False) if name == regularizers.BASELINE
        else Case(f"{name}+mask", name, True) for name in regularizers.names())
    return (*per_regularizer, Case("l1l2-nomask", "l1l2", False),
            Case("none+dead2%", "none", False, 0.02),
            Case("l1l2+mask+dead2%", "l1l2", True, 0.02))


STRENGTH = 1e-2  # any positive lambda costs the same
WINDOW = 10_000_000  # dead window of the config (samples)


def loss_kwargs(args: argparse.Namespace, case: Case) -> dict:
    return {"regularizer": case.regularizer, "strength": STRENGTH, "mask": case.mask,
            "eps": 1e-8, "aux_alpha": 1 / 32, "aux_k": min(args.dim // 2, args.latents)}


def fast_options(args: argparse.Namespace) -> dict:
    """The fast step's explicit options from the command line: formulation and compilation."""
    return {"formulation": Formulation(args.decoder, args.topk), "compiled": args.compile}


def formulation(args: argparse.Namespace) -> dict:
    """The formulation the fast step took (what "auto" resolved to)."""
    return resolved_formulation(torch.device(args.device).type,
                                torch.bfloat16 if args.bf16 else None,
                                Formulation(args.decoder, args.topk))


def tune_cpu_allocator() -> bool:
    """Keep freed large blocks in the process (glibc: no mmap for big allocations, no trim).

    By default glibc maps and unmaps each large (B, n) temporary on every allocation, and the
    kernel zero-fills it page by page (cost: docs/performance.md). Affects every CPU tensor of
    the process; call once at start-up. Returns False where glibc's mallopt is not available.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**30))
    except (OSError, AttributeError):
        return False


@dataclass
class Trainee:
    """A model, its optimizer and its training state (dead-latent counters), as the trainer
    holds them; each step is the trainer's own (sae.training.trainer.train_step)."""

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


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def profile_table(fn: Callable[[], object], device: str, rows: int) -> str:
    """The costliest ops of ``fn`` by self time: where a step's time goes, op by op."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    on_cuda = device.startswith("cuda")
    if on_cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        sync(device)
    sort_by = "self_device_time_total" if on_cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=rows)
