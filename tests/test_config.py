"""Every config composes; bad values stop with an error naming the field and the fix."""

from pathlib import Path

import numpy as np
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException

from sae.config import ConfigError, register_configs, validate
from sae.data import DataError, load_splits
from tests.helpers import REPO

register_configs()
CONF = REPO / "conf"
GROUPS = ["backbone", "dataset", "sae", "regularizer", "logger", "launcher"]


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_of_every_group_composes(group):
    for option in options(group):
        overrides = [f"{group}={option}"]
        if group == "backbone" and option != "none":
            overrides.append("dataset=digits_images")  # an image dataset needs a backbone
        if group == "dataset" and option in ("imagenet", "openimages", "digits_images"):
            overrides.append("backbone=vit_tiny")
        cfg = compose_train(overrides)
        if group == "dataset" and option == "files":
            overrides += ["dataset.train_path=/x.npy"]
            cfg = compose_train(overrides)
        root = validate(cfg)
        # What composed is the option asked for: its file's fields reached the typed config.
        written = yaml.safe_load((CONF / group / f"{option}.yaml").read_text()) or {}
        if group in ("backbone", "dataset", "sae", "regularizer", "logger"):
            node = getattr(root, group)
            fields = {k: v for k, v in written.items()
                      if k not in ("defaults",) and not isinstance(v, dict | list)
                      and not (isinstance(v, str) and ("${" in v or v == "???"))}
            if not fields:  # a preset that is the schema's defaults (sae=topk)
                assert node == type(node)(), (group, option)
            for key, value in fields.items():
                assert getattr(node, key) == value, (group, option, key)


@pytest.mark.parametrize("sweep", sorted(p.stem for p in (REPO / "sweeps").glob("*.yaml")))
def test_every_sweep_file_composes(sweep):
    cfg = compose_train([f"+sweep={sweep}"])
    assert cfg.sweep_name == sweep
    assert cfg.hydra.sweeper.params, "a sweep file must define hydra.sweeper.params"


@pytest.mark.parametrize("overrides,field", [
    (["k=9000"], "k: 9000 exceeds sae.n_latents=8192"),
    (["k=0"], "k: 0 is not positive"),
    (["regularizer=l1l2", "regularizer.strength=-1"], "regularizer.strength"),
    (["regularizer.name=l3"], "regularizer.name: unknown regularizer 'l3'"),
    (["regularizer=l1l2", "regularizer.strength=0"], "regularizer.strength: is 0"),
    (["train.lr=0"], "train.lr"),
    (["dataset=digits", "backbone=vit_tiny"], "backbone: dataset 'digits' already holds"),
    (["dataset=imagenet"], "needs a backbone"),
    (["dataset=imagenet", "backbone=vit_tiny", "dataset.layout=coco"], "dataset.layout"),
])
def test_bad_values_name_the_field_and_the_fix(overrides, field):
    with pytest.raises(ConfigError, match="Fix:") as info:
        validate(compose_train(overrides))
    assert field in str(info.value)


def test_unknown_option_and_unknown_key_fail_at_compose_time():
    with pytest.raises(HydraException, match="regularizer"):
        compose_train(["regularizer=l3"])
    with pytest.raises(HydraException, match="lamda"):
        compose_train(["regularizer.lamda=0.1"])


def test_wrong_type_fails_at_compose_time():
    with pytest.raises(Exception, match="k"):
        compose_train(["k=many"])


def files_cfg(tmp_path: Path, **paths):
    overrides = ["dataset=files"] + [f"dataset.{k}={v}" for k, v in paths.items()]
    return validate(compose_train(overrides))


def test_missing_embedding_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_splits(files_cfg(tmp_path, train_path=tmp_path / "nope.npy"))


def test_malformed_embedding_file(tmp_path):
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"not an array")
    with pytest.raises(DataError, match=r"not a \.npy array file"):
        load_splits(files_cfg(tmp_path, train_path=bad))
    flat = tmp_path / "flat.npy"
    np.save(flat, np.ones(10, dtype=np.float32))
    with pytest.raises(DataError, match=r"\(N, d\)"):
        load_splits(files_cfg(tmp_path, train_path=flat))


def test_nan_inputs_are_refused(tmp_path):
    x = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    x[7, 3] = np.nan
    path = tmp_path / "nan.npy"
    np.save(path, x)
    with pytest.raises(DataError, match=r"NaN or inf \(first: \[7\]\)"):
        load_splits(files_cfg(tmp_path, train_path=path))


def test_files_dataset_loads_and_normalises(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.normal(size=(40, 6)).astype(np.float32))
    np.save(tmp_path / "y.npy", rng.integers(0, 3, 40))
    train, held = load_splits(files_cfg(tmp_path, train_path=tmp_path / "x.npy",
                                        train_labels=tmp_path / "y.npy"))
    assert train.n + held.n == 40 and held.n == 8
    np.testing.assert_allclose(train.x.norm(dim=1).numpy(), 1.0, rtol=1e-6)
    assert train.labels.shape == (32,)


def test_safetensors_embedding_file(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"embeddings": torch.randn(30, 4)}, str(tmp_path / "e.safetensors"))
    train, held = load_splits(files_cfg(tmp_path, train_path=tmp_path / "e.safetensors"))
    assert train.dim == 4 and train.labels is None
