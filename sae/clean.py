"""``sae-clean``: remove what runs set aside -- the outputs a ``force=true`` launch moved to
``<run>/previous-<time>/`` and the corrupt checkpoints moved to ``checkpoints/*.corrupt-<time>``.
Nothing a run reads is touched.

    sae-clean                    # under $SAE_OUTPUT_ROOT (default: outputs)
    sae-clean /scratch/sae --dry-run
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from sae.grid.runs import CHECKPOINTS_DIR, PREVIOUS_PREFIX, RUNS_DIR
from sae.io.tensors import CORRUPT_MARK


def runs_root(root: Path) -> Path:
    """``root``'s ``runs/`` directory when it is an output root, else ``root`` itself."""
    return root / RUNS_DIR if (root / RUNS_DIR).is_dir() else root


def set_aside(root: Path) -> list[Path]:
    """Every set-aside directory and file under the runs of ``root``, sorted."""
    runs = runs_root(root)
    found = [p for p in runs.glob(f"*/{PREVIOUS_PREFIX}*") if p.is_dir()]
    found += [p for p in runs.glob(f"*/{CHECKPOINTS_DIR}/*{CORRUPT_MARK}*") if p.is_file()]
    return sorted(found)


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def human(n_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n_bytes < 1024 or unit == "GiB":
            return f"{n_bytes:.1f} {unit}" if unit != "B" else f"{n_bytes:.0f} B"
        n_bytes /= 1024
    raise AssertionError("unreachable")


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def clean(root: Path, dry_run: bool) -> int:
    """Remove (or, with ``dry_run``, list) what was set aside; returns the bytes freed."""
    items = set_aside(root)
    total = 0
    for path in items:
        size = size_of(path)
        total += size
        print(f"{'would remove' if dry_run else 'removed'} {path} ({human(size)})")
        if not dry_run:
            remove(path)
    verb = "would free" if dry_run else "freed"
    print(f"{verb} {human(total)} in {len(items)} set-aside item(s) under {runs_root(root)}")
    return total


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sae-clean", description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", type=Path,
                        default=Path(os.environ.get("SAE_OUTPUT_ROOT", "outputs")),
                        help="output root (or its runs/ directory); default $SAE_OUTPUT_ROOT")
    parser.add_argument("--dry-run", action="store_true", help="list, remove nothing")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        parser.exit(1, f"sae-clean: {args.root} is not a directory\n")
    clean(args.root, args.dry_run)


if __name__ == "__main__":
    cli()
