"""The sweep's method card (METHOD.md s7), assembled from the runs' own cards, with seed
stability filled in.

Seed stability of a setting (a cell without its seed) with two or more finished seeds: the mean
over seed pairs of ``sae.metrics.seed_stability`` (mean max cosine between the decoder atoms of
the two dictionaries, both directions averaged), and the spread (sample std over seeds) of every
metric. A setting with one seed has neither, and says so.

Merging the runs' cards field by field: a value shared by every run is stated once; a value that
follows an axis (the source model follows the backbone, the data set and its preprocessing the
dataset) is keyed by that axis; numbers that vary are given as their range; other varying values
are listed.
"""

from __future__ import annotations

import itertools
import json
import math
import shlex
from pathlib import Path
from typing import Any

import pandas as pd

from sae.evaluation.method_card import CARD_FIELDS
from sae.grid.runs import METHOD_CARD_JSON, MODEL_FILE
from sae.io.plain import plain
from sae.reporting.aggregate import SETTING_KEYS, finished_runs
from sae.reporting.collect import read_json

MAX_LISTED = 12  # distinct values listed before "... and N more"
BY_AXIS = {"source_model": "backbone", "dataset": "dataset",
           "embedding_preprocessing": "dataset", "qualitative_inspection": "dataset"}


# -- seed stability -------------------------------------------------------------------------------
def decoder_atoms(run_dir: Path):
    """The decoder atoms (rows of ``W_dec``) of a run, or None when its model is missing."""
    from sae.model import load_model  # torch is imported only when there is a model to read

    path = Path(run_dir) / MODEL_FILE
    if not path.exists():
        return None
    return load_model(path).W_dec.detach()


def pair_stability(run_dirs: list[str]) -> tuple[float, int]:
    """(mean over seed pairs of the mean max cosine of atoms, number of pairs compared)."""
    from sae.metrics import seed_stability

    atoms = [a for a in (decoder_atoms(Path(d)) for d in run_dirs) if a is not None]
    values = [seed_stability(a, b) for a, b in itertools.combinations(atoms, 2)
              if a.shape == b.shape]
    return (sum(values) / len(values) if values else float("nan")), len(values)


def seed_stability_table(runs: pd.DataFrame, metrics: list[str], compute_atoms: bool = True
                         ) -> pd.DataFrame:
    """One row per setting: ``n_seeds``, ``atom_stability`` (NaN with one seed), ``pairs`` and
    ``<metric>_std`` (sample std over seeds) for every metric."""
    done = finished_runs(runs)
    rows = []
    for setting, group in done.groupby(list(SETTING_KEYS), dropna=False, sort=False):
        row = dict(zip(SETTING_KEYS, setting))
        row["n_seeds"] = len(group)
        stability, pairs = (pair_stability(list(group["run_dir"]))
                            if compute_atoms and len(group) > 1 else (float("nan"), 0))
        row.update(atom_stability=stability, pairs=pairs)
        for metric in metrics:
            values = group[metric].astype(float) if metric in group else pd.Series(dtype=float)
            row[f"{metric}_std"] = values.std(ddof=1) if values.count() > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def stability_field(table: pd.DataFrame, metrics: list[str], computed: bool) -> dict[str, Any]:
    """The ``seed_stability`` field of the sweep's card."""
    measured = table[table["pairs"] > 0] if not table.empty else table
    field: dict[str, Any] = {
        "metric": "mean max cosine similarity between the decoder atoms of two seeds of the "
                  "same setting (both directions averaged), averaged over seed pairs",
        "settings_with_several_seeds": int((table["n_seeds"] > 1).sum()) if not table.empty
        else 0,
    }
    if measured.empty:
        field["value"] = ("not computed (disabled)" if not computed else
                          "not measurable: no setting has two finished seeds with a model")
    else:
        field.update(mean=_round(measured["atom_stability"].mean()),
                     min=_round(measured["atom_stability"].min()),
                     max=_round(measured["atom_stability"].max()),
                     per_setting=[{**{k: plain(r[k]) for k in SETTING_KEYS},
                                   "value": _round(r["atom_stability"])}
                                  for _, r in measured.iterrows()])
    field["metric_spread"] = metric_spread(table, metrics)
    return field


def metric_spread(table: pd.DataFrame, metrics: list[str]) -> dict[str, Any] | str:
    """Per metric: the mean and the largest sample std over seeds across settings."""
    spread = {}
    for metric in metrics:
        column = f"{metric}_std"
        if column in table and table[column].notna().any():
            spread[metric] = {"mean_std": _round(table[column].mean()),
                              "max_std": _round(table[column].max())}
    return spread or "not measurable: no setting has two finished seeds"


