"""InvDiff: the min-step loss, the grouper, loss normalisation, δ construction, training/resume, sampling hook,
and independence from our own training code (a UNet2DConditionModel with text or class conditioning)."""

import numpy as np
import pytest
import torch

from pipeline.data import LabelledImages, ScoredImages
from pipeline.diffusion import make_noise_scheduler, training_target
from pipeline.errors import UserError
from pipeline.methods.invdiff import (
    Conditioning,
    InvDiffHooks,
    balanced_indices,
    call_unet,
    count_params,
    denoising_losses,
    finetune_guidance,
    fit_grouper,
    group_loss,
    grouping_quality,
    load_delta,
    loss_timesteps,
    make_delta,
    normalised_scores,
    oracle_groups,
    predicted_noise,
    project_rows,
)
from pipeline.pretrained import DiffusionModel
from pipeline.sampling import SamplerSettings, make_scheduler, sample, sample_seeds

CFG = {"steps": 4, "batch_size": 8, "lr": 1e-3, "lam": 1.0, "balanced": True, "label_dropout": 0.1,
       "checkpoint_every": 2}


def test_group_loss_matches_a_hand_computed_value():
    per_sample = torch.tensor([1.0, 2.0, 3.0, 4.0])
    W = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.0, 1.0]])
    # L0 = (1 + 2·0.5)/1.5 = 4/3, L1 = (2·0.5 + 3 + 4)/2.5 = 3.2; mean 34/15; population var ((3.2 − 4/3)/2)²
    loss, L = group_loss(per_sample, W, lam=2.0)
    assert torch.allclose(L, torch.tensor([4 / 3, 3.2]))
    expected = (4 / 3 + 3.2) / 2 + 2.0 * ((3.2 - 4 / 3) / 2) ** 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_one_hot_groups_and_zero_lambda_give_the_group_balanced_mean():
    gen = torch.Generator().manual_seed(0)
    per_sample = torch.rand(20, generator=gen)
    g = torch.tensor([0] * 15 + [1] * 4 + [2])
    loss, _ = group_loss(per_sample, torch.nn.functional.one_hot(g, 3).float(), lam=0.0)
    balanced = torch.stack([per_sample[g == k].mean() for k in range(3)]).mean()
    assert loss.item() == pytest.approx(balanced.item(), rel=1e-6)
    assert loss.item() != pytest.approx(per_sample.mean().item(), rel=1e-3)  # not the plain mean


def test_group_loss_leaves_out_groups_absent_from_the_batch():
    loss, L = group_loss(torch.tensor([1.0, 3.0]), torch.tensor([[1.0, 0.0], [1.0, 0.0]]), lam=5.0)
    assert L.tolist() == [2.0] and loss.item() == 2.0


def test_project_rows_puts_rows_on_the_simplex():
    W = project_rows(torch.tensor([[2.0, -1.0, 2.0], [-1.0, -2.0, -3.0], [0.2, 0.3, 0.5]]))
    assert (W >= 0).all() and torch.allclose(W.sum(1), torch.ones(3))
    assert torch.allclose(W[0], torch.tensor([0.5, 0.0, 0.5])) and torch.allclose(W[1], torch.full((3,), 1 / 3))


def _synthetic_scores(n=2000, rate=0.05, shift=3.0, seed=0):
    rng = np.random.default_rng(seed)
    conflicting = rng.random(n) < rate
    return rng.normal(size=n) + shift * conflicting, conflicting


@pytest.mark.parametrize("init", ["ranked", "random"])
@pytest.mark.parametrize("K", [2, 3])
def test_grouper_keeps_rows_on_the_simplex_and_orders_groups_by_mean(init, K):
    z, _ = _synthetic_scores()
    fit = fit_grouper(z, K, min_share=0.05, steps=50, init=init, seed=1)
    assert fit.W.shape == (len(z), K) and (fit.W >= 0).all()
    np.testing.assert_allclose(fit.W.sum(1), 1.0, atol=1e-6)
    means = (z[:, None] * fit.W).sum(0) / fit.W.sum(0)
    assert np.all(np.diff(means) > 0)


