"""Latent Directions: SVM directions, pooling, target assignment, and the initial-noise hook."""

import numpy as np
import pytest
import torch

from pipeline.config import parse_params
from pipeline.diffusion import make_noise_scheduler
from pipeline.errors import UserError
from pipeline.methods.latent_directions import (
    LatentDirectionHooks,
    RecordLatents,
    assign_attributes,
    fit_directions,
    latent_direction_hooks,
    pool_latents,
    unpool_directions,
    validate_target,
)
from pipeline.pretrained import DiffusionModel
from pipeline.sampling import SamplerSettings, make_scheduler, sample, sample_seeds
from tests.tiny import tiny_params

SHAPE = (3, 4, 4)


@pytest.fixture(scope="module")
def scheduler():
    return make_scheduler(make_noise_scheduler(1000, "squaredcos_cap_v2", "v_prediction").config)


def _run(unet, scheduler, cond, hooks=None, batch_size=8):
    return sample(DiffusionModel(unet, dict(scheduler.config)), cond, sample_seeds(0, len(cond)),
                  SamplerSettings(num_inference_steps=3, batch_size=batch_size), hooks=hooks, progress=False)


def test_weight_zero_reproduces_the_baseline_bit_for_bit(unet, scheduler):
    cond = np.repeat(np.arange(10), 2)
    d = np.random.default_rng(0).normal(size=(10, 3 * 16 * 16)).astype(np.float32)
    hooks = LatentDirectionHooks(d, assign_attributes(cond, np.full(10, 0.1), 0), weight=0.0)
    assert torch.equal(_run(unet, scheduler, cond, hooks), _run(unet, scheduler, cond))


def test_hook_adds_w_times_the_norm_times_the_assigned_direction_to_z_T(unet, scheduler):
    """w is a fraction of each sample's own ‖z_T‖: z_T ← z_T + w·‖z_T‖·d_a."""
    cond = np.repeat(np.arange(10), 2)
    d = np.eye(10, 3 * 16 * 16, dtype=np.float32)  # value a → unit vector e_a
    assigned = assign_attributes(cond, np.full(10, 0.1), 0)
    rec_plain, rec_shift = RecordLatents([-1]), RecordLatents([-1])
    _run(unet, scheduler, cond, rec_plain)

    class Both(LatentDirectionHooks):
        def initial_noise(self, z, ctx):
            return rec_shift.initial_noise(super().initial_noise(z, ctx), ctx)

    _run(unet, scheduler, cond, Both(d, assigned, weight=0.1))
    z = rec_plain.stacked()[-1]
    delta = rec_shift.stacked()[-1] - z
    np.testing.assert_allclose(delta, 0.1 * np.linalg.norm(z, axis=1, keepdims=True) * d[assigned], atol=1e-5)
    # the same fraction moves a latent of another size by the same share of its norm
    assert np.allclose(np.linalg.norm(delta, axis=1) / np.linalg.norm(z, axis=1), 0.1, atol=1e-6)


def test_assignment_is_the_same_whatever_the_batch_size(unet, scheduler):
    cond = np.repeat(np.arange(10), 3)
    d = np.random.default_rng(1).normal(size=(10, 3 * 16 * 16)).astype(np.float32)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    hooks = LatentDirectionHooks(d, assign_attributes(cond, np.full(10, 0.1), 0), weight=5.0)
    a = _run(unet, scheduler, cond, hooks, batch_size=4)
    b = _run(unet, scheduler, cond, hooks, batch_size=30)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n", [1, 7, 10, 33, 100])
def test_assignment_meets_the_target_for_any_count(n):
    target = np.array([0.5, 0.3, 0.2])
    cond = np.repeat([0, 1], n)
    a = assign_attributes(cond, target, seed=3)
    for y in (0, 1):
        counts = np.bincount(a[cond == y], minlength=3)
        assert counts.sum() == n
        assert np.all(np.abs(counts - n * target) < 1.0)


def test_assignment_is_seeded():
    cond = np.repeat(np.arange(4), 10)
    p = np.full(5, 0.2)
    assert np.array_equal(assign_attributes(cond, p, 1), assign_attributes(cond, p, 1))
    assert not np.array_equal(assign_attributes(cond, p, 1), assign_attributes(cond, p, 2))


def test_svm_directions_are_unit_and_point_along_the_separating_axis():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 600)
    centres = np.zeros((3, 20))
    centres[0, 0], centres[1, 1], centres[2, 2] = 4, 4, 4
    x = centres[labels] + rng.normal(size=(600, 20))
    steps, dirs, acc, missing = fit_directions({5: x, 9: x * 2}, labels, 3, C=1.0, seed=0)
    assert list(steps) == [5, 9] and missing == []
    np.testing.assert_allclose(np.linalg.norm(dirs, axis=-1), 1.0, atol=1e-5)
    assert acc.min() > 0.95
    for a in range(3):
        assert dirs[0, a, a] == dirs[0, a].max() and dirs[0, a, a] > 0.5


def test_binary_attribute_gives_opposite_directions():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    x = rng.normal(size=(200, 5)) + 3 * labels[:, None] * np.eye(5)[0]
    _, dirs, _, _ = fit_directions({0: x}, labels, 2, seed=0)
    np.testing.assert_allclose(dirs[0, 0], -dirs[0, 1], atol=1e-6)


