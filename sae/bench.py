"""Benchmarks, one JSON line per case: ``python -m sae.bench [step|monoscore|eval|extract|pack] [options]``.

``step`` (the default): the training step against one dense encoder product and the reference
step (``sae.benchmarks.step``). ``monoscore``: the MonoSemanticity score
(``sae.benchmarks.monoscore``). ``eval``: the evaluation stage per metric family
(``sae.benchmarks.eval``). ``extract``: stage 1's decode-only, model-only and pipeline images/s
per backbone (``sae.benchmarks.extract``). ``pack``: the step per member of a pack of G cells
against one unpacked step (``sae.benchmarks.pack``). ``python -m sae.bench <name> --help`` lists
the options.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

BENCHMARKS = ("step", "monoscore", "eval", "extract", "pack")


def cli(argv: Sequence[str] | None = None) -> None:
    # OpenMP threads that spin while they wait turn a shared machine's contention into
    # stalls (docs/performance.md). Set before torch (and its OpenMP runtime) is loaded; an
    # explicit value wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = list(sys.argv[1:] if argv is None else argv)
    name = args.pop(0) if args and args[0] in BENCHMARKS else "step"
    if name == "monoscore":  # imported lazily: each benchmark pulls in only what it needs
        from sae.benchmarks.monoscore import main
    elif name == "eval":
        from sae.benchmarks.eval import main
    elif name == "extract":
        from sae.benchmarks.extract import main
    elif name == "pack":
        from sae.benchmarks.pack import main
    else:
        from sae.benchmarks.step import main
    main(args)


if __name__ == "__main__":
    cli()
