"""Distribution Guidance: the h recorder, the ADP (training, save/load), the guidance loss and the mid-block hook."""

import numpy as np
import pytest
import torch

from pipeline.config import parse_params
from pipeline.diffusion import make_noise_scheduler
from pipeline.errors import UserError
from pipeline.methods.distribution_guidance import (
    ADP,
    DistributionGuidanceHooks,
    RecordH,
    distribution_guidance_hooks,
    guidance_loss,
    load_adp,
    pool_h,
    save_adp,
    train_adp,
    validate_target,
)
from pipeline.pretrained import DiffusionModel
from pipeline.sampling import SamplerSettings, StepContext, make_scheduler, sample, sample_seeds
from tests.tiny import tiny_params

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 3
K = 10


@pytest.fixture(scope="module")
def scheduler():
    return make_scheduler(make_noise_scheduler(1000, "squaredcos_cap_v2", "v_prediction").config)


def _run(unet, scheduler, cond, hooks=None, batch_size=20, **kw):
    settings = SamplerSettings(num_inference_steps=STEPS, batch_size=batch_size, **kw)
    return sample(DiffusionModel(unet, dict(scheduler.config)), cond, sample_seeds(0, len(cond)), settings,
                  hooks=hooks, progress=False)


@pytest.fixture(scope="module")
def recorded(unet, scheduler):
    """(h [S, N, D], timesteps, h's shape [C, H, W]) of the tiny U-Net over a 20-sample run."""
    rec = RecordH()
    _run(unet, scheduler, np.repeat(np.arange(10), 2), rec)
    return rec.stacked(), [rec.timesteps[s] for s in sorted(rec.timesteps)], rec.shape


def random_adp(recorded, kind="linear", seed=0, scale=1.0) -> ADP:
    h, timesteps, shape = recorded
    torch.manual_seed(seed)
    adp = ADP(kind, shape, K, h.shape[0], 10, timesteps=timesteps)
    with torch.no_grad():
        for p in adp.parameters():
            p.normal_(0, scale / np.sqrt(p.shape[-1]))
        adp.mean.copy_(torch.as_tensor(h.mean(1)))
        adp.std.copy_(torch.as_tensor(h.std(1)).clamp_min(1e-4))
    return adp.eval()


def ctx_for(step, n, labels=None, num_steps=STEPS, timesteps=None, ids=None):
    labels = torch.zeros(n, dtype=torch.long) if labels is None else labels
    t = 0 if timesteps is None else timesteps[step]
    return StepContext(step, num_steps, t, labels, 10, torch.arange(n) if ids is None else ids)


# ------------------------------------------------------------------------------------------------ recorder

def test_recorder_sees_every_step_and_the_conditional_half_only(unet, scheduler, recorded):
    h, timesteps, _ = recorded
    assert h.shape[:2] == (STEPS, 20) and len(timesteps) == STEPS and timesteps[0] > timesteps[-1]
    rec = RecordH()
    _run(unet, scheduler, np.repeat(np.arange(10), 2), rec, guidance_scale=2.0)
    assert rec.stacked().shape == h.shape  # the null-class half is not recorded


def test_recorder_reads_the_configured_module_pooled(unet, scheduler):
    rec = RecordH("up_blocks.0", pool=2)
    _run(unet, scheduler, np.arange(10), rec)
    c = rec.shape[0]
    assert len(rec.shape) == 3 and rec.stacked().shape == (STEPS, 10, c * 2 * 2)
    with pytest.raises(UserError, match="up_blocks.9"):
        _run(unet, scheduler, np.arange(10), RecordH("up_blocks.9"))


def test_pooled_adp_on_full_h_equals_the_adp_on_recorded_features(unet, scheduler):
    rec = RecordH("up_blocks.1", pool=1)
    full = RecordH("up_blocks.1")
    cond = np.repeat(np.arange(10), 2)
    _run(unet, scheduler, cond, rec)
    _run(unet, scheduler, cond, full)
    labels = np.arange(20) % K
    adp, _ = train_adp(rec.stacked(), labels, cond, kind="linear", shape=rec.shape, num_attr=K, num_classes=10,
                       timesteps=[0, 1, 2], module="up_blocks.1", pool=1, epochs=2, holdout=0, progress=False)
    y = torch.as_tensor(cond)
    with torch.no_grad():
        torch.testing.assert_close(adp(torch.as_tensor(full.stacked()[1]), 1, y),
                                   adp(torch.as_tensor(rec.stacked()[1]), 1, y, pooled=True))
    assert DistributionGuidanceHooks(adp, None, scale=1.0).h_module == "up_blocks.1"