def test_ranked_grouper_finds_a_shifted_minority_and_beats_the_random_start():
    z, conflicting = _synthetic_scores()
    ranked = grouping_quality(fit_grouper(z, 2, min_share=0.05, steps=200, init="ranked").W, conflicting, z)
    random = grouping_quality(fit_grouper(z, 2, min_share=0.05, steps=200, init="random").W, conflicting, z)
    assert ranked["precision_top_group"] > 0.7 and ranked["recall_top_group"] > 0.6
    assert ranked["nmi_conflicting"] > 0.4
    assert ranked["nmi_conflicting"] > random["nmi_conflicting"]
    assert ranked["auroc_scores"] > 0.95


def test_grouper_rejects_impossible_shares():
    with pytest.raises(UserError, match="min_group_share"):
        fit_grouper(np.zeros(10), 3, min_share=0.5)


def test_normalised_scores_equalise_timesteps_and_classes():
    rng = np.random.default_rng(0)
    losses = rng.gamma(2.0, size=(300, 4))
    classes = np.repeat([0, 1, 2], 100)
    z = normalised_scores(losses, classes)
    for y in range(3):
        assert abs(z[classes == y].mean()) < 1e-9 and z[classes == y].std() == pytest.approx(1.0)
    # a timestep whose losses are 50× larger does not dominate: rescaling one column changes nothing
    scaled = losses.copy()
    scaled[:, 0] *= 50
    np.testing.assert_allclose(normalised_scores(scaled, classes), z, atol=1e-10)
    assert list(loss_timesteps(0, 999, 4)) == [0, 333, 666, 999]


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_predicted_noise_inverts_each_parameterisation(kind):
    sched = make_noise_scheduler(1000, "squaredcos_cap_v2", kind)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 8, 8, generator=gen), torch.randn(4, 3, 8, 8, generator=gen)
    t = torch.tensor([10, 200, 600, 950])
    x_t = sched.add_noise(x0, noise, t)
    assert torch.allclose(predicted_noise(sched, training_target(sched, x0, noise, t), x_t, t), noise, atol=1e-4)


def test_oracle_groups_and_balanced_batches():
    aligned = np.array([True, True, True, False])
    W = oracle_groups(aligned)
    np.testing.assert_array_equal(W, [[1, 0], [1, 0], [1, 0], [0, 1]])
    idx = balanced_indices(torch.as_tensor(W), 10, torch.Generator().manual_seed(0))
    assert len(idx) == 10 and (idx[:5] < 3).all() and (idx[5:] == 3).all()


def test_delta_is_small_zero_output_and_same_class(unet):
    delta = make_delta(unet, width=0.25)
    assert type(delta) is type(unet)
    assert count_params(delta) <= 0.25 * count_params(unet)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 500])
    assert torch.equal(delta(x, t, class_labels=torch.tensor([1, 10])).sample, torch.zeros_like(x))
    with pytest.raises(UserError, match="delta_width"):
        make_delta(unet, width=1.0)


def test_delta_at_initialisation_leaves_samples_bit_identical(unet, one_thread):
    scheduler = make_scheduler(make_noise_scheduler(1000, "squaredcos_cap_v2", "v_prediction").config)
    cond = np.repeat(np.arange(10), 2)

    def run(hooks=None, w=1.0):
        return sample(DiffusionModel(unet, dict(scheduler.config)), cond, sample_seeds(0, len(cond)),
                      SamplerSettings(num_inference_steps=3, batch_size=8, guidance_scale=w), hooks=hooks,
                      progress=False)

    hooks = InvDiffHooks(make_delta(unet, width=0.25), strength=3.0)
    assert torch.equal(run(hooks), run())
    assert torch.equal(run(hooks, w=2.0), run(w=2.0))


def _train(unet, tmp_path, name, images, cond, W, cfg=CFG, null=10):
    sched = make_noise_scheduler(1000, "squaredcos_cap_v2", "v_prediction")
    torch.manual_seed(0)
    delta = make_delta(unet, width=0.25)
    res = finetune_guidance(unet, delta, sched, images, cond, W, cfg=cfg, seed=0, out_dir=tmp_path / name,
                            ckpt_dir=tmp_path / f"ckpt_{name}", null_class=null, progress=False)
    return res, load_delta(tmp_path / name)


