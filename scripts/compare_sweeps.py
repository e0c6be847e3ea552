"""Compare the final metrics of the same runs trained in two output roots (e.g. CPU and CUDA).

    python scripts/compare_sweeps.py ROOT_A ROOT_B [--scale 1] [--by-axes] [--out diff.jsonl]

Runs are matched by run id (the id does not depend on the device), or, with ``--by-axes``, by
the id's readable part (every axis value) without its hash, so that runs whose settings differ
outside the axes (``train.autocast_bf16``, another seed list) can be paired. For each headline
metric of
METHOD.md s4 (all on a 0-1 scale, dead latents as a fraction) it prints the largest absolute
difference over the runs, one JSON line per metric, then a summary line; exit 1 when a
difference exceeds its tolerance (``TOLERANCES`` times ``--scale``) or when the roots share no
run. Different devices train along different rounding paths (float32 reductions in another
order, Adam with eps 6.25e-10 amplifying the rounding of near-zero gradients, and a GPU
extraction under float16 autocast giving other embeddings), so the metrics agree to a
tolerance, not bit for bit. Each tolerance is at or above the spread between two seeds of the
same cells (docs/performance.md, 2026-12-04: the digits_images sweep of scripts/gpu_check.sh,
whose 359 evaluation images make one image 0.0028 of a probe accuracy).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RECONSTRUCTION, STRUCTURE, PROBES = 0.015, 0.05, 0.08  # seed spread: 0.014, 0.050, 0.081
TOLERANCES = {
    "r2": RECONSTRUCTION, "fvu": RECONSTRUCTION, "r2_variance_weighted": RECONSTRUCTION,
    "nmse": RECONSTRUCTION, "dead_fraction": STRUCTURE, "mono_live": STRUCTURE,
    "mono_dead0": STRUCTURE, "purity_binary": STRUCTURE, "purity_weighted": STRUCTURE,
    "k_robustness_mean_ratio": STRUCTURE, "probe_m1": PROBES, "probe_m2": PROBES,
    "probe_m4": PROBES, "probe_m8": PROBES, "probe_raw": PROBES,
}


def final_metrics(root: Path, by_axes: bool = False) -> dict[str, dict]:
    """Each run's metrics.json under ``root/runs``, by run id (or its readable part)."""
    runs = {}
    for path in sorted((root / "runs").glob("*/metrics.json")):
        name = path.parent.name
        runs[name.rsplit("-", 1)[0] if by_axes else name] = json.loads(path.read_text())
    return runs


def compare(a: dict[str, dict], b: dict[str, dict]) -> list[dict]:
    shared = sorted(set(a) & set(b))
    lines = []
    for name in TOLERANCES:
        diffs = [(abs(a[r][name] - b[r][name]), r) for r in shared
                 if isinstance(a[r].get(name), int | float) and isinstance(b[r].get(name), int | float)]
        if diffs:
            worst, run = max(diffs)
            lines.append({"metric": name, "max_abs_diff": round(worst, 6), "runs": len(diffs),
                          "worst_run": run, "tol": TOLERANCES[name]})
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root_a", type=Path)
    parser.add_argument("root_b", type=Path)
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every tolerance (default 1)")
    parser.add_argument("--by-axes", action="store_true",
                        help="pair runs by the readable part of their ids (axis values)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    a = final_metrics(args.root_a, args.by_axes)
    b = final_metrics(args.root_b, args.by_axes)
    lines = compare(a, b)
    over = [line["metric"] for line in lines if line["max_abs_diff"] > line["tol"] * args.scale]
    summary = {"summary": True, "runs_a": len(a), "runs_b": len(b),
               "shared_runs": len(set(a) & set(b)), "scale": args.scale, "over_tol": over,
               "ok": bool(lines) and not over}
    for line in (*lines, summary):
        text = json.dumps(line)
        print(text)
        if args.out:
            with args.out.open("a") as handle:
                handle.write(text + "\n")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
