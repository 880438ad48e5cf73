"""pipeline/diffusion.py: training targets, tiny training runs, checkpoint resume and model loading."""

import json
import math
import shutil

import pytest
import torch

from pipeline.checkpoints import config_fingerprint, latest_checkpoint
from pipeline.config import Params
from pipeline.diffusion import load_diffusion, make_noise_scheduler, train_diffusion, training_target
from pipeline.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------- targets

def _noised(kind):
    sched = make_noise_scheduler(1000, "squaredcos_cap_v2", kind)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    return sched, x0, noise, t


def test_training_target_epsilon_is_noise():
    sched, x0, noise, t = _noised("epsilon")
    assert torch.equal(training_target(sched, x0, noise, t), noise)


def test_training_target_sample_is_x0():
    sched, x0, noise, t = _noised("sample")
    assert torch.equal(training_target(sched, x0, noise, t), x0)


def test_training_target_v_prediction_by_hand():
    """v = √ᾱ_t ε − √(1−ᾱ_t) x_0 with ᾱ from scheduler.alphas_cumprod."""
    sched, x0, noise, t = _noised("v_prediction")
    acp = sched.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    v = acp.sqrt() * noise.double() - (1 - acp).sqrt() * x0.double()
    torch.testing.assert_close(training_target(sched, x0, noise, t).double(), v, atol=1e-6, rtol=0)
    # and x_t = √ᾱ x0 + √(1−ᾱ) ε is what add_noise computes, so (x_t, v) recover x0 = √ᾱ x_t − √(1−ᾱ) v
    x_t = sched.add_noise(x0, noise, t).double()
    torch.testing.assert_close(acp.sqrt() * x_t - (1 - acp).sqrt() * v, x0.double(), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------- training

def tiny_cfg(**over) -> dict:
    """The real diffusion params, shrunk."""
    cfg = Params().diffusion.model_dump()
    cfg.update(block_out_channels=[16, 32], train_steps=6, batch_size=8, checkpoint_every=3, warmup_steps=1)
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module")
def toy_data():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(64, 3, 16, 16, generator=g) * 2 - 1
    classes = torch.arange(64) % 10
    return images, classes


def train(toy_data, out_dir, ckpt_dir, log=None, **over):
    images, classes = toy_data
    return train_diffusion(images, classes, num_classes=10, cfg=tiny_cfg(**over), seed=0, out_dir=out_dir,
                           ckpt_dir=ckpt_dir, log=log)


@pytest.fixture(scope="module")
def run_a(toy_data, tmp_path_factory):
    """An uninterrupted 6-step run with checkpoints every 3 steps."""
    root = tmp_path_factory.mktemp("run_a")
    logged = []
    images, classes = toy_data
    result = train_diffusion(images, classes, num_classes=10, cfg=tiny_cfg(), seed=0, out_dir=root / "model",
                             ckpt_dir=root / "ckpt", log=lambda step, m: logged.append((step, m)))
    return result, root, logged


def _weights(model_dir):
    from safetensors.torch import load_file

    return load_file(str(model_dir / "unet" / "diffusion_pytorch_model.safetensors"))


def test_train_writes_model_and_checkpoint(run_a):
    result, root, logged = run_a
    assert (root / "model" / "unet" / "config.json").is_file()
    assert (root / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (root / "model" / "scheduler" / "scheduler_config.json").is_file()
    ckpt = root / "ckpt" / "step-0000003"
    files = {"model.safetensors", "ema.safetensors", "state.safetensors", "state.json", "meta.json"}  # no pickle
    assert {p.name for p in ckpt.iterdir()} == files
    assert sorted(p.name for p in (root / "ckpt").iterdir()) == ["step-0000003"]  # none at the final step
    assert result.steps == 6 and result.resumed_from == 0 and result.num_params > 0
    assert math.isfinite(result.final_loss) and result.losses == [(6, result.final_loss)]
    assert logged == [(6, {"train_loss": result.final_loss})]
    assert not [p for p in root.rglob(".*")]  # no temp leftovers


def test_trained_model_loads_and_matches_config(run_a):
    _, root, _ = run_a
    unet, sched_cfg = load_diffusion(root / "model")
    assert not unet.training
    assert unet.config.sample_size == 16 and list(unet.config.block_out_channels) == [16, 32]
    assert unet.config.num_class_embeds == 11
    assert sched_cfg["prediction_type"] == "v_prediction" and sched_cfg["beta_schedule"] == "squaredcos_cap_v2"
    assert sched_cfg["num_train_timesteps"] == 1000


def test_resume_matches_uninterrupted_run(run_a, toy_data, tmp_path):
    """Resuming from run A's step-3 checkpoint reproduces run A's final EMA weights bit for bit (the README's
    "exactly"), and its loss records and logged metrics exactly: the record at step 6 averages steps 1-6, the
    three before the kill coming from the checkpoint."""
    result_a, root, logged_a = run_a
    shutil.copytree(root / "ckpt" / "step-0000003", tmp_path / "ckpt" / "step-0000003")
    logged_b = []
    result_b = train(toy_data, tmp_path / "model", tmp_path / "ckpt", log=lambda step, m: logged_b.append((step, m)))
    assert result_b.resumed_from == 3 and result_b.steps == 6
    wa, wb = _weights(root / "model"), _weights(tmp_path / "model")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wb[k], wa[k]), k
    assert result_b.final_loss == result_a.final_loss and result_b.losses == result_a.losses
    assert logged_b == logged_a


def test_checkpoint_with_other_config_not_resumed(run_a, toy_data, tmp_path):
    _, root, _ = run_a
    shutil.copytree(root / "ckpt" / "step-0000003", tmp_path / "ckpt" / "step-0000003")
    result = train(toy_data, tmp_path / "model", tmp_path / "ckpt", lr=5e-4, train_steps=1)
    assert result.resumed_from == 0 and result.steps == 1
    # a different seed is another config too; training length and cadence are not
    assert config_fingerprint({**tiny_cfg(), "seed": 0}) != config_fingerprint({**tiny_cfg(), "seed": 1})
    assert config_fingerprint(tiny_cfg()) == config_fingerprint(tiny_cfg(train_steps=99, checkpoint_every=7))


def test_corrupt_checkpoint_raises_user_error_naming_it(run_a, toy_data, tmp_path):
    _, root, _ = run_a
    ckpt = tmp_path / "ckpt" / "step-0000003"
    shutil.copytree(root / "ckpt" / "step-0000003", ckpt)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UserError) as exc:
        train(toy_data, tmp_path / "model", tmp_path / "ckpt", train_steps=4)
    assert str(ckpt) in str(exc.value) and "\n" not in str(exc.value)
    assert not (tmp_path / "model").exists()


