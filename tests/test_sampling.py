"""pipeline/sampling.py: per-sample seeding, classifier-free guidance and the three hooks, on a tiny random U-Net."""

import dataclasses

import numpy as np
import pytest
import torch

from pipeline.diffusion import make_noise_scheduler, null_class
from pipeline.pretrained import DiffusionModel
from pipeline.sampling import SamplerHooks, SamplerSettings, StepContext, make_scheduler, sample, sample_seeds

STEPS = 3
N = 10


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sched_cfg():
    return dict(make_noise_scheduler(1000, "squaredcos_cap_v2", "v_prediction").config)


@pytest.fixture(scope="module")
def cond():
    return np.arange(N) % 10


@pytest.fixture(scope="module")
def seeds():
    return sample_seeds(123, N)


SETTINGS = {f.name for f in dataclasses.fields(SamplerSettings)}


def settings(**kw) -> SamplerSettings:
    """SamplerSettings from the keyword arguments that name its fields (STEPS steps, one batch by default)."""
    kw.setdefault("num_inference_steps", STEPS)
    kw.setdefault("batch_size", N)
    return SamplerSettings(**kw)


def run(unet, sched_cfg, cond, seeds, kind="ddim", **kw):
    chosen = settings(scheduler=kind, **{k: kw.pop(k) for k in list(kw) if k in SETTINGS})
    return sample(DiffusionModel(unet, sched_cfg), cond, seeds, chosen, progress=False, **kw)


@pytest.fixture(scope="module")
def ref(unet, sched_cfg, cond, seeds):
    """The whole run in one batch, guidance 1, DDIM η=0."""
    return run(unet, sched_cfg, cond, seeds)


# ---------------------------------------------------------------------------------------------------- seeds

def test_sample_seeds_deterministic_distinct_offset():
    a = sample_seeds(7, 20)
    assert a.dtype == np.int64 and (a >= 0).all()
    assert np.array_equal(a, sample_seeds(7, 20))
    assert len(set(a.tolist())) == 20
    assert np.array_equal(sample_seeds(7, 5, offset=2), sample_seeds(7, 7)[2:])
    assert not set(a.tolist()) & set(sample_seeds(8, 20).tolist())  # neighbouring base seeds do not overlap


# ---------------------------------------------------------------------------------------------------- seeding

def test_output_shape_and_range(ref):
    assert ref.shape == (N, 3, 16, 16) and ref.dtype == torch.float32
    assert ref.min() >= -1 and ref.max() <= 1
    assert ref.std() > 0.05  # not a constant image


@pytest.mark.parametrize("batch_size", [1, 3])
def test_sample_independent_of_batch_size(unet, sched_cfg, cond, seeds, ref, batch_size):
    out = run(unet, sched_cfg, cond, seeds, batch_size=batch_size)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_sample_independent_of_position(unet, sched_cfg, cond, seeds, ref):
    out = run(unet, sched_cfg, cond[3:6], seeds[3:6])
    torch.testing.assert_close(out, ref[3:6], atol=1e-5, rtol=0)


def test_repeat_call_identical_and_eta0_deterministic(unet, sched_cfg, cond, seeds, ref):
    torch.manual_seed(999)  # the global RNG plays no part
    out = run(unet, sched_cfg, cond, seeds, eta=0.0)
    assert torch.equal(out, ref)


def test_different_seeds_give_different_images(unet, sched_cfg, cond, seeds, ref):
    out = run(unet, sched_cfg, cond, sample_seeds(124, N))
    per_sample = (out - ref).abs().flatten(1).amax(1)
    assert (per_sample > 1e-2).all()


def test_empty_condition_returns_empty(unet, sched_cfg):
    out = run(unet, sched_cfg, np.array([], dtype=np.int64), np.array([], dtype=np.int64))
    assert out.shape == (0, 3, 16, 16)