def test_finetune_trains_delta_keeps_base_frozen_and_resumes_exactly(unet, one_thread, tmp_path):
    gen = torch.Generator().manual_seed(0)
    images, classes = torch.rand(16, 3, 16, 16, generator=gen) * 2 - 1, torch.arange(16) % 10
    cond, W = Conditioning(class_labels=classes), oracle_groups(np.arange(16) % 4 != 0)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    res, delta = _train(unet, tmp_path, "a", images, cond, W)
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in before.items())
    assert np.isfinite(res.final_loss) and res.delta_params <= 0.25 * res.base_params
    assert delta.conv_out.weight.abs().sum() > 0  # δ has left its zero initialisation
    # resume: a second run in the same checkpoint dir restarts from step 2 and ends with identical weights
    res_b, _ = _train(unet, tmp_path, "b", images, cond, W)
    (tmp_path / "ckpt_b").rename(tmp_path / "ckpt_c")
    res_c, resumed = _train(unet, tmp_path, "c", images, cond, W)
    assert res_b.resumed_from == 0 and res_c.resumed_from == 2
    for (k, v), w in zip(delta.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(v, w), k


def _text_unet(class_embeds: int | None = None):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8, num_class_embeds=class_embeds).eval()


@pytest.mark.parametrize("class_embeds", [None, 5])
def test_works_on_a_saved_unet2dconditionmodel(tmp_path, one_thread, class_embeds):
    from diffusers import UNet2DConditionModel

    _text_unet(class_embeds).save_pretrained(tmp_path / "base")
    base = UNet2DConditionModel.from_pretrained(str(tmp_path / "base"), use_safetensors=True).eval()
    n = 12
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(n, 3, 8, 8, generator=gen) * 2 - 1
    cond = Conditioning(class_labels=torch.arange(n) % 5 if class_embeds else None,
                        encoder_hidden_states=torch.randn(n, 4, 16, generator=gen))
    sched = make_noise_scheduler(1000, "linear", "epsilon")
    empty = Conditioning(class_labels=cond.class_labels, encoder_hidden_states=torch.zeros(n, 4, 16))
    losses, ref = denoising_losses(base, sched, images, cond, loss_timesteps(100, 900, 3), reference=empty, seed=0,
                                   batch_size=5, progress=False)
    assert losses.shape == ref.shape == (n, 3) and np.isfinite(losses).all() and not np.allclose(losses, ref)
    W = fit_grouper(normalised_scores(losses, None, ref), 2, min_share=0.25, steps=20).W
    delta = make_delta(base, width=0.25)
    assert isinstance(delta, UNet2DConditionModel) and count_params(delta) <= 0.25 * count_params(base)
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([1, 2, 3])
    assert torch.equal(call_unet(delta, x, t, cond.select([0, 1, 2])), torch.zeros_like(x))
    res = finetune_guidance(base, delta, sched, images, cond, W, cfg={**CFG, "label_dropout": 0.0}, seed=0,
                            out_dir=tmp_path / "delta", ckpt_dir=tmp_path / "ckpt", progress=False)
    assert np.isfinite(res.final_loss)
    trained = load_delta(tmp_path / "delta")
    assert isinstance(trained, UNet2DConditionModel)
    assert call_unet(trained, x, t, cond.select([0, 1, 2])).abs().sum() > 0


def test_the_max_step_refuses_a_view_with_the_bias_attribute():
    from pipeline.methods.invdiff import infer_groups

    view = ScoredImages(np.zeros((2, 16, 16, 3), np.uint8), np.zeros(2, np.int64), np.zeros(2, np.int64),
                        np.ones(2, bool))
    with pytest.raises(UserError, match="bias attribute"):
        infer_groups(view, None, None, 0, "cpu")
    assert not hasattr(LabelledImages(view.images, view.classes), "bias")


def test_load_delta_names_the_path_when_missing(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path / "nope")):
        load_delta(tmp_path / "nope")


def test_contrast_scores_cancel_the_shared_draw():
    """With a reference, s_i = mean_d (l − r)/mean r: a per-sample offset common to l and r (image difficulty,
    the noise draw) drops out; without one it does not."""
    rng = np.random.default_rng(0)
    signal, difficulty = rng.normal(size=400), rng.gamma(2.0, size=(400, 1)) * 10
    ref = 1.0 + difficulty + rng.random((400, 3))
    losses = ref + signal[:, None]
    z = normalised_scores(losses, None, ref)
    assert np.corrcoef(z, signal)[0, 1] > 0.999
    assert np.corrcoef(normalised_scores(losses, None), signal)[0, 1] < 0.5


