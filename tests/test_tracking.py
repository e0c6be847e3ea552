"""W&B tracking, read back from the offline ``.wandb`` files (no server): the axes, every
metric of metrics.json in the summary, the weights artifact, the per-latent table, the density
histogram, lr and samples seen; an unreachable server costs seconds, not minutes; ``sae-sync``
finds a sweep's offline runs."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sae import sync, tracking
from sae.tracking import NOT_APPLICABLE, start_tracking, summary_values
from tests import wandb_records as W
from tests.helpers import REPO, synthetic_cfg

UNREACHABLE = "http://127.0.0.1:9"  # the discard port on loopback: refused at once
CELL = ["dataset=digits", "k=8", "train.max_steps=6", "train.log_every=2", "sae.n_latents=64",
        "eval.probe_epochs=2", "eval.probe_max_train=300", "eval.inspect_latents=2",
        "eval.inspect_top_images=4", "logger=wandb"]


def train(root: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "SAE_OUTPUT_ROOT": str(root), "WANDB_SILENT": "true",
                "PYTHONPATH": str(REPO), **(env or {})}
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        if key not in (env or {}):
            full_env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "sae.train", "-m", *CELL, *overrides], cwd=REPO,
                          env=full_env, capture_output=True, text=True, timeout=300)


def flush_wandb() -> None:
    """Stop this process's W&B service: its record log is complete on disk only then."""
    import wandb

    wandb.teardown()


def offline_dir(run_dir: Path) -> Path:
    (found,) = (run_dir / "wandb").glob("offline-run-*")
    return found


@pytest.fixture(scope="module")
def sweep_root(tmp_path_factory) -> Path:
    """A two-cell sweep (baseline and l1l2) tracked offline."""
    root = tmp_path_factory.mktemp("tracked")
    result = train(root, "regularizer=none,l1l2", "sweep_name=tracked")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root


def run_dirs(root: Path) -> dict[str, Path]:
    return {p.name.split("-")[2]: p for p in (root / "runs").iterdir()}


def test_config_and_tags_carry_flat_axes_and_the_baseline_mask_is_na(sweep_root):
    for reg, run_dir in run_dirs(sweep_root).items():
        offline = offline_dir(run_dir)
        config, record = W.config(offline), W.run(offline)
        mask = NOT_APPLICABLE if reg == "none" else True
        assert {k: config[k] for k in ("backbone", "dataset", "k", "regularizer", "mask",
                                       "seed")} == {"backbone": "none", "dataset": "digits",
                                                    "k": 8, "regularizer": reg, "mask": mask,
                                                    "seed": 0}
        assert isinstance(config["strength"], float) and config["cfg"]["k"] == 8
        assert f"mask:{mask}" in record.tags and f"regularizer:{reg}" in record.tags
        assert record.run_group == "tracked" and record.job_type == "train"


