"""Read a sweep directory into tables: one row per grid cell, and the runs' curves.

Inputs (see ``sae.grid.sweep`` and ``sae.grid.runs``): ``<sweep_dir>/cells.json`` lists every cell with its
run id and run directory; each run directory holds ``config.yaml``, ``status.json``,
``metrics.json`` and the method card (names from ``sae.grid.runs``). Nothing here fails on a missing
piece: a cell whose run never started is a row with status ``new``, a failed run a row with its
reason, a run without metrics a row with empty metric columns. The status column is
``sae.grid.runs.state_and_reason``'s, the vocabulary of ``sae-status``.

Columns of the runs table: the cell (``cell``, ``overrides``, ``duplicate_of``), the run
(``run_id``, ``run_dir``, ``status``, ``reason``), the axes (``backbone``, ``dataset``, ``k``,
``regularizer``, ``strength``, ``mask``, ``seed``, ``n_latents``), every numeric leaf of
``metrics.json`` (nested keys joined with dots, ``protocols`` and lists left out) and every leaf
of the resolved config as ``config.<dotted key>``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from sae.grid.runs import CONFIG_FILE, METRICS_FILE, state_and_reason
from sae.io.plain import flatten, multiple_name, numeric_leaves

AXES = ("backbone", "dataset", "k", "regularizer", "strength", "mask", "seed", "n_latents")
CELL_COLUMNS = ("cell", "overrides", "duplicate_of", "run_id", "run_dir", "status", "reason")
# Metric sub-trees that are descriptions or long per-step lists, not numbers to compare.
SKIPPED_METRIC_KEYS = {"protocols", "run_id"}


class ReportError(ValueError):
    """The sweep directory cannot be reported on; the message says why and what to do."""


@dataclass
class SweepRuns:
    name: str
    sweep_dir: Path
    runs: pd.DataFrame  # one row per cell
    curves: pd.DataFrame  # long form: run_id, curve, x, y (k_robustness: x = k'; probe: x = m)
    multirun: dict[str, Any] | None  # the sweep's saved Hydra config, when present


# -- small readers --------------------------------------------------------------------------------
def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when it is missing or unreadable."""
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def read_yaml(path: Path) -> dict[str, Any] | None:
    try:
        value = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return value if isinstance(value, dict) else None


def load_cells(sweep_dir: Path) -> tuple[str, list[dict[str, Any]]]:
    record = read_json(sweep_dir / "cells.json")
    if record is None or "cells" not in record:
        raise ReportError(f"{sweep_dir}/cells.json is missing or unreadable. Fix: pass the "
                          "directory of a launched sweep (python -m sae.train -m +sweep=NAME "
                          "writes it to <paths.sweeps>/<sweep_name>/)")
    return str(record.get("sweep", sweep_dir.name)), list(record["cells"])


# -- one row --------------------------------------------------------------------------------------
def parse_overrides(overrides: list[str]) -> dict[str, str]:
    """``["dataset=digits", "+x=1", "k=8"]`` -> ``{"dataset": "digits", "x": "1", "k": "8"}``."""
    parsed = {}
    for item in overrides:
        key, sep, value = item.lstrip("+~").partition("=")
        if sep:
            parsed[key] = value
    return parsed


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, bool) or value is None:
        return value
    return str(value).strip().lower() in ("true", "1", "yes", "on")


def _as_number(value: Any) -> float | int | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if number.is_integer() and "." not in str(value) else number


def cell_axes(config: dict[str, Any] | None, overrides: dict[str, str]) -> dict[str, Any]:
    """The axis values of a cell: from its run's resolved config, else from its overrides.

    The cell's own ``mask`` override wins: a baseline's mask twins share one run (and one
    config), but each cell keeps the value it asked for.
    """
    config = config or {}

    def pick(section: str, field: str = "name") -> Any:
        node = config.get(section)
        if isinstance(node, dict) and field in node:
            return node[field]
        return overrides.get(section if field == "name" else f"{section}.{field}")

    mask = overrides.get("mask", config.get("mask"))
    return {
        "backbone": pick("backbone") or "none",
        "dataset": pick("dataset"),
        "k": _as_number(config.get("k", overrides.get("k"))),
        "regularizer": pick("regularizer") or "none",
        "strength": _as_number(pick("regularizer", "strength")),
        "mask": _as_bool(mask),
        "seed": _as_number(config.get("seed", overrides.get("seed"))),
        "n_latents": _as_number(pick("sae", "n_latents")),
    }


def run_status(run_dir: Path) -> tuple[str, str | None]:
    """The run's state in ``sae.grid.runs``' vocabulary (``new`` when it never started), and why."""
    state, reason = state_and_reason(run_dir)
    if state == "running":
        reason = reason or "still running when the report was built"
    return state, reason


def flat_values(tree: dict[str, Any], numbers_only: bool = True) -> dict[str, Any]:
    """Nested dict -> ``{"a.b.c": leaf}``. Lists are kept only as JSON text, and only when
    ``numbers_only`` is off (config values); with it, leaves must be numbers or bools."""
    if numbers_only:
        return numeric_leaves(tree)
    return {name: value if isinstance(value, bool | int | float) or value is None
            else json.dumps(value) if isinstance(value, list) else str(value)
            for name, value in flatten(tree).items()}


# Names that runs evaluated before the one-name-per-metric rename wrote (issue 16).
LEGACY_NAMES = {"mono_mean_dead0": "mono_dead0", "mono_mean_live": "mono_live",
                "probe_ceiling": "probe_raw"}
LEGACY_ROBUST = re.compile(r"^k_robust_(r2|ratio)_k(\d+)$")  # keyed by the absolute k'
# Before issue 22 the multiples were written as numbers (r2_at_0.25k), which W&B cannot sort.
LEGACY_MULTIPLE = re.compile(r"^(r2|r2_ratio)_at_([0-9.]+)k$")


