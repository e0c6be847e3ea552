"""Inputs a run can train on but whose numbers mean less get one warning line each, in the log,
metrics.json, the method card and the run's notes.md (issue 22, item 6)."""

from __future__ import annotations

import json

import numpy as np

from tests.helpers import run_cli


def test_small_training_split_unseen_classes_and_missing_probe_are_reported(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "train.npy", rng.normal(size=(40, 8)).astype(np.float32))
    np.save(tmp_path / "eval.npy", rng.normal(size=(30, 8)).astype(np.float32))
    np.save(tmp_path / "y_train.npy", np.arange(40) % 2)
    np.save(tmp_path / "y_eval.npy", np.arange(30) % 3)  # class 2 never in training
    common = ["-m", "sae.train", "dataset=files", f"dataset.train_path={tmp_path}/train.npy",
              f"dataset.eval_path={tmp_path}/eval.npy", "sae=tiny", "sae.n_latents=32", "k=4",
              "logger=none", "train.max_steps=5", "train.batch_size=64", "train.progress=false",
              "eval.probe_max_train=40", "eval.probe_epochs=2"]
    labelled = run_cli([*common, f"dataset.train_labels={tmp_path}/y_train.npy",
                        f"dataset.eval_labels={tmp_path}/y_eval.npy"],
                       env_extra={"SAE_OUTPUT_ROOT": str(tmp_path / "a")})
    assert labelled.returncode == 0, labelled.stderr[-2000:]
    unlabelled = run_cli(common, env_extra={"SAE_OUTPUT_ROOT": str(tmp_path / "b")})
    assert unlabelled.returncode == 0, unlabelled.stderr[-2000:]
    for result, root, expected in (
            (labelled, tmp_path / "a", ["40 rows, fewer than one batch (64)",
                                        "1 classes appear only in the evaluation split"]),
            (unlabelled, tmp_path / "b", ["40 rows, fewer than one batch (64)",
                                          "no probe metrics: a split has no labels"])):
        (run,) = (root / "runs").iterdir()
        warnings = json.loads((run / "metrics.json").read_text())["warnings"]
        card = json.loads((run / "method_card.json").read_text())
        notes = (run / "notes.md").read_text()
        assert len(warnings) == len(expected)
        for text, line in zip(expected, warnings):
            assert text in line and line in notes and line in card["warnings"]
            assert text in result.stderr + result.stdout