def test_summary_holds_every_metric_of_metrics_json(sweep_root):
    run_dir = run_dirs(sweep_root)["l1l2"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    summary = W.summary(offline_dir(run_dir))
    expected = summary_values(metrics)
    assert {"r2", "r2_variance_weighted", "mono_live", "mono_dead0", "r2_at_k_x2",
            "r2_ratio_at_k_div4", "k_robustness_mean_ratio", "probe_small_m_mean", "probe_raw",
            "train/steps"} <= expected.keys()
    # Every name is one W&B can sort and filter by (issue 22 item 4): sections of
    # [_a-zA-Z][_a-zA-Z0-9]*, no curve point named by a number.
    name = re.compile(r"^[_a-zA-Z][_a-zA-Z0-9]*$")
    bad = [k for k in expected if not all(name.match(part) for part in k.split("/"))]
    assert bad == [], bad
    assert not [k for k in summary if k.startswith("curves")]  # curves are tables
    for key, value in expected.items():
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        assert summary[key] == pytest.approx(value), key


def test_history_artifact_table_histogram_and_images(sweep_root):
    run_dir = run_dirs(sweep_root)["l1l2"]
    offline = offline_dir(run_dir)
    rows = W.history(offline)
    train_rows = [r for r in rows if "train/loss" in r]
    batch = json.loads((run_dir / "metrics.json").read_text())["train"]["batch_size"]
    assert [r["train/samples_seen"] for r in train_rows] == [r["_step"] * batch
                                                            for r in train_rows]
    assert len(train_rows) == 3 and all(r["train/lr"] == 1e-4 for r in train_rows)
    final = {k: v for r in rows for k, v in r.items()}
    assert final["eval/feature_density_log10._type"] == "histogram"
    assert final["eval/latents._type"] == "table-file" and final["eval/latents.nrows"] == 64
    assert final["eval/contact_sheets._type"] == "images/separated"
    for curve in ("k_robustness", "k_robustness_ratio", "probe"):  # curves as tables
        assert final[f"eval/curves/{curve}._type"] == "table-file", curve
    table = json.loads((offline / "files" / final["eval/latents.path"]).read_text())
    assert table["columns"][:3] == ["latent", "firing_rate", "monoscore"]
    assert "purity_top_class" in table["columns"]
    counts = np.asarray(final["eval/feature_density_log10.values"])
    assert counts.sum() == 64  # one entry per latent
    (model,) = [a for a in W.of_type(offline, "artifact") if a.type == "model"]
    refs = {e.path: e.ref for e in model.manifest.contents}
    assert refs["model.safetensors"] == (run_dir / "model.safetensors").resolve().as_uri()


def track_against(server_url: str, tmp_path: Path, monkeypatch, run_id: str):
    """A cell's tracker with an API key and ``server_url`` as the W&B server (logger.mode=auto):
    one logged point, a summary, the end. Returns the tracker, its run dir and the seconds."""
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # a dummy: no real server is reached
    monkeypatch.setenv("WANDB_BASE_URL", server_url)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = synthetic_cfg()
    assert cfg.logger.name == "wandb" and cfg.logger.mode == "auto"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    started = time.perf_counter()
    tracker = start_tracking(cfg, run_id, run_dir)
    tracker.log({"train/loss": 1.0}, step=1)
    tracker.summary({"r2": 0.5})
    tracker.finish()
    return tracker, run_dir, time.perf_counter() - started


def test_an_unreachable_server_costs_seconds_and_logs_offline(tmp_path, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger="sae.tracking"):
        tracker, run_dir, seconds = track_against(UNREACHABLE, tmp_path, monkeypatch,
                                                  "unreachable-run")
    assert seconds < 15.0
    flush_wandb()
    assert isinstance(tracker, tracking.WandbTracker)
    assert [r.message for r in caplog.records if "unreachable" in r.message] == [
        f"W&B server {UNREACHABLE} unreachable within 3.0 s: logging offline (nothing is lost; "
        "upload later with `sae-sync SWEEP_DIR`)"]
    assert W.summary(offline_dir(run_dir))["r2"] == 0.5


def test_reachability_probe_is_bounded():
    started = time.perf_counter()
    assert not tracking.reachable(UNREACHABLE, 2.0)
    assert time.perf_counter() - started < 3.0


def test_the_report_logs_a_report_run_in_the_sweeps_group(sweep_root):
    from sae.report import main

    sweep_dir = sweep_root / "sweeps" / "tracked"
    assert main([str(sweep_dir), "--no-seed-stability"]) == 0
    flush_wandb()
    offline = offline_dir(sweep_dir / "report")
    spec = json.loads((sweep_dir / "report" / "wandb_dashboard.json").read_text())
    assert spec["sweep"] == "tracked" and spec["filters"] == {"config": {"sweep": "tracked"}}
    record = W.run(offline)
    assert record.job_type == "report" and record.run_group == "tracked"
    logged = {k: v for r in W.history(offline) for k, v in r.items()}
    for table in ("paper_tables", "claims", "claim_settings"):
        assert logged[f"{table}._type"] == "table-file", table
    assert logged["claims.nrows"] == 5
    plots = {k.split(".")[0] for k, v in logged.items() if k.endswith("._type")
             and v == "image-file"}
    assert {"plots/metrics_vs_k_none_digits", "plots/probe_none_digits"} <= plots


def test_sync_finds_the_offline_runs_of_a_sweep(sweep_root, capsys):
    sweep_dir = sweep_root / "sweeps" / "tracked"
    found = sync.offline_runs(sweep_dir)
    expected = {*run_dirs(sweep_root).values()}
    if (sweep_dir / "report" / "wandb").exists():  # the report test ran first
        expected.add(sweep_dir / "report")
    assert {p.parent.parent for p in found} == expected
    assert sync.main([str(sweep_dir), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"{len(found)} offline W&B runs" in out and all(str(p) in out for p in found)


def test_sync_to_an_unreachable_server_fails_fast(sweep_root, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_BASE_URL", UNREACHABLE)
    started = time.perf_counter()
    assert sync.main([str(sweep_root / "sweeps" / "tracked")]) == 1
    assert time.perf_counter() - started < 10.0
    assert f"W&B server {UNREACHABLE} unreachable" in capsys.readouterr().out


class LoopbackServer:
    """A TCP server on 127.0.0.1 for W&B's probe: ``silent`` accepts connections and never
    answers; otherwise it answers every request with HTTP 404 after ``delay_s``. Bounded: it
    serves until ``stop()`` (a context manager), each connection closed within 30 s."""

    def __init__(self, silent: bool, delay_s: float = 0.0) -> None:
        import socket
        import threading

        self.silent, self.delay_s = silent, delay_s
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stopping = threading.Event()
        self.open: list = []
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:

        deadline = time.monotonic() + 60
        while not self.stopping.is_set() and time.monotonic() < deadline:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.open.append(conn)
            if not self.silent:
                time.sleep(self.delay_s)
                conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n")
                conn.close()

    def __enter__(self) -> LoopbackServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join(5)
        for conn in self.open:
            conn.close()
        self.sock.close()


def test_a_server_that_accepts_and_never_answers_costs_the_probe_and_logs_offline(
        tmp_path, monkeypatch, caplog):
    """Issue 23: a TCP connection alone used to count as reachable, and wandb.init then waited
    about 90 s and lost the data. Now the probe's HTTP request times out and the run is offline,
    with everything logged."""
    with LoopbackServer(silent=True) as server, \
            caplog.at_level(logging.WARNING, logger="sae.tracking"):
        tracker, run_dir, seconds = track_against(server.url, tmp_path, monkeypatch,
                                                  "silent-run")
    print(f"silent server: {seconds:.1f} s")
    assert seconds < synthetic_cfg().logger.probe_timeout_s + 10.0
    flush_wandb()
    assert isinstance(tracker, tracking.WandbTracker) and tracker.offline
    assert any(f"W&B server {server.url} unreachable" in r.message for r in caplog.records)
    assert W.summary(offline_dir(run_dir))["r2"] == 0.5


def test_the_probe_counts_a_graphql_answer_not_a_connection():
    from tests.test_dashboard import FakeWandb

    with LoopbackServer(silent=True) as server:
        started = time.perf_counter()
        assert not tracking.reachable(server.url, 1.0)
        assert time.perf_counter() - started < 2.5
    with LoopbackServer(silent=False, delay_s=0.5) as server:  # answers, but a 404
        assert not tracking.reachable(server.url, 3.0)
    with FakeWandb() as server:  # W&B's viewer query answered
        assert tracking.reachable(server.url, 3.0)


def test_a_server_that_answers_slowly_and_wrongly_costs_seconds_and_logs_offline(
        tmp_path, monkeypatch):
    """A proxy that answers every request after a second, with a 404: no online start is
    tried (it would fail, and its run id would then be taken in this process); the run is
    offline, its data kept."""
    with LoopbackServer(silent=False, delay_s=1.0) as server:
        tracker, run_dir, seconds = track_against(server.url, tmp_path, monkeypatch, "slow-run")
    print(f"slow server: {seconds:.1f} s")
    assert seconds < 3.0 + 10.0 and isinstance(tracker, tracking.WandbTracker)
    flush_wandb()
    assert W.summary(offline_dir(run_dir))["r2"] == 0.5


def test_sync_passes_project_and_entity_to_wandb_sync():
    """As ``wandb sync -p/-e``: the flags reach the W&B CLI, which has them."""
    command = sync.sync_command(Path("/r/offline-run-x"), "other-project", "my-team")
    assert command[-4:] == ["--project", "other-project", "--entity", "my-team"]
    assert sync.sync_command(Path("/r/x"))[-1] == "/r/x"
    helped = subprocess.run([sys.executable, "-m", "wandb", "sync", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert "--project" in helped.stdout and "--entity" in helped.stdout
