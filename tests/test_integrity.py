"""Nothing stale is trusted (issue 13 items 1-3): ``force=true`` retrains from scratch and sets the
old outputs aside (``sae-clean`` removes them), the run id holds the identity of the data, and a
checkpoint is verified against its digest, an older one or a fresh start taking over."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sae.config import PathsConfig
from tests.helpers import REPO, synthetic_cfg


def tiny_cell(root: Path, **overrides):
    cfg = synthetic_cfg(n_latents=64, max_steps=40, checkpoint_every=10, n_train=1024, dim=16,
                        n_atoms=32)
    cfg.eval = dataclasses.replace(cfg.eval, probe_max_train=256, probe_epochs=1)
    paths = PathsConfig(root=str(root), runs=str(root / "runs"), sweeps=str(root / "sweeps"),
                        cache=str(root / "cache"))
    return dataclasses.replace(cfg, paths=paths, **overrides)


def metrics_of(directory: Path) -> dict:
    return json.loads((Path(directory) / "metrics.json").read_text())


# -- force (item 1) -----------------------------------------------------------------------------
def test_force_retrains_from_scratch_and_sets_the_old_run_aside(tmp_path):
    from sae.train import run_cell

    first = run_cell(tiny_cell(tmp_path))
    directory = Path(first["run_dir"])
    old_model = (directory / "model.safetensors").read_bytes()
    forced = run_cell(tiny_cell(tmp_path, force=True))
    assert forced["state"] == "done" and forced["run_dir"] == first["run_dir"]
    train = metrics_of(directory)["train"]
    assert train["resumed_from_step"] is None and train["steps"] == 40, train
    (previous,) = directory.glob("previous-*")
    assert (previous / "model.safetensors").read_bytes() == old_model
    assert (previous / "checkpoints" / "last.safetensors").exists()
    assert (previous / "metrics.json").exists()

    dry = clean(tmp_path, "--dry-run")
    assert dry.returncode == 0 and str(previous) in dry.stdout and previous.exists(), dry
    assert "would free" in dry.stdout
    done = clean(tmp_path)
    assert done.returncode == 0 and "freed" in done.stdout and not previous.exists(), done
    assert (directory / "model.safetensors").exists()  # the current run is untouched


def test_a_requeued_forced_job_resumes_its_own_checkpoint(tmp_path, monkeypatch):
    """SLURM re-runs a requeued job with the same command, force=true included: the job's own
    checkpoint is resumed, not set aside (that would restart it at every preemption)."""
    from sae.grid.runs import run_dir, write_status
    from sae.train import run_cell

    monkeypatch.setenv("SLURM_JOB_ID", "77")
    first = run_cell(tiny_cell(tmp_path))
    directory = Path(first["run_dir"])
    write_status(directory, "preempted", "SIGUSR2")  # as a preempted job of job 77 leaves it
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    run_cell(tiny_cell(tmp_path, force=True))
    assert not list(directory.glob("previous-*"))
    assert metrics_of(run_dir(tiny_cell(tmp_path)))["train"]["resumed_from_step"] == 40


def clean(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sae.clean", str(root), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


# -- checkpoints protect themselves (item 3) -----------------------------------------------------
CKPT_CELL = dict(reg="l1l2", strength=0.05, n_train=2000, batch=256, n_latents=128, k=4,
                 checkpoint_every=5)


def train_to(ckpt: Path, max_steps: int):
    from sae.data.synthetic import load_synthetic
    from tests.test_trainer import train

    cfg = synthetic_cfg(max_steps=max_steps, **CKPT_CELL)
    return train(cfg, load_synthetic(cfg.dataset)[0].x, ckpt)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])  # as a full disk or a killed copy leaves it


def flip_a_weight_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-9] ^= 0xFF  # in the tensor data: the header still parses
    path.write_bytes(bytes(data))


def test_the_last_two_checkpoints_are_kept_with_a_digest(tmp_path):
    from sae.training.trainer import older_checkpoint

    ckpt = tmp_path / "checkpoints" / "last.safetensors"
    train_to(ckpt, 12)
    older = older_checkpoint(ckpt)
    assert older.name == "prev.safetensors"
    last_meta = json.loads(ckpt.with_suffix(".json").read_text())
    prev_meta = json.loads(older.with_suffix(".json").read_text())
    assert (last_meta["step"], prev_meta["step"]) == (12, 10)
    assert len(last_meta["digest"]) == 64 and last_meta["digest"] != prev_meta["digest"]


@pytest.mark.parametrize("damage", [truncate, flip_a_weight_byte], ids=["truncated", "bitflip"])
def test_a_corrupt_checkpoint_is_set_aside_and_the_older_one_resumes(tmp_path, damage, caplog):
    straight, _, _ = train_to(tmp_path / "straight" / "last.safetensors", 20)
    ckpt = tmp_path / "damaged" / "last.safetensors"
    train_to(ckpt, 12)  # last: step 12, prev: step 10
    damage(ckpt)
    with caplog.at_level("WARNING"):
        resumed, state, trainer = train_to(ckpt, 20)
    assert trainer.resumed_from == 10 and state.step == 20
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    (aside,) = ckpt.parent.glob("last.safetensors.corrupt-*")
    assert len(warnings) == 1 and str(ckpt) in warnings[0] and str(aside) in warnings[0]
    assert "\n" not in warnings[0]
    for name, value in straight.state_dict().items():  # the older checkpoint resumes exactly
        assert torch.equal(value, resumed.state_dict()[name]), name


def test_with_both_checkpoints_corrupt_training_starts_afresh(tmp_path, caplog):
    from sae.training.trainer import older_checkpoint

    ckpt = tmp_path / "last.safetensors"
    train_to(ckpt, 12)
    truncate(ckpt)
    older = older_checkpoint(ckpt)
    meta_end = older.read_bytes()
    older.write_bytes(b"\xff" * 8 + meta_end[8:])  # a header length no file can have
    with caplog.at_level("WARNING"):
        _, state, trainer = train_to(ckpt, 12)
    assert trainer.resumed_from is None and state.step == 12
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 2


# -- the run id holds the identity of the data (item 2) -------------------------------------------
def files_cell(root: Path, x_path: Path, **dataset):
    from sae.config import FilesDatasetConfig

    cell = tiny_cell(root)
    files = FilesDatasetConfig(name="files", train_path=str(x_path), **dataset)
    return dataclasses.replace(cell, dataset=files)


def write_embeddings(path: Path, n: int, d: int, seed: int) -> None:
    import numpy as np

    np.save(path, np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32))


def test_overwritten_embeddings_are_a_new_run_not_already_done(tmp_path):
    from sae.identity import run_id
    from sae.train import run_cell

    x_path = tmp_path / "emb.npy"
    write_embeddings(x_path, 600, 32, seed=0)
    first = run_cell(files_cell(tmp_path, x_path))
    assert first["state"] == "done"
    write_embeddings(x_path, 900, 48, seed=1)  # same path, other data
    second = run_cell(files_cell(tmp_path, x_path))
    assert second["state"] == "done" and second["run_id"] != first["run_id"], second
    assert metrics_of(second["run_dir"])["train"]["resumed_from_step"] is None
    # Same size, other bytes: the content digest, not the size, tells them apart.
    write_embeddings(x_path, 900, 48, seed=2)
    assert run_id(files_cell(tmp_path, x_path)) != second["run_id"]


def test_labels_and_class_names_files_are_part_of_the_id(tmp_path):
    import numpy as np

    from sae.identity import run_id

    x_path, labels = tmp_path / "emb.npy", tmp_path / "labels.npy"
    write_embeddings(x_path, 60, 8, seed=0)
    np.save(labels, np.arange(60) % 3)
    names = tmp_path / "names.txt"
    names.write_text("a\nb\nc\n")
    before = run_id(files_cell(tmp_path, x_path, train_labels=str(labels),
                               class_names=str(names)))
    names.write_text("a\nb\nd\n")
    assert run_id(files_cell(tmp_path, x_path, train_labels=str(labels),
                             class_names=str(names))) != before
    np.save(labels, np.arange(60) % 2)
    assert run_id(files_cell(tmp_path, x_path, train_labels=str(labels),
                             class_names=str(names))) != before


def test_a_file_is_hashed_once_per_size_and_mtime(tmp_path, monkeypatch):
    import sae.io.digests
    from sae.identity import run_id

    x_path = tmp_path / "emb.npy"
    write_embeddings(x_path, 600, 32, seed=0)
    first = run_id(files_cell(tmp_path, x_path))
    sidecar = json.loads((tmp_path / "emb.npy.sha256.json").read_text())
    assert sidecar["size"] == x_path.stat().st_size and len(sidecar["sha256"]) == 64
    sae.io.digests.file_digest.cache_clear()
    monkeypatch.setattr(sae.io.digests, "stream_sha256", lambda path: pytest.fail("hashed again"))
    assert run_id(files_cell(tmp_path, x_path)) == first  # read from the sidecar


def test_the_digest_of_a_file_in_a_read_only_directory_is_cached_under_the_output_root(
        tmp_path, monkeypatch):
    import sae.io.digests
    from sae.identity import run_id

    data = tmp_path / "readonly"
    data.mkdir()
    x_path = data / "emb.npy"
    write_embeddings(x_path, 60, 8, seed=0)
    monkeypatch.setattr(sae.io.digests, "writable_dir", lambda directory: directory != data)
    run_id(files_cell(tmp_path / "out", x_path))
    assert not list(data.glob("*.sha256.json"))
    assert len(list((tmp_path / "out" / "cache" / "digests").glob("*.sha256.json"))) == 1


def image_cell(root: Path, **backbone):
    from sae.config import validate
    from tests.test_config import compose_train

    cfg = validate(compose_train(["dataset=digits_images", "backbone=vit_tiny",
                                  f"paths.root={root}"]))
    return dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, **backbone))


def test_another_backbone_checkpoint_is_another_run(tmp_path):
    from sae.identity import run_id

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"weights A" * 100)
    b.write_bytes(b"weights B" * 100)
    assert run_id(image_cell(tmp_path, checkpoint_path=str(a))) != run_id(
        image_cell(tmp_path, checkpoint_path=str(b)))
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "config.json").write_text("{}")  # a transformers snapshot directory
    (snapshot / "model.safetensors").write_bytes(b"weights A")
    before = run_id(image_cell(tmp_path, checkpoint_path=str(snapshot)))
    (snapshot / "model.safetensors").write_bytes(b"weights C")
    assert run_id(image_cell(tmp_path, checkpoint_path=str(snapshot))) != before


def test_an_image_run_changes_whenever_its_embedding_cache_key_does(tmp_path):
    from sae.data.cache import cache_path
    from sae.identity import run_id

    base = image_cell(tmp_path)
    variants = [dataclasses.replace(base.dataset, layout="imagenet"),
                dataclasses.replace(base.dataset, eval_fraction=0.3),
                dataclasses.replace(base.dataset, max_per_split=50),
                dataclasses.replace(base.dataset, max_per_split=50, split_seed=1)]
    cells = [base] + [dataclasses.replace(base, dataset=v) for v in variants]
    for one in cells:
        for other in cells:
            if cache_path("c", one.backbone, one.dataset, "train") != cache_path(
                    "c", other.backbone, other.dataset, "train"):
                assert run_id(one) != run_id(other), (one.dataset, other.dataset)


@pytest.mark.parametrize("members", [1, 2])
def test_a_stop_between_log_steps_resumes_the_same_curve(tmp_path, members):
    """A stop signal checkpoints mid-window: the losses since the last logged point are kept,
    so the resumed run logs the curve of an uninterrupted one (the chaos test compares it);
    for a lone run and for every member of a pack (whose checkpoints dropped them before the
    one loop)."""
    import dataclasses
    import signal

    from sae.data.synthetic import load_synthetic
    from sae.model import TopKSAE
    from sae.runtime.preemption import Interrupted, StopRequest
    from sae.tracking import NullTracker
    from sae.training.loop import TrainingLoop
    from sae.training.trainer import Trainer

    base = synthetic_cfg(max_steps=20, log_every=10, **{**CKPT_CELL, "checkpoint_every": 0})
    cfgs = [dataclasses.replace(base, seed=seed) for seed in range(members)]
    x = load_synthetic(base.dataset)[0].x

    def trainers(folder: str, stop: StopRequest | None = None) -> list[Trainer]:
        made = []
        for cfg in cfgs:
            torch.manual_seed(cfg.seed)
            made.append(Trainer(cfg, TopKSAE(x.shape[1], cfg.sae.n_latents, cfg.k), x,
                                tmp_path / folder / f"{cfg.seed}.safetensors", NullTracker(),
                                {}))
        return made

    def histories(loop: TrainingLoop) -> list[list[dict]]:
        return [result.state.history for _, result in sorted(loop.run().items())]

    straight = histories(TrainingLoop(trainers("a")))
    with pytest.raises(Interrupted):
        TrainingLoop(trainers("b"), stop=StopRequest(signum=signal.SIGTERM)).run()
    resumed_trainers = trainers("b")
    resumed = histories(TrainingLoop(resumed_trainers))
    assert [t.resumed_from for t in resumed_trainers] == [1] * members
    assert resumed == straight


def test_a_folder_of_embeddings_is_named_by_the_one_folder_digest(tmp_path, monkeypatch):
    """A files dataset given as a folder is named by ``sae.io.fingerprint.directory_sha256``, the
    digest of a weights snapshot too: its files' relative names and bytes, not its dot files,
    nor where the folder lies."""
    import shutil

    from sae.identity import run_id, semantic_config
    from sae.io.fingerprint import content_identity, directory_sha256, weights_id

    monkeypatch.setenv("SAE_DIGEST_CACHE", str(tmp_path / "digests"))
    folder = tmp_path / "emb"
    (folder / "part").mkdir(parents=True)
    write_embeddings(folder / "part" / "0.npy", 60, 8, seed=0)
    (folder / "config.json").write_text("{}")
    cell = files_cell(tmp_path / "out", folder)
    sha256 = directory_sha256(folder)
    assert semantic_config(cell)["data"]["train_path"] == {"files": 2, "sha256": sha256}
    backbone = dataclasses.replace(image_cell(tmp_path / "out").backbone,
                                   checkpoint_path=str(folder))
    assert weights_id(backbone) == f"sha256:{sha256}"  # one folder digest for both
    before = run_id(cell)
    (folder / ".DS_Store").write_bytes(b"finder")
    assert run_id(cell) == before
    shutil.copytree(folder, tmp_path / "copy")
    assert content_identity(tmp_path / "copy", None) == {"files": 2, "sha256": sha256}
    write_embeddings(folder / "part" / "0.npy", 60, 8, seed=1)
    assert run_id(cell) != before