# ------------------------------------------------------------------------------------------------ the hook

def test_hook_changes_h_only_inside_the_step_range(recorded):
    h_all, timesteps, shape = recorded
    adp = random_adp(recorded)
    hooks = DistributionGuidanceHooks(adp, None, scale=5.0, steps=(1, 2), group_size=20)
    for step in range(STEPS):
        h = torch.as_tensor(h_all[step]).view(20, *shape)
        out = hooks.mid_block(h, ctx_for(step, 20, timesteps=timesteps))
        if step == 1:
            assert not torch.equal(out, h)
        else:
            assert out is h


def test_scale_zero_reproduces_the_baseline_bit_for_bit(unet, scheduler, recorded):
    cond = np.repeat(np.arange(10), 2)
    hooks = DistributionGuidanceHooks(random_adp(recorded), None, scale=0.0, steps=(0, STEPS), group_size=20)
    assert torch.equal(_run(unet, scheduler, cond, hooks), _run(unet, scheduler, cond))
    assert torch.equal(_run(unet, scheduler, cond, hooks, batch_size=3), _run(unet, scheduler, cond))


def test_guided_samples_change_and_do_not_depend_on_the_batch_size(unet, scheduler, recorded):
    """Batches are rounded to whole guidance blocks, so sample i is the same for any sampler batch size."""
    cond = np.repeat(np.arange(10), 4)
    hooks = DistributionGuidanceHooks(random_adp(recorded, scale=3.0), None, scale=50.0, steps=(0, STEPS),
                                      group_size=10)
    base = _run(unet, scheduler, cond)
    a = _run(unet, scheduler, cond, hooks, batch_size=10)
    b = _run(unet, scheduler, cond, hooks, batch_size=27)  # rounded down to 20
    c = _run(unet, scheduler, cond, hooks, batch_size=3)  # rounded up to 10
    assert (a - base).abs().max() > 1e-3
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=0)


def test_gradient_is_zero_when_p_hat_equals_the_target_and_a_step_lowers_L():
    torch.manual_seed(0)
    logits = torch.randn(12, 4, requires_grad=True)
    groups = torch.tensor([0] * 6 + [1] * 6)
    probs = torch.softmax(logits, 1)
    p_hat = probs[:6].mean(0).detach()
    # group 1 uses the same rows as group 0 → both groups' p̂ equal the target
    both = torch.cat([probs[:6], probs[:6]])
    (g,) = torch.autograd.grad(guidance_loss(both, groups, p_hat), logits)
    assert torch.count_nonzero(g) == 0
    target = torch.full((4,), 0.25)
    loss = guidance_loss(torch.softmax(logits, 1), groups, target)
    (g,) = torch.autograd.grad(loss, logits)
    assert g.abs().max() > 0
    with torch.no_grad():
        assert guidance_loss(torch.softmax(logits - 0.5 * g, 1), groups, target) < loss


def test_guidance_loss_is_the_chi_square_formula_per_group_times_its_size():
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    groups = torch.tensor([7, 7, 3, 3, 3])
    target = torch.tensor([0.25, 0.75])
    # group 7 (2 rows): p̂ = (.5, .5) → .0625/.25 + .0625/.75; group 3 (3 rows): p̂ = (1, 0) → .5625/.25 + .5625/.75
    expected = 2 * (0.0625 / 0.25 + 0.0625 / 0.75) + 3 * (0.5625 / 0.25 + 0.5625 / 0.75)
    assert guidance_loss(probs, groups, target).item() == pytest.approx(expected)


def test_a_rows_gradient_does_not_depend_on_its_groups_size():
    """∂L/∂logits_i = 2·Σ_k (p̂_k − p*_k)/p*_k·∂p_ik/∂logits_i: a group of 3 copies of a row and a group of 30
    copies give each row the same gradient (the unscaled χ² gives the large group's rows a tenth of it)."""
    torch.manual_seed(0)
    row = torch.randn(1, 4)
    target = torch.tensor([0.1, 0.2, 0.3, 0.4])
    grads = []
    for n in (3, 30):
        logits = row.repeat(n, 1).requires_grad_(True)
        (g,) = torch.autograd.grad(guidance_loss(torch.softmax(logits, 1), torch.zeros(n, dtype=torch.long),
                                                 target), logits)
        grads.append(g[0])
    torch.testing.assert_close(grads[0], grads[1])
    p = torch.softmax(row[0], 0)
    jac = torch.diag(p) - p[:, None] * p[None, :]  # ∂p_k/∂logit_j
    torch.testing.assert_close(grads[0], jac.T @ (2 * (p - target) / target))


