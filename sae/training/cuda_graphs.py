"""Capturing a training step as a CUDA graph without letting the capture train.

A step captured with ``torch.cuda.graph`` must first run a few times on a side stream (lazy
initialisation: Adam's moments, cuBLAS workspaces). Those warm-up steps would train; here they
run on the live tensors and the tensors are restored afterwards, so a capture leaves the
training state as it found it (tests/test_bench.py and tests/test_packed.py check on CUDA that
replays train exactly as the eager step). Optimizer state the warm-up created (Adam's moments
and step count on a fresh start) goes back to zero, its initial value.

A step can be captured when it never synchronises with the host and its shapes depend only on
host values fixed at capture: both the lone fast step (``sae.training.fast``) and the packed step
(``sae.training.packed``) are written so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

Output = TypeVar("Output")
WARMUP_STEPS = 3  # torch.cuda.graphs' advice: a few iterations on a side stream


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [value for state in optimizer.state.values() for value in state.values()
            if torch.is_tensor(value)]


def capture_step(body: Callable[[], Output], state: Callable[[], list[torch.Tensor]],
                 zero_grad: Callable[[], None], pool=None
                 ) -> tuple[torch.cuda.CUDAGraph, Output]:
    """Capture ``body`` (one training step) as a graph; returns it and the body's output (static
    tensors the replays overwrite). ``state()`` lists every tensor a step mutates (parameters,
    counters, optimizer state); ``zero_grad`` sets the gradients to None (a step's backward
    then allocates them inside the graph). ``pool``: a memory pool shared with other graphs of
    the same step, replayed one at a time."""
    saved = state()
    with torch.no_grad():  # a clone in the autograd graph would keep a stale
        snapshot = [tensor.clone() for tensor in saved]  # AccumulateGrad node alive
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP_STEPS):
            zero_grad()
            body()
    torch.cuda.current_stream().wait_stream(side)
    known = {id(tensor) for tensor in saved}
    with torch.no_grad():
        for tensor, value in zip(saved, snapshot):
            tensor.copy_(value)
        for tensor in state():
            if id(tensor) not in known:
                tensor.zero_()
    zero_grad()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = body()
    return graph, output
