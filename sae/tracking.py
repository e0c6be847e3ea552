"""Experiment tracking: the only module that imports wandb.

One W&B run per grid cell: ``id`` = the run id (so a requeued or re-launched cell continues the
same W&B run), ``group`` = the sweep, ``job_type`` = the stage, explicit ``step=`` on every log
(an offline resume starts a new run directory at step 0, see PITFALLS.md).

What a run holds, so that one W&B project carries the whole comparison:

* config: flat, filterable axis keys (``backbone``, ``dataset``, ``k``, ``regularizer``,
  ``strength``, ``mask``, ``seed``, ``n_latents``, ``sweep``; a baseline's ``mask`` is ``n/a``),
  the same as tags (``mask:n/a``), and the whole resolved config under ``cfg``;
* history: the training losses, dead latents, learning rate and samples seen;
* summary: every numeric leaf of metrics.json under its metrics.json name, nested keys joined
  with ``/`` as W&B sections (``r2``, ``r2_variance_weighted``, ``mono_dead0``,
  ``r2_at_k_x2``, ``train/steps``, ...): every part matches ``[_a-zA-Z][_a-zA-Z0-9]*``, the
  names W&B can sort and filter by;
* the curves of metrics.json (R^2 and its ratio per inference k', probe accuracy per m) as
  tables ``eval/curves/<name>`` (x, value), not as summary keys named by numbers;
* at the end: the weights as an artifact (a reference to the run directory when offline), a
  per-latent table (firing rate, MonoScore, purity, top class), the feature-density histogram
  (log10 firing rate, SAELens's convention) and the contact sheets as images.

``python -m sae.report`` adds a ``job_type=report`` run in the sweep's group with the paper
tables and claims as tables and the plots as images (:func:`log_report`).

Tracking never fails or stalls training: under ``logger.mode=auto`` with an API key, a bounded
request to the server (its GraphQL viewer query, within ``logger.probe_timeout_s``) precedes
``wandb.init``; a server that refuses, accepts and never answers, or answers with no GraphQL
data means an offline run and one warning line (upload later: ``sae-sync SWEEP_DIR``). ``wandb.init`` itself waits at most the
probe timeout plus ``INIT_TIMEOUT_MARGIN_S``; an online start that fails falls back to an offline
run, so every history point, summary value, artifact and image is kept for ``sae-sync``. Every W&B call
is guarded; a failure turns the tracker into a no-op with one warning.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from sae.config import RootConfig, to_dict
from sae.grid.runs import CONFIG_FILE, INSPECT_DIR, METRICS_FILE, MODEL_FILE, MODEL_SIDECAR
from sae.io.plain import numeric_leaves

log = logging.getLogger(__name__)

NOT_APPLICABLE = "n/a"  # the mask of a run without a regularizer
DEFAULT_BASE_URL = "https://api.wandb.ai"
MAX_IMAGES = 16  # contact sheets logged per run
DENSITY_FLOOR = 1e-10  # log10 of a dead latent's firing rate reads -10 (SAELens's convention)


class NullTracker:
    """logger=none, or W&B unavailable."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def summary(self, metrics: dict[str, Any]) -> None:
        pass

    def finish(self, failed: bool = False) -> None:
        pass


# -- what identifies a run ------------------------------------------------------------------------
def axis_values(cfg: RootConfig) -> dict[str, Any]:
    """The grid axes as flat values (the W&B config keys to filter and group by)."""
    baseline = cfg.regularizer.name == "none"
    return {"backbone": cfg.backbone.name, "dataset": cfg.dataset.name, "k": cfg.k,
            "regularizer": cfg.regularizer.name, "strength": cfg.regularizer.strength,
            "mask": NOT_APPLICABLE if baseline else cfg.mask, "seed": cfg.seed,
            "n_latents": cfg.sae.n_latents, "sweep": cfg.sweep_name}


def axis_tags(cfg: RootConfig) -> list[str]:
    return [f"{key}:{value}" for key, value in axis_values(cfg).items()]


def run_config(cfg: RootConfig) -> dict[str, Any]:
    return {**axis_values(cfg), "cfg": to_dict(cfg)}