def test_checkpoint_past_train_steps_not_resumed(run_a, toy_data, tmp_path):
    """Lowering diffusion.train_steps below a persisted checkpoint must not ship the longer run's model
    (today: resumed_from=3 > steps=2, no step runs, final_loss is NaN)."""
    _, root, _ = run_a
    shutil.copytree(root / "ckpt" / "step-0000003", tmp_path / "ckpt" / "step-0000003")
    result = train(toy_data, tmp_path / "model", tmp_path / "ckpt", train_steps=2)
    assert result.resumed_from < result.steps
    assert math.isfinite(result.final_loss)


# ---------------------------------------------------------------------------------------------------- loading

def test_load_diffusion_missing_dir(tmp_path):
    with pytest.raises(UserError) as exc:
        load_diffusion(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(exc.value)


def test_load_diffusion_truncated_weights(run_a, tmp_path):
    _, root, _ = run_a
    shutil.copytree(root / "model", tmp_path / "model")
    weights = tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UserError) as exc:
        load_diffusion(tmp_path / "model")
    assert str(tmp_path / "model" / "unet") in str(exc.value) and "\n" not in str(exc.value)


def test_load_diffusion_missing_scheduler(run_a, tmp_path):
    _, root, _ = run_a
    shutil.copytree(root / "model" / "unet", tmp_path / "model" / "unet")
    with pytest.raises(UserError, match="scheduler"):
        load_diffusion(tmp_path / "model")


def test_load_diffusion_corrupt_scheduler_config_names_it(run_a, tmp_path):
    _, root, _ = run_a
    shutil.copytree(root / "model", tmp_path / "model")
    cfg = tmp_path / "model" / "scheduler" / "scheduler_config.json"
    cfg.write_text("{bad")
    with pytest.raises(UserError) as exc:
        load_diffusion(tmp_path / "model")
    assert "scheduler" in str(exc.value)


