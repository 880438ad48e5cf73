"""Diffusing DeBias: GroupDRO, the Recipe II weight, LfF's GCE and EMA, the amplifier's data, metrics, params."""

import itertools

import numpy as np
import pytest
import torch
import yaml

from pipeline.config import parse_params
from pipeline.errors import UserError
from pipeline.methods import diffusing_debias as ddb
from tests.tiny import ROOT, tiny_params

pytestmark = pytest.mark.usefixtures("one_thread")


def toy_biased(n=2000, rho=0.9, seed=0):
    """Two classes; feature 0 = 'colour' (easy, agrees with the class for a share rho), feature 1 = 'shape'
    (the class, noisier). Returns x [n, 4], y, colour."""
    g = np.random.default_rng(seed)
    y = g.integers(0, 2, n)
    colour = np.where(g.random(n) < rho, y, 1 - y)
    x = np.stack([2.0 * colour - 1 + 0.05 * g.normal(size=n), (2.0 * y - 1) * 0.5 + 0.5 * g.normal(size=n),
                  g.normal(size=n), g.normal(size=n)], 1)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y), colour


# ---------------------------------------------------------------- GroupDRO


def test_groupdro_weights_move_toward_the_worst_group():
    dro = ddb.GroupDRO(3, eta=0.1)
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    losses = torch.tensor([0.1, 0.1, 0.5, 0.5, 2.0, 2.0])  # group 2 is the worst
    history = [dro.q.clone()]
    for _ in range(20):
        loss = dro.loss(losses, groups)
        history.append(dro.q.clone())
    q = dro.q
    assert torch.isclose(q.sum(), torch.tensor(1.0))
    assert q[2] > q[1] > q[0]
    assert all(b[2] > a[2] for a, b in itertools.pairwise(history))  # monotone toward the worst
    # loss = Σ q_g L_g, with each L_g the group's mean loss
    assert torch.isclose(loss, (q * torch.tensor([0.1, 0.5, 2.0])).sum())


def test_groupdro_leaves_absent_groups_alone():
    dro = ddb.GroupDRO(3, eta=1.0)
    dro.loss(torch.tensor([1.0, 1.0]), torch.tensor([0, 0]))
    # q_1 and q_2 were multiplied by exp(0) = 1, then renormalised with q_0
    assert torch.isclose(dro.q[1], dro.q[2]) and dro.q[0] > dro.q[1]


def test_groupdro_on_a_toy_problem_upweights_the_minority_group():
    x, y, colour = toy_biased()
    groups = y.numpy() * 2 + (colour != y.numpy())  # class × aligned/conflicting (the true groups)
    cfg = ddb.TrainConfig(epochs=3, batch_size=128, hidden=16, depth=1, dro_eta=0.05, group_sampling="uniform")
    _, info = ddb.fit_groupdro(x, y, groups, 2, cfg)
    q = np.array(info["q"])
    assert q[1] + q[3] > q[0] + q[2]  # the conflicting groups (where a colour shortcut fails) are the worst


# ---------------------------------------------------------------- Recipe II, LfF


def test_recipe2_weight_is_in_unit_interval():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(1000, generator=g) * 5, torch.rand(1000, generator=g) * 5
    w = ddb.recipe2_weight(torch.cat([a, torch.zeros(3)]), torch.cat([b, torch.tensor([0.0, 1.0, 0.0])]))
    assert (w >= 0).all() and (w <= 1).all()
    assert torch.isclose(w[-3], torch.tensor(0.5))  # both zero
    assert w[-2] < 1e-6  # amplifier right, debiased model wrong: no weight


def test_recipe2_weight_larger_where_the_amplifier_is_wrong():
    """A frozen amplifier that reads only the colour: its wrong samples are the bias-conflicting ones and get the
    larger weight W = ℓ^BA / (ℓ^BA + ℓ^D) at the end of training."""
    x, y, colour = toy_biased()
    amplifier = ColourAmplifier()  # reads feature 0 (the colour) only
    cfg = ddb.TrainConfig(epochs=3, batch_size=128, hidden=16, depth=1)
    _, info = ddb.fit_reweighted(x, y, 2, cfg, amplifier=amplifier)
    pred, _ = ddb.predict(amplifier, x)
    wrong = pred != y.numpy()
    assert wrong.mean() > 0.05 and (wrong == (colour != y.numpy())).mean() > 0.95
    w = info["weights"]
    assert ((w >= 0) & (w <= 1)).all()
    assert w[wrong].mean() > 2 * w[~wrong].mean()