# -- online, offline, or unreachable --------------------------------------------------------------
def _answers(url: str, timeout_s: float) -> bool:
    """Whether the server answers W&B's own viewer query (``POST /graphql``, authenticated
    with ``WANDB_API_KEY`` when set) with GraphQL data within ``timeout_s``. A refused
    connection, one accepted and never answered, an error status (a proxy's 404, a refused
    key's 401) or a body that is no GraphQL answer all mean: do not start online."""
    import base64
    import json
    import urllib.request

    request = urllib.request.Request(
        url.rstrip("/") + "/graphql", data=json.dumps({"query": "{ viewer { id } }"}).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    key = os.environ.get("WANDB_API_KEY")
    if key:
        token = base64.b64encode(f"api:{key}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return "data" in json.loads(response.read(1 << 20) or b"{}")
    except (OSError, ValueError):  # HTTPError, URLError and timeouts are OSErrors
        return False


def reachable(url: str, timeout_s: float) -> bool:
    """Whether the W&B server at ``url`` answers its viewer query within ``timeout_s`` (a TCP
    connection alone is not enough: a stalled proxy accepts and never answers). Bounded as a
    whole, name resolution included: it runs in a daemon thread, abandoned when it takes
    longer."""
    answer: list[bool] = []
    probe = threading.Thread(target=lambda: answer.append(_answers(url, timeout_s)),
                             daemon=True)
    probe.start()
    probe.join(timeout_s)
    return bool(answer and answer[0])


def wandb_mode(cfg_mode: str, probe_timeout_s: float = 3.0) -> str:
    """auto -> WANDB_MODE when set; else online with an API key and a reachable server,
    offline otherwise (one warning line when the server did not answer)."""
    if cfg_mode != "auto":
        return cfg_mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if not os.environ.get("WANDB_API_KEY"):
        return "offline"
    url = os.environ.get("WANDB_BASE_URL", DEFAULT_BASE_URL)
    if reachable(url, probe_timeout_s):
        return "online"
    log.warning("W&B server %s unreachable within %.1f s: logging offline (nothing is lost; "
                "upload later with `sae-sync SWEEP_DIR`)", url, probe_timeout_s)
    return "offline"


# -- the run's tracker ----------------------------------------------------------------------------
def summary_values(metrics: dict[str, Any]) -> dict[str, Any]:
    """Numeric leaves under their metrics.json names, sections joined by ``/``
    (``train/steps``); text and lists (the protocols, the training curve, which is in the
    history) and the curves (logged as tables: ``log_curves``) are left out."""
    return numeric_leaves({k: v for k, v in metrics.items() if k != "curves"}, sep="/")


class WandbTracker:
    def __init__(self, run: Any, run_dir: Path | None = None, offline: bool = True) -> None:
        self.run, self.run_dir, self.offline = run, run_dir, offline

    def _guard(self, what: str, fn, *args, **kwargs) -> None:
        if self.run is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 -- tracking must never fail training
            log.warning("W&B %s failed (%s); tracking is off for the rest of this run", what, exc)
            self.run = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._guard("log", lambda: self.run.log(metrics, step=step))

    def summary(self, metrics: dict[str, Any]) -> None:
        """The final metrics, then the run's outputs (each optional: a missing piece is skipped
        with a warning, the others are still logged)."""
        self._guard("summary", lambda: self.run.summary.update(summary_values(metrics)))
        if self.run is None or self.run_dir is None:
            return
        for what, log_output in OUTPUTS.items():
            try:
                log_output(self.run, self.run_dir, metrics, self.offline)
            except Exception as exc:  # noqa: BLE001 -- an output is optional
                log.warning("W&B %s not logged (%s)", what, exc)

    def finish(self, failed: bool = False) -> None:
        self._guard("finish", lambda: self.run.finish(exit_code=1 if failed else 0))
        self.run = None


# -- a run's outputs, logged at its end -----------------------------------------------------------
def final_step(metrics: dict[str, Any]) -> int:
    return int((metrics.get("train") or {}).get("steps") or 0)


def log_weights(run: Any, run_dir: Path, metrics: dict[str, Any], offline: bool) -> None:
    """The weights as a ``model`` artifact: offline, a reference to the run directory (no copy);
    online, the files themselves."""
    import wandb

    artifact = wandb.Artifact(f"sae-{run.id}", type="model",
                              metadata={"run_dir": str(run_dir.resolve())})
    for name in (MODEL_FILE, MODEL_SIDECAR, CONFIG_FILE, METRICS_FILE):
        path = run_dir / name
        if not path.exists():
            continue
        if offline:
            artifact.add_reference(path.resolve().as_uri(), name=name)
        else:
            artifact.add_file(str(path), name=name)
    run.log_artifact(artifact)


def per_latent_columns(run_dir: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """The evaluation's per-latent arrays (numpy): firing rate, MonoScore, purity, top class."""
    from safetensors.numpy import load_file

    arrays = load_file(str(run_dir / metrics["per_latent_file"]))
    n_eval = max(int(metrics.get("n_eval") or 1), 1)
    columns = {"firing_rate": arrays["firing_count"].astype("float64") / n_eval,
               "monoscore": arrays["monoscore"]}
    for name in ("purity_binary", "purity_weighted", "purity_top_class"):
        if name in arrays:
            columns[name] = arrays[name]
    return columns


def log_latents(run: Any, run_dir: Path, metrics: dict[str, Any], offline: bool) -> None:
    """A per-latent table and the feature-density histogram (log10 firing rate)."""
    import numpy as np
    import wandb

    columns = per_latent_columns(run_dir, metrics)
    names = ["latent", *columns]
    rows = [[j, *(v.item() for v in values)]
            for j, values in enumerate(zip(*columns.values()))]
    density = np.log10(columns["firing_rate"] + DENSITY_FLOOR)
    run.log({"eval/latents": wandb.Table(columns=names, data=rows),
             "eval/feature_density_log10": wandb.Histogram(density),
             "eval/dead_density_count": int((columns["firing_rate"] == 0).sum())},
            step=final_step(metrics))


def log_contact_sheets(run: Any, run_dir: Path, metrics: dict[str, Any], offline: bool) -> None:
    import wandb

    sheets = sorted((run_dir / INSPECT_DIR).glob("latent_*.png"))[:MAX_IMAGES]
    if sheets:
        run.log({"eval/contact_sheets": [wandb.Image(str(p), caption=p.stem) for p in sheets]},
                step=final_step(metrics))


def log_curves(run: Any, run_dir: Path, metrics: dict[str, Any], offline: bool) -> None:
    """Each curve of metrics.json (``{x: value}``) as a two-column table, which W&B plots as a
    line (``wandb.plot.line`` in a panel) and the dashboard compares across runs."""
    import wandb

    tables = {}
    for name, points in (metrics.get("curves") or {}).items():
        if isinstance(points, dict) and points:
            rows = sorted((float(x), float(y)) for x, y in points.items()
                          if isinstance(y, int | float))
            tables[f"eval/curves/{name}"] = wandb.Table(columns=["x", "value"],
                                                        data=[list(r) for r in rows])
    if tables:
        run.log(tables, step=final_step(metrics))


OUTPUTS = {"weights artifact": log_weights, "per-latent table": log_latents,
           "curves": log_curves, "contact sheets": log_contact_sheets}


INIT_TIMEOUT_MARGIN_S = 10.0  # wandb.init's handshake, beyond the probe (default wait: 90 s)


def _settings(probe_timeout_s: float = 3.0) -> Any:
    import wandb

    return wandb.Settings(console="off", silent=True,
                          init_timeout=probe_timeout_s + INIT_TIMEOUT_MARGIN_S)


def start_tracking(cfg: RootConfig, run_id: str, run_dir: Path, job_type: str = "train", *,
                   concurrent: bool = False):
    """A tracker for this cell: W&B (online or offline) or a no-op. ``concurrent``: the run
    lives beside other open runs of this process (the members of a pack)."""
    if cfg.logger.name == "none":
        return NullTracker()
    try:
        import wandb

        mode = wandb_mode(cfg.logger.mode, cfg.logger.probe_timeout_s)

        def init(mode: str):
            return wandb.init(
                project=cfg.logger.project, entity=cfg.logger.entity, id=run_id, name=run_id,
                group=cfg.sweep_name, job_type=job_type, tags=axis_tags(cfg),
                config=run_config(cfg), dir=str(run_dir), mode=mode, resume="allow",
                reinit="create_new" if concurrent else "finish_previous",
                settings=_settings(cfg.logger.probe_timeout_s))

        try:
            run = init(mode)
        except Exception as exc:  # noqa: BLE001 -- a server that answered the probe but
            if mode != "online":  # not W&B's handshake in time: keep everything offline
                raise
            log.warning("W&B online start failed (%s): logging offline (nothing is lost; "
                        "upload later with `sae-sync SWEEP_DIR`)", exc)
            mode = "offline"
            run = init(mode)
        return WandbTracker(run, Path(run_dir), offline=mode != "online")
    except Exception as exc:  # noqa: BLE001 -- W&B unreachable, bad key, ...: train anyway
        log.warning("W&B could not start (%s); continuing without tracking", exc)
        return NullTracker()


# -- the sweep's report run -----------------------------------------------------------------------
def log_report(sweep_name: str, report_dir: Path, logger: dict[str, Any],
               tables: dict[str, Any], images: dict[str, Path]) -> str | None:
    """A ``job_type=report`` run in the sweep's group: ``tables`` (name -> DataFrame) as W&B
    tables, ``images`` (name -> PNG) as images. Returns the run's directory, None when W&B
    could not log (a warning says why)."""
    try:
        import wandb

        mode = wandb_mode(str(logger.get("mode", "auto")),
                          float(logger.get("probe_timeout_s", 3.0)))
        with wandb.init(project=logger.get("project", "sae-grid"), entity=logger.get("entity"),
                        group=sweep_name, job_type="report", name=f"report-{sweep_name}",
                        tags=[f"sweep:{sweep_name}", "report"], dir=str(report_dir), mode=mode,
                        reinit="finish_previous", settings=_settings()) as run:
            payload: dict[str, Any] = {name: wandb.Table(dataframe=frame)
                                       for name, frame in tables.items()}
            payload |= {name: wandb.Image(str(path)) for name, path in images.items()}
            run.log(payload, step=0)
            return str(Path(run.dir).parent)
    except Exception as exc:  # noqa: BLE001 -- the report is written either way
        log.warning("W&B report run not logged (%s)", exc)
        return None


# -- the sweep's dashboard ------------------------------------------------------------------------
def _expression(ref: dict[str, str]) -> Any:
    """``{"config": "k"}`` / ``{"summary": "r2"}`` as a wandb_workspaces panel reference."""
    import wandb_workspaces.reports.v2 as wr

    (kind, name), = ref.items()
    return wr.Config(name) if kind == "config" else wr.SummaryMetric(name)


def _panel(panel: dict[str, Any]) -> Any:
    import wandb_workspaces.reports.v2 as wr

    if panel["type"] == "scatter":
        return wr.ScatterPlot(title=panel["title"], x=_expression(panel["x"]),
                              y=_expression(panel["y"]))
    if panel["type"] == "parallel_coordinates":
        return wr.ParallelCoordinatesPlot(title=panel["title"], columns=[
            wr.ParallelCoordinatesPlotColumn(metric=_expression(c)) for c in panel["columns"]])
    if panel["type"] == "media":
        return wr.MediaBrowser(media_keys=panel["keys"])
    raise ValueError(f"unknown dashboard panel type {panel['type']!r}")


def dashboard_workspace(spec: dict[str, Any]) -> Any:
    """The ``wandb_workspaces.workspaces.Workspace`` of a spec of
    ``sae.reporting.dashboard.dashboard_spec``."""
    import wandb_workspaces.workspaces as ws

    (key, value), = spec["filters"]["config"].items()
    return ws.Workspace(
        entity=spec["entity"], project=spec["project"], name=spec["name"],
        sections=[ws.Section(name=s["name"], panels=[_panel(p) for p in s["panels"]],
                             is_open=True) for s in spec["sections"]],
        runset_settings=ws.RunsetSettings(
            filters=[ws.Config(key) == value],
            groupby=[ws.Config(g["config"]) for g in spec["groupby"]],
            pinned_columns=spec["pinned_columns"]))


def save_dashboard(spec: dict[str, Any]) -> str:
    """Save the sweep's workspace view to the W&B server; returns its URL. Needs the server
    (``WANDB_API_KEY``, ``WANDB_BASE_URL``) and an entity (the spec's, else the key's default)."""
    import wandb

    if not spec.get("entity"):
        spec = {**spec, "entity": wandb.Api().default_entity}
    workspace = dashboard_workspace(spec).save()
    return str(workspace.url)