def test_denoising_losses_same_draws_for_the_reference(unet, one_thread):
    sched = make_noise_scheduler(1000, "squaredcos_cap_v2", "v_prediction")
    images, classes = torch.rand(6, 3, 16, 16) * 2 - 1, torch.arange(6)
    cond = Conditioning(class_labels=classes)
    same, ref = denoising_losses(unet, sched, images, cond, np.array([10, 500]), reference=cond, seed=3,
                                 batch_size=4, progress=False)
    np.testing.assert_array_equal(same, ref)  # identical condition and draws → identical losses
    alone, none = denoising_losses(unet, sched, images, cond, np.array([10, 500]), seed=3, batch_size=4,
                                   progress=False)
    assert none is None
    np.testing.assert_array_equal(alone, same)


def test_minority_share_is_estimated_without_labels():
    from pipeline.methods.invdiff import estimate_minority_share

    z, conflicting = _synthetic_scores(n=4000, shift=5.0)
    assert estimate_minority_share(z) == pytest.approx(conflicting.mean(), abs=0.01)


def test_paired_draws_share_t_and_noise_across_groups():
    from pipeline.methods.invdiff import paired_draws

    noise, t = paired_draws(3, 10, (3, 4, 4), 1000, torch.Generator().manual_seed(0))
    assert noise.shape == (10, 3, 4, 4) and t.shape == (10,)
    # layout of balanced_indices: sizes 4, 3, 3; position j of each group shares its draw
    for start, size in ((4, 3), (7, 3)):
        assert torch.equal(t[start:start + size], t[:size]) and torch.equal(noise[start:start + size], noise[:size])
    assert len(set(t[:4].tolist())) > 1  # positions within a group still differ


def test_nan_loss_stops_delta_finetuning_naming_the_step(unet, one_thread, tmp_path):
    """A NaN in the data: a one-line UserError naming finetune_guidance and the step, no δ written."""
    images, classes = torch.full((16, 3, 16, 16), float("nan")), torch.arange(16) % 10
    cond, W = Conditioning(class_labels=classes), oracle_groups(np.arange(16) % 4 != 0)
    with pytest.raises(UserError, match=r"^finetune_guidance: loss became nan at step 0; lower invdiff.lr"):
        _train(unet, tmp_path, "nan", images, cond, W)
    assert not (tmp_path / "nan").exists() and not list((tmp_path / "ckpt_nan").iterdir())


# ---------------------------------------------------------------------------------------------------------------
# target weighting (docs/methods.md "InvDiff"): the re-weighted training data has the target distribution


def _coloured_labels(per_class: int = 100, conflicting_per_colour: int = 2, C: int = 10):
    """Classes and colours with colour y aligned to class y and the conflicting images spread evenly."""
    classes, colours = [], []
    for y in range(C):
        others = [c for c in range(C) if c != y]
        cols = [y] * (per_class - conflicting_per_colour * (C - 1)) + others * conflicting_per_colour
        classes += [y] * per_class
        colours += cols
    return np.array(classes), np.array(colours)


def _colour_distribution(q: np.ndarray, classes: np.ndarray, colours: np.ndarray, C: int = 10) -> np.ndarray:
    out = np.zeros((C, C))
    np.add.at(out, (classes, colours), q)
    return out / out.sum(1, keepdims=True)


def test_uniform_target_gives_weights_one_over_k_and_the_rest():
    from pipeline.methods.invdiff import group_targets

    T = group_targets("uniform", 2, tuple(range(10)), 10)
    np.testing.assert_allclose(T, np.tile([0.1, 0.9], (10, 1)))
    np.testing.assert_allclose(group_targets("equal", 2, tuple(range(10)), 10), 0.5)
    p = np.arange(1, 11) / 55.0  # non-uniform: the aligned-like group takes p*(a_y) of class y
    np.testing.assert_allclose(group_targets(tuple(p), 2, tuple(range(10)), 10)[:, 0], p)
    with pytest.raises(UserError, match="invdiff.target"):
        group_targets((0.5, 0.5), 2, tuple(range(10)), 10)