def test_missing_attribute_value_is_an_error_unless_allowed():
    rng = np.random.default_rng(0)
    x, labels = rng.normal(size=(50, 4)), rng.integers(0, 2, 50)
    with pytest.raises(UserError, match=r"\[2\]"):
        fit_directions({0: x}, labels, 3)
    _, dirs, _, missing = fit_directions({0: x}, labels, 3, allow_missing=True)
    assert missing == [2] and not dirs[0, 2].any()


def test_pooling_keeps_channel_means_and_unpooling_is_uniform_and_unit():
    x = np.random.default_rng(0).normal(size=(5, 3 * 4 * 4))
    pooled = pool_latents({0: x}, SHAPE, 1)[0]
    np.testing.assert_allclose(pooled, x.reshape(5, 3, 16).mean(-1))
    d = unpool_directions(np.array([[[1.0, 2.0, 2.0]]]), SHAPE, 1)[0, 0]
    np.testing.assert_allclose(np.linalg.norm(d), 1.0, atol=1e-6)
    np.testing.assert_allclose(d.reshape(3, 16), np.repeat([[1.0], [2.0], [2.0]], 16, axis=1) / 12.0, atol=1e-6)
    assert pool_latents({0: x}, SHAPE, 0)[0] is x
    with pytest.raises(UserError, match="pool"):
        pool_latents({0: x}, SHAPE, 3)


@pytest.mark.parametrize("target", [[0.5, 0.4], [0.6, 0.4, 0.0], [0.7, 0.7, -0.4]])
def test_bad_target_distribution_is_a_one_line_error(target):
    with pytest.raises(UserError) as err:
        validate_target(target, len(target) if len(target) == 3 else 3)
    assert "\n" not in str(err.value)


def test_params_check_source_step_and_target():
    raw = tiny_params()
    raw["latentdir"]["source_step"] = 7
    with pytest.raises(UserError, match=r"latentdir.*source_step"):
        parse_params(raw)
    raw = tiny_params()
    raw["latentdir"]["target"] = [0.5] * 10
    with pytest.raises(UserError, match="sum to 1"):
        parse_params(raw)


def test_hooks_from_file_refuse_an_unrecorded_step(tmp_path):
    path = tmp_path / "directions.npz"
    np.savez(path, steps=np.array([0, 5]), directions=np.zeros((2, 10, 12), np.float32))
    with pytest.raises(UserError, match="source_step"):
        latent_direction_hooks(path, np.zeros(4, int), step=3, weight=1.0, target=None, seed=0)
    hooks = latent_direction_hooks(path, np.zeros(4, int), step=5, weight=1.0, target=None, seed=0)
    assert hooks.directions.shape == (10, 12)


def test_renormalised_shift_keeps_the_noise_norm_and_moves_along_d():
    z = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    d = np.zeros((2, 48), np.float32)
    d[:, 0] = 1.0
    from pipeline.sampling import StepContext

    ctx = StepContext(-1, 3, 999, torch.zeros(4, dtype=torch.long), 10, torch.arange(4))
    out = LatentDirectionHooks(d, np.array([0, 1, 0, 1]), weight=5.0, renormalise=True).initial_noise(z, ctx)
    torch.testing.assert_close(out.flatten(1).norm(dim=1), z.flatten(1).norm(dim=1))
    assert (out.flatten(1)[:, 0] / out.flatten(1).norm(dim=1) > z.flatten(1)[:, 0] / z.flatten(1).norm(dim=1)).all()


def test_directions_fitted_on_inverted_latents_separate_the_attribute():
    """fit_on: balanced — the SVM reads x_t along DDIM inversion; here the attribute is a shift of one channel of
    the image, which inversion (affine in the image under a constant-ε model) carries into every x_t and z_T
    (scaled by √ᾱ_t), so the direction fitted at each recorded step is that channel's mean, at held-out accuracy 1."""
    from pipeline.sampling import invert
    from tests.test_sampling import ConstantEps

    rng = np.random.default_rng(0)
    attr = np.repeat([0, 1], 40)
    images = torch.as_tensor(rng.normal(0, 0.2, (80, 3, 16, 16)), dtype=torch.float32)
    images[:, 0] += torch.as_tensor(np.where(attr == 1, 0.5, -0.5), dtype=torch.float32)[:, None, None]
    cond = np.zeros(80, int)
    sched = make_scheduler(make_noise_scheduler(1000, "linear", "epsilon").config)
    _, kept = invert(DiffusionModel(ConstantEps(), dict(sched.config)), images, cond,
                     SamplerSettings(num_inference_steps=5), progress=False, keep_steps=(-1, 4))
    latents = pool_latents({s: v.numpy() for s, v in kept.items()}, (3, 16, 16), 1)
    steps, dirs, acc, _ = fit_directions(latents, attr, 2, C=1e4, holdout=0.25, seed=0)
    assert list(steps) == [-1, 4] and (acc == 1.0).all(), acc
    assert (dirs[:, 1, 0] > 0.9).all() and (dirs[:, 0, 0] < -0.9).all(), dirs
