"""The sweep's W&B dashboard as code (issue 23): its spec, the workspace built from it, and its
saving, against a small fake W&B GraphQL server on 127.0.0.1 that records the mutation."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from sae.reporting.dashboard import AXES, HEADLINE, dashboard_spec
from sae.tracking import dashboard_workspace, save_dashboard


class FakeWandb:
    """Answers every GraphQL request with a viewer and an upsertView result; records the
    requests. Bounded: serves from a daemon thread until the ``with`` block ends."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/graphql":
                    fake.requests.append(json.loads(body))
                self._send(json.dumps({"data": {
                    "upsertView": {"view": {"id": "VIEW1", "name": "nwsaved"}, "inserted": True},
                    "viewer": {"id": "u1", "entity": "lab", "username": "u", "flags": "{}",
                               "teams": {"edges": []}}}}).encode())

            def do_GET(self) -> None:  # noqa: N802
                self._send(b"", 404)

            def _send(self, payload: bytes, code: int = 200) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.timeout = 5
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeWandb:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def mutations(self) -> list[dict]:
        return [r for r in self.requests if "UpsertView2" in r.get("query", "")]


def test_the_spec_holds_every_panel_the_issue_names():
    spec = dashboard_spec("paper", "sae-grid", "lab")
    assert spec["name"] == "sae-grid sweep paper" and spec["filters"] == {
        "config": {"sweep": "paper"}}
    assert spec["groupby"] == [{"config": "regularizer"}, {"config": "mask"}]
    assert spec["pinned_columns"][:len(AXES)] == [f"config:{a}" for a in AXES]
    sections = {s["name"]: s["panels"] for s in spec["sections"]}
    for key, title in HEADLINE:  # a section per headline metric, against k
        (panel,) = sections[title]
        assert panel["x"] == {"config": "k"} and panel["y"] == {"summary": key}
    overview = sections["Sweep paper: overview"]
    parallel = next(p for p in overview if p["type"] == "parallel_coordinates")
    assert {"summary": "mono_dead0"} in parallel["columns"] and {"config": "mask"} in \
        parallel["columns"]
    scatter = next(p for p in overview if p["type"] == "scatter")
    assert (scatter["x"], scatter["y"]) == ({"summary": "r2"}, {"summary": "mono_live"})
    assert any(p["type"] == "media" for s in spec["sections"] for p in s["panels"])
    workspace = dashboard_workspace(spec)  # the real wandb_workspaces objects build from it
    assert len(workspace.sections) == len(spec["sections"])
    view = json.loads(workspace._to_model().spec.model_dump_json(by_alias=True,
                                                                  exclude_none=True))
    assert "mono_live" in json.dumps(view) and "paper" in json.dumps(view)


def test_the_dashboard_is_saved_as_a_workspace_view(monkeypatch):
    with FakeWandb() as server:
        monkeypatch.setenv("WANDB_BASE_URL", server.url)
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
        url = save_dashboard(dashboard_spec("paper", "sae-grid", "lab"))
        (mutation,) = server.mutations()
    variables = mutation["variables"]
    assert (variables["entityName"], variables["projectName"]) == ("lab", "sae-grid")
    assert variables["displayName"] == "sae-grid sweep paper"
    assert "mono_dead0" in variables["spec"] and "k_robustness_mean_ratio" in variables["spec"]
    assert url.endswith("/lab/sae-grid?nw=nwsaved")


@pytest.mark.parametrize("flags", [[], ["--project", "elsewhere", "--entity", "team2"]])
def test_sync_saves_the_dashboard_the_report_wrote(tmp_path, monkeypatch, capsys, flags):
    from sae import sync

    report = tmp_path / "sweeps" / "paper" / "report"
    report.mkdir(parents=True)
    (report.parent / "cells.json").write_text(json.dumps({"sweep": "paper", "cells": []}))
    (report / "wandb_dashboard.json").write_text(json.dumps(
        dashboard_spec("paper", "sae-grid", "lab")))
    with FakeWandb() as server:
        monkeypatch.setenv("WANDB_BASE_URL", server.url)
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
        assert sync.main([str(tmp_path / "sweeps" / "paper"), "--dashboard", *flags]) == 0
        (mutation,) = server.mutations()
    expected = ("team2", "elsewhere") if flags else ("lab", "sae-grid")
    assert (mutation["variables"]["entityName"], mutation["variables"]["projectName"]) == \
        expected
    assert "- ok   dashboard: " in capsys.readouterr().out