def test_target_weighted_aligned_conflicting_groups_give_a_uniform_colour_distribution():
    from pipeline.methods.invdiff import TargetSampler, group_targets

    classes, colours = _coloured_labels()
    W = oracle_groups(colours == classes)  # aligned / conflicting, 82% aligned per class
    q = TargetSampler(W, classes, group_targets("uniform", 2, tuple(range(10)), 10)).probabilities(len(classes))
    np.testing.assert_allclose(q.sum(), 1.0)
    np.testing.assert_allclose(_colour_distribution(q, classes, colours), 0.1, atol=1e-12)
    # the published weighting (every group alike) stops at an aligned share of one half
    q_eq = TargetSampler(W, classes, group_targets("equal", 2, tuple(range(10)), 10)).probabilities(len(classes))
    np.testing.assert_allclose(np.diag(_colour_distribution(q_eq, classes, colours)), 0.5)


def test_oracle_cells_match_any_target_even_on_uneven_data():
    from pipeline.methods.invdiff import TargetSampler, attribute_groups, group_targets

    rng = np.random.default_rng(0)
    classes = np.repeat(np.arange(10), 200)
    colours = np.where(rng.random(2000) < 0.9, classes, rng.integers(0, 10, 2000))  # uneven conflicting colours
    colours[::10] = np.arange(200) % 10  # every cell non-empty
    p = np.arange(1, 11) / 55.0
    W = attribute_groups(colours, 10)
    T = group_targets(tuple(p), 10, tuple(range(10)), 10, attribute_groups=True)
    sampler = TargetSampler(W, classes, T)
    np.testing.assert_allclose(_colour_distribution(sampler.probabilities(2000), classes, colours),
                               np.tile(p, (10, 1)), atol=1e-12)
    # stratified draws: every cell within one draw of B·π, and the recorded group is the cell's colour
    idx, grp = sampler.draw(1000, torch.Generator().manual_seed(0))
    assert len(idx) == 1000 and torch.equal(torch.as_tensor(colours)[idx], grp)
    cells = np.bincount(classes[idx.numpy()] * 10 + colours[idx.numpy()], minlength=100)
    assert np.abs(cells - 1000 * 0.1 * np.tile(p, 10)).max() <= 1


def test_drawn_group_loss_matches_a_hand_computed_value():
    from pipeline.methods.invdiff import drawn_group_loss

    loss, L = drawn_group_loss(torch.tensor([1.0, 3.0, 2.0, 6.0]), torch.tensor([0, 0, 2, 2]), 3, lam=2.0)
    torch.testing.assert_close(L, torch.tensor([2.0, 4.0]))  # group 1 absent
    torch.testing.assert_close(loss, torch.tensor(3.0 + 2.0 * 1.0))


def test_cosine_schedule_with_warmup_and_ema():
    from pipeline.methods.invdiff import ema_update, lr_factor

    assert lr_factor(0, 100, "cosine", 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, "cosine", 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, "cosine", 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, "cosine", 10) == pytest.approx(0.5)
    assert lr_factor(99, 100, "cosine", 10) < 0.001
    assert lr_factor(99, 100, "constant", 10) == 1.0
    ema = [torch.zeros(3)]
    for _ in range(2):
        ema_update(ema, [torch.ones(3)], 0.9)
    torch.testing.assert_close(ema[0], torch.full((3,), 1 - 0.9**2))


def test_soft_group_purity_counts_aligned_mass_in_the_conflicting_like_group():
    W = np.array([[0.9, 0.1], [0.6, 0.4], [0.0, 1.0], [0.5, 0.5]], np.float32)
    conflicting = np.array([False, False, True, True])
    q = grouping_quality(W, conflicting)
    assert q["aligned_mass_top_group"] == pytest.approx(0.5 / 2.0)
    assert q["aligned_share_top_group_hard"] == pytest.approx(0.0)


def test_invdiff_params_reject_bad_targets_and_schedules():
    from pipeline.config import InvDiffParams

    with pytest.raises(ValueError, match="target"):
        InvDiffParams(target=(0.5, 0.6))
    with pytest.raises(ValueError, match="paired"):
        InvDiffParams(paired=True)
    with pytest.raises(ValueError, match="warmup_steps"):
        InvDiffParams(steps=10, warmup_steps=10)
    assert InvDiffParams().target == "uniform"  # the defaults validate (their values: tests/test_config.py)


