"""The embedding cache keyed by what was read, checked library versions, resumable extraction.

- two roots with other images (same names and count) get other caches: before issue 14 root B
  silently got root A's 12-row cache;
- a root with one image added or resized gets a new key; weights are identified by content;
- a cache built by other major.minor library versions is refused, or used with
  ``extract.allow_version_drift``;
- an extraction killed (``kill -9``) or stopped by SIGTERM mid-way resumes from its last complete
  shard, and the finished cache is byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sae.config import ExtractOptions
from sae.data.cache import CacheError, cache_path, ensure_cache, load_image_split, open_cache
from sae.data.embedding import resolve_num_workers
from sae.data.images import materialize_digits_images
from sae.data.shards import PROGRESS_FILE, ShardLog, StopSignals, partial_dir
from sae.io.fingerprint import file_sha256, version_drift, weights_id
from tests.fixtures_images import make_imagenet, write_jpeg
from tests.test_extract import REPO, backbone_cfg, imagenet_cfg

CACHE_FILES = ("embeddings.npy", "labels.npy", "ids.txt", "class_names.json")


# Tiny models on 2 shared cores run 3-5x faster on one thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def load(root: Path, cache: Path, **options):
    return load_image_split(backbone_cfg("clip_tiny"), imagenet_cfg(root), cache, "train",
                            device="cpu", progress=False, options=ExtractOptions(**options))


# ---------------------------------------------------------------- the key is what was read

def test_two_roots_with_other_images_get_other_caches(tmp_path):
    a = make_imagenet(tmp_path / "a")
    b = make_imagenet(tmp_path / "b")
    for i, image in enumerate(sorted((b / "train").rglob("*.JPEG"))):
        write_jpeg(image, 1000 + i)  # other images under the same names: same count
    from_a, from_b = load(a, tmp_path / "cache"), load(b, tmp_path / "cache")
    assert from_a.n == from_b.n == 12 and from_a.ids == from_b.ids
    assert from_a.info["cache"] != from_b.info["cache"]
    assert not torch.allclose(from_a.x, from_b.x)  # B's own images, not A's cache


def test_a_modified_root_gets_a_new_key(tmp_path):
    root = make_imagenet(tmp_path / "root")
    backbone = backbone_cfg("clip_tiny")

    def key() -> str:
        return cache_path(tmp_path / "cache", backbone, imagenet_cfg(root), "train").name

    original = key()
    image = root / "train" / "n01440764" / "n01440764_0.JPEG"
    size = image.stat().st_size
    write_jpeg(image, 0, size=(48, 40))  # resized in place, same name
    assert image.stat().st_size != size and key() != original
    write_jpeg(image, 0)  # restored byte for byte: the same key again
    assert key() == original
    write_jpeg(root / "train" / "n01440764" / "n01440764_9.JPEG", 99)  # one image added
    assert key() != original
    (root / "train" / "n01440764" / "n01440764_9.JPEG").unlink()
    (root / "LOC_synset_mapping.txt").write_text("n01440764 tench\n")  # metadata read: in too
    assert key() != original


def test_weights_are_identified_by_content_and_hashed_once(tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_DIGEST_CACHE", str(tmp_path / "digests"))
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"weights" * 1000)
    expected = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert file_sha256(weights) == expected
    assert not list(tmp_path.glob("*.sha256.json"))  # nothing written beside the weights
    (sidecar,) = (tmp_path / "digests" / "digests").glob("*w.pt.sha256.json")
    record = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**record, "sha256": "from-the-sidecar"}))
    assert file_sha256(weights) == "from-the-sidecar"  # same size and mtime: not re-read
    os.utime(weights, ns=(record["mtime_ns"] + 10**9, record["mtime_ns"] + 10**9))
    assert file_sha256(weights) == expected  # touched: hashed again
    renamed = weights.rename(tmp_path / "other-name.pt")
    cfg = backbone_cfg("vit_tiny", checkpoint_path=str(renamed))
    assert weights_id(cfg) == f"sha256:{expected}"
    # a transformers snapshot directory: a digest of its files' names and contents
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors").write_bytes(b"a")
    before = weights_id(backbone_cfg("vit_tiny", checkpoint_path=str(snapshot)))
    (snapshot / "model.safetensors").write_bytes(b"b")
    assert before.startswith("sha256:")
    assert weights_id(backbone_cfg("vit_tiny", checkpoint_path=str(snapshot))) != before


# ---------------------------------------------------------------- library versions

def test_version_drift_is_refused_unless_allowed(tmp_path):
    root = make_imagenet(tmp_path / "root", train_per_class=1)
    path = Path(load(root, tmp_path / "cache").info["cache"])
    manifest_file = path / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    assert set(manifest["key_versions"]) >= {"torch", "open_clip_torch", "timm"}
    assert all(v.count(".") == 1 for v in manifest["key_versions"].values())  # major.minor
    manifest["key_versions"]["torch"] = "1.13"
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=r"torch 1\.13 \(cache\) != .*rm -r .*"
                                         r"extract\.allow_version_drift=true"):
        load(root, tmp_path / "cache")
    allowed = load(root, tmp_path / "cache", allow_version_drift=True)
    assert allowed.info["cache"] == str(path) and allowed.n == 3
    assert version_drift({"timm": "1.0"}, {"timm": "1.0"}) == []


def test_num_workers_default_to_the_job_cpus_minus_one(monkeypatch):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")
    assert resolve_num_workers(None) == 5
    assert resolve_num_workers(2) == 2  # an explicit value wins
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    assert resolve_num_workers(None) == max(0, len(os.sched_getaffinity(0)) - 1)
    # One source of truth: the paper backbones leave it to the allocation (before: 8 in every
    # backbone file, whatever the job's CPUs).
    for name in ("clip_vitl14", "siglip2", "vit_l16", "dinov2_vitl14", "siglip2_openclip"):
        assert backbone_cfg(name).num_workers is None
    from sae.config import BackboneConfig

    assert BackboneConfig().num_workers is None


# ---------------------------------------------------------------- resumable extraction

def test_an_interrupted_extraction_resumes_from_its_last_shard(tmp_path, monkeypatch, caplog):
    """In process: the third shard's write fails; the next call resumes after two shards."""
    root = make_imagenet(tmp_path / "root", train_per_class=5)  # 15 images, 4 per shard
    backbone = backbone_cfg("clip_tiny", batch_size=2)
    options = ExtractOptions(shard_size=3)  # rounded up to whole batches: 4
    whole = ensure_cache(backbone, imagenet_cfg(root), "train", tmp_path / "whole", "cpu", False,
                         options)
    add = ShardLog.add

    def fail_third(self, *args, **kwargs):
        if len(self.shards) == 2:
            raise OSError("disk full (simulated)")
        add(self, *args, **kwargs)

    monkeypatch.setattr(ShardLog, "add", fail_third)
    with pytest.raises(OSError, match="simulated"):
        ensure_cache(backbone, imagenet_cfg(root), "train", tmp_path / "cache", "cpu", False,
                     options)
    final = cache_path(tmp_path / "cache", backbone, imagenet_cfg(root), "train")
    progress = json.loads((partial_dir(final) / PROGRESS_FILE).read_text())
    assert [(s["start"], s["stop"]) for s in progress["shards"]] == [(0, 4), (4, 8)]
    monkeypatch.setattr(ShardLog, "add", add)
    with caplog.at_level("INFO", logger="sae.data.embedding"):
        path = ensure_cache(backbone, imagenet_cfg(root), "train", tmp_path / "cache", "cpu",
                            False, options)
    assert "at image 8 of 15 (2 shards complete)" in caplog.text
    assert not partial_dir(final).exists()
    resumed = open_cache(path)
    assert resumed.manifest["extraction"]["resumed_at_image"] == 8
    assert resumed.manifest["extraction"]["shards"] == 4
    assert resumed.manifest["files"] == open_cache(whole).manifest["files"]  # byte-identical