# ---------------------------------------------------------------------------------------------------- checkpoints

def _fake_ckpt(ckpt_dir, name, fingerprint, step=1):
    d = ckpt_dir / name
    d.mkdir(parents=True)
    if fingerprint is not None:
        (d / "meta.json").write_text(json.dumps({"step": step, "fingerprint": fingerprint}))
    return d


def test_latest_checkpoint_skips_temp_foreign_and_incomplete(tmp_path):
    ckpt = tmp_path / "ckpt"
    assert latest_checkpoint(ckpt, "abc") is None  # no directory
    good = _fake_ckpt(ckpt, "step-0000003", "abc", 3)
    _fake_ckpt(ckpt, ".step-0000009.tmp-123", "abc", 9)  # a killed writer's temp dir
    _fake_ckpt(ckpt, ".step-0000008.old-123", "abc", 8)
    _fake_ckpt(ckpt, "step-0000007", "other", 7)  # another config
    _fake_ckpt(ckpt, "step-0000006", None)  # no meta.json: incomplete
    (ckpt / "step-0000005").mkdir()
    (ckpt / "step-0000005" / "meta.json").write_text("{not json")
    assert latest_checkpoint(ckpt, "abc") == good
    newer = _fake_ckpt(ckpt, "step-0000004", "abc", 4)
    assert latest_checkpoint(ckpt, "abc") == newer
    assert latest_checkpoint(ckpt, "zzz") is None


def test_nan_loss_stops_training_naming_the_step_and_writes_no_model(toy_data, tmp_path):
    """A NaN in the data makes the first loss NaN: a one-line UserError naming the stage and step, no model."""
    images, classes = toy_data
    bad = images.clone()
    bad[:] = float("nan")
    with pytest.raises(UserError, match=r"^train_diffusion: loss became nan at step 0; lower diffusion.lr$"):
        train_diffusion(bad, classes, num_classes=10, cfg=tiny_cfg(), seed=0, out_dir=tmp_path / "model",
                        ckpt_dir=tmp_path / "ckpt")
    assert not (tmp_path / "model").exists() and not list((tmp_path / "ckpt").iterdir())


def test_foreach_optimiser_and_ema_equal_the_per_parameter_ones_bit_for_bit():
    """The training loop's AdamW and EMA run as foreach ops for speed (benchmarks/throughput.py); every published
    figure was made with the per-parameter implementations, so the two must agree to the last bit."""
    from diffusers.training_utils import EMAModel

    from pipeline.diffusion import adamw, build_unet, foreach_ema
    from pipeline.methods.invdiff import ema_update

    torch.manual_seed(0)
    ours = build_unet(resolution=8, num_classes=3, block_out_channels=[8, 16], layers_per_block=1, attention=True)
    ref = build_unet(resolution=8, num_classes=3, block_out_channels=[8, 16], layers_per_block=1, attention=True)
    ref.load_state_dict(ours.state_dict())
    ours.conv_in.bias.requires_grad_(False)  # EMAModel copies a frozen parameter instead of averaging it
    ref.conv_in.bias.requires_grad_(False)
    opt_a = adamw([p for p in ours.parameters() if p.requires_grad], 1e-2)
    opt_b = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0,
                              foreach=False)
    ema_a = foreach_ema(ours.parameters(), decay=0.9, use_ema_warmup=True)
    ema_b = EMAModel(ref.parameters(), decay=0.9, use_ema_warmup=True)
    lerp_a = [p.detach().clone() for p in ours.parameters()]
    lerp_b = [p.detach().clone() for p in ref.parameters()]
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        opt_a.step()
        opt_b.step()
        ema_a.step(ours.parameters())
        ema_b.step(ref.parameters())
        ema_update(lerp_a, ours.parameters(), 0.7)
        for e, p in zip(lerp_b, ref.parameters(), strict=True):  # ema_update's per-parameter form
            e.lerp_(p.detach().float(), 1.0 - 0.7)
    assert any(not torch.equal(a, b) for a, b in zip(ema_a.shadow_params, ours.parameters(), strict=True))
    for name, a, b in zip(["params", "ema", "lerp"], [list(ours.parameters()), ema_a.shadow_params, lerp_a],
                          [list(ref.parameters()), ema_b.shadow_params, lerp_b], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), name