def test_target_weighted_finetune_with_ema_and_cosine_resumes_exactly(unet, one_thread, tmp_path):
    from pipeline.methods.invdiff import group_targets

    gen = torch.Generator().manual_seed(0)
    images, classes = torch.rand(20, 3, 16, 16, generator=gen) * 2 - 1, torch.arange(20) % 10
    cond, W = Conditioning(class_labels=classes), oracle_groups(np.arange(20) < 10)
    T = group_targets("uniform", 2, tuple(range(10)), 10)
    cfg = {**CFG, "ema_decay": 0.5, "lr_schedule": "cosine", "warmup_steps": 1}
    sched = make_noise_scheduler(1000, "squaredcos_cap_v2", "v_prediction")

    def train(name):
        torch.manual_seed(0)
        res = finetune_guidance(unet, make_delta(unet, width=0.25), sched, images, cond, W, cfg=cfg, seed=0,
                                out_dir=tmp_path / name, ckpt_dir=tmp_path / f"ckpt_{name}", null_class=10,
                                targets=T, progress=False)
        return res, load_delta(tmp_path / name)

    res_a, a = train("a")
    assert np.isfinite(res_a.final_loss) and a.conv_out.weight.abs().sum() > 0
    (tmp_path / "ckpt_a").rename(tmp_path / "ckpt_b")
    res_b, b = train("b")
    assert res_b.resumed_from == 2
    # the loss records too (the step-2 checkpoint carries steps 1-2 of the record made at step 4)
    assert res_b.final_loss == res_a.final_loss and res_b.losses == res_a.losses
    assert res_b.group_losses == res_a.group_losses and len(res_a.group_losses[-1]) == 2
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(v, w), k


# level 2 of the max step: the conflicting-like group split by features, no bias labels (docs/methods.md "InvDiff")


def _blobs(centres: np.ndarray, per: int, spread: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(centres)), per)
    return centres[labels] + spread * rng.standard_normal((len(labels), centres.shape[1])), labels


def test_the_number_of_clusters_is_chosen_on_held_out_rows_and_is_one_without_structure():
    from pipeline.methods.invdiff import choose_num_clusters

    centres = 6.0 * np.eye(8)[:5]
    F, _ = _blobs(centres, 40, 0.5)
    k, sil = choose_num_clusters(F, 10, seed=0)
    assert k == 5 and sil[5] == max(sil.values()) and sil[5] > 0.6
    F2, _ = _blobs(6.0 * np.eye(8)[:3], 40, 0.5, seed=1)
    assert choose_num_clusters(F2, 10, seed=0)[0] == 3
    blob = np.random.default_rng(2).standard_normal((200, 8))  # one Gaussian: no substantial structure
    assert choose_num_clusters(blob, 10, seed=0)[0] == 1


def _split_data(C: int = 4, K: int = 5, per_value: int = 12, aligned_per_class: int = 150, strays: int = 3):
    """Classes 0..C−1, attribute value a_y = y of K; features = class offset + value centre + noise. W: the
    aligned/conflicting pair from the true flag, with `strays` aligned images per class in the conflicting group."""
    rng = np.random.default_rng(0)
    value_centre, class_offset = 5.0 * np.eye(K, 12), 3.0 * rng.standard_normal((C, 12))
    classes, values, conflicting_like = [], [], []
    for y in range(C):
        for b in range(K):
            n = aligned_per_class if b == y else per_value
            classes += [y] * n
            values += [b] * n
            conflicting_like += [b != y] * n if b != y else [True] * strays + [False] * (n - strays)
    classes, values, flag = np.array(classes), np.array(values), np.array(conflicting_like)
    feats = class_offset[classes] + value_centre[values] + 0.4 * rng.standard_normal((len(classes), 12))
    return classes, values, flag, feats


