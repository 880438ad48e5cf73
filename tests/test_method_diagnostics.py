"""benchmarks/method_diagnostics.py: the stroke chromaticity its amplifier diagnostic compares, on known images, and
its written-out DDIM loop (the asymmetric-step experiment) against the sampler's own step."""

import json

import numpy as np
import torch
import yaml

from benchmarks.method_diagnostics import guided_samples, percentile_among, stroke_chromaticity, stroke_typicality
from pipeline.diffusion import build_unet, make_noise_scheduler
from pipeline.pretrained import DiffusionModel
from pipeline.sampling import SamplerHooks, SamplerSettings, sample, sample_seeds


def test_stroke_chromaticity_is_the_stroke_colour_over_its_brightness():
    img = np.zeros((2, 8, 8, 3), np.uint8)
    img[0, 2:6, 3] = (200, 100, 50)  # a stroke, brightness 200
    img[1, 2:6, 3] = (100, 50, 25)  # the same colour at half the intensity
    img[1, 0, 0] = (10, 40, 10)  # a faint pixel below 0.6 × the brightest: not stroke
    np.testing.assert_allclose(stroke_chromaticity(img), [[1.0, 0.5, 0.25], [1.0, 0.5, 0.25]], atol=1e-9)


def test_stroke_typicality_by_hand():
    """Class 0's synthetic images stroke pixel (0, 0) always and (0, 1) half the time; class 1's pixel (1, 1)."""
    synthetic = np.zeros((4, 2, 2, 3), np.uint8)
    synthetic[:2, 0, 0] = 200
    synthetic[0, 0, 1] = 200
    synthetic[2:, 1, 1] = 255
    images = np.zeros((4, 2, 2, 3), np.uint8)
    images[0, 0, 0] = 100                      # class 0, where every class-0 image strokes: 1
    images[1, 0, 1, 2] = 255                   # class 0, where half do: 0.5
    images[2, 0, 0] = 255
    images[2, 1, 1] = 255                      # class 0, half its brightness where none does: 0.5
    images[3, 0, 0] = 255                      # class 1, where no class-1 image strokes: 0
    got = stroke_typicality(images, np.array([0, 0, 0, 1]), synthetic, np.array([0, 0, 1, 1]))
    np.testing.assert_allclose(got, [1.0, 0.5, 0.5, 0.0])
    np.testing.assert_allclose(percentile_among(np.array([0.0, 0.5, 2.0]), np.array([0.1, 0.5, 0.7, 1.0])),
                               [0.0, 25.0, 100.0])


def test_stroke_chromaticity_spread_tracks_colour_noise():
    rng = np.random.default_rng(0)
    base = np.array([200.0, 100.0, 50.0])
    def images(noise):
        out = np.zeros((200, 8, 8, 3), np.uint8)
        out[:, 2:6, 3] = np.clip(base + rng.normal(0, noise, (200, 1, 3)), 0, 255).round().astype(np.uint8)
        return out
    assert stroke_chromaticity(images(12.0)).std(0).sum() > 3 * stroke_chromaticity(images(2.0)).std(0).sum()


class _Shift(SamplerHooks):
    """Adds `delta` to h at step indices in [1, 3): an edit for the written-out loop to carry or not."""

    h_module = "mid_block"

    def __init__(self, delta: float):
        self.delta = delta

    def active(self, ctx) -> bool:
        return 1 <= ctx.step_index < 3

    def mid_block(self, h, ctx):
        return h + self.delta if self.active(ctx) else h


def _tiny_model():
    torch.manual_seed(0)
    unet = build_unet(resolution=8, num_classes=10, block_out_channels=[8, 16], layers_per_block=1,
                      attention=False).eval()
    return DiffusionModel(unet=unet, scheduler_config=dict(make_noise_scheduler(1000, "squaredcos_cap_v2",
                                                                                 "v_prediction").config))


def test_written_out_ddim_loop_is_the_samplers_step():
    model, cond, seeds = _tiny_model(), np.arange(6) % 10, sample_seeds(3, 6)
    settings = SamplerSettings(num_inference_steps=5, batch_size=6, scheduler="ddim")
    for delta in (0.0, 0.5):  # unguided, and with the edit applied symmetrically as the sampler applies it
        ours = guided_samples(model, _Shift(delta), cond, seeds, settings, asymmetric=False, group=6)
        ref = sample(model, cond, seeds, settings, hooks=_Shift(delta), progress=False)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    # asymmetric with an identity edit is the symmetric step; with a real edit it differs from both
    same = guided_samples(model, _Shift(0.0), cond, seeds, settings, asymmetric=True, group=6)
    torch.testing.assert_close(same, sample(model, cond, seeds, settings, progress=False), atol=1e-5, rtol=0)
    asym = guided_samples(model, _Shift(0.5), cond, seeds, settings, asymmetric=True, group=6)
    sym = guided_samples(model, _Shift(0.5), cond, seeds, settings, asymmetric=False, group=6)
    plain = sample(model, cond, seeds, settings, progress=False)
    assert (asym - sym).abs().max() > 1e-3 and (asym - plain).abs().max() > 1e-3
    assert not model.unet.get_submodule("mid_block")._forward_hooks  # the loop removes its hook