def test_stop_signals_defer_then_hand_the_signal_to_the_previous_handler():
    """SIGUSR2 (SLURM's preemption warning) only sets a flag while shards are written; after
    the shard is saved, the handler that was there before (e.g. submitit's requeue) runs."""
    seen: list[int] = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))
    try:
        with StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGUSR2)
            assert stop.requested == signal.SIGUSR2 and seen == []
            stop.resend()
        assert seen == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits") / "digits_images"
    materialize_digits_images(root, 0.2, 0)
    return root


def _extract_command(digits_root: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "sae.extract", "backbone=clip_tiny", "dataset=digits_images",
            f"dataset.root={digits_root}", "dataset.max_per_split=480", "split=train",
            "device=cpu", "progress=false", "backbone.batch_size=8", "extract.shard_size=16",
            f"paths.cache={cache}", f"paths.root={cache.parent}"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1"}


def _run(digits_root: Path, cache: Path) -> Path:
    result = subprocess.run(_extract_command(digits_root, cache), cwd=REPO, env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return Path(result.stdout.strip().splitlines()[-1])


def _digests(path: Path) -> dict[str, str]:
    files = open_cache(path).manifest["files"]
    return {name: files[name]["sha256"] for name in CACHE_FILES}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, digits_root) -> dict[str, str]:
    return _digests(_run(digits_root, tmp_path_factory.mktemp("whole") / "cache"))


def _interrupt(digits_root: Path, cache: Path, send: signal.Signals, after_shards: int
               ) -> tuple[int, int]:
    """Start an extraction, send ``send`` once ``after_shards`` shards are recorded; return
    (exit code, shards recorded afterwards)."""
    proc = subprocess.Popen(_extract_command(digits_root, cache), cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    progress = None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            found = list(cache.glob(f".partial-*/{PROGRESS_FILE}"))
            if found and _shard_count(found[0]) >= after_shards:
                progress = found[0]
                proc.send_signal(send)
                break
            time.sleep(0.01)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert progress is not None, f"finished before it could be interrupted: {proc.stderr.read()}"
    return proc.returncode, _shard_count(progress)


def _caches(cache: Path) -> list[Path]:
    return [p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")]


def _shard_count(progress: Path) -> int:
    try:
        return len(json.loads(progress.read_text())["shards"])
    except (OSError, ValueError):  # not there yet: the file only ever appears whole
        return 0


@pytest.mark.slow  # three extraction subprocesses
def test_kill_9_mid_way_resumes_to_a_byte_identical_cache(tmp_path, digits_root, uninterrupted):
    cache = tmp_path / "cache"
    code, shards = _interrupt(digits_root, cache, signal.SIGKILL, after_shards=3)
    assert code == -signal.SIGKILL and 3 <= shards < 30  # 480 images, 16 per shard
    assert not _caches(cache)  # only the shards, no cache that looks complete
    assert _digests(_run(digits_root, cache)) == uninterrupted
    manifest = open_cache(_caches(cache)[0]).manifest
    assert manifest["extraction"]["resumed_at_image"] == 16 * shards


@pytest.mark.slow
def test_sigterm_saves_the_current_batch_then_resumes(tmp_path, digits_root, uninterrupted):
    """SLURM's preemption signal: the rows so far become a shard, then the process ends."""
    cache = tmp_path / "cache"
    code, shards = _interrupt(digits_root, cache, signal.SIGTERM, after_shards=2)
    assert code == -signal.SIGTERM and shards >= 2
    progress = json.loads(next(cache.glob(f".partial-*/{PROGRESS_FILE}")).read_text())
    stops = [s["stop"] for s in progress["shards"]]
    assert all(stop % 8 == 0 for stop in stops)  # whole batches, so resumed batches are alike
    assert _digests(_run(digits_root, cache)) == uninterrupted
    shutil.rmtree(cache)


def test_extract_bench_prints_the_three_rates(capsys):
    from sae.benchmarks.extract import main

    main(["--device", "cpu", "--backbones", "vit_tiny", "--images", "8", "--image-size",
          "64x48", "--batch-size", "4", "--num-workers", "0", "--model-batches", "1"])
    line = json.loads(capsys.readouterr().out.strip())
    assert line["backbone"] == "vit_tiny" and line["images"] == 8 and line["dim"] == 192
    assert all(line[key] > 0 for key in ("decode_img_s", "model_img_s", "pipeline_img_s"))


def test_method_card_names_the_sampling_and_the_cache_key_inputs(tmp_path):
    from sae.config import RootConfig
    from sae.evaluation.method_card import render_markdown, run_card

    root = make_imagenet(tmp_path / "root", train_per_class=1)
    data = load(root, tmp_path / "cache")
    cfg = RootConfig(backbone=backbone_cfg("clip_tiny"), dataset=imagenet_cfg(root), k=4)
    card = run_card(cfg, {}, {"train_samples": 3}, "v0", "python -m sae.train ...",
                    {"train": data.info["cache_key_inputs"]})
    inputs = card["dataset"]["embedding_cache_key_inputs"]["train"]
    assert card["dataset"]["sampling"] == "per_image: every image of the split once"
    assert inputs["key"] == Path(data.info["cache"]).name.rsplit("__", 1)[1]
    assert inputs["weights"] == "random:seed0" and inputs["n_images"] == 3
    assert inputs["metadata_files"] == {"LOC_synset_mapping.txt": (root / "LOC_synset_mapping.txt")
                                        .stat().st_size}
    assert set(inputs["library_versions"]) >= {"torch", "timm"}
    text = render_markdown(card, "run")
    assert "image_list_sha256" in text and "sampling: per_image: every image" in text
