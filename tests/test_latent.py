"""Pre-trained diffusers models and latent diffusion (pipeline/pretrained.py, pipeline/conditioning.py): a tiny
randomly initialised latent pipeline built and saved by the test (Stable Diffusion's layout, no download), the
sampler with it and every hook type, clear errors for bad directories, and the chain train → sample → score on it
(in-process by default: DVC's wiring of these stages is the pixel DAG's, tests/test_dag.py; every method through
`dvc repro` is the `slow` twin)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pipeline.conditioning import Conditioning, call_unet, encode_prompts, fill_template
from pipeline.errors import UserError
from pipeline.pretrained import DiffusionModel, adopt_pretrained, encode_latents, load_model, load_pretrained
from pipeline.sampling import SamplerHooks, SamplerSettings, make_scheduler, sample, sample_seeds
from tests.dag import dvc, make_project
from tests.latent import MAX_LENGTH, save_tiny_pipeline, write_red_sign_judge
from tests.realdata import folder_rows, write_folder

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ("cat", "dog")
TEMPLATE = "a photo of a {class}"


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("pretrained") / "tiny-sd")


@pytest.fixture(scope="module")
def adopted(pipe_dir):
    return adopt_pretrained(pipe_dir, class_names=CLASSES, prompt_template=TEMPLATE, resolution=16)


@pytest.fixture(scope="module")
def sched_cfg(adopted):
    return adopted.scheduler_config


def one_line(exc_info, *needles):
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)


# ------------------------------------------------------------------------------------------------ prompts, VAE

def test_prompts_are_encoded_once_per_class_plus_the_empty_prompt(pipe_dir, adopted):
    pre = load_pretrained(pipe_dir)
    assert fill_template(TEMPLATE, CLASSES) == ["a photo of a cat", "a photo of a dog"]
    table = adopted.conditioning.prompt_embeds
    assert table.shape == (3, MAX_LENGTH, pre.text_encoder.config.hidden_size) and table.dtype == torch.float32
    assert adopted.prompts == ("a photo of a cat", "a photo of a dog")
    again = encode_prompts(pre.tokenizer, pre.text_encoder, ["a photo of a dog"])
    assert torch.allclose(again[0], table[1], atol=1e-6)  # row y = class y's prompt
    assert torch.allclose(again[1], table[2], atol=1e-6)  # last row = the empty prompt (the null class)
    assert not torch.allclose(table[0], table[1])
    with pytest.raises(UserError) as exc:
        fill_template("a photo", CLASSES)
    one_line(exc, "{class}")


def test_conditioning_gives_text_states_by_class_index(adopted):
    table = adopted.conditioning.prompt_embeds
    labels = torch.tensor([1, 2, 0])
    kwargs = adopted.conditioning.with_labels(labels).unet_kwargs()
    assert list(kwargs) == ["encoder_hidden_states"] and torch.equal(kwargs["encoder_hidden_states"], table[labels])
    assert Conditioning().with_labels(labels).unet_kwargs().keys() == {"class_labels"}
    picked = Conditioning(class_labels=labels, prompt_embeds=table).select(torch.tensor([0, 2]))
    assert torch.equal(picked.unet_kwargs()["encoder_hidden_states"], table[[1, 0]])


def model_of(adopted, unet=None) -> DiffusionModel:
    """The adopted pipeline as the model later stages load (pipeline.pretrained.load_model)."""
    return DiffusionModel(unet or adopted.unet, adopted.scheduler_config, vae=adopted.vae,
                          prompt_embeds=adopted.conditioning.prompt_embeds)


def test_latent_round_trip_shapes(adopted):
    images = torch.rand(5, 3, 16, 16) * 2 - 1
    model = model_of(adopted)
    z = model.encode(images, batch_size=2)
    assert z.shape == (5, 4, 8, 8) and z.dtype == torch.float32
    whole = model.encode(images)  # one batch
    assert torch.equal(model.to_model_space(images), whole) and torch.equal(adopted.to_model_space(images), whole)
    scale = adopted.vae.config.scaling_factor
    assert torch.allclose(z, adopted.vae.encode(images).latent_dist.mean * scale, atol=1e-5)
    x = model.decode(z)
    assert x.shape == (5, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert torch.allclose(x, adopted.vae.decode(z / scale).sample.clamp(-1, 1), atol=1e-5)


def test_call_unet_refuses_a_text_unet_without_text(adopted):
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 10])
    assert call_unet(adopted.unet, x, t, adopted.conditioning.with_labels(torch.tensor([0, 2]))).shape == x.shape
    with pytest.raises(UserError) as exc:
        call_unet(adopted.unet, x, t, Conditioning(class_labels=torch.tensor([0, 1])))
    one_line(exc, "prompt_template")


# ------------------------------------------------------------------------------------------------ the sampler

def run(adopted, sched_cfg, hooks=None, n=4, **kw):
    cond = np.arange(n) % 2
    settings = SamplerSettings(num_inference_steps=3, batch_size=kw.pop("batch_size", n), **kw)
    return sample(model_of(adopted), cond, sample_seeds(3, n), settings, hooks=hooks, progress=False)


class Spy(SamplerHooks):
    """Every hook type: sees latents; the initial noise and h are edited, the model output scaled."""

    h_module = "up_blocks.0"

    def __init__(self, edit: bool):
        self.edit, self.seen = edit, {"initial": [], "h": [], "out": [], "kwargs": []}

    def initial_noise(self, z, ctx):
        self.seen["initial"].append(tuple(z.shape))
        return z + 0.5 if self.edit else z

    def mid_block(self, h, ctx):
        self.seen["h"].append(tuple(h.shape))
        return h * 1.1 if self.edit else h

    def model_output(self, out, x_t, ctx):
        self.seen["out"].append((tuple(out.shape), tuple(x_t.shape), ctx.labels.tolist()))
        self.seen["kwargs"].append(ctx.unet_kwargs["encoder_hidden_states"].shape)
        return out * 0.9 if self.edit else out


def test_latent_sampler_decodes_and_each_hook_sees_latents(adopted, sched_cfg):
    base = run(adopted, sched_cfg)
    assert base.shape == (4, 3, 16, 16) and base.min() >= -1 and base.max() <= 1
    torch.testing.assert_close(run(adopted, sched_cfg, batch_size=3), base, atol=1e-5, rtol=1e-4)  # per-sample seeds
    identity = Spy(edit=False)
    assert torch.equal(run(adopted, sched_cfg, identity), base)
    assert identity.seen["initial"] == [(4, 4, 8, 8)]
    assert len(identity.seen["h"]) == 3 and identity.seen["h"][0][0] == 4
    assert identity.seen["out"][0] == ((4, 4, 8, 8), (4, 4, 8, 8), [0, 1, 0, 1])
    assert identity.seen["kwargs"][0] == (4, MAX_LENGTH, 32)
    for name in ("initial_noise", "mid_block", "model_output"):
        only = type("Only", (Spy,), {k: getattr(SamplerHooks, k) for k in
                                      ("initial_noise", "mid_block", "model_output") if k != name})(edit=True)
        assert not torch.allclose(run(adopted, sched_cfg, only), base, atol=1e-4), name


def test_latent_sampler_with_guidance_feeds_the_empty_prompt(adopted, sched_cfg):
    spy = Spy(edit=False)
    guided = run(adopted, sched_cfg, spy, guidance_scale=3.0)
    assert spy.seen["out"][0][2] == [0, 1, 0, 1, 2, 2, 2, 2]  # [y; ∅]
    assert not torch.allclose(guided, run(adopted, sched_cfg), atol=1e-4)


# ------------------------------------------------------------------------------------------------ bad directories

def test_bad_pretrained_directories_fail_in_one_line(pipe_dir, tmp_path):
    with pytest.raises(UserError) as exc:
        load_pretrained(tmp_path / "nope")
    one_line(exc, "nope", "no such directory", "unet/", "vae/", "text_encoder/", "tokenizer/")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError) as exc:
        load_pretrained(empty)
    one_line(exc, "empty", "no unet/", "UNet2DModel")
    broken = tmp_path / "no-tokenizer"
    shutil.copytree(pipe_dir, broken)
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(UserError) as exc:
        load_pretrained(broken)
    one_line(exc, "no-tokenizer", "lacks tokenizer/")
    truncated = tmp_path / "truncated"
    shutil.copytree(pipe_dir, truncated)
    weights = truncated / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(UserError) as exc:
        load_pretrained(truncated)
    one_line(exc, str(truncated / "vae"), "AutoencoderKL")
    bad_json = tmp_path / "bad-json"
    shutil.copytree(pipe_dir, bad_json)
    (bad_json / "unet" / "config.json").write_text("{ not json")
    with pytest.raises(UserError) as exc:
        load_pretrained(bad_json)
    one_line(exc, "config.json")


def test_adopt_checks_conditioning_and_size(pipe_dir, tmp_path, unet):
    with pytest.raises(UserError) as exc:
        adopt_pretrained(pipe_dir, class_names=CLASSES, prompt_template=None, resolution=16)
    one_line(exc, "diffusion.prompt_template", "latent pipeline")
    with pytest.raises(UserError) as exc:
        adopt_pretrained(pipe_dir, class_names=CLASSES, prompt_template=TEMPLATE, resolution=32)
    one_line(exc, "sample_size 8", "downsampling 2", "32")
    unet.save_pretrained(tmp_path / "pixel" / "unet")  # 10 classes + the null class
    with pytest.raises(UserError) as exc:
        adopt_pretrained(tmp_path / "pixel", class_names=CLASSES, prompt_template=None, resolution=16)
    one_line(exc, "num_class_embeds 11", "2 classes", "3 are needed")
    with pytest.raises(UserError) as exc:
        adopt_pretrained(tmp_path / "pixel", class_names=CLASSES, prompt_template=TEMPLATE, resolution=16)
    one_line(exc, "UNet2DModel", "prompt_template: null")
    ok = adopt_pretrained(tmp_path / "pixel", class_names=[str(d) for d in range(10)], prompt_template=None,
                          resolution=16)
    assert ok.vae is None and ok.conditioning.prompt_embeds is None and ok.scheduler_config is None


# ------------------------------------------------------------------------------------------------ dvc repro

LATENT_PARAMS = {
    "data": {"format": "folder", "resolution": 16, "n_train": 100, "n_judge": 100, "n_test": 100},
    "classifiers": {"epochs": 2, "batch_size": 8},
    "diffusion": {"prompt_template": TEMPLATE, "train_steps": 2, "batch_size": 4, "checkpoint_every": 1},
    "sample": {"num_per_class": 4, "batch_size": 8, "num_inference_steps": 3},
    "latentdir": {"fit_per_class": 8},
    "invdiff": {"loss_batch_size": 16, "steps": 2, "batch_size": 4},
    "distguide": {"fit_per_class": 8, "batch_size": 4, "h_module": "up_blocks.0"},
}


@pytest.fixture(scope="module")
def latent_project(tmp_path_factory, pipe_dir):
    """A project copy on a 2-class / 2-attribute image folder with the tiny latent pipeline as diffusion.pretrained
    (fine-tuned 2 steps) and a user-supplied attribute judge (tests/latent.py)."""
    tmp = make_project(tmp_path_factory.mktemp("latent"))
    write_folder(tmp / "ds", folder_rows(48))
    raw = yaml.safe_load((tmp / "params.yaml").read_text())
    for section, values in LATENT_PARAMS.items():
        raw[section].update(values)
    raw["data"]["source"] = str(tmp / "ds")
    raw["diffusion"]["pretrained"] = str(pipe_dir)
    raw["classifiers"]["attribute_judge"] = str(write_red_sign_judge(tmp / "red_sign.safetensors"))
    (tmp / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return tmp


def repro(tmp, *targets):
    proc = dvc(tmp, "repro", *targets)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def run_in_process(tmp, monkeypatch, *stages):
    """Run stage modules' main() in the project directory, as `dvc repro` would run their commands."""
    import importlib

    monkeypatch.chdir(tmp)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
    for module, *argv in stages:
        main = importlib.import_module(f"stages.{module}").main
        main(argv) if argv else main()