def current_name(key: str, train_k: Any) -> str | None:
    """A metric's current name; robustness keys by the absolute k' or by a number become
    ``r2_at_<multiple_name>`` (None when the training k is unknown)."""
    if key in LEGACY_NAMES:
        return LEGACY_NAMES[key]
    if (by_number := LEGACY_MULTIPLE.match(key)) is not None:
        return f"{by_number.group(1)}_at_{multiple_name(float(by_number.group(2)))}"
    robust = LEGACY_ROBUST.match(key)
    if robust is None:
        return key
    if not train_k:
        return None
    prefix = "r2_at_" if robust.group(1) == "r2" else "r2_ratio_at_"
    return f"{prefix}{multiple_name(int(robust.group(2)) / float(train_k))}"


def flat_metrics(metrics: dict[str, Any] | None) -> dict[str, Any]:
    if not metrics:
        return {}
    kept = {k: v for k, v in metrics.items() if k not in SKIPPED_METRIC_KEYS}
    flat = {}
    for key, value in flat_values(kept).items():
        name = current_name(key, metrics.get("train_k"))
        if value is not None and name is not None:
            flat.setdefault(name, value)
    return flat


def cell_row(cell: dict[str, Any]) -> dict[str, Any]:
    run_dir = Path(cell["run_dir"])
    config = read_yaml(run_dir / CONFIG_FILE)
    status, reason = run_status(run_dir)
    metrics = read_json(run_dir / METRICS_FILE) if status == "done" else None
    overrides = list(cell.get("overrides", []))
    row = {
        "cell": cell.get("index"), "overrides": " ".join(overrides),
        "duplicate_of": cell.get("duplicate_of"), "run_id": cell.get("run_id", run_dir.name),
        "run_dir": str(run_dir), "status": status, "reason": reason,
        **cell_axes(config, parse_overrides(overrides)),
        **flat_metrics(metrics),
    }
    if config:
        row.update({f"config.{k}": v for k, v in flat_values(config, numbers_only=False).items()})
    return row


# -- curves ---------------------------------------------------------------------------------------
def _numeric_points(mapping: Any) -> list[tuple[float, float]]:
    """``{"2": 0.5, "4": 0.7}`` -> [(2, 0.5), (4, 0.7)]; entries with non-numeric keys or
    values (a ``raw`` reference, NaN) are left out."""
    if not isinstance(mapping, dict):
        return []
    points = []
    for key, value in mapping.items():
        x, y = _as_number(key), value
        if x is not None and isinstance(y, int | float) and not isinstance(y, bool) \
                and math.isfinite(y):
            points.append((float(x), float(y)))
    return sorted(points)


def robustness_points(curve: Any) -> list[tuple[float, float]]:
    """R^2 per inference k' from ``curves.k_robustness`` (``{"r2": {k': R^2}, ...}`` or a
    bare ``{k': R^2}``)."""
    if isinstance(curve, dict) and "r2" in curve:
        return _numeric_points(curve["r2"])
    return _numeric_points(curve)


def probe_points(curve: Any) -> list[tuple[float, float]]:
    """Probe score per m from ``curves.probe`` (``{"by_m": {m: score}}``, ``{"m": {...}}``,
    ``{"accuracy": {...}}`` or a bare ``{m: score}``)."""
    if isinstance(curve, dict):
        for key in ("by_m", "m", "accuracy", "score", "scores"):
            if isinstance(curve.get(key), dict):
                return _numeric_points(curve[key])
    return _numeric_points(curve)


def curve_rows(run_id: str, metrics: dict[str, Any] | None) -> list[dict[str, Any]]:
    curves = (metrics or {}).get("curves") or {}
    rows = [{"run_id": run_id, "curve": "k_robustness", "x": x, "y": y}
            for x, y in robustness_points(curves.get("k_robustness"))]
    rows += [{"run_id": run_id, "curve": "probe", "x": x, "y": y}
             for x, y in probe_points(curves.get("probe"))]
    return rows


# -- the whole sweep ------------------------------------------------------------------------------
def collect(sweep_dir: Path) -> SweepRuns:
    """Every cell of the sweep as a row (failed and never started ones included), and the
    curves."""
    sweep_dir = Path(sweep_dir)
    name, cells = load_cells(sweep_dir)
    rows = [cell_row(cell) for cell in cells]
    runs = pd.DataFrame(rows)
    if runs.empty:
        runs = pd.DataFrame(columns=["cell", "run_id", "status", *AXES])
    for column in ("k", "seed", "n_latents", "duplicate_of"):
        # Integers stay integers when a cell that never ran leaves a gap (no 8.0 in the CSV).
        runs[column] = pd.to_numeric(runs[column]).astype("Int64")
    curve_list: list[dict[str, Any]] = []
    for run_id, run_dir, status in runs[["run_id", "run_dir", "status"]].drop_duplicates(
            "run_id").itertuples(index=False):
        if status == "done":
            curve_list += curve_rows(run_id, read_json(Path(run_dir) / METRICS_FILE))
    curves = pd.DataFrame(curve_list, columns=["run_id", "curve", "x", "y"])
    return SweepRuns(name, sweep_dir, runs, curves, read_yaml(sweep_dir / "multirun.yaml"))


def metric_columns(runs: pd.DataFrame) -> list[str]:
    """The numeric metric columns of a runs table (not the cell, the axes or the config)."""
    fixed = {*CELL_COLUMNS, *AXES, "mask_label"}
    return [c for c in runs.columns if c not in fixed and not c.startswith("config.")
            and pd.api.types.is_numeric_dtype(runs[c])]
