"""train_diffusion under `accelerate launch` with 2 CPU processes (gloo) matches a 1-process run with the same
global batch: every process draws the same global batch and trains on its slice; gradients are averaged."""

import os
import shutil
import subprocess
import sys

import yaml
from safetensors.torch import load_file

from tests.tiny import ROOT, tiny_params

WEIGHTS = "data/models/diffusion/unet/diffusion_pytorch_model.safetensors"


def _project(tmp):
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, tmp / name, ignore=shutil.ignore_patterns("__pycache__"))
    raw = tiny_params()
    raw["diffusion"].update(train_steps=6, batch_size=8)
    (tmp / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(tmp), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    subprocess.run([sys.executable, "-m", "stages.prepare_data"], cwd=tmp, env=env, check=True, capture_output=True)
    return env


def test_two_process_training_matches_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    env_one, env_two = _project(one), _project(two)
    subprocess.run([sys.executable, "-m", "stages.train_diffusion"], cwd=one, env=env_one, check=True,
                   capture_output=True)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
              "--cpu", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "stages.train_diffusion"]
    proc = subprocess.run(launch, cwd=two, env=env_two, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_file(str(one / WEIGHTS)), load_file(str(two / WEIGHTS))
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-4, worst
    assert any((a[k] != 0).any() for k in a)