def test_train_sample_and_score_a_latent_pretrained_pipeline(latent_project, monkeypatch):
    tmp = latent_project
    run_in_process(tmp, monkeypatch, ("prepare_data",), ("train_classifiers",), ("train_diffusion",),
                   ("fid_reference",), ("sample", "--method", "baseline"), ("score", "--method", "baseline"))
    model_dir = tmp / "data/models/diffusion"
    assert sorted(p.name for p in model_dir.iterdir()) == ["prompts.safetensors", "scheduler", "unet", "vae"]
    assert json.loads((model_dir / "unet/config.json").read_text())["_class_name"] == "UNet2DConditionModel"
    assert (model_dir / "unet/diffusion_pytorch_model.safetensors").is_file()
    model = load_model(model_dir)
    assert model.prompts == ("a photo of a cat", "a photo of a dog") and model.null_class == 2
    assert json.loads((tmp / "data/metrics/train_diffusion.json").read_text())["steps"] == 2
    images = np.load(tmp / "data/samples/baseline/images.npz")["images"]
    assert images.shape == (8, 16, 16, 3) and images.dtype == np.uint8
    metrics = json.loads((tmp / "data/scores/baseline/metrics.json").read_text())
    assert metrics["num_samples"] == 8
    # The aligned fraction is the red-sign judge's verdict on the decoded samples, computed here: the share of
    # samples whose judged attribute is their class's aligned one (the dataset's meta.json map).
    from pipeline.data import load_meta, to_tensor
    from pipeline.judges import load_judge

    cond = pd.read_parquet(tmp / "data/samples/baseline/samples.parquet")["condition"].to_numpy()
    judge = load_judge(tmp / "red_sign.safetensors", "cpu")
    with torch.no_grad():
        attr = judge(to_tensor(images)).argmax(1).numpy()
    aligned = np.asarray(load_meta(tmp / "data/prepared").aligned)
    assert 0 < attr.sum() < len(attr)  # both attribute values occur: the check is not vacuous
    assert metrics["aligned_fraction"] == pytest.approx(np.mean(attr == aligned[cond]), abs=1e-12)
    assert (tmp / "data/reference/meta.json").is_file()


