"""Kill the long stages mid-run (SIGKILL at a random moment after their first checkpoint), re-run `dvc repro`,
and check it completes from the checkpoint with valid outputs."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import yaml

from pipeline.diffusion import load_diffusion
from pipeline.models import load_judge
from tests.test_dag import _env, dvc, make_project


def _kill_after_checkpoint(tmp, stage: str, checkpoint_glob: str, rng: random.Random, timeout: float = 300):
    """Start `dvc repro <stage>`, wait for a checkpoint, sleep a random 0–0.3 s, SIGKILL the whole process group."""
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", stage], cwd=tmp, env=_env(tmp),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while not list(tmp.glob(checkpoint_glob)):
        if proc.poll() is not None:
            pytest.fail(f"{stage} finished before its first checkpoint: raise its length in the test")
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no checkpoint from {stage} within {timeout} s")
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 0.3))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return proc.returncode


def test_killed_long_stages_resume_and_complete(tmp_path):
    tmp = make_project(tmp_path)
    raw = yaml.safe_load((tmp / "params.yaml").read_text())
    raw["classifiers"].update(epochs=20)
    raw["diffusion"].update(train_steps=60, checkpoint_every=10)
    (tmp / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    rng = random.Random(0)
    assert dvc(tmp, "repro", "prepare_data").returncode == 0

    rc = _kill_after_checkpoint(tmp, "train_classifiers", "data/checkpoints/classifiers/colour/step-*", rng)
    assert rc == -signal.SIGKILL
    rc = _kill_after_checkpoint(tmp, "train_diffusion", "data/checkpoints/diffusion/step-*", rng)
    assert rc == -signal.SIGKILL
    assert not (tmp / "data/models/diffusion").exists()  # the model dir appears only when complete
    # DVC does not take either killed stage for finished.
    status = dvc(tmp, "status", "train_diffusion", "train_classifiers").stdout
    assert "train_diffusion" in status and "train_classifiers" in status, status

    proc = dvc(tmp, "repro", "train_diffusion", "train_classifiers")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "changed" not in dvc(tmp, "status", "train_diffusion", "train_classifiers").stdout
    summary = json.loads((tmp / "data/metrics/train_diffusion.json").read_text())
    assert summary["resumed_from"] >= 10 and summary["steps"] == 60
    unet, _ = load_diffusion(tmp / "data/models/diffusion")
    assert unet.config.sample_size == 16
    for name in ("colour", "digit"):
        load_judge(tmp / f"data/judges/{name}.safetensors")
