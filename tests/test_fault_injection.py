"""Kill long stages mid-run (SIGKILL to `dvc repro`'s whole process group at a random moment), re-run
`dvc repro`, and compare the outputs with an uninterrupted run's, byte for byte (the README: resume is exact).

Default suite: the two trainings of the core chain (train_classifiers, train_diffusion), killed after their
first checkpoint, resumed from it. `slow`: every other long stage (fit_directions, fit_adp, fit_grouper,
finetune_guidance, sample, sweep, sample_bias_aligned, the two DDB trainers), killed at a random point of
its run; the re-run (checkpointed δ fine-tuning resumes, the others restart) must rebuild the same bytes."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml
from safetensors.torch import load_file

from tests.dag import _env, copy_project, dvc, make_project


def _repro(tmp, *args: str):
    proc = dvc(tmp, "repro", "--no-run-cache", *args)  # no run cache: a stage restored from it proves nothing
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def _popen(tmp, *args: str):
    return subprocess.Popen([sys.executable, "-m", "dvc", "repro", "--no-run-cache", *args], cwd=tmp,
                            env=_env(tmp), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _kill(proc) -> int:
    os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait()


def _kill_after_checkpoint(tmp, stage: str, checkpoint_glob: str, rng: random.Random, timeout: float = 300):
    """Start `dvc repro -f -s <stage>`, wait for a checkpoint, sleep a random 0–0.3 s, SIGKILL the group."""
    proc = _popen(tmp, "-f", "-s", stage)
    deadline = time.time() + timeout
    while not list(tmp.glob(checkpoint_glob)):
        if proc.poll() is not None:
            pytest.fail(f"{stage} finished before its first checkpoint: raise its length in the test")
        if time.time() > deadline:
            _kill(proc)
            pytest.fail(f"no checkpoint from {stage} within {timeout} s")
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 0.3))
    assert _kill(proc) == -signal.SIGKILL


def _kill_at_random(tmp, stage: str, duration: float, rng: random.Random) -> float:
    """Start a forced re-run of `stage` and SIGKILL it at a random 30–90% of its uninterrupted duration
    (halved until the kill lands before the stage ends). Returns the delay used."""
    delay = rng.uniform(0.3, 0.9) * duration
    for _ in range(4):
        proc = _popen(tmp, "-f", "-s", stage)
        deadline = time.time() + delay
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        if proc.poll() is None:
            assert _kill(proc) == -signal.SIGKILL
            return delay
        delay /= 2
    pytest.fail(f"{stage} always finished before the kill (last delay {delay:.2f} s)")


def _outs(tmp, stage: str) -> dict[str, str]:
    """{output path: content hash} of `stage` as dvc.lock records it (directories: the hash of their listing)."""
    lock = yaml.safe_load((tmp / "dvc.lock").read_text())["stages"][stage]
    return {o["path"]: o.get("md5") or o.get("hash") for o in lock["outs"]}


def _project(tmp_path, built=None, **sections):
    """A project with these params changed: a copy of the session's tiny DAG (`built`; without its checkpoints, so
    the trainings start fresh), else a fresh one."""
    tmp = (copy_project(built.path, tmp_path / "project", drop=("data/checkpoints",)) if built
           else make_project(tmp_path))
    raw = yaml.safe_load((tmp / "params.yaml").read_text())
    for section, values in sections.items():
        raw[section].update(values)
    (tmp / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return tmp


def test_killed_trainings_resume_to_the_uninterrupted_result(tiny_dag, tmp_path):
    tmp = _project(tmp_path, tiny_dag, classifiers={"epochs": 20},
                   diffusion={"train_steps": 60, "checkpoint_every": 10})
    rng = random.Random(0)
    stages = ("train_classifiers", "train_diffusion")
    models = {"train_classifiers": "data/judges", "train_diffusion": "data/models/diffusion"}
    _repro(tmp, *stages)
    clean = {s: _outs(tmp, s)[models[s]] for s in stages}

    for stage in stages:  # a fresh start: the uninterrupted run's persisted checkpoints would be resumed
        shutil.rmtree(tmp / "data/checkpoints" / ("classifiers" if stage == "train_classifiers" else "diffusion"))
    _kill_after_checkpoint(tmp, "train_classifiers", "data/checkpoints/classifiers/colour/step-*", rng)
    _kill_after_checkpoint(tmp, "train_diffusion", "data/checkpoints/diffusion/step-*", rng)
    assert not (tmp / "data/models/diffusion").exists()  # the model dir appears only when complete
    status = dvc(tmp, "status", *stages).stdout  # DVC does not take either killed stage for finished
    assert all(s in status for s in stages), status

    _repro(tmp, *stages)
    assert "changed" not in dvc(tmp, "status", *stages).stdout
    summary = json.loads((tmp / "data/metrics/train_diffusion.json").read_text())
    assert summary["resumed_from"] >= 10 and summary["steps"] == 60
    assert {s: _outs(tmp, s)[models[s]] for s in stages} == clean  # byte for byte


# stage → its outputs that must come back identical (None: all of dvc.lock's outs)
LONG_STAGES = {
    "fit_directions": None,
    "fit_adp": None,
    "fit_grouper": None,
    "finetune_guidance@invdiff": ["data/methods/invdiff/delta/diffusion_pytorch_model.safetensors"],
    "sample@baseline": None,
    "sweep@latentdir": None,
    "sample_bias_aligned": None,
    "train_bias_amplifier": None,
    "debias_classifier@erm": None,
}


@pytest.mark.slow
def test_every_long_stage_killed_at_random_reruns_to_the_same_bytes(tmp_path):
    tmp = _project(tmp_path, invdiff={"steps": 40, "checkpoint_every": 10})
    rng = random.Random(1)
    _repro(tmp, "prepare_data", "train_classifiers", "train_diffusion", "fid_reference")
    durations, clean = {}, {}
    for stage in LONG_STAGES:  # in an order where each stage's inputs are already built
        start = time.time()
        _repro(tmp, stage)
        durations[stage] = time.time() - start

    def snapshot(stage):
        files = LONG_STAGES[stage]
        if files is None:
            return _outs(tmp, stage)
        return {f: {k: v.numpy().tobytes() for k, v in load_file(str(tmp / f)).items()} for f in files}

    clean = {stage: snapshot(stage) for stage in LONG_STAGES}
    for stage in LONG_STAGES:
        if stage.startswith("finetune_guidance"):
            shutil.rmtree(tmp / "data/checkpoints/invdiff")  # else the clean run's last checkpoint is resumed
            _kill_after_checkpoint(tmp, stage, "data/checkpoints/invdiff/step-*", rng)
        else:
            _kill_at_random(tmp, stage, durations[stage], rng)
        assert stage in dvc(tmp, "status", stage).stdout, f"{stage}: a killed run looks finished to DVC"
        _repro(tmp, stage)
        assert snapshot(stage) == clean[stage], f"{stage}: re-run after a kill differs from the uninterrupted run"
    resumed = json.loads((tmp / "data/metrics/finetune_guidance_invdiff.json").read_text())["resumed_from"]
    assert resumed >= 10