@pytest.mark.slow
def test_dvc_repro_every_method_on_a_latent_pretrained_pipeline(latent_project):
    """Every method's fit and sample stages, then scores, Diffusing DeBias and the report (about 3–4 min here:
    `slow`, the latent twin of the default run's train/sample/score test)."""
    tmp = latent_project
    repro(tmp, "sample")
    for method in ("baseline", "latentdir", "invdiff", "invdiff_lambda0", "invdiff_oracle", "distguide"):
        images = np.load(tmp / f"data/samples/{method}/images.npz")["images"]
        assert images.shape == (8, 16, 16, 3) and images.dtype == np.uint8, method
    directions = np.load(tmp / "data/methods/latentdir/directions.npz")["directions"]
    assert directions.shape[1:] == (2, 4 * 8 * 8)  # two attribute values, in latent space
    delta = json.loads((tmp / "data/methods/invdiff/delta/config.json").read_text())
    assert delta["_class_name"] == "UNet2DConditionModel" and delta["cross_attention_dim"] == 32
    repro(tmp, "report")
    assert "| distguide |" in (tmp / "data/report/report.md").read_text()
    synthetic = np.load(tmp / "data/methods/ddb_synthetic/images.npz")  # decoded from the latent model
    assert synthetic["images"].shape[1:] == (16, 16, 3) and set(synthetic["classes"]) == {0, 1}
    for method in ("erm", "lff", "recipe1", "recipe2"):  # two classes × two attribute values: four cells
        metrics = json.loads((tmp / f"data/metrics/debias_classifier_{method}.json").read_text())
        assert metrics["worst_group_accuracy"] <= metrics["unbiased_accuracy"], method