class ColourAmplifier(torch.nn.Module):
    """logits (−3·x_0, 3·x_0): predicts the class its colour stands for."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor([-3.0, 3.0]))

    def forward(self, x):
        return x[:, :1] * self.scale


def test_amplifier_ce_temperature_by_hand():
    """CE(softmax(z/T), y): z = (2, 0), y = 0 → log(1 + e^{−2}) = 0.126928 at T = 1, log(1 + e^{−1}) = 0.313262 at
    T = 2; z = (0, 4), y = 0, T = 4 → log(1 + e) = 1.313262."""
    z, y = torch.tensor([[2.0, 0.0], [0.0, 4.0]]), torch.tensor([0, 0])
    assert torch.allclose(ddb.amplifier_ce(z, y), torch.tensor([0.126928, 4.018150]), atol=1e-5)
    assert torch.allclose(ddb.amplifier_ce(z, y, 2.0), torch.tensor([0.313262, 2.126928]), atol=1e-5)
    assert torch.isclose(ddb.amplifier_ce(z, y, 4.0)[1], torch.tensor(1.313262), atol=1e-5)
    with pytest.raises(UserError, match="ba_temperature"):
        ddb.amplifier_ce(z, y, 0.0)
    # then W = ℓ^BA / (ℓ^BA + ℓ^D) with ℓ^D = 0.313262: 0.126928 / 0.44019 = 0.288349 (T = 1), 0.5 (T = 2)
    w = [ddb.recipe2_weight(ddb.amplifier_ce(z[:1], y[:1], t), torch.tensor([0.313262])) for t in (1.0, 2.0)]
    assert torch.allclose(torch.cat(w), torch.tensor([0.288349, 0.5]), atol=1e-5)


def test_tempered_recipe2_keeps_weight_on_aligned_samples():
    """The published Recipe II (T = 1) with a confident frozen amplifier gives the aligned samples almost no weight;
    the tempered variant (T = 3) gives them more while the conflicting ones still weigh more."""
    x, y, colour = toy_biased()
    aligned = colour == y.numpy()
    w = {}
    for temp in (1.0, 3.0):
        cfg = ddb.TrainConfig(epochs=2, batch_size=128, hidden=16, depth=1, ba_temperature=temp)
        w[temp] = ddb.fit_reweighted(x, y, 2, cfg, amplifier=ColourAmplifier())[1]["weights"]
    assert w[1.0][aligned].mean() < 0.05
    assert w[3.0][aligned].mean() > 3 * w[1.0][aligned].mean()
    assert w[3.0][~aligned].mean() > 1.5 * w[3.0][aligned].mean()


def test_recipe1_uses_the_papers_aligned_conflicting_groups_by_default():
    """Recipe I's default pseudo bias is the paper's binary one: 1[BA wrong], so 2K groups, not K²."""
    from pipeline.config import DdbParams

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert raw["ddb"]["pseudo_bias"] == "aligned" and DdbParams().pseudo_bias == "aligned"
    pred, y = np.array([3, 1, 2, 0, 9]), np.array([3, 1, 5, 5, 9])
    groups = ddb.pseudo_groups(pred, y, 10, raw["ddb"]["pseudo_bias"])
    assert groups.tolist() == [6, 2, 11, 11, 18] and groups.max() < 2 * 10


def test_gce_gradient_is_q_times_the_gce_gradient():
    """LfF's form CE · q · p_y^q (p_y detached) has gradient q · ∇(1 − p_y^q)/q."""
    logits = torch.randn(5, 3, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 1])
    q = 0.7
    (g1,) = torch.autograd.grad(ddb.gce_loss(logits, y, q).sum(), logits)
    p = torch.softmax(logits, 1).gather(1, y[:, None]).squeeze(1)
    (g2,) = torch.autograd.grad(((1 - p**q) / q).sum(), logits)
    assert torch.allclose(g1, q * g2, atol=1e-6)


def test_loss_ema_and_per_class_normalisation():
    ema = ddb.LossEMA(torch.tensor([0, 0, 1]), alpha=0.7)
    ema.update(torch.tensor([0, 1, 2]), torch.tensor([1.0, 2.0, 4.0]))  # first update sets the value
    assert torch.allclose(ema.value, torch.tensor([1.0, 2.0, 4.0]))
    ema.update(torch.tensor([0]), torch.tensor([3.0]))
    assert torch.isclose(ema.value[0], torch.tensor(0.7 * 1.0 + 0.3 * 3.0))
    assert torch.allclose(ema.normalised(torch.tensor([0, 1, 2])), torch.tensor([1.6 / 2.0, 1.0, 1.0]))