def test_hook_moves_each_class_towards_the_target_and_leaves_the_null_half(recorded):
    h_all, timesteps, shape = recorded
    adp = random_adp(recorded, scale=3.0)
    target = np.array([0.4, 0.3] + [0.3 / 8] * 8)
    hooks = DistributionGuidanceHooks(adp, target, scale=20.0, steps=(0, STEPS), group_size=20)
    labels = torch.repeat_interleave(torch.arange(10), 2)
    h = torch.as_tensor(h_all[0]).view(20, *shape)
    both = torch.cat([h, h])  # with classifier-free guidance: [conditional; null]
    ctx = ctx_for(0, 20, labels=torch.cat([labels, torch.full_like(labels, 10)]), timesteps=timesteps)
    out = hooks.mid_block(both, ctx)
    assert torch.equal(out[20:], h)

    def loss(x):
        probs = torch.softmax(adp(x.flatten(1), 0, labels), 1)
        return guidance_loss(probs, labels, torch.as_tensor(target, dtype=torch.float32)).item()

    with torch.no_grad():
        assert loss(out[:20]) < loss(h)


def test_hook_refuses_an_adp_fitted_on_other_timesteps(recorded):
    h_all, _, shape = recorded
    hooks = DistributionGuidanceHooks(random_adp(recorded), None, scale=1.0, steps=(0, STEPS), group_size=20)
    h = torch.as_tensor(h_all[0]).view(20, *shape)
    with pytest.raises(UserError, match="re-run fit_adp"):
        hooks.mid_block(h, ctx_for(0, 20, num_steps=5, timesteps=[1, 2, 3, 4, 5]))


# ------------------------------------------------------------------------------------------------ the ADP

def _synthetic(num_steps=3, n=600, dim=20, seed=0, aligned=0.8):
    """Classes y, attribute a = y with probability `aligned`, else uniform; h = a's centre + noise (per step a
    different scale, so one model must read the step)."""
    rng = np.random.default_rng(seed)
    cond = rng.integers(0, 4, n)
    attr = np.where(rng.random(n) < aligned, cond, rng.integers(0, 4, n))
    centres = rng.normal(size=(4, dim)) * 3
    h = np.stack([(s + 1) * centres[attr] + rng.normal(size=(n, dim)) for s in range(num_steps)]).astype(np.float32)
    return h, attr, cond


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_adp_learns_separable_synthetic_data(kind):
    h, attr, cond = _synthetic()
    _, acc = train_adp(h, attr, cond, kind=kind, shape=(20, 1, 1), num_attr=4, num_classes=4,
                           timesteps=[900, 500, 100],
                           hidden=32, epochs=40, lr=0.01, seed=0, progress=False)
    assert acc["accuracy"].shape == (3,)
    assert acc["accuracy"].min() > 0.95
    assert acc["minority_accuracy"].min() > 0.9  # the attribute is read from h, not guessed from the class


def test_adp_training_is_seeded():
    h, attr, cond = _synthetic(n=200)
    kw = dict(kind="linear", shape=(20, 1, 1), num_attr=4, num_classes=4, timesteps=[3, 2, 1], epochs=3, seed=5,
              progress=False)
    a, _ = train_adp(h, attr, cond, **kw)
    b, _ = train_adp(h, attr, cond, **kw)
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(v, w), k


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_adp_save_load_round_trip(tmp_path, kind):
    h, attr, cond = _synthetic(n=100)
    model, _ = train_adp(h, attr, cond, kind=kind, shape=(20, 1, 1), num_attr=4, num_classes=4, timesteps=[3, 2, 1],
                         epochs=2,
                         seed=0, progress=False)
    save_adp(model, tmp_path / "adp.safetensors")
    loaded = load_adp(tmp_path / "adp.safetensors")
    assert loaded.config == model.config
    x, y = torch.as_tensor(h[1]), torch.as_tensor(cond)
    with torch.no_grad():
        assert torch.equal(loaded(x, 1, y), model(x, 1, y))
    data = (tmp_path / "adp.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cut.safetensors"):
        load_adp(tmp_path / "cut.safetensors")
    with pytest.raises(UserError, match="fit_adp"):
        load_adp(tmp_path / "missing.safetensors")