# ------------------------------------------------------------------------------------------------ adopt, params

def test_zero_steps_adopts_the_latent_pipeline_as_it_is(pipe_dir, tmp_path):
    from pipeline.config import DiffusionParams
    from pipeline.diffusion import train_diffusion

    model = adopt_pretrained(pipe_dir, class_names=CLASSES, prompt_template=TEMPLATE, resolution=16)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    images = torch.rand(6, 3, 16, 16) * 2 - 1
    latents = encode_latents(model.vae, images)
    cfg = DiffusionParams(pretrained=str(pipe_dir), prompt_template=TEMPLATE, train_steps=0).model_dump()
    result = train_diffusion(latents, torch.tensor([0, 1] * 3), num_classes=2, cfg=cfg, seed=0,
                             out_dir=tmp_path / "model", ckpt_dir=tmp_path / "ckpt", unet=model.unet,
                             conditioning=model.conditioning, scheduler_config=model.scheduler_config,
                             save_extra=model.save_extra)
    assert result.steps == 0 and result.final_loss is None
    loaded = load_model(tmp_path / "model")
    assert all(torch.equal(loaded.unet.state_dict()[k], v) for k, v in before.items())
    assert torch.equal(loaded.prompt_embeds, model.conditioning.prompt_embeds) and loaded.null_class == 2
    assert loaded.scheduler_config["beta_schedule"] == "scaled_linear"  # the pipeline's own schedule
    assert loaded.scheduler_config["prediction_type"] == "epsilon"
    assert torch.equal(loaded.to_model_space(images), latents)


@pytest.mark.parametrize(("diffusion", "needle"), [
    ({"train_steps": 0}, "train_steps 0"),
    ({"pretrained": "x", "prompt_template": "a photo"}, "{class}"),
    ({"prompt_template": "a photo of a {class}"}, "needs a pretrained"),
])
def test_pretrained_params_are_checked(diffusion, needle):
    from pipeline.config import parse_params

    with pytest.raises(UserError) as exc:
        parse_params({"diffusion": diffusion})
    one_line(exc, "diffusion", needle)