def test_split_finds_the_attribute_values_and_returns_strays_to_the_aligned_like_group():
    from types import SimpleNamespace

    from pipeline.methods.invdiff import split_conflicting, split_quality

    classes, values, flag, feats = _split_data()
    aligned = values == classes
    W = oracle_groups(~flag)  # group 0 aligned-like, group 1 conflicting-like
    asked = []

    def features(idx):
        asked.append(np.asarray(idx))
        return feats[idx]

    p = SimpleNamespace(conflict_clusters="auto", conflict_clusters_max=8, split_reference=20)
    W2, info = split_conflicting(W, classes, features, p, seed=0)
    assert info["conflict_clusters"] == 5 and W2.shape == (len(classes), 6)
    np.testing.assert_allclose(W2.sum(1), 1.0, atol=1e-6)
    assert (W2.sum(0) > 0).all()
    # the strays (aligned images the score level let through) go back to group 0; no conflicting image does
    strays = flag & aligned
    moved = flag & (W2[:, 0] == 1.0)
    assert (W2[flag & ~aligned, 0] == 0).all() and moved.sum() > 0 and (moved <= strays).all()
    assert info["moved_to_group0"] == moved.sum()
    q = split_quality(W2, 1, values, ~aligned)
    assert q["nmi_attribute_level2"] > 0.99 and q["purity_attribute_level2"] == 1.0
    assert q["groups_total"] == 6 and q["conflict_clusters"] == 5
    # features were computed only for the conflicting-like rows and the aligned-like references
    assert np.isin(np.flatnonzero(flag), asked[0]).all() and len(asked[0]) == flag.sum() + 4 * 20
    # a fixed k, and k = 1 leaves W alone
    W3, _ = split_conflicting(W, classes, lambda i: feats[i], SimpleNamespace(**{**vars(p), "conflict_clusters": 3}),
                              seed=0)
    assert W3.shape[1] == 4
    W1, info1 = split_conflicting(W, classes, lambda i: feats[i],
                                  SimpleNamespace(**{**vars(p), "conflict_clusters": 1}), seed=0)
    assert W1 is W and info1["conflict_clusters"] == 1


def test_split_groups_with_target_weights_give_a_uniform_attribute_distribution_value_by_value():
    """Uneven conflicting values (value b+1 of class y 4× as frequent as the others): the two-group target
    weighting keeps the unevenness, the split groups (one per value) balance each value."""
    from pipeline.methods.invdiff import TargetSampler, attribute_groups, group_targets

    C = 10
    classes, colours = [], []
    for y in range(C):
        others = [c for c in range(C) if c != y]
        cols = [y] * 80 + others * 2 + [others[0]] * 6
        classes += [y] * len(cols)
        colours += cols
    classes, colours = np.array(classes), np.array(colours)
    aligned = colours == classes
    # the split as found: group 0 aligned-like, groups 1..10 one per colour (class y has none in group 1+y)
    W = np.concatenate([aligned[:, None], attribute_groups(colours, C) * ~aligned[:, None]], 1).astype(np.float32)
    present = np.stack([W[classes == y].sum(0) > 0 for y in range(C)])
    T = group_targets("uniform", W.shape[1], tuple(range(C)), C, present=present)
    np.testing.assert_allclose(T.sum(1), 1.0)
    assert (T[np.arange(C), 1 + np.arange(C)] == 0).all() and np.allclose(T[:, 0], 0.1)
    q = TargetSampler(W, classes, T).probabilities(len(classes))
    np.testing.assert_allclose(_colour_distribution(q, classes, colours), 0.1, atol=1e-12)
    q2 = TargetSampler(oracle_groups(aligned), classes, group_targets("uniform", 2, tuple(range(C)), C))
    assert np.abs(_colour_distribution(q2.probabilities(len(classes)), classes, colours) - 0.1).max() > 0.1


def test_unet_features_are_seeded_per_channel_means_and_a_bad_module_is_named(unet, one_thread):
    from pipeline.methods.invdiff import unet_features

    scheduler = make_noise_scheduler(100, "linear", "epsilon")
    images = torch.rand(6, 3, 16, 16) * 2 - 1
    cond = Conditioning(class_labels=torch.arange(6) % 2)
    a = unet_features(unet, scheduler, images, cond, 5, "up_blocks.0", seed=0, batch_size=4)
    b = unet_features(unet, scheduler, images, cond, 5, "up_blocks.0", seed=0, batch_size=6)
    assert a.shape == (6, unet.config.block_out_channels[-1]) and np.isfinite(a).all()
    np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(UserError, match="split_module.*nope"):
        unet_features(unet, scheduler, images, cond, 5, "nope", seed=0)


