"""Training with 2 real CPU processes (torchrun, accelerate over gloo) gives the 1-process result: every process
draws the same global batch and trains on its slice; gradients are averaged. Each run records its world size.
train_diffusion, and InvDiff's δ fine-tuning (finetune_guidance@invdiff_oracle with λ = 0: hard groups and no
variance term make the per-slice group loss average to the whole batch's, so the two must agree)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.tiny import ROOT, tiny_params

WEIGHTS = "data/models/diffusion/unet/diffusion_pytorch_model.safetensors"
DELTA = "data/methods/invdiff_oracle/delta/diffusion_pytorch_model.safetensors"
# float32 sums reduced in another order across processes; Adam turns that rounding noise into lr-sized steps on
# the few parameters whose true gradient is zero (attention key biases), hence not 1e-7
TOL = 5e-5


def _env(tmp):
    return {**os.environ, "PYTHONPATH": str(tmp), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
            "OMP_NUM_THREADS": "1", "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}


def _run(tmp, module, *args, procs=1):
    launch = [sys.executable, "-m", module] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
        "-m", module]
    proc = subprocess.run([*launch, *args], cwd=tmp, env=_env(tmp), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def projects(tmp_path_factory):
    """Two copies of a tiny project with the same prepared data."""
    one = tmp_path_factory.mktemp("one")
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, one / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", one / "dvc.yaml")  # finetune_guidance's variants are its foreach keys
    raw = tiny_params()
    raw["diffusion"].update(train_steps=10, batch_size=8)
    raw["invdiff"].update(steps=10, warmup_steps=1, batch_size=8, lam=0.0, num_groups=2, balanced=True)
    (one / "params.yaml").write_text(yaml.safe_dump(raw))
    _run(one, "stages.prepare_data")
    two = tmp_path_factory.mktemp("two")
    shutil.copytree(one, two, dirs_exist_ok=True)
    return one, two


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_two_process_training_matches_one_process(projects):
    one, two = projects
    _run(one, "stages.train_diffusion")
    _run(two, "stages.train_diffusion", procs=2)
    assert json.loads((one / "data/metrics/train_diffusion.json").read_text())["world_size"] == 1
    assert json.loads((two / "data/metrics/train_diffusion.json").read_text())["world_size"] == 2
    a, b = load_file(str(one / WEIGHTS)), load_file(str(two / WEIGHTS))
    assert _max_diff(a, b) < TOL
    # the initial weights (train_diffusion: torch.manual_seed(seed), then build_unet) are far from both
    from pipeline.diffusion import build_unet

    cfg = tiny_params()
    torch.manual_seed(cfg["seed"])
    d = cfg["diffusion"]
    init = build_unet(resolution=16, num_classes=10, block_out_channels=d["block_out_channels"],
                      layers_per_block=d["layers_per_block"], attention=d["attention"]).state_dict()
    assert _max_diff(init, b) > 50 * TOL


def test_two_process_delta_finetuning_matches_one_process(projects):
    one, two = projects
    if not (one / WEIGHTS).exists():
        _run(one, "stages.train_diffusion")
    shutil.rmtree(two / "data/models", ignore_errors=True)
    shutil.copytree(one / "data/models", two / "data/models")  # the same frozen base in both
    _run(one, "stages.finetune_guidance", "--variant", "invdiff_oracle")
    _run(two, "stages.finetune_guidance", "--variant", "invdiff_oracle", procs=2)
    s1 = json.loads((one / "data/metrics/finetune_guidance_invdiff_oracle.json").read_text())
    s2 = json.loads((two / "data/metrics/finetune_guidance_invdiff_oracle.json").read_text())
    assert (s1["world_size"], s2["world_size"], s2["lam"]) == (1, 2, 0.0)
    a, b = load_file(str(one / DELTA)), load_file(str(two / DELTA))
    # δ's output layer starts at exactly zero (make_delta), so its size is how far training moved it, and it
    # agrees to rounding (measured 7e-9 with a 1e-2 move). Behind a near-zero output layer the inner layers'
    # gradients are tiny and Adam scales their rounding noise up to lr-sized steps: a looser bound there.
    out_a, out_b = a.pop("conv_out.weight"), b.pop("conv_out.weight")
    assert (out_a - out_b).abs().max().item() < 1e-6
    assert out_b.abs().max().item() > 1000 * 1e-6
    assert _max_diff(a, b) < 1e-3
