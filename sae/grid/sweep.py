"""Sweep planning: from a grid of override lists to the runs to launch.

Pure functions (the composition of a cell is passed in), used by the Hydra sweeper in
``hydra_plugins/sae_sweeper`` before any job is submitted:

1. every cell is composed and validated; the first bad cell stops the launch with an error
   naming the cell and the field (:class:`SweepError`);
2. cells with the same run id (settings with no effect, e.g. ``mask`` without a regularizer)
   collapse to one run;
3. runs already ``done`` are skipped, ``failed`` and interrupted ones are re-run.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from sae.config import ConfigError, RootConfig, validate
from sae.data.errors import CacheError
from sae.data.similarity import resolve_similarity
from sae.grid.runs import NEW, run_dir, run_state
from sae.identity import run_id

PROGRESS_EVERY = 50  # cells between progress lines while planning


class SweepError(ConfigError):
    """The grid cannot be launched; the message names the cell, the field and the fix."""


@dataclass
class Cell:
    index: int  # position in the expanded grid
    overrides: list[str]  # the cell's command-line overrides
    run_id: str
    run_dir: str
    # before this launch: new | running | interrupted | done | failed, or queued (its job from
    # an earlier launch is still pending or running: left alone)
    state: str
    duplicate_of: int | None = None  # index of the cell with the same run id
    # after this launch: done | failed | cancelled | timeout | node_fail | skipped
    result: str | None = None
    reason: str | None = None  # why the launched cell is not done (its error, the task's end)
    problem: str | None = None  # dry run only: why this cell could not launch from here
    checkpoint: str = ""  # the backbone option and its weights, e.g. "vit_l16: transformers ..."
    notes: list[str] = field(default_factory=list)  # dry run only: what may fail on a node
    pack: int | None = None  # the pack (one job) that trains this cell with others (pack > 1)
    job_id: str | None = None  # the scheduler's job (array task) that trains this cell
    cache: str | None = None  # the cache build it reads (launcher=slurm: stage 1 in cells.json)
    config: RootConfig | None = field(default=None, repr=False)  # validated; not in cells.json

    @property
    def to_launch(self) -> bool:
        return self.duplicate_of is None and self.state not in ("done", "queued")

    def describe(self) -> str:
        return " ".join(self.overrides) or "(defaults)"


def preflight(cfg: RootConfig) -> None:
    """Checks that need the file system, done before submission rather than on a node."""
    data = cfg.dataset
    if data.kind == "images" and data.layout != "digits_images":  # that one is generated
        _check_image_root(data)
    if data.kind == "images" and data.sampling == "narratives":
        from sae.data.errors import DataError
        from sae.data.openimages import narrative_files

        for split in (data.train_split, data.eval_split):
            try:
                narrative_files(Path(data.root), split)
            except DataError as exc:
                raise ConfigError(f"dataset.sampling: {exc}") from None
    if data.kind == "files":
        check_files(data)
    try:
        similarity = resolve_similarity(cfg)
    except CacheError as exc:
        raise ConfigError(str(exc)) from None
    if similarity.kind != "input" and not Path(similarity.target).exists():
        raise ConfigError(f"eval.similarity: {similarity.target} does not exist. Fix: check the "
                          "path, or use input or backbone:NAME")


def check_files(data) -> None:
    """A files dataset's paths exist and open as a format sae-grid reads (headers and schemas
    only: cheap on a login node)."""
    from sae.data.errors import DataError
    from sae.data.formats import check_readable

    for name in ("train_path", "eval_path"):
        if getattr(data, name):
            try:
                check_readable(Path(getattr(data, name)), name, data.embedding_key)
            except DataError as exc:
                raise ConfigError(f"dataset.{exc}") from None
    for name in ("train_labels", "eval_labels", "class_names"):
        path = getattr(data, name)
        if path and not Path(path).exists():
            raise ConfigError(f"dataset.{name}: {path} does not exist. Fix: check the path")


def _check_image_root(data) -> None:
    from sae.data.images import ROOT_ENV

    env = ROOT_ENV.get(data.layout)
    fix = (f"Fix: set dataset.root=/path/to/{data.name}"
           + (f" or export {env}" if env else ""))
    if not data.root:
        raise ConfigError(f"dataset.root: is empty or not set. {fix}")
    root = Path(data.root)
    if not root.is_dir():
        raise ConfigError(f"dataset.root: {data.root} is not a directory. {fix}")
    if data.layout == "imagenet" and not (root / data.train_split).is_dir():
        raise ConfigError(f"dataset.root: {data.root} has no {data.train_split!r} split "
                          f"directory (an empty or wrong root). {fix}")


def node_notes(cfg: RootConfig) -> list[str]:
    """What a dry run can tell about a cell that may still fail on a compute node."""
    backbone = cfg.backbone
    if backbone.library == "none" or not backbone.pretrained:
        return []
    if not backbone.checkpoint_path:
        return [f"backbone.checkpoint_path: not set, so {backbone.name} weights are downloaded "
                "on the node (compute nodes often have no network). Fix: run "
                f"`python scripts/download_weights.py {backbone.name}` on a login node and "
                "export SAE_WEIGHTS_DIR (and HF_HUB_OFFLINE=1)"]
    if not Path(backbone.checkpoint_path).exists():
        return [f"backbone.checkpoint_path: {backbone.checkpoint_path} does not exist. Fix: "
                f"`python scripts/download_weights.py {backbone.name}` fills it"]
    return []


def plan_cells(cells: Sequence[Sequence[str]], compose: Callable[[list[str]], DictConfig],
               force: bool = False, dry_run: bool = False,
               progress: Callable[[str], None] | None = None) -> list[Cell]:
    """Compose, validate, identify and classify every cell of the grid.

    A dry run lists cells whose data is not reachable from here (a dataset root that exists
    only on the cluster) with the problem instead of stopping; a real launch stops.
    ``progress`` gets a line now and then: Hydra composes each cell anew, so a large grid
    takes a while before anything is listed (docs/performance.md).
    """
    planned: list[Cell] = []
    first_of: dict[str, int] = {}
    started = time.monotonic()
    for index, overrides in enumerate(cells):
        if progress is not None and index % PROGRESS_EVERY == 0:
            progress(f"planning: composing and validating cell {index + 1} of {len(cells)} "
                     f"({time.monotonic() - started:.0f} s)")
        where = f"cell {index} ({' '.join(overrides) or 'defaults'})"
        cfg = _validated_cell(where, list(overrides), compose)
        problem = _preflight_problem(where, cfg, raise_it=not dry_run)
        rid = run_id(cfg)
        directory = run_dir(cfg, rid)
        state = NEW if force else run_state(directory)
        checkpoint = (f"{cfg.backbone.name}: {cfg.backbone.checkpoint}"
                      if cfg.backbone.library != "none" else "")
        planned.append(Cell(index, list(overrides), rid, str(directory), state,
                            duplicate_of=first_of.get(rid), problem=problem,
                            checkpoint=checkpoint, config=cfg,
                            notes=node_notes(cfg) if dry_run else []))
        first_of.setdefault(rid, index)
    return planned


def _validated_cell(where: str, overrides: list[str],
                    compose: Callable[[list[str]], DictConfig]) -> RootConfig:
    try:
        return validate(compose(overrides))
    except ConfigError as exc:
        raise SweepError(f"{where}: {exc}") from None
    except Exception as exc:  # composition errors: unknown group option, bad override syntax
        raise SweepError(f"{where}: {type(exc).__name__}: {exc}") from None


def _preflight_problem(where: str, cfg: RootConfig, raise_it: bool) -> str | None:
    try:
        preflight(cfg)
    except ConfigError as exc:
        if raise_it:
            raise SweepError(f"{where}: {exc}") from None
        return str(exc)
    return None


def summary_line(name: str, cells: Sequence[Cell]) -> str:
    unique = [c for c in cells if c.duplicate_of is None]
    states = Counter(c.state for c in unique)
    duplicates = len(cells) - len(unique)
    return (f"sweep {name}: {len(cells)} cells -> {len(unique)} unique runs "
            f"({duplicates} duplicates of settings with no effect); "
            f"{states['done']} done (skipped), {states['failed']} failed (re-run), "
            f"{states['interrupted']} interrupted (resumed), {states['running']} running "
            f"elsewhere (waited for), {states['new']} new"
            + (f", {states['queued']} with a pending or running job of an earlier launch (left "
               "alone)" if states["queued"] else ""))


def checkpoints_line(cells: Sequence[Cell]) -> str:
    """The backbones of the grid with the weights each option names (METHOD.md s1)."""
    names = list(dict.fromkeys(c.checkpoint for c in cells if c.checkpoint))
    return "backbones: " + ("; ".join(names) if names else "none (embedding datasets)")


def table(cells: Sequence[Cell]) -> str:
    """The dry-run listing: one line per cell with its run id and what will happen to it, and
    the numbers of its problems in :func:`problem_summary`."""
    numbers = _problem_numbers(cells)
    lines = []
    for c in cells:
        action = (f"same run as cell {c.duplicate_of}" if c.duplicate_of is not None
                  else {"done": "skip (done)", "failed": "re-run (failed)",
                        "interrupted": "resume", "running": "wait, then skip",
                        "queued": f"left alone (job {c.job_id})"}.get(c.state, "run"))
        if c.pack is not None and c.to_launch:
            action += f" in pack {c.pack}"
        marks = [f"! problem {numbers[p]}" for p in _problems_of(c)]
        lines.append(f"{c.index:4d}  {c.run_id:<64s}  {action:<22s}  {c.describe()}"
                     + (f"  ({', '.join(marks)})" if marks else ""))
    return "\n".join(lines)


def _problems_of(cell: Cell) -> list[str]:
    return ([cell.problem] if cell.problem else []) + cell.notes


def _problem_numbers(cells: Sequence[Cell]) -> dict[str, int]:
    counts = Counter(p for c in cells for p in _problems_of(c))
    return {problem: number for number, (problem, _) in enumerate(counts.most_common(), 1)}


def progress_line(ended: int, failed: int, running: int, total: int, elapsed_s: float) -> str:
    """``sweep progress: 12/40 jobs ended (11 done, 1 failed), 2 running, 26 waiting; 5 min
    elapsed, ETA 14 min`` (the ETA from the mean time per ended job so far)."""
    waiting = total - ended - running
    line = (f"sweep progress: {ended}/{total} jobs ended ({ended - failed} done, {failed} "
            f"failed), {running} running, {waiting} waiting; {_minutes(elapsed_s)} elapsed")
    if 0 < ended < total:
        line += f", ETA {_minutes(elapsed_s / ended * (total - ended))}"
    return line


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def has_problems(cells: Sequence[Cell]) -> bool:
    return any(_problems_of(c) for c in cells)


def problem_summary(cells: Sequence[Cell]) -> str:
    """The end of a dry run: each distinct problem once, with its cell count and the fix."""
    counts = Counter(p for c in cells for p in _problems_of(c))
    if not counts:
        return "problems: none found from here"
    lines = [f"problems ({len(counts)} distinct; a real launch stops at a dataset problem):"]
    lines += [f"  {number}. {counts[p]} cells: {p}"
              for p, number in _problem_numbers(cells).items()]
    return "\n".join(lines)


# How a scheduler ended a task that returned no result (SLURM's sacct states; submitit's local
# executor says INTERRUPTED for a process killed by a signal). Anything else counts as failed.
SCHEDULER_ENDS = {"CANCELLED": "cancelled", "INTERRUPTED": "cancelled", "TIMEOUT": "timeout",
                  "DEADLINE": "timeout", "NODE_FAIL": "node_fail", "PREEMPTED": "cancelled"}
OUTCOMES = ("done", "failed", "cancelled", "timeout", "node_fail")


def scheduler_end(state: str) -> str:
    """``CANCELLED by 1000`` -> ``cancelled``; OUT_OF_MEMORY, FAILED, ... -> ``failed``."""
    word = state.split()[0].upper() if state.strip() else ""
    return SCHEDULER_ENDS.get(word, "failed")


def outcome_summary(name: str, cells: Sequence[Cell], sweep_dir: Path | str) -> str:
    """``sweep NAME: 3 done, 1 failed (FloatingPointError x1), 1 cancelled, ...``"""
    launched = [c for c in cells if c.result not in ("skipped", "queued", None)]
    counts = Counter(c.result for c in launched)
    reasons = Counter(_reason_kind(c.reason) for c in launched if c.result == "failed")
    parts = [f"{counts['done']} done",
             f"{counts['failed']} failed" + (
                 " (" + ", ".join(f"{k} x{n}" for k, n in reasons.most_common()) + ")"
                 if reasons else ""),
             f"{counts['cancelled']} cancelled"]
    parts += [f"{counts[o]} {o}" for o in ("timeout", "node_fail") if counts[o]]
    queued = sum(c.result == "queued" for c in cells)
    if queued:
        parts.append(f"{queued} left to their earlier job")
    parts.append(f"{len(cells) - len(launched) - queued} skipped")
    return (f"sweep {name}: " + ", ".join(parts)
            + f"; plan and results in {sweep_dir}/cells.json")


def _reason_kind(reason: str | None) -> str:
    """The short name of a failure: the exception type or the scheduler state."""
    if not reason:
        return "unknown"
    if reason.startswith("task ended in state "):  # hydra_plugins/sae_sweeper/launchers.py
        return reason.split()[4]
    head = reason.split(":", 1)[0].strip()
    return head if head and " " not in head else reason[:40]


def cells_record(name: str, cells: Sequence[Cell], caches: Sequence[Any] = (),
                 scheduler: str = "local") -> dict:
    """What ``cells.json`` in the sweep directory holds: the cells, stage 1's cache builds
    (``sae.grid.stages.CacheBuild``) with their extraction jobs, and whose job ids they are
    (``slurm`` or ``local`` processes). The report, ``sae-status`` and a re-launch read it."""
    return {"sweep": name, "scheduler": scheduler,
            "cells": [{f.name: getattr(c, f.name) for f in fields(c) if f.name != "config"}
                      for c in cells],
            "caches": [build.record() for build in caches]}


def earlier_jobs(record: dict) -> tuple[dict[str, str], dict[str, dict]]:
    """From an earlier ``cells.json``: run id -> its job id, and cache build name -> its
    record (paths, job id)."""
    runs = {c["run_id"]: c["job_id"] for c in record.get("cells", []) if c.get("job_id")}
    caches = {b["name"]: b for b in record.get("caches", []) if b.get("job_id")}
    return runs, caches


def leave_live_jobs(cells: Sequence[Cell], earlier_runs: dict[str, str],
                    states: dict[str, str]) -> int:
    """Cells whose job of an earlier launch is still pending or running become ``queued``
    (not submitted again); returns how many."""
    from sae.grid.scheduler import is_live

    left = 0
    for cell in cells:
        job = earlier_runs.get(cell.run_id)
        if cell.to_launch and job and is_live(states.get(job)):
            cell.state, cell.job_id = "queued", job
            left += 1
    return left
