"""benchmarks/gpu_check.sh --dry: the GPU check's own script, on the CPU at tiny size, in a temporary copy of the
project (docs/gpu.md), so the one command a GPU session runs cannot rot."""

import json
import os
import re
import shutil
import subprocess
import sys

from tests.tiny import ROOT

FILES = ["pipeline", "stages", "benchmarks/gpu_check.sh", "benchmarks/gpu_check.py", "tests/__init__.py",
         "tests/tiny.py", "params.yaml", "params_gpu.yaml", "dvc.yaml"]
METHODS = ("baseline", "latentdir", "distguide", "invdiff")


def _project(tmp):
    for name in FILES:
        src, dst = ROOT / name, tmp / "project" / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst)
    return tmp / "project"


def _check(tmp, *args):
    project = _project(tmp)
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "DEBIAS_TRACKING", "PYTHONPATH")}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry", "--workdir", str(tmp / "work"),
                           "--out", str(tmp / "out" / "gpu_check.json"), *args],
                          cwd=project, env=env, capture_output=True, text=True, timeout=600)
    return proc, json.loads((tmp / "out" / "gpu_check.json").read_text())


def test_dry_run_writes_every_figure(tmp_path):
    proc, r = _check(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert r["ok"] and r["mode"] == "dry" and r["machine"]["device"].startswith("CPU")
    assert r["imported"] == {"mlflow": False, "dvc": False, "prefect": False}
    assert set(r["packages"]) >= {"diffusers", "pydantic", "zarr", "torch"}
    assert not [v for v in r["packages"].values() if v.startswith("import failed")]
    assert not (tmp_path / "work" / "mlflow.db").exists()
    stages = {s["stage"]: s["status"] for s in r["stages"]}
    for label in ("prepare_data", "train_classifiers", "train_diffusion (calibration)", "train_diffusion",
                  "fid_reference", "fit_directions", "fit_adp", "fit_grouper", "finetune_guidance@invdiff",
                  "report", *(f"sample@{m}" for m in METHODS), *(f"score@{m}" for m in METHODS)):
        assert stages.pop(label) == "ok", label
    assert not stages
    t = r["train"]
    assert t["steps"] == r["params"]["diffusion"]["train_steps"] == 4 and t["batch_size"] == 8
    # both are rounded from the same unrounded rate (3 and 1 decimals): they agree to 0.05 + 8 × 0.0005
    assert t["steps_per_s"] > 0 and abs(t["images_per_s"] - t["steps_per_s"] * 8) <= 0.055
    assert r["invdiff_train"]["steps"] == r["params"]["invdiff"]["steps"] == 4
    assert set(r["gpu"]) >= {"peak_mem_allocated_gib", "util_mean_whole_run", "utilisation_source"}
    assert r["gpu"]["utilisation_source"] is None  # no GPU in the dry run: unmeasured, not zero
    assert set(r["sampling"]) == set(METHODS) and r["sampling"]["baseline"]["ratio_to_baseline"] == 1.0
    assert all(s["images_per_s"] > 0 and s["images"] == 20 for s in r["sampling"].values())
    assert set(r["scores"]) == set(METHODS)
    for scores in r["scores"].values():
        assert scores["num_samples"] == 20 and "fid_inception" not in scores
        for key in ("bias_score", "aligned_fraction", "fid_indomain", "precision"):
            lo, hi = scores[f"{key}_ci95"]
            assert lo <= scores[key] <= hi, key
    assert r["params"]["data"]["resolution"] == 16 and r["params"]["diffusion"]["block_out_channels"] == [16, 32]
    assert "all stages ok" in proc.stdout
    assert re.search(r"^scores invdiff: .*\bbias_score [\d.]+ \[[\d.]+, [\d.]+\]", proc.stdout, re.M)


def test_budget_stops_the_run_and_still_writes_the_json(tmp_path):
    proc, r = _check(tmp_path, "--budget", "3")
    assert proc.returncode == 1 and not r["ok"]
    statuses = [s["status"] for s in r["stages"]]
    # whether the alarm lands inside a stage ("timeout") or between two ("skipped") depends on the machine's speed
    assert statuses[-1] == "skipped" and "score@baseline" not in r["scores"]
    assert r["stages"][-1]["error"] == "time budget spent"
    assert statuses.count("ok") < len(statuses) - 1


def test_gpu_sampler_reads_nvidia_smi(tmp_path, monkeypatch):
    """The utilisation sampler on a fake nvidia-smi (the real one needs a GPU): parses its CSV lines, windows them."""
    import importlib.util
    import time

    import torch

    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nwhile true; do echo '40, 1000'; echo '80, 3000'; sleep 0.05; done\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    t0 = time.perf_counter()
    sampler = gpu_check.GpuSampler()
    time.sleep(0.5)
    sampler.stop()
    sampler.join(timeout=5)
    assert sampler.source == "nvidia-smi" and not sampler.is_alive()
    w = sampler.window(t0, time.perf_counter())
    assert 40 <= w["gpu_util_mean"] <= 80 and w["gpu_util_max"] == 80 and w["gpu_mem_used_max_mib"] == 3000
    assert sampler.window(0, t0)["gpu_util_mean"] is None
