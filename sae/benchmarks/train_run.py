"""``--train``: a timed ImageNet-sized training run of the fast step (on-device data, shuffling
and dead-latent bookkeeping), in epochs/s and total time."""

from __future__ import annotations

import argparse
import math
import time

import torch

from sae.benchmarks.common import (
    WINDOW,
    Case,
    fast_options,
    formulation,
    loss_kwargs,
    make_trainee,
    sync,
)
from sae.benchmarks.graph import EagerStep, GraphStep
from sae.training.trainer import dead_count_bound


def unit_embeddings(n: int, d: int, device: str, seed: int) -> torch.Tensor:
    """(n, d) random unit vectors made on the device in chunks (no host copy of 5 GB)."""
    g = torch.Generator(device=device).manual_seed(seed)
    data = torch.empty(n, d, device=device)
    for start in range(0, n, 65536):
        chunk = data[start:start + 65536]
        chunk.normal_(generator=g)
        chunk.div_(chunk.norm(dim=1, keepdim=True))
    return data


def bench_train(args: argparse.Namespace) -> dict:
    data = unit_embeddings(args.samples, args.dim, args.device, args.seed)
    trainee = make_trainee(args, args.seed, capturable=args.cuda_graph)
    trainee.model.init_b_pre_(data[:65536])
    kwargs = {**loss_kwargs(args, Case("l1l2+mask", "l1l2", True)), **fast_options(args)}
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
    sync(args.device)
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
    sync(args.device)
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