def test_knob_validation_scores_a_registry_sweep_on_validation_seeds(tiny_dag, monkeypatch):
    """Any method's sweep grid through the registry, on the `knob_validation` seed stream: the knob-at-0 point is
    the reference of every ratio, the choice obeys the rule, and the working directory is given back."""
    import os

    from benchmarks.method_diagnostics import knob_validation

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    here = os.getcwd()
    out = knob_validation(tiny_dag.path / "data", tiny_dag.path / "params.yaml", "latentdir",
                          {"sweep_weights": [0.2, 0.6]}, per_class=2)
    assert os.getcwd() == here
    rows = out["rows"]
    assert rows[0]["weight"] == 0 and rows[0]["fid_ratio"] == 1 and rows[0]["fidelity_ratio"] == 1
    assert "bias_removed" not in rows[0] and all("bias_removed" in r for r in rows[1:])
    assert sorted({r["weight"] for r in rows[1:]}) == [0.2, 0.6] and out["samples"] == 2 * 10  # 2 per class
    ok = [r for r in rows[1:] if r["fid_ratio"] <= 1.5 and r["fidelity_ratio"] >= 0.9]
    if ok:
        assert out["chosen"]["bias_removed"] == max(r["bias_removed"] for r in ok)
    else:
        assert out["chosen"] is None


def test_paired_difference_by_hand():
    from benchmarks.invdiff_steps import paired_difference

    cond = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    a = np.array([1, 1, 0, 1, 1, 0, 0, 1])
    b = np.array([1, 0, 0, 1, 1, 0, 1, 1])
    out = paired_difference(a, b, cond, seed=0)
    assert out["difference"] == 0.0 and out["only_a"] == 1 and out["only_b"] == 1
    lo, hi = out["ci95"]
    assert -0.5 <= lo < 0 < hi <= 0.5
    same = paired_difference(a, a, cond, seed=0)  # identical outcomes: no spread at all, however resampled
    assert same["difference"] == 0.0 and same["ci95"] == [0.0, 0.0]
    shifted = paired_difference(np.ones(8), np.zeros(8), cond, seed=0)
    assert shifted["difference"] == 1.0 and shifted["ci95"] == [1.0, 1.0]


def test_invdiff_steps_trains_cheaper_settings_and_pairs_them_with_the_default(tiny_dag, tmp_path, monkeypatch):
    """A shorter δ, and δs on groups from fewer loss draws, trained by the stages themselves beside the built
    project's δ (read, not trained again), all sampled on the validation seeds and paired; a grouper setting leaves
    the oracle (which reads no inferred groups) out."""
    from benchmarks.invdiff_steps import run
    from tests.dag import copy_project

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    project = copy_project(tiny_dag.path, tmp_path / "p")
    invdiff = yaml.safe_load((project / "params.yaml").read_text())["invdiff"]
    steps, draws = invdiff["steps"] // 2, invdiff["loss_draws"] - 1
    out = run(project / "data", [steps], ["invdiff", "invdiff_oracle"], tmp_path / "work", per_class=2, jobs=1,
              warmup_share=None, loss_draws=[draws])
    work = tmp_path / "work"
    assert json.loads((work / f"steps_{steps}/data/methods/invdiff/summary.json").read_text())["steps"] == steps
    grouped = np.load(work / f"loss_draws_{draws}/data/methods/invdiff_groups/groups.npz")
    assert grouped["losses"].shape[1] == draws and not (work / f"steps_{steps}/fit_grouper.json").exists()
    assert [(r["variant"], r["setting"], r["finetune_cpu_s"] is None) for r in out["rows"]] == [
        ("invdiff", "default", True), ("invdiff", f"steps={steps}", False), ("invdiff", f"loss_draws={draws}", False),
        ("invdiff_oracle", "default", True), ("invdiff_oracle", f"steps={steps}", False)]
    assert sorted((p["variant"], p["setting"]) for p in out["paired_to_default"]) == [
        ("invdiff", f"loss_draws={draws}"), ("invdiff", f"steps={steps}"), ("invdiff_oracle", f"steps={steps}")]
    for pair in out["paired_to_default"]:
        for key in ("aligned_fraction", "fidelity"):
            lo, hi = pair[key]["ci95"]
            assert -1 <= lo <= hi <= 1
    assert out["samples"] == 20 and all("bias_removed" in r for r in out["rows"])