def test_a_pixel_unet_is_fine_tuned_from_where_it_was(unet, tmp_path):
    from pipeline.config import DiffusionParams
    from pipeline.diffusion import train_diffusion

    unet.save_pretrained(tmp_path / "pixel" / "unet")
    model = adopt_pretrained(tmp_path / "pixel", class_names=[str(d) for d in range(10)], prompt_template=None,
                             resolution=16)
    cfg = DiffusionParams(pretrained=str(tmp_path / "pixel"), train_steps=1, batch_size=4,
                          warmup_steps=0).model_dump()
    result = train_diffusion(torch.rand(8, 3, 16, 16) * 2 - 1, torch.arange(8), num_classes=10, cfg=cfg, seed=0,
                             out_dir=tmp_path / "model", ckpt_dir=tmp_path / "ckpt", unet=model.unet,
                             conditioning=model.conditioning, scheduler_config=model.scheduler_config,
                             save_extra=model.save_extra)
    assert result.steps == 1 and result.final_loss > 0
    loaded = load_model(tmp_path / "model")
    assert loaded.vae is None and loaded.prompt_embeds is None and loaded.null_class == 10
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["scheduler", "unet"]
    # one step from the saved weights, not from a fresh initialisation: the weights moved only a little
    original = dict(unet.state_dict())
    drift = max((loaded.unet.state_dict()[k] - v).abs().max().item() for k, v in original.items())
    assert 0 < drift < 0.05


class PromptConstantEps(torch.nn.Module):
    """ε(x, t, prompt) = a fixed pattern times a sum of the prompt's text states: independent of x, so DDIM's
    step is exactly invertible, while the text conditioning still decides ε (a wrong prompt gives another z_T)."""

    def __init__(self, unet):
        super().__init__()
        self.config = unet.config
        self.pattern = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(2))

    def forward(self, x, t, encoder_hidden_states):
        scale = encoder_hidden_states[:, :, :4].sum(dim=(1, 2))
        return type("Out", (), {"sample": scale[:, None, None, None] * self.pattern.expand_as(x)})()


def test_ddim_inversion_on_the_latent_pipeline_regenerates_the_images(adopted, sched_cfg):
    """invert encodes the images (E(x)·scaling_factor) and runs the sampler's steps backwards under each image's own
    prompt; sampling from that z_T regenerates D(E(x)) (to float32 rounding) when the step is invertible (ε
    independent of x), and the random tiny U-Net's latents come back closer at 40 steps than at 4 (first-order
    error)."""
    from pipeline.sampling import invert

    cond = np.arange(4) % 2
    images = run(adopted, sched_cfg)
    model = model_of(adopted)
    target = model.decode(model.encode(images))
    exact = model_of(adopted, PromptConstantEps(adopted.unet))
    six = SamplerSettings(num_inference_steps=6)
    z, kept = invert(exact, images, cond, six, keep_steps=(-1,), progress=False)
    assert z.shape == (4, 4, 8, 8) and torch.equal(kept[-1], z.flatten(1))
    rec = sample(exact, cond, sample_seeds(3, 4), six, noise=z, progress=False)
    torch.testing.assert_close(rec, target, atol=2e-3, rtol=0)  # float32 rounding through 1/√ᾱ_T
    z_swapped, _ = invert(exact, images, 1 - cond, six, progress=False)
    assert (z_swapped - z).abs().max() > 1e-2
    latents = model.encode(images)
    in_latents = DiffusionModel(adopted.unet, sched_cfg, prompt_embeds=adopted.conditioning.prompt_embeds)
    errors = []
    for steps in (4, 40):
        z, _ = invert(in_latents, latents, cond, SamplerSettings(num_inference_steps=steps), progress=False)
        back = invert(in_latents, latents, cond, SamplerSettings(num_inference_steps=steps), progress=False)[0]
        assert torch.equal(back, z)  # deterministic
        scheduler = make_scheduler(sched_cfg, "ddim")
        scheduler.set_timesteps(steps)
        x = z
        for t in scheduler.timesteps:  # the sampler's own step, unclamped, to compare latents
            f = adopted.unet(x, t, **adopted.conditioning.with_labels(torch.as_tensor(cond)).unet_kwargs()).sample
            x = scheduler.step(f, t, x).prev_sample
        errors.append(float((x - latents).abs().mean()))
    assert errors[1] < errors[0] / 2, errors
