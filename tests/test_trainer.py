"""Training: exact resume, planted-atom recovery, dead-latent bookkeeping, divergence."""

import torch
import torch.nn.functional as F

from sae import regularizers
from sae.data.synthetic import load_synthetic
from sae.model import TopKSAE
from sae.tracking import NullTracker
from sae.training import fast
from sae.training.loop import train_alone
from sae.training.losses import training_loss
from sae.training.trainer import DivergedError, Schedule, Trainer, loss_function
from tests.helpers import synthetic_cfg


def train(cfg, x, ckpt, seed=0):
    torch.manual_seed(seed)
    model = TopKSAE(x.shape[1], cfg.sae.n_latents, cfg.k)
    trainer = Trainer(cfg, model, x, ckpt, NullTracker(), {})
    state = train_alone(trainer)
    return model, state, trainer


def test_resume_equals_uninterrupted_training(tmp_path):
    """2N steps == N steps, stop, resume, N steps: same weights, bit for bit."""
    base = dict(reg="l1l2", strength=0.05, n_train=2000, batch=256, n_latents=128, k=4)
    x = load_synthetic(synthetic_cfg(**base).dataset)[0].x
    # 12 steps cross an epoch boundary (8 steps per epoch), so the batch order is exercised.
    straight, _, _ = train(synthetic_cfg(max_steps=12, **base), x, tmp_path / "a.safetensors")
    train(synthetic_cfg(max_steps=6, **base), x, tmp_path / "b.safetensors")
    resumed, state, trainer = train(synthetic_cfg(max_steps=12, **base), x,
                                    tmp_path / "b.safetensors")
    assert trainer.resumed_from == 6 and state.step == 12
    for name, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


def test_baseline_recovers_planted_atoms(tmp_path):
    """A 256-latent Top-4 SAE on 8,000 samples of a 128-atom planted dictionary (3 atoms per
    sample, d = 32): at least 90 % of the atoms get a decoder atom with cosine >= 0.9 (a random
    dictionary of the same size matches none)."""
    cfg = synthetic_cfg(epochs=10, lr=1e-3)
    train_set, _ = load_synthetic(cfg.dataset)
    model, state, _ = train(cfg, train_set.x, tmp_path / "c.safetensors")
    atoms = train_set.planted_atoms

    def recovered(decoder):
        return ((F.normalize(decoder, dim=1) @ atoms.T).max(0).values >= 0.9).float().mean()

    assert recovered(model.W_dec.detach()) >= 0.9
    assert recovered(torch.randn_like(model.W_dec)) < 0.05
    assert state.history[-1]["nmse"] < 0.2


def test_dead_latents_are_counted_by_sample_window(tmp_path):
    cfg = synthetic_cfg(max_steps=30, n_train=2000, n_latents=1024, k=2)
    _, state, trainer = train(cfg, load_synthetic(cfg.dataset)[0].x, tmp_path / "d.safetensors")
    assert trainer.schedule.dead_window == 2 * 2000  # capped at dead_window_max_epochs epochs
    assert state.samples_since_fired.max() <= 30 * 256
    assert state.history[-1]["dead"] > 0  # 1024 latents, k=2: many never fire in 30 steps


def test_schedule_clamps_batch_and_counts_steps():
    cfg = synthetic_cfg(batch=4096, epochs=2.5)
    schedule = Schedule.from_config(cfg, 1000)
    assert schedule.batch_size == 1000 and schedule.steps_per_epoch == 1
    assert schedule.total_steps == 3


def test_diverging_run_raises_with_the_fix(tmp_path):
    cfg = synthetic_cfg(max_steps=20, lr=1e30, log_every=5, n_train=2000)
    x = load_synthetic(cfg.dataset)[0].x
    try:
        train(cfg, x, tmp_path / "e.safetensors")
    except DivergedError as exc:
        assert "train.lr" in str(exc)
    else:
        raise AssertionError("a learning rate of 1e30 should diverge")