def test_invdiff_params_conflict_clusters():
    from pipeline.config import InvDiffParams

    assert InvDiffParams().conflict_clusters == 1 and InvDiffParams(conflict_clusters="auto").conflict_clusters
    with pytest.raises(ValueError, match="conflict_clusters"):
        InvDiffParams(conflict_clusters=0)


def test_the_max_step_names_a_wrong_split_module_before_the_loss_draws(unet):
    from types import SimpleNamespace

    from pipeline.methods.invdiff import infer_groups

    view = LabelledImages(np.zeros((4, 16, 16, 3), np.uint8), np.zeros(4, np.int64))
    model = SimpleNamespace(unet=unet)  # no scheduler config: reaching the loss draws would fail differently
    with pytest.raises(UserError, match="invdiff.split_module: .*'up_blocks.9'"):
        infer_groups(view, model, SimpleNamespace(conflict_clusters="auto", split_module="up_blocks.9"), 0, "cpu")


@pytest.mark.parametrize("paired", [False, True])
def test_train_timesteps_bound_deltas_training_t(unet, one_thread, tmp_path, monkeypatch, paired):
    """δ sees only t in [lo, hi) (paired draws too); a range past the schedule is a one-line error."""
    from diffusers import DDPMScheduler

    seen = []
    add_noise = DDPMScheduler.add_noise
    monkeypatch.setattr(DDPMScheduler, "add_noise",
                        lambda self, x, n, t: seen.append(t.clone()) or add_noise(self, x, n, t))
    gen = torch.Generator().manual_seed(0)
    images, classes = torch.rand(16, 3, 16, 16, generator=gen) * 2 - 1, torch.arange(16) % 10
    cond, W = Conditioning(class_labels=classes), oracle_groups(np.arange(16) % 4 != 0)
    cfg = {**CFG, "train_timesteps": (700, 760), "paired": paired, "steps": 6}
    _train(unet, tmp_path, "a", images, cond, W, cfg=cfg)
    drawn = torch.cat(seen)
    assert len(drawn) == 6 * 8 and drawn.min() >= 700 and drawn.max() < 760
    seen.clear()
    _train(unet, tmp_path, "b", images, cond, W, cfg={**CFG, "paired": paired, "steps": 6})
    assert torch.cat(seen).min() < 700 or torch.cat(seen).max() >= 760  # without it, t spans [0, 1000)
    with pytest.raises(UserError, match=r"invdiff.train_timesteps.*\[0, 1000\]"):
        _train(unet, tmp_path, "c", images, cond, W, cfg={**CFG, "train_timesteps": (500, 1001)})


def test_hooks_add_delta_only_inside_its_timesteps(unet):
    """InvDiffHooks with timesteps [lo, hi): f unchanged outside, f + r·δ inside."""
    from pipeline.sampling import StepContext

    torch.manual_seed(0)
    delta = make_delta(unet, width=0.25)
    torch.nn.init.normal_(delta.conv_out.weight, std=0.1)  # a δ whose output is not zero
    x, out = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)

    def at(t, timesteps):
        ctx = StepContext(step_index=0, num_steps=10, timestep=t, labels=torch.tensor([1, 2]), null_class=10,
                          sample_ids=torch.tensor([0, 1]), unet_kwargs={"class_labels": torch.tensor([1, 2])})
        with torch.no_grad():
            return InvDiffHooks(delta, 2.0, timesteps).model_output(out, x, ctx)

    assert torch.equal(at(400, (500, 1000)), out) and torch.equal(at(1000, (500, 1000)), out)
    inside = at(500, (500, 1000))
    assert not torch.equal(inside, out) and torch.equal(inside, at(500, None))


def test_invdiff_params_train_timesteps():
    from pipeline.config import InvDiffParams

    assert InvDiffParams().train_timesteps is None and InvDiffParams(train_timesteps=[500, 1000]).train_timesteps
    for bad in ([600, 600], [700, 500], [-1, 10]):
        with pytest.raises(ValueError, match="train_timesteps"):
            InvDiffParams(train_timesteps=bad)
