"""benchmarks/throughput.py at its --quick size: it runs, writes valid JSON, and its peer DDIM loop (plain diffusers)
gives bit for bit our sampler's images, so the side-by-side timing compares the same work."""

import json
import math
import statistics
import time

import numpy as np
import pytest
import torch

from benchmarks.throughput import interleaved, peer_ddim, round_order, run
from pipeline.diffusion import build_unet, make_noise_scheduler, null_class
from pipeline.pretrained import DiffusionModel
from pipeline.sampling import SamplerSettings, make_scheduler, sample, sample_seeds


def test_peer_ddim_loop_matches_our_sampler(one_thread):
    torch.manual_seed(0)
    unet = build_unet(resolution=8, num_classes=10, block_out_channels=[8, 16], layers_per_block=1,
                      attention=False).eval()
    cfg = dict(make_noise_scheduler(1000, "squaredcos_cap_v2", "v_prediction").config)
    cond, seeds = np.arange(5) % 10, sample_seeds(7, 5)
    for w in (1.0, 2.5):  # guidance > 1: the peer's own batch doubling and combination
        ours = sample(DiffusionModel(unet=unet, scheduler_config=cfg), cond, seeds,
                      SamplerSettings(num_inference_steps=4, guidance_scale=w, batch_size=len(cond), scheduler="ddim"),
                      progress=False)
        peer = peer_ddim(unet, make_scheduler(cfg, "ddim"), cond, seeds, steps=4, guidance_scale=w,
                         null=null_class(unet))
        assert torch.equal(ours, peer), w


def test_quick_run_writes_valid_json(tmp_path, one_thread):
    out = tmp_path / "throughput.json"
    run(quick=True, reps=1, out=out, log=lambda *a: None)
    result = json.loads(out.read_text())
    assert result["quick"] and result["machine"]["torch_threads"] == 1
    assert result["ours_vs_peer_max_abs_diff"] == {"w1": 0.0, "w3": 0.0}
    for name, ratio in result["ratios"].items():
        assert math.isfinite(ratio) and ratio > 0, name
        lo, hi = result["ratio_ci95"][name]
        assert 0 < lo <= hi, name
    assert set(result["rates"]["sample"]) == {"ours_w1", "peer_w1", "ours_w3", "peer_w3", "baseline", "invdiff",
                                              "distguide", "baseline_8", "invdiff_8", "ours_w1_fp32", "ours_w1_bf16"}
    assert 0 < result["bf16_vs_fp32_max_abs_diff"] < 0.5  # bf16 changes the last bits, not the image


def test_invdiff_cost_times_each_delta_width_against_the_plain_sampler(tmp_path, one_thread):
    from benchmarks.invdiff_cost import main

    out = tmp_path / "invdiff_cost.json"
    main(["--widths", "0.45", "0.25", "--batches", "3", "--repeats", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    # the widths are make_delta's on the default U-Net (32/64/64 channels, 8 GroupNorm groups)
    assert result["deltas"]["0.45"]["channels"] == [12, 28, 28]
    assert result["deltas"]["0.25"]["channels"] == [8, 16, 16]
    assert 0.18 < result["deltas"]["0.45"]["param_share"] < 0.19 and result["deltas"]["0.25"]["param_share"] < 0.07
    ratios = result["by_batch"]["3"]["time_over_baseline"]
    assert set(ratios) == {"invdiff_w0.45", "invdiff_w0.25"}
    assert all(math.isfinite(r) and r > 0 for r in ratios.values())


def test_every_arm_runs_in_every_position_equally_often():
    # plain ABBA with three arms put the middle arm (the peer) in the middle of every round
    for k in (2, 3, 4):
        names = [f"arm{i}" for i in range(k)]
        orders = [round_order(names, r) for r in range(2 * k)]
        assert all(sorted(o) == names for o in orders)
        for name in names:
            assert sorted(o.index(name) for o in orders) == sorted(list(range(k)) * 2), (k, name)
    assert [round_order(["a", "b"], r) for r in range(4)] == [["a", "b"], ["b", "a"], ["b", "a"], ["a", "b"]]
    calls = []

    def arm(name):
        def fn():  # runs until the process clock moves, so the arm's rate has a non-zero time
            calls.append(name)
            t = time.process_time()
            while time.process_time() == t:
                pass
            return 1
        return fn

    interleaved({n: arm(n) for n in "abc"}, reps=6)
    assert calls[3:] == [x for r in range(6) for x in round_order(list("abc"), r)]  # after one warm-up call each


def test_cpu_levers_times_each_lever_against_eager_on_the_same_work(tmp_path, one_thread):
    """benchmarks/cpu_levers.py --quick without torch.compile (its compilation alone takes minutes): every arm gets
    a rate per repeat for both kinds of work, and the ratios are those rates' medians over eager's."""
    from benchmarks.cpu_levers import run as levers

    out = tmp_path / "levers.json"
    result = levers(quick=True, arms=["eager", "channels_last"], reps=2, out=out, log=lambda *a: None)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    for what in ("train", "forward"):
        rates = result["rates"][what]
        assert set(rates) == {"eager", "channels_last"} and all(len(v) == 2 and min(v) > 0 for v in rates.values())
        ratio = result["speedup_over_eager"][f"{what}_channels_last_over_eager"]
        assert ratio == pytest.approx(statistics.median(rates["channels_last"]) / statistics.median(rates["eager"]))
    assert result["compile_break_even_calls"] == {}


def test_ratio_interval_resamples_rounds_whole():
    from benchmarks.throughput import ratio_interval

    # a constant ratio in every round: every resample gives it exactly, however slow the round
    assert ratio_interval([2.0, 4.0, 8.0], [1.0, 2.0, 4.0], seed=0) == [2.0, 2.0]
    lo, hi = ratio_interval([1.0, 1.1, 0.9, 1.05, 0.95] * 4, [1.0] * 20, seed=0)
    assert 0.9 <= lo < 1.0 < hi <= 1.1