def test_hooks_from_file_check_the_step_range(tmp_path, recorded):
    save_adp(random_adp(recorded), tmp_path / "adp.safetensors")
    with pytest.raises(UserError, match="distguide.steps"):
        distribution_guidance_hooks(tmp_path / "adp.safetensors", scale=1, tau=1, steps=(0, 9), group_size=10,
                                    target=None)
    hooks = distribution_guidance_hooks(tmp_path / "adp.safetensors", scale=1, tau=1, steps=(0, 2), group_size=10,
                                        target=None)
    assert hooks.batch_multiple == 10 and hooks.end == 2


# ------------------------------------------------------------------------------------------------ the target

@pytest.mark.parametrize("target,needle", [([0.5] * 10, "sum to 1"), ([0.0, 0.5, 0.5] + [0.0] * 7, "> 0"),
                                           ([1.2, -0.2] + [0.0] * 8, "> 0")])
def test_bad_target_in_params_is_a_one_line_error_naming_the_key(target, needle):
    raw = tiny_params()
    raw["distguide"]["target"] = target
    with pytest.raises(UserError) as err:
        parse_params(raw)
    msg = str(err.value)
    assert "\n" not in msg and "distguide.target" in msg and needle in msg


def test_target_of_the_wrong_length_is_refused_at_sampling():
    with pytest.raises(UserError, match="distguide.target"):
        validate_target([0.5, 0.5], 10)
    np.testing.assert_allclose(validate_target(None, 4), 0.25)


def test_bad_step_range_names_the_key():
    raw = tiny_params()
    raw["distguide"]["steps"] = [5, 5]
    with pytest.raises(UserError, match="distguide.steps"):
        parse_params(raw)


def test_activity_pooling_is_the_norm_weighted_mean_and_its_gradient_follows_the_weights():
    h = torch.randn(3, 4, 4, 4, dtype=torch.float64)
    m = h.norm(dim=1)  # [N, H, W]
    f = pool_h(h, 1, "activity")
    ref = (h * m[:, None]).sum(dim=(2, 3)) / m.sum(dim=(1, 2))[:, None]
    assert torch.allclose(f, ref)
    # 2×2 cells: each cell's own weighted mean
    cell = h[:, :, :2, 2:]
    mc = cell.norm(dim=1)
    ref01 = (cell * mc[:, None]).sum(dim=(2, 3)) / mc.sum(dim=(1, 2))[:, None]
    assert torch.allclose(pool_h(h, 2, "activity").view(3, 4, 2, 2)[:, :, 0, 1], ref01)
    # the weights are held constant: ∂f_c/∂h_cxy = m_xy / Σ m
    x = h.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(pool_h(x, 1, "activity")[:, 0].sum(), x)
    assert torch.allclose(g[:, 0], m / m.sum(dim=(1, 2), keepdim=True))
    assert torch.count_nonzero(g[:, 1:]) == 0
    assert torch.allclose(pool_h(h, 1, "uniform"), h.mean(dim=(2, 3)))
    with pytest.raises(UserError, match="pool_weights"):
        pool_h(h, 1, "median")


def test_step_size_follows_the_published_beta_schedule(recorded, scheduler):
    """h ← h − s·β_t^p·∇_h L (published: p = 0.05): at each step the edit equals the constant-step edit with
    s·β_t^p; p = 0 is the constant step; an ADP file without β_t is refused when p > 0."""
    h_all, timesteps, shape = recorded
    adp = random_adp(recorded, scale=3.0)
    betas = scheduler.betas[timesteps].tolist()
    adp.config["betas"] = betas
    scheduled = DistributionGuidanceHooks(adp, None, scale=40.0, steps=(0, STEPS), group_size=20, beta_power=0.05)
    for step in range(STEPS):
        h = torch.as_tensor(h_all[step]).view(20, *shape)
        ctx = ctx_for(step, 20, timesteps=timesteps)
        constant = DistributionGuidanceHooks(adp, None, scale=40.0 * betas[step] ** 0.05, steps=(0, STEPS),
                                             group_size=20)
        torch.testing.assert_close(scheduled.mid_block(h, ctx), constant.mid_block(h, ctx), atol=1e-6, rtol=1e-5)
    assert betas[0] > betas[-1]  # the noisiest step gets the largest step size
    flat = DistributionGuidanceHooks(adp, None, scale=40.0, steps=(0, STEPS), group_size=20, beta_power=0.0)
    assert flat.step_size == [40.0] * STEPS
    adp.config["betas"] = []
    with pytest.raises(UserError, match="beta_power"):
        DistributionGuidanceHooks(adp, None, scale=1.0, beta_power=0.05)


