"""The Top-k SAE: selection, sparse decoding, the unit-norm decoder, LayerNorm, save/load."""

import pytest
import torch

from sae.model import TopKSAE, load_model, save_model


def dense_reference(model: TopKSAE, x: torch.Tensor, k: int) -> torch.Tensor:
    """METHOD.md s2 written densely: a = ReLU(pre) on the Top-k support, x_hat = W_dec a + b."""
    x_in, stats = model.standardize(x)
    pre = (x_in - model.b_pre) @ model.W_enc.T + model.b_enc
    support = pre.topk(k, dim=1).indices
    codes = torch.zeros_like(pre).scatter(1, support, pre.gather(1, support)).clamp_min(0)
    x_hat = codes @ model.W_dec + model.b_pre
    return x_hat if stats is None else x_hat * stats.std + stats.mean


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("layernorm", [False, True])
@pytest.mark.parametrize("k", [1, 5, 64])
def test_forward_matches_dense_reference(tied, layernorm, k):
    torch.manual_seed(0)
    model = TopKSAE(16, 64, 5, tied=tied, layernorm=layernorm).double()
    with torch.no_grad():
        model.b_enc.normal_()
        model.b_pre.normal_()
    x = torch.randn(7, 16, dtype=torch.float64)
    torch.testing.assert_close(model.reconstruct(x, k=k), dense_reference(model, x, k))


def test_inference_k_changes_the_number_of_active_latents():
    torch.manual_seed(0)
    model = TopKSAE(8, 32, 4)
    x = torch.randn(5, 8)
    assert model.encode(x).indices.shape == (5, 4)
    assert model.encode(x, k=12).indices.shape == (5, 12)
    assert model.encode(x, k=100).indices.shape == (5, 32)  # capped at n


def test_layernorm_is_undone_on_the_output():
    """Per-sample standardisation makes the SAE equivariant to x -> a x + b (a > 0)."""
    torch.manual_seed(0)
    model = TopKSAE(16, 64, 6, layernorm=True).double()
    x = torch.randn(4, 16, dtype=torch.float64)
    torch.testing.assert_close(model.reconstruct(3.0 * x + 0.5), 3.0 * model.reconstruct(x) + 0.5)


def test_decoder_projection_and_renormalisation_keep_unit_atoms():
    torch.manual_seed(0)
    model = TopKSAE(16, 64, 4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        x = torch.randn(32, 16)
        loss = (model(x).x_hat - x).square().mean()
        opt.zero_grad()
        loss.backward()
        model.project_decoder_grad_()
        parallel = (model.W_dec.grad * model.W_dec).sum(1)
        assert parallel.abs().max() < 1e-6  # no gradient along the atoms
        opt.step()
        model.normalize_decoder_()
    torch.testing.assert_close(model.W_dec.norm(dim=1), torch.ones(64))


@pytest.mark.parametrize("layernorm", [False, True])
def test_saved_and_reloaded_sae_reconstructs_bit_identically(tmp_path, layernorm):
    torch.manual_seed(0)
    model = TopKSAE(16, 64, 4, layernorm=layernorm)
    with torch.no_grad():
        model.b_pre.normal_()
        model.b_enc.normal_()
    save_model(model, tmp_path / "model.safetensors", {"k": 4})
    loaded = load_model(tmp_path / "model.safetensors")
    assert loaded.spec() == model.spec()
    x = torch.randn(9, 16)
    assert torch.equal(loaded.reconstruct(x), model.reconstruct(x))
    assert (tmp_path / "model.json").exists()


def test_checkpoint_of_another_schema_version_is_refused(tmp_path):
    import json

    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "old.safetensors"),
              metadata={"sidecar": json.dumps({"schema_version": 0})})
    with pytest.raises(ValueError, match="schema version"):
        load_model(tmp_path / "old.safetensors")


def test_k_must_fit_the_dictionary():
    with pytest.raises(ValueError, match="k=65"):
        TopKSAE(8, 64, 65)
