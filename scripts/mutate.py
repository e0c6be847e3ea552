"""Planted bugs, as a habit: each mutation below is applied to a copy of the project and the tests
that should catch it are run there; one line per mutation says whether they did.

    make mutate                       # or: python scripts/mutate.py [--only WORD] [--list]

A mutation is a real bug of the kind that happened or nearly did (issue 24): a mask ignored, an
eps dropped, AuxK over all latents, a firing threshold, a field left out of a hash. Every one
must be caught; the exit status is 1 when one is not. The working tree is never modified. Not
part of ``make test`` (about 2-4 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COPIED = ("sae", "tests", "conf", "hydra_plugins", "sweeps", "pyproject.toml")
DEFINITIONS = "tests/test_definitions.py"


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    before: str
    after: str
    tests: tuple[str, ...]


MUTATIONS = (
    Mutation("regularizers: the mask ignored in the reference penalty",
             "sae/regularizers/common.py", "    if not mask:\n        return z\n",
             "    if True:\n        return z\n", (DEFINITIONS, "-k", "penalties")),
    Mutation("l1l2: eps dropped from the reference ratio", "sae/regularizers/l1l2.py",
             "    return (l1 / (l2 + eps)).mean()\n", "    return (l1 / l2).mean()\n",
             (DEFINITIONS, "-k", "penalties")),
    Mutation("l1l2: eps dropped from the fused kernel", "sae/regularizers/l1l2.py",
             "return (l1 / (l2 + eps)).mean(), z_bm", "return (l1 / l2).mean(), z_bm",
             (DEFINITIONS, "-k", "penalties")),
    Mutation("packed: eps dropped from the L1/L2 ratio", "sae/training/packed.py",
             "denominator = l2 + coeffs.eps.unsqueeze(1)", "denominator = l2 + 0 * coeffs.eps.unsqueeze(1)",
             (DEFINITIONS, "-k", "penalties")),
    Mutation("off-support L1: the support not subtracted (reference)",
             "sae/regularizers/offsupport_l1.py",
             "    return (z_masked.sum() - on_support) / pre.shape[0]",
             "    return z_masked.sum() / pre.shape[0]", (DEFINITIONS, "-k", "penalties")),
    Mutation("packed: the support not subtracted from the off-support L1", "sae/training/packed.py",
             "off = (masked_sum - values.sum(dim=(1, 2))) / pre.shape[1]",
             "off = masked_sum / pre.shape[1]", (DEFINITIONS, "-k", "penalties")),
    Mutation("AuxK over all latents (reference)", "sae/training/losses.py",
             'dead_pre = pre.masked_fill(~dead, float("-inf"))', "dead_pre = pre",
             (DEFINITIONS, "-k", "auxk")),
    Mutation("AuxK over all latents (fast path)", "sae/training/fast/auxk.py",
             '.masked_fill_(~dead[cols], float("-inf"))', "",
             (DEFINITIONS, "-k", "auxk")),
    Mutation("AuxK over all latents (packed)", "sae/training/packed.py",
             'masked_fill_(~dead_gn, float("-inf"))', 'masked_fill_(dead_gn & ~dead_gn, 0.0)',
             (DEFINITIONS, "-k", "auxk")),
    Mutation("metrics: a firing threshold of 1e-3", "sae/metrics/_sparse.py",
             "keep_bk = code.values > 0", "keep_bk = code.values > 1e-3",
             (DEFINITIONS, "-k", "firing")),
    Mutation("MonoScore without its min-max shift", "sae/metrics/monosemanticity.py",
             "m_n = torch.where(fires_everywhere, self.min_n, torch.zeros_like(self.min_n))",
             "m_n = torch.zeros_like(self.min_n)", ("tests/test_metrics.py", "-k", "mono")),
    Mutation("R^2: the median over dimensions in place of the mean",
             "sae/metrics/reconstruction.py", "r2 = float(r2_d.mean())",
             "r2 = float(r2_d.median())",
             ("tests/test_metrics.py", "-k", "r2")),
    Mutation("claims: the Student-t quantile replaced by 1.96", "sae/reporting/stats.py",
             "return float(stats.t.ppf((1.0 + level) / 2.0, df))", "return 1.96",
             ("tests/test_claims.py",)),
    Mutation("identity: the seed left out of the run id", "sae/identity.py",
             '    "pack_members",\n', '    "pack_members", "seed",\n',
             ("tests/test_identity_properties.py",)),
    Mutation("cache key: the sampling protocol left out", "sae/data/cache_key.py",
             '"sampling": getattr(dataset, "sampling", None), "subset": subset}',
             '"subset": subset}', ("tests/test_cache_key_properties.py",)),
    Mutation("fast Top-k: group minima in place of maxima", "sae/training/fast/topk.py",
             "group_max_bg = pre.view(batch, c, groups).amax(dim=1)",
             "group_max_bg = pre.view(batch, c, groups).amin(dim=1)",
             ("tests/test_fast.py", "-k", "cpu")),
    Mutation("fast path: padded inactive columns penalised (no clamp at 0)",
             "sae/training/fast/penalties.py",
             "return pre_bn.index_select(1, cols), cols, upper_n[cols], position_n[support_bk]",
             "return (pre_bn.index_select(1, cols), cols,\n"
             "            torch.full_like(upper_n[cols], float('inf')), position_n[support_bk])",
             ("tests/test_fast.py", "-k", "padded")),
    Mutation("trainer: the dead-latent window off by one", "sae/training/trainer.py",
             "dead = state.samples_since_fired >= dead_window",
             "dead = state.samples_since_fired > dead_window + 256",
             ("tests/test_packed.py", "-k", "mixed_cells")),
    Mutation("loop: a checkpoint without the losses since the last log point",
             "sae/training/loop.py",
             "state.pending = [losses[row] for losses in pending]", "state.pending = []",
             ("tests/test_integrity.py", "-k", "same_curve")),
    Mutation("resume: only the newest checkpoint tried (a corrupt one counted as no resume)",
             "sae/training/trainer.py",
             "    return path, older_checkpoint(path)", "    return (path,)",
             ("tests/test_pack_sweep.py", "-k", "different_steps")),
)


def apply(root: Path, mutation: Mutation) -> None:
    path = root / mutation.path
    text = path.read_text()
    count = text.count(mutation.before)
    if count != 1:
        raise SystemExit(f"mutation {mutation.name!r}: its text occurs {count} times in "
                         f"{mutation.path} (the code moved): update scripts/mutate.py")
    path.write_text(text.replace(mutation.before, mutation.after))


def run(mutation: Mutation, timeout: float) -> tuple[bool, float, str]:
    """Whether the tests failed on the mutated copy (caught), the seconds, the last line."""
    with tempfile.TemporaryDirectory(prefix="sae-mutate-") as tmp:
        root = Path(tmp)
        for name in COPIED:
            source = REPO / name
            if source.is_dir():
                shutil.copytree(source, root / name,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(source, root / name)
        apply(root, mutation)
        env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
        started = time.monotonic()
        try:
            result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q",
                                     "-p", "no:cacheprovider", *mutation.tests], cwd=root,
                                    env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return True, time.monotonic() - started, "timed out (counted as caught)"
        lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
        return result.returncode not in (0, 5), time.monotonic() - started, (
            lines[-1] if lines else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run the mutations whose name contains this text")
    parser.add_argument("--list", action="store_true", help="list the mutations, run nothing")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or args.only.lower() in m.name.lower()]
    if args.list:
        for m in chosen:
            print(f"{m.name}  ({m.path}; {' '.join(m.tests)})")
        return 0
    missed = 0
    for mutation in chosen:
        caught, seconds, last = run(mutation, args.timeout)
        missed += not caught
        print(f"{'caught    ' if caught else 'NOT CAUGHT'}  {mutation.name}  "
              f"[{seconds:.0f} s: {last}]", flush=True)
    print(f"{len(chosen) - missed} of {len(chosen)} mutations caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