def test_adp_fitted_on_inverted_h_round_trips_its_betas(unet, scheduler, tmp_path):
    """fit_on: balanced — h recorded along DDIM inversion (every step, in sampling order, with the sampler's
    timesteps) trains an ADP whose file keeps β_t per step for the step-size schedule."""
    from pipeline.sampling import invert

    cond = np.repeat(np.arange(10), 2)
    images = _run(unet, scheduler, cond)
    rec = RecordH()
    invert(DiffusionModel(unet, dict(scheduler.config)), images, cond, SamplerSettings(num_inference_steps=STEPS),
           hooks=rec, progress=False)
    timesteps = [rec.timesteps[s] for s in sorted(rec.timesteps)]
    scheduler.set_timesteps(STEPS)
    assert timesteps == [int(t) for t in scheduler.timesteps]
    h = rec.stacked()
    assert h.shape[:2] == (STEPS, 20)
    betas = scheduler.betas[timesteps].tolist()
    adp, _ = train_adp(h, cond % 3, cond, kind="linear", shape=rec.shape, num_attr=3, num_classes=10,
                       timesteps=timesteps, betas=betas, epochs=2, progress=False)
    save_adp(adp, tmp_path / "adp.safetensors")
    assert load_adp(tmp_path / "adp.safetensors").config["betas"] == pytest.approx(betas)


# ------------------------------------------------------------------------------------------------ x-space (ours)

@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_shift_noise_moves_eps_by_delta_in_every_parameterisation(kind):
    from pipeline.sampling import _x0_eps, shift_noise

    torch.manual_seed(0)
    f, x, delta = torch.randn(3, 4, 4, 4, dtype=torch.float64).unbind(0)
    a = torch.tensor(0.37, dtype=torch.float64)
    _, eps = _x0_eps(f, x, a, kind)
    x0_new, eps_new = _x0_eps(shift_noise(f, delta, 0.37, kind), x, a, kind)
    torch.testing.assert_close(eps_new, eps + delta)
    torch.testing.assert_close(x0_new, (x - (1 - a).sqrt() * (eps + delta)) / a.sqrt())
    with pytest.raises(UserError, match="prediction_type"):
        shift_noise(f, delta, 0.37, "flow")


def test_x_space_hook_is_classifier_guidance_by_the_input_gradient(unet, recorded, scheduler):
    """(3x): ε̂ of the conditional half moves by s·β_t^p·√(1−ᾱ_t)·∇_{x_t} L, L read at h through the U-Net, the
    gradient recomputed here independently; h and the null half are left alone."""
    from pipeline.sampling import _x0_eps

    _, timesteps, _ = recorded
    adp = random_adp(recorded, scale=3.0)
    adp.config["betas"] = scheduler.betas[timesteps].tolist()
    hooks = DistributionGuidanceHooks(adp, None, scale=30.0, steps=(0, STEPS), group_size=10, beta_power=0.05,
                                      space="x")
    step, n = 1, 20
    t = timesteps[step]
    alpha = float(scheduler.alphas_cumprod[t])
    labels = torch.repeat_interleave(torch.arange(10), 2)
    both = torch.cat([labels, torch.full_like(labels, 10)])  # classifier-free guidance: [conditional; null]
    ctx = StepContext(step, STEPS, t, both, 10, torch.arange(n), {}, alpha, "v_prediction")
    torch.manual_seed(1)
    x = torch.randn(n, 3, 16, 16).repeat(2, 1, 1, 1).requires_grad_(True)
    assert hooks.needs_input_grad(ctx)
    handle = unet.mid_block.register_forward_hook(lambda m, i, o: hooks.mid_block(o, ctx))
    try:
        with torch.enable_grad():
            f = unet(x, t, class_labels=both).sample
            out = hooks.model_output(f, x, ctx)
    finally:
        handle.remove()
    # independent: the plain U-Net, h read by a hook, L of (1)–(2), autograd to x
    box = {}
    handle = unet.mid_block.register_forward_hook(lambda m, i, o: box.__setitem__("h", o))
    try:
        xr = x.detach()[:n].clone().requires_grad_(True)
        f_plain = unet(xr, t, class_labels=labels).sample
        probs = torch.softmax(adp(box["h"].flatten(1), step, labels), 1)
        groups = labels * n + torch.arange(n) // 10
        (g,) = torch.autograd.grad(guidance_loss(probs, groups, torch.full((K,), 1 / K)), xr)
    finally:
        handle.remove()
    torch.testing.assert_close(f[:n].detach(), f_plain.detach())
    a = torch.tensor(alpha)
    _, eps = _x0_eps(f[:n].detach(), x[:n].detach(), a, "v_prediction")
    _, eps_new = _x0_eps(out[:n], x[:n].detach(), a, "v_prediction")
    expected = 30.0 * adp.config["betas"][step] ** 0.05 * (1 - alpha) ** 0.5 * g
    assert expected.abs().max() > 1e-6
    torch.testing.assert_close(eps_new - eps, expected, atol=1e-6, rtol=1e-4)
    assert torch.equal(out[n:], f[n:].detach())