@pytest.mark.parametrize("kind,eta", [("ddpm", 0.0), ("ddim", 1.0)])
def test_stochastic_scheduler_per_sample_seeding(unet, sched_cfg, cond, seeds, kind, eta):
    """DDPM and DDIM η>0 draw step noise from per-sample generators: batch size / position invariant."""
    full = run(unet, sched_cfg, cond, seeds, kind=kind, eta=eta)
    assert torch.equal(full, run(unet, sched_cfg, cond, seeds, kind=kind, eta=eta))
    torch.testing.assert_close(run(unet, sched_cfg, cond, seeds, kind=kind, eta=eta, batch_size=3), full,
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(run(unet, sched_cfg, cond[3:6], seeds[3:6], kind=kind, eta=eta), full[3:6],
                               atol=1e-5, rtol=0)


def test_ddpm_differs_from_ddim(unet, sched_cfg, cond, seeds, ref):
    out = run(unet, sched_cfg, cond, seeds, kind="ddpm")
    assert out.min() >= -1 and out.max() <= 1
    assert not torch.allclose(out, ref, atol=1e-3)


# ---------------------------------------------------------------------------------------------------- hooks

def test_identity_hooks_bit_identical(unet, sched_cfg, cond, seeds, ref):
    assert torch.equal(run(unet, sched_cfg, cond, seeds, hooks=SamplerHooks()), ref)
    assert torch.equal(run(unet, sched_cfg, cond, seeds, hooks=None), ref)


class NoiseHook(SamplerHooks):
    def __init__(self, shift: float):
        self.shift, self.calls = shift, []

    def initial_noise(self, z, ctx):
        self.calls.append((tuple(z.shape), ctx.step_index, ctx.sample_ids.tolist()))
        return z + self.shift


def test_initial_noise_hook_sees_z_and_changes_output(unet, sched_cfg, cond, seeds, ref):
    same = NoiseHook(0.0)
    assert torch.equal(run(unet, sched_cfg, cond, seeds, hooks=same), ref)
    assert same.calls == [((N, 3, 16, 16), -1, list(range(N)))]
    moved = NoiseHook(0.5)
    out = run(unet, sched_cfg, cond, seeds, hooks=moved, batch_size=4)
    assert [c[0] for c in moved.calls] == [(4, 3, 16, 16), (4, 3, 16, 16), (2, 3, 16, 16)]
    assert moved.calls[2][2] == [8, 9]
    assert not torch.allclose(out, ref, atol=1e-3)


class MidHook(SamplerHooks):
    def __init__(self, scale: float = 1.0):
        self.scale, self.calls = scale, []

    def mid_block(self, h, ctx):
        assert isinstance(ctx, StepContext)
        self.calls.append((tuple(h.shape), ctx.step_index, ctx.num_steps, ctx.timestep))
        return h if self.scale == 1.0 else h * self.scale


def test_mid_block_hook_once_per_step_per_batch(unet, sched_cfg, cond, seeds, ref):
    hook = MidHook()
    out = run(unet, sched_cfg, cond, seeds, hooks=hook, batch_size=5)
    # 16×16 input, two levels → mid block at 8×8 with the last width (32)
    assert [c[0] for c in hook.calls] == [(5, 32, 8, 8)] * (2 * STEPS)
    assert [c[1] for c in hook.calls] == list(range(STEPS)) * 2
    assert all(c[2] == STEPS for c in hook.calls)
    timesteps = [c[3] for c in hook.calls[:STEPS]]
    assert timesteps == sorted(timesteps, reverse=True) and len(set(timesteps)) == STEPS
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert len(unet.mid_block._forward_hooks) == 0


def test_mid_block_hook_unchanged_h_identical_edit_changes(unet, sched_cfg, cond, seeds, ref):
    assert torch.equal(run(unet, sched_cfg, cond, seeds, hooks=MidHook(1.0)), ref)
    edited = run(unet, sched_cfg, cond, seeds, hooks=MidHook(3.0))
    assert not torch.allclose(edited, ref, atol=1e-3)


def test_mid_block_hook_guided_batch_doubled(unet, sched_cfg, cond, seeds):
    hook = MidHook()
    run(unet, sched_cfg, cond, seeds, hooks=hook, guidance_scale=2.0, batch_size=4)
    assert [c[0][0] for c in hook.calls] == [8] * STEPS + [8] * STEPS + [4] * STEPS


class Boom(SamplerHooks):
    def mid_block(self, h, ctx):
        if ctx.step_index == 1:
            raise RuntimeError("boom")
        return h


def test_forward_hook_removed_even_when_hook_raises(unet, sched_cfg, cond, seeds, ref):
    with pytest.raises(RuntimeError, match="boom"):
        run(unet, sched_cfg, cond, seeds, hooks=Boom())
    assert len(unet.mid_block._forward_hooks) == 0
    assert torch.equal(run(unet, sched_cfg, cond, seeds), ref)  # the model is left untouched


class OutHook(SamplerHooks):
    def __init__(self, fn=None):
        self.fn, self.seen = fn, []

    def model_output(self, out, x_t, ctx):
        self.seen.append((tuple(out.shape), tuple(x_t.shape), ctx.labels.clone(), ctx.null_class))
        return out if self.fn is None else self.fn(out, ctx)


def test_model_output_hook_doubled_batch_with_guidance(unet, sched_cfg, cond, seeds):
    hook = OutHook()
    run(unet, sched_cfg, cond, seeds, hooks=hook, guidance_scale=3.0)
    assert len(hook.seen) == STEPS
    null = null_class(unet)
    assert null == 10
    for out_shape, x_shape, labels, seen_null in hook.seen:
        assert out_shape == x_shape == (2 * N, 3, 16, 16)
        assert seen_null == null
        assert labels.tolist() == cond.tolist() + [null] * N


def test_model_output_hook_plain_batch_without_guidance(unet, sched_cfg, cond, seeds, ref):
    hook = OutHook()
    out = run(unet, sched_cfg, cond, seeds, hooks=hook, guidance_scale=1.0)
    assert torch.equal(out, ref)
    assert len(hook.seen) == STEPS
    for out_shape, _, labels, _ in hook.seen:
        assert out_shape == (N, 3, 16, 16) and labels.tolist() == cond.tolist()


def test_model_output_edit_changes_output(unet, sched_cfg, cond, seeds, ref):
    out = run(unet, sched_cfg, cond, seeds, hooks=OutHook(lambda f, ctx: f * 0.5))
    assert not torch.allclose(out, ref, atol=1e-3)


def test_guidance_one_is_the_conditional_model(unet, sched_cfg, cond, seeds, ref):
    """w=1 equals any w once the unconditional half is replaced by the conditional one: f̃ = f_y."""
    def uncond_is_cond(f, ctx):
        f_cond, _ = f.chunk(2)
        return torch.cat([f_cond, f_cond])

    out = run(unet, sched_cfg, cond, seeds, hooks=OutHook(uncond_is_cond), guidance_scale=4.0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    plain_guided = run(unet, sched_cfg, cond, seeds, guidance_scale=4.0)
    assert not torch.allclose(plain_guided, ref, atol=1e-3)


def test_guidance_zero_is_the_unconditional_model(unet, sched_cfg, cond, seeds):
    """w=0: f̃ = f_∅, so the result matches conditioning every sample on the null class."""
    null = null_class(unet)
    uncond = run(unet, sched_cfg, np.full(N, null), seeds)
    torch.testing.assert_close(run(unet, sched_cfg, cond, seeds, guidance_scale=0.0), uncond, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- DDIM inversion

class ConstantEps(torch.nn.Module):
    """ε_θ(x, t, y) = e_y, a fixed vector per class: DDIM's step is then exactly invertible (x̂_0 and ε̂ are affine in
    x with the same ε̂ on both sides), so invert → regenerate must give the images back to float precision."""

    def __init__(self, num_classes=11, shape=(3, 16, 16)):
        super().__init__()
        self.config = type("Cfg", (), {"sample_size": shape[1], "in_channels": shape[0],
                                       "num_class_embeds": num_classes})()
        self.e = torch.randn(num_classes, *shape, generator=torch.Generator().manual_seed(5))

    def forward(self, x, t, class_labels):
        return type("Out", (), {"sample": self.e[class_labels].expand_as(x).clone()})()


@pytest.mark.parametrize("w", [1.0, 2.5])
def test_invert_then_regenerate_is_exact_when_the_step_is_invertible(cond, w):
    from pipeline.sampling import invert

    unet, cfg = ConstantEps(), dict(make_noise_scheduler(1000, "linear", "epsilon").config)
    images = torch.rand(N, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 1.6 - 0.8
    model = DiffusionModel(unet, cfg)
    z, kept = invert(model, images, cond, settings(num_inference_steps=7, guidance_scale=w), progress=False,
                     keep_steps=(-1, 0, 6))
    assert z.shape == images.shape and torch.equal(kept[-1], kept[0]) and torch.equal(kept[-1], z.flatten(1))
    rec = sample(model, cond, sample_seeds(0, N), settings(num_inference_steps=7, guidance_scale=w), progress=False,
                 noise=z)
    torch.testing.assert_close(rec, images, atol=1e-4, rtol=0)
    # the class condition is used: inverting under other classes gives another z_T
    z_other, _ = invert(model, images, (cond + 1) % 10, settings(num_inference_steps=7, guidance_scale=w),
                        progress=False)
    assert (z_other - z).abs().max() > 0.1


def test_invert_reconstruction_error_shrinks_with_steps(unet, sched_cfg, cond, seeds):
    """On a real U-Net the one approximation, ε(x_{τ_i}) ≈ ε(x_{τ_{i+1}}), is first order in the step: the
    reconstruction error falls as the steps grow (v-prediction here); the same z_T whatever the batch size."""
    from pipeline.sampling import invert

    images = run(unet, sched_cfg, cond, seeds, num_inference_steps=10)
    errors = []
    for steps in (5, 40):
        z, _ = invert(DiffusionModel(unet, sched_cfg), images, cond, settings(num_inference_steps=steps),
                      progress=False)
        rec = run(unet, sched_cfg, cond, seeds, num_inference_steps=steps, noise=z)
        errors.append(float((rec - images).abs().mean()))
    assert errors[1] < errors[0] / 3 and errors[1] < 0.05, errors
    z_small, _ = invert(DiffusionModel(unet, sched_cfg), images, cond, settings(num_inference_steps=40, batch_size=3),
                        progress=False)
    torch.testing.assert_close(z_small, z, atol=1e-5, rtol=1e-4)


def test_invert_hooks_see_every_step_and_noise_is_checked(unet, sched_cfg, cond, seeds):
    from pipeline.errors import UserError
    from pipeline.sampling import invert

    seen = []

    class Spy(SamplerHooks):
        def mid_block(self, h, ctx):
            seen.append((ctx.step_index, ctx.timestep))
            return h

    invert(DiffusionModel(unet, sched_cfg), torch.zeros(N, 3, 16, 16), cond, settings(), hooks=Spy(), progress=False)
    scheduler = make_scheduler(sched_cfg)
    scheduler.set_timesteps(STEPS)
    assert seen == [(i, int(scheduler.timesteps[i])) for i in reversed(range(STEPS))]
    with pytest.raises(UserError, match="noise"):
        run(unet, sched_cfg, cond, seeds, noise=torch.zeros(N - 1, 3, 16, 16))


def test_sample_builds_no_autograd_graph(unet, sched_cfg, cond, seeds, one_thread):
    """The sampler runs without autograd even when the caller has it on: a graph kept across 25 steps and every
    batch held 22 GB on the default profile (a lost @torch.no_grad)."""
    assert torch.is_grad_enabled() and any(p.requires_grad for p in unet.parameters())
    out = run(unet, sched_cfg, cond[:4], seeds[:4])
    assert not out.requires_grad and out.grad_fn is None