def test_bf16_autocast_trains_close_to_float32_with_float32_weights(tmp_path):
    base = dict(reg="l1l2", strength=0.05, n_train=2000, batch=256, n_latents=128, k=4,
                max_steps=10)
    x = load_synthetic(synthetic_cfg(**base).dataset)[0].x
    fp32, _, _ = train(synthetic_cfg(**base), x, tmp_path / "a.safetensors")
    bf16, _, _ = train(synthetic_cfg(autocast_bf16=True, **base), x, tmp_path / "b.safetensors")
    for name, value in bf16.state_dict().items():
        assert value.dtype == torch.float32, name  # master weights stay float32
    drift = (bf16.W_dec - fp32.W_dec).detach().abs().max() / fp32.W_dec.detach().abs().max()
    assert 0 < float(drift) < 0.05  # the products ran in bf16, and training still agrees
    reference, _, _ = train(synthetic_cfg(autocast_bf16=True, fast_path=False, **base), x,
                            tmp_path / "c.safetensors")  # the reference step under autocast too
    drift = (reference.W_dec - bf16.W_dec).detach().abs().max() / bf16.W_dec.detach().abs().max()
    assert float(drift) < 0.05


def test_compile_option_is_an_argument_of_the_fast_step():
    """train.compile reaches the fast step as its ``compiled`` argument, nothing process-wide;
    the plan then holds torch.compile'd kernels (compiled lazily, at their first call)."""
    compiled, eager = loss_function(synthetic_cfg(compile=True)), loss_function(synthetic_cfg())
    assert compiled.func is fast.fast_training_loss and compiled.keywords == {"compiled": True}
    assert eager.keywords == {"compiled": False}
    model, x = TopKSAE(8, 32, 2), torch.randn(4, 8)
    kwargs = dict(regularizer="l1l2", strength=0.1, mask=True, eps=1e-8,
                  dead=torch.zeros(32, dtype=torch.bool), aux_alpha=0.0, aux_k=4, dead_bound=0)
    reference = regularizers.get("l1l2").kernels
    assert fast.make_plan(model, x, compiled=False, **kwargs).kernels is reference
    compiled_kernels = fast.make_plan(model, x, compiled=True, **kwargs).kernels
    assert compiled_kernels is not reference and compiled_kernels.forward is not reference.forward
    assert loss_function(synthetic_cfg(fast_path=False)) is training_loss


def test_dead_bound_covers_the_dead_count_until_the_next_log(tmp_path):
    """Where the bound is passed (accelerators; forced here), every step's dead count stays
    under it, and it is read once per log interval."""
    cfg = synthetic_cfg(max_steps=40, n_train=2000, n_latents=1024, k=2, log_every=7)
    x = load_synthetic(cfg.dataset)[0].x
    model = TopKSAE(x.shape[1], cfg.sae.n_latents, cfg.k)
    trainer = Trainer(cfg, model, x, tmp_path / "e.safetensors", NullTracker(), {})
    assert not trainer.pass_dead_bound  # the CPU reads the count itself
    trainer.pass_dead_bound = True
    seen = []

    def checked_loss(model, x, *, dead, dead_bound, **kwargs):
        seen.append((int(dead.sum()), dead_bound))
        return fast.fast_training_loss(model, x, dead=dead, dead_bound=dead_bound, **kwargs)

    trainer.loss_fn = checked_loss
    train_alone(trainer)
    assert len(seen) == 40
    assert all(count <= bound for count, bound in seen)
    assert max(count for count, _ in seen) > 0  # latents did die: the bound was tested
    bounds = [bound for _, bound in seen]
    assert all(len(set(bounds[i:i + 7])) == 1 for i in range(0, 40, 7))  # one per interval


def test_checkpoints_by_steps_and_by_training_time(tmp_path, monkeypatch):
    """By steps when asked; by time at log steps (a time limit of ~0 s: every log step); and
    always at the end."""
    base = dict(n_train=2000, batch=256, n_latents=64, k=4, max_steps=12, log_every=5)
    x = load_synthetic(synthetic_cfg(**base).dataset)[0].x
    saved_at = []
    monkeypatch.setattr("sae.training.loop.save_checkpoint",
                        lambda path, model, opt, state, config: saved_at.append(state.step))
    for every, every_s, expected in ((0, 0.0, [12]), (4, 0.0, [4, 8, 12]),
                                     (0, 1e-9, [5, 10, 12]), (0, 3600.0, [12])):
        saved_at.clear()
        cfg = synthetic_cfg(checkpoint_every=every, checkpoint_every_s=every_s, **base)
        train(cfg, x, tmp_path / f"{every}-{every_s}.safetensors")
        assert saved_at == expected, (every, every_s)
