"""``sae.load``: a trained SAE in a notebook takes raw embeddings (issue 22, item 1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sae
from sae.model import load_model
from tests.helpers import run_cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run on a user's embeddings whose rows have norms around 100 (dataset.normalize=true:
    the SAE trains on unit rows)."""
    root = tmp_path_factory.mktemp("pretrained")
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(1200, 16)) * 25).astype(np.float32)
    np.save(root / "train.npy", x[:1000])
    np.save(root / "eval.npy", x[1000:])
    result = run_cli(["-m", "sae.train", "dataset=files", f"dataset.train_path={root}/train.npy",
                      f"dataset.eval_path={root}/eval.npy", "sae=tiny", "sae.n_latents=64",
                      "k=4", "logger=none", "train.max_steps=30", "train.batch_size=200",
                      "train.progress=false", "train.device=cpu"],
                     env_extra={"SAE_OUTPUT_ROOT": str(root)})
    assert result.returncode == 0, result.stderr[-3000:]
    run = next((root / "runs").iterdir())
    return root, run, torch.from_numpy(x[1000:])


def test_load_applies_the_trainings_normalisation(trained):
    """Raw rows give the codes the evaluation computed (on unit rows); the reconstruction is
    back at each row's own norm."""
    root, run, raw = trained
    model = sae.load(run)
    as_trained = load_model(run / "model.safetensors")
    expected = as_trained.encode(F.normalize(raw, dim=1))
    got = model.encode(raw)
    assert raw.norm(dim=1).mean() > 50  # the failure mode: raw rows far from unit norm
    order_e, order_g = expected.indices.sort(dim=1), got.indices.sort(dim=1)
    assert torch.equal(order_g.values, order_e.values)
    torch.testing.assert_close(got.values.gather(1, order_g.indices),
                               expected.values.gather(1, order_e.indices))
    x_hat = model(raw).x_hat
    unit_hat = as_trained(F.normalize(raw, dim=1)).x_hat
    torch.testing.assert_close(x_hat, unit_hat * raw.norm(dim=1, keepdim=True))
    # The plain model on raw rows gets other codes: the test would fail without the fix.
    plain = as_trained.encode(raw)
    assert not torch.equal(plain.indices.sort(dim=1).values, order_e.values)


def test_load_takes_a_run_directory_a_file_a_checkpoint_or_a_run_id(trained):
    root, run, raw = trained
    reference = sae.load(run).encode(raw)
    for given in (run / "model.safetensors", run / "checkpoints" / "last.safetensors"):
        torch.testing.assert_close(sae.load(given).encode(raw).values, reference.values)
    by_id = sae.load(run.name, root=root)
    by_prefix = sae.load(run.name[:12], root=root)
    assert by_id.run_id == by_prefix.run_id == run.name
    assert by_id.config["k"] == 4 and by_id.normalize_inputs
    assert 0 < by_id.metrics["r2_variance_weighted"] <= 1


def test_load_errors_name_what_was_given_and_what_is_expected(trained, tmp_path):
    root, _, _ = trained
    with pytest.raises(FileNotFoundError, match="no run id starting with it.*expected a run"):
        sae.load("no-such-run", root=root)
    with pytest.raises(FileNotFoundError, match="directory without model.safetensors"):
        sae.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        sae.load(tmp_path / "missing.safetensors")