def test_x_space_through_the_sampler(unet, scheduler, recorded):
    """Scale 0: the baseline bit for bit (no gradient taken); guided: the samples change, the same whatever the
    batch size, with and without classifier-free guidance; the h-space hook at the same s is another edit."""
    cond = np.repeat(np.arange(10), 2)
    adp = random_adp(recorded, scale=3.0)
    off = DistributionGuidanceHooks(adp, None, scale=0.0, steps=(0, STEPS), group_size=10, space="x")
    assert not off.needs_input_grad(ctx_for(0, 20))
    assert torch.equal(_run(unet, scheduler, cond, off), _run(unet, scheduler, cond))
    hooks = DistributionGuidanceHooks(adp, None, scale=200.0, steps=(1, STEPS), group_size=10, space="x")
    base = _run(unet, scheduler, cond)
    a = _run(unet, scheduler, cond, hooks, batch_size=10)
    b = _run(unet, scheduler, cond, hooks, batch_size=20)
    moved = (a - base).abs().max()
    assert moved > 1e-2
    assert (a - b).abs().max() < 1e-2 * moved  # float rounding of other batch shapes, amplified by s
    w2 = _run(unet, scheduler, cond, hooks, guidance_scale=2.0)
    assert (w2 - _run(unet, scheduler, cond, guidance_scale=2.0)).abs().max() > 1e-3
    h_space = DistributionGuidanceHooks(adp, None, scale=200.0, steps=(1, STEPS), group_size=10)
    assert (_run(unet, scheduler, cond, h_space) - a).abs().max() > 1e-3


def test_the_methods_own_guidance_scale_is_the_samplers_and_off_with_the_guidance(unet, scheduler, recorded):
    """hooks.guidance_scale replaces the settings' w: the same images as the settings at that w; at s = 0 the
    hooks are the baseline sampler at the settings' w, bit for bit."""
    cond = np.repeat(np.arange(10), 2)
    adp = random_adp(recorded, scale=3.0)
    own = DistributionGuidanceHooks(adp, None, scale=200.0, steps=(1, STEPS), group_size=10, space="x",
                                    guidance_scale=2.0)
    plain = DistributionGuidanceHooks(adp, None, scale=200.0, steps=(1, STEPS), group_size=10, space="x")
    at_w2 = _run(unet, scheduler, cond, own)
    assert torch.equal(at_w2, _run(unet, scheduler, cond, plain, guidance_scale=2.0))
    assert (at_w2 - _run(unet, scheduler, cond, plain)).abs().max() > 1e-3
    off = DistributionGuidanceHooks(adp, None, scale=0.0, steps=(1, STEPS), group_size=10, space="x",
                                    guidance_scale=2.0)
    assert off.guidance_scale is None
    assert torch.equal(_run(unet, scheduler, cond, off), _run(unet, scheduler, cond))


def test_unknown_space_names_the_key():
    raw = tiny_params()
    raw["distguide"]["space"] = "z"
    with pytest.raises(UserError, match="distguide.space"):
        parse_params(raw)
    with pytest.raises(UserError, match="distguide.space"):
        DistributionGuidanceHooks(ADP("linear", (4, 2, 2), K, STEPS, 10), None, scale=1.0, space="z")