def test_pseudo_groups():
    pred, y = np.array([0, 1, 2, 2]), np.array([0, 0, 2, 1])
    assert ddb.pseudo_groups(pred, y, 3, "aligned").tolist() == [0, 1, 4, 3]
    assert ddb.pseudo_groups(pred, y, 3, "predicted").tolist() == [0, 1, 8, 5]


# ---------------------------------------------------------------- the amplifier never sees a real image


def test_bias_amplifier_trains_on_synthetic_images_only(monkeypatch):
    g = np.random.default_rng(0)
    real = g.integers(0, 256, (50, 4, 4, 3), dtype=np.uint8)
    synthetic = ddb.SyntheticImages(g.integers(0, 256, (30, 4, 4, 3), dtype=np.uint8), np.arange(30) % 3, 3.0)
    seen = {}
    fit = ddb.fit_classifier

    def spy(x, y, *args, **kwargs):
        seen["x"] = x.clone()
        return fit(x, y, *args, **kwargs)

    monkeypatch.setattr(ddb, "fit_classifier", spy)
    ddb.train_bias_amplifier(synthetic, 3, ddb.TrainConfig(epochs=1, hidden=4, depth=1))
    given = seen["x"]
    assert torch.equal(given, ddb.flatten_images(synthetic.images))  # exactly the synthetic set ...
    real_rows = ddb.flatten_images(real)
    assert not (given[:, None, :] == real_rows[None]).all(-1).any()  # ... and no real image
    ddb.assert_no_real_images(synthetic.images, real)
    with pytest.raises(AssertionError, match="1 images"):
        ddb.assert_no_real_images(np.concatenate([synthetic.images, real[3:4]]), real)
    with pytest.raises(TypeError, match="SyntheticImages only"):
        ddb.train_bias_amplifier(real, 3, ddb.TrainConfig(epochs=1))


def test_random_translate_matches_an_explicit_shift():
    """Against a by-hand reference: out[i, j] = x[i − dy, j − dx] inside the image, 0 elsewhere, with the offsets
    the generator draws (top, left ~ U{0..2s}; dy = s − top, dx = s − left)."""
    shape, shift = (5, 4, 3), 2
    x = torch.rand((6, *shape), generator=torch.Generator().manual_seed(1)) + 0.5  # no zeros of its own
    out = ddb.random_translate(x.flatten(1), shape, shift, torch.Generator().manual_seed(0)).view(6, *shape)
    g = torch.Generator().manual_seed(0)
    top, left = torch.randint(0, 2 * shift + 1, (6,), generator=g), torch.randint(0, 2 * shift + 1, (6,), generator=g)
    for b in range(6):
        dy, dx = shift - int(top[b]), shift - int(left[b])
        ref = torch.zeros(shape)
        for i, j in itertools.product(range(shape[0]), range(shape[1])):
            if 0 <= i - dy < shape[0] and 0 <= j - dx < shape[1]:
                ref[i, j] = x[b, i - dy, j - dx]
        assert torch.equal(out[b], ref)
    assert len({(int(a), int(c)) for a, c in zip(top, left, strict=True)}) > 1  # the images move independently


def test_amplifier_shift_translates_its_batches_and_zero_draws_nothing(monkeypatch):
    g = np.random.default_rng(0)
    synthetic = ddb.SyntheticImages(g.integers(0, 256, (30, 4, 5, 3), dtype=np.uint8), np.arange(30) % 3, 1.0)
    calls, translate = [], ddb.random_translate

    def spy(x, shape, shift, gen):
        calls.append((tuple(shape), shift))
        return translate(x, shape, shift, gen)

    monkeypatch.setattr(ddb, "random_translate", spy)
    cfg = ddb.TrainConfig(epochs=2, hidden=4, depth=1, batch_size=16, loss="gce")
    plain = [ddb.train_bias_amplifier(synthetic, 3, cfg) for _ in range(2)]
    assert not calls  # shift 0: no translation and no extra random draw (the published amplifier, bit for bit)
    assert all(torch.equal(a, b) for a, b in zip(plain[0].state_dict().values(), plain[1].state_dict().values(),
                                                  strict=True))
    moved = ddb.train_bias_amplifier(synthetic, 3, ddb.TrainConfig(**{**cfg.__dict__, "shift": 1}))
    assert calls == [((4, 5, 3), 1)] * 4  # every batch of both epochs, at the images' own shape
    assert not torch.equal(moved.head.weight, plain[0].head.weight)
    with pytest.raises(ValueError, match="image_shape"):
        ddb.fit_classifier(ddb.flatten_images(synthetic.images), torch.from_numpy(synthetic.classes), 3,
                           ddb.TrainConfig(epochs=1, shift=1))


