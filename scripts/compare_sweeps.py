"""Compare the final metrics of the same runs trained in two output roots (e.g. CPU and CUDA).

    python scripts/compare_sweeps.py ROOT_A ROOT_B [--tol 0.03] [--out diff.jsonl]

Runs are matched by run id (the id does not depend on the device). For each headline metric of
METHOD.md s4 (all on a 0-1 scale, dead latents as a fraction) it prints the largest absolute
difference over the runs, one JSON line per metric, then a summary line; exit 1 when a
difference exceeds ``--tol`` or when the roots share no run. Different devices train along
different rounding paths (float32 reductions in another order, and Adam with eps 6.25e-10
amplifies rounding of near-zero gradients), so the metrics agree to a tolerance, not bit for bit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

METRICS = ("r2", "fvu", "r2_variance_weighted", "nmse", "dead_fraction", "mono_live",
           "mono_dead0", "purity_binary", "purity_weighted", "probe_m1", "probe_m2", "probe_m4",
           "probe_m8", "probe_raw", "k_robustness_mean_ratio")


def final_metrics(root: Path) -> dict[str, dict]:
    return {path.parent.name: json.loads(path.read_text())
            for path in sorted((root / "runs").glob("*/metrics.json"))}


def compare(a: dict[str, dict], b: dict[str, dict]) -> list[dict]:
    shared = sorted(set(a) & set(b))
    lines = []
    for name in METRICS:
        diffs = [(abs(a[r][name] - b[r][name]), r) for r in shared
                 if isinstance(a[r].get(name), int | float) and isinstance(b[r].get(name), int | float)]
        if diffs:
            worst, run = max(diffs)
            lines.append({"metric": name, "max_abs_diff": round(worst, 6), "runs": len(diffs),
                          "worst_run": run})
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root_a", type=Path)
    parser.add_argument("root_b", type=Path)
    parser.add_argument("--tol", type=float, default=0.03)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    a, b = final_metrics(args.root_a), final_metrics(args.root_b)
    lines = compare(a, b)
    over = [line["metric"] for line in lines if line["max_abs_diff"] > args.tol]
    summary = {"summary": True, "runs_a": len(a), "runs_b": len(b),
               "shared_runs": len(set(a) & set(b)), "tol": args.tol, "over_tol": over,
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