# -- merging the runs' cards ----------------------------------------------------------------------
def _round(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 4)
    return value


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def merge_values(values: list[Any]) -> Any:
    """One value for many runs: shared -> itself; dicts -> per key; numbers -> their range;
    otherwise the distinct values."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    distinct = list({_key(v): v for v in present}.values())
    if len(distinct) == 1:
        return distinct[0]
    if all(isinstance(v, dict) for v in present):
        keys = list(dict.fromkeys(k for v in present for k in v))
        return {k: merge_values([v.get(k) for v in present]) for k in keys}
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
        return {"min": _round(float(min(present))), "max": _round(float(max(present))),
                "mean": _round(sum(present) / len(present)), "runs": len(present)}
    listed = sorted(distinct, key=_key)
    if len(listed) > MAX_LISTED:
        return [*listed[:MAX_LISTED], f"... and {len(listed) - MAX_LISTED} more"]
    return listed


def merge_field(cards: list[dict[str, Any]], axis_values: list[Any], field: str) -> Any:
    values = [card.get(field) for card in cards]
    merged = merge_values(values)
    axis = BY_AXIS.get(field)
    if axis is None or len({_key(v) for v in values}) <= 1:
        return merged
    by_axis: dict[str, list[Any]] = {}
    for axis_value, value in zip(axis_values, values):
        by_axis.setdefault(str(axis_value), []).append(value)
    return {name: merge_values(group) for name, group in by_axis.items()}


def run_cards(runs: pd.DataFrame) -> tuple[list[dict[str, Any]], pd.DataFrame]:
    """The cards of the finished runs that have one, and those runs' rows."""
    done = finished_runs(runs)
    cards, kept = [], []
    for index, row in done.iterrows():
        card = read_json(Path(row["run_dir"]) / METHOD_CARD_JSON)
        if card is not None:
            cards.append(card)
            kept.append(index)
    return cards, done.loc[kept]


# -- the sweep's card -----------------------------------------------------------------------------
def reproduce_command(sweep_name: str, sweep_dir: Path, multirun: dict[str, Any] | None) -> str:
    """The launch that re-runs the sweep (its overrides from the saved Hydra config, its output
    root from where the sweep directory lies), then this report."""
    task = ((multirun or {}).get("hydra") or {}).get("overrides", {}).get("task")
    if task is None:
        launch = f"python -m sae.train -m +sweep={sweep_name}"
    else:
        launch = "python -m sae.train -m " + " ".join(shlex.quote(str(o)) for o in task)
    if sweep_dir.parent.name == "sweeps":  # <paths.root>/sweeps/<name>: say which root
        launch = f"SAE_OUTPUT_ROOT={shlex.quote(str(sweep_dir.parent.parent))} {launch}"
    command = f"{launch} && python -m sae.report {shlex.quote(str(sweep_dir))}"
    return command + ("  # multirun.yaml missing: other launch overrides unknown"
                      if task is None else "")


def sweep_card(sweep_name: str, sweep_dir: Path, runs: pd.DataFrame, stability: dict[str, Any],
               claims: list[Any], report_code_version: str,
               multirun: dict[str, Any] | None) -> dict[str, Any]:
    """Every field of METHOD.md s7 (``CARD_FIELDS``), plus the sweep's own facts."""
    cards, rows = run_cards(runs)
    axis_values = {axis: list(rows[axis]) for axis in set(BY_AXIS.values())}
    card = {field: merge_field(cards, axis_values.get(BY_AXIS.get(field), []), field)
            for field in CARD_FIELDS}
    card["seed_stability"] = stability
    card["inference_k_sensitivity"] = {
        "protocol": "R^2 with Top-k' at inference for k' in multiples of the training k; "
                    "per setting in the robustness plots",
        "mean_ratio_by_regularizer": _mean_by(rows, "regularizer", "k_robustness_mean_ratio"),
        "per_run": card.get("inference_k_sensitivity") if len(cards) == 1 else "see plots",
    }
    card["code_version"] = {"runs": merge_values([c.get("code_version") for c in cards]),
                            "report": report_code_version}
    card["reproduce"] = reproduce_command(sweep_name, sweep_dir, multirun)
    card["sweep"] = sweep_facts(sweep_name, runs, len(cards))
    card["claims"] = {f"claim {c.number}": f"{c.verdict}: {c.summary}" for c in claims}
    return card


def _mean_by(rows: pd.DataFrame, axis: str, column: str) -> dict[str, Any] | str:
    if column not in rows or rows[column].notna().sum() == 0:
        return "not measured"
    return {str(k): _round(float(v)) for k, v in rows.groupby(axis)[column].mean().items()}


def sweep_facts(sweep_name: str, runs: pd.DataFrame, n_cards: int) -> dict[str, Any]:
    states = runs.drop_duplicates("run_id")["status"].value_counts()
    return {"name": sweep_name, "cells": len(runs),
            "unique_runs": int(runs["run_id"].nunique()),
            "runs_by_status": {str(k): int(v) for k, v in states.items()},
            "runs_with_a_card": n_cards}