def test_load_synthetic_refuses_other_sets(tmp_path):
    from pipeline.io import save_npz

    imgs = np.zeros((2, 4, 4, 3), np.uint8)
    save_npz(tmp_path / "s.npz", images=imgs, classes=np.array([0, 1]), guidance_scale=np.float64(3.0),
             origin=np.array("synthetic"))
    s = ddb.load_synthetic(tmp_path / "s.npz")
    assert s.guidance_scale == 3.0 and s.classes.tolist() == [0, 1]
    save_npz(tmp_path / "r.npz", images=imgs, classes=np.array([0, 1]), guidance_scale=np.float64(3.0),
             origin=np.array("real"))
    with pytest.raises(UserError, match="not a synthetic sample set"):
        ddb.load_synthetic(tmp_path / "r.npz")
    save_npz(tmp_path / "p.npz", images=imgs)
    with pytest.raises(UserError, match="missing"):
        ddb.load_synthetic(tmp_path / "p.npz")


# ---------------------------------------------------------------- metrics


def test_group_accuracy_on_known_values():
    # classes 0, 1; bias 0, 1; aligned: b = y. Cells: (0,0) 2/2, (0,1) 0/1, (1,0) 1/2, (1,1) 3/3
    y = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    b = np.array([0, 0, 1, 0, 0, 1, 1, 1])
    pred = np.array([0, 0, 1, 1, 0, 1, 1, 1])
    m = ddb.group_accuracy(pred, y, b, np.array([0, 1]))
    assert m["unbiased_accuracy"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert m["worst_group_accuracy"] == 0.0
    assert m["conflicting_accuracy"] == pytest.approx(1 / 3)  # (0,1): 0/1, (1,0): 1/2
    assert m["aligned_accuracy"] == pytest.approx(5 / 5)
    assert m["accuracy"] == pytest.approx(6 / 8)
    # an empty cell (class 0 never has b = 1 here) is skipped, not counted as 0 or NaN
    keep = ~((y == 0) & (b == 1))
    m = ddb.group_accuracy(pred[keep], y[keep], b[keep], np.array([0, 1]))
    assert m["unbiased_accuracy"] == pytest.approx((1 + 0.5 + 1) / 3) and m["worst_group_accuracy"] == 0.5


def test_summarise_mean_and_std():
    rows = [{"bias_ratio": 0.99, "method": "erm", "unbiased_accuracy": v, "worst_group_accuracy": 0.0,
             "conflicting_accuracy": 0.1, "aligned_accuracy": 1.0} for v in (0.5, 0.6, 0.7)]
    (row,) = ddb.summarise(rows)
    assert row["n_seeds"] == 3 and row["unbiased_accuracy"] == pytest.approx(0.6)
    assert row["unbiased_accuracy_std"] == pytest.approx(0.1)


def test_classifier_round_trip(tmp_path):
    m = ddb.MLP(12, 3, hidden=5, depth=2)
    ddb.save_classifier(m, tmp_path / "m.safetensors")
    back = ddb.load_classifier(tmp_path / "m.safetensors")
    x = torch.randn(4, 12)
    assert torch.equal(m.eval()(x), back(x))
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    with pytest.raises(UserError, match="not a valid classifier"):
        ddb.load_classifier(tmp_path / "bad.safetensors")


# ---------------------------------------------------------------- params


@pytest.mark.parametrize("key,value,expected", [
    ("guidance_scale", -1.0, "ddb.guidance_scale"), ("pseudo_bias", "colour", "ddb.pseudo_bias"),
    ("epochs", 0, "ddb.epochs"), ("ema", 1.0, "ddb.ema"), ("gce_q", 0.0, "ddb.gce_q"), ("nope", 1, "ddb.nope"),
    ("amplifier_shift", -1, "ddb.amplifier_shift"),
])
def test_bad_params_are_one_line_user_errors(key, value, expected):
    raw = tiny_params()
    raw["ddb"][key] = value
    with pytest.raises(UserError) as err:
        parse_params(raw)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_unknown_method_exits_with_one_line(capsys):
    from stages.debias_classifier import main

    with pytest.raises(SystemExit) as exc:
        main(["--method", "nope"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --method 'nope'") and "\n" not in err
