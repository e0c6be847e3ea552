"""A W&B dashboard for one sweep, as data: the panels a reader compares runs with.

:func:`dashboard_spec` describes a W&B workspace view named after the sweep and filtered to its
runs (config ``sweep``, which every run of the sweep carries; its W&B group is the same name),
grouped by regularizer and mask:

* one section per headline metric (R^2 both ways, ``mono_live``, ``mono_dead0``, both purities,
  dead latents, the small-m probe, the k-robustness ratio): the metric of every run against
  ``k``, the runs grouped by regularizer and mask (the seeds of a setting together);
* a parallel-coordinates panel over the axes and those metrics;
* R^2 against ``mono_live``;
* the runs table with the axis columns first (pinned);
* the report run's tables and plots (a media panel of ``job_type=report``).

The spec is plain JSON (``report/wandb_dashboard.json``); ``sae.tracking.save_dashboard``
turns it into ``wandb_workspaces`` objects and saves it (``sae-sync SWEEP_DIR --dashboard``,
or ``sae-report --wandb`` online). Imports neither wandb nor torch.
"""

from __future__ import annotations

from typing import Any

SPEC_FILE = "wandb_dashboard.json"
AXES = ("backbone", "dataset", "k", "regularizer", "strength", "mask", "seed", "n_latents")
# (summary key, panel title): METHOD.md s4's headline numbers, under their metrics.json names.
HEADLINE = (
    ("r2", "R^2 (uniform over dimensions, the paper's)"),
    ("r2_variance_weighted", "R^2 (1 - FVU)"),
    ("mono_live", "MonoScore over live latents"),
    ("mono_dead0", "MonoScore, dead latents as 0"),
    ("purity_binary", "Class purity (binary)"),
    ("purity_weighted", "Class purity (weighted)"),
    ("dead_count", "Dead latents (evaluation)"),
    ("probe_small_m_mean", "Probe accuracy, small m"),
    ("k_robustness_mean_ratio", "k robustness (mean R^2 ratio)"),
)


def dashboard_spec(sweep_name: str, project: str, entity: str | None) -> dict[str, Any]:
    """The workspace view of the sweep (see the module docstring)."""
    metric_sections = [
        {"name": title, "panels": [{"type": "scatter", "title": f"{title} against k",
                                    "x": {"config": "k"}, "y": {"summary": key}}]}
        for key, title in HEADLINE]
    overview = {"name": f"Sweep {sweep_name}: overview", "panels": [
        {"type": "parallel_coordinates", "title": "Axes and headline metrics",
         "columns": [{"config": axis} for axis in ("k", "regularizer", "mask", "strength")]
         + [{"summary": key} for key, _ in HEADLINE]},
        {"type": "scatter", "title": "R^2 against mono_live", "x": {"summary": "r2"},
         "y": {"summary": "mono_live"}},
    ]}
    report = {"name": "The report run", "panels": [
        {"type": "media", "title": "Report tables and plots",
         "keys": ["paper_tables", "claims", "claim_settings", "plots"]}]}
    return {
        "name": f"sae-grid sweep {sweep_name}",
        "entity": entity,
        "project": project,
        "sweep": sweep_name,
        "filters": {"config": {"sweep": sweep_name}},
        "groupby": [{"config": "regularizer"}, {"config": "mask"}],
        "pinned_columns": [f"config:{axis}" for axis in AXES],
        "sections": [overview, *metric_sections, report],
    }
