"""The GPU check (docs/gpu.md): the shortened GPU profile end to end as plain stages, and the figures a session
with a device needs: train steps/s and images/s, peak GPU memory, GPU utilisation, each method's sampling
images/s and its ratio to the baseline's (as benchmarks/distguide_cost.py reports guided / plain), and each
method's scores with their 95% intervals. Writes one results JSON (after every stage, so a kill leaves one).

    bash benchmarks/gpu_check.sh                 # on a CUDA machine: installs the prepared wheels, then this
    bash benchmarks/gpu_check.sh --dry           # the same on the CPU at tiny size (tests/test_gpu_check.py)

The stages run in this one process, each exactly as `python -m stages.<name> [args]` runs it (runpy), in a
work directory holding params.yaml = the GPU profile (params_gpu.yaml applied to params.yaml, as
`python -m pipeline.config apply` does) merged with OVERRIDES (--dry: then tests/tiny.py's SHRINK):
one Python start-up instead of seventeen. Tracking is off (DEBIAS_TRACKING=off, stages/common.py). The base
model's length is calibrated so the run fits its budget: a short run measures steps/s, then
train_steps = clamp(steps/s · train_share · budget, min, max); δ gets delta_share of it. A SIGALRM at the budget
ends the stage in flight; later stages are marked skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import gc
import io
import json
import os
import platform
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The one place the check departs from params_gpu.yaml (reduced sizes; everything else is the GPU profile:
# 32×32, the [64, 128, 256] × 2 U-Net with attention, batch 128, bf16 autocast, 25 DDIM steps, Inception FID).
OVERRIDES = {
    "classifiers": {"epochs": 3},
    "sample": {"num_per_class": 200},
    "score": {"max_reference": 5000, "bootstrap": 200, "bootstrap_fid": 20},
    "latentdir": {"fit_per_class": 50},
    "distguide": {"fit_per_class": 50, "epochs": 20},
    "report": {"grid_per_class": 5},
}
# --dry: tests/tiny.py's SHRINK, then these (a 4-step model's tiny fitting set can show a single colour).
DRY = {"latentdir": {"fit_per_class": 20}}
# Training lengths: calibration steps, the base model's share of --budget (100 s of the default 420 s), its step
# range, δ's share of the base model's steps and its range.
TRAINING = {
    "gpu": {"calibrate": 200, "train_share": 0.24, "steps": (500, 3000), "delta_share": 0.25,
            "delta_steps": (200, 1000)},
    "dry": {"calibrate": 2, "train_share": 0.0, "steps": (4, 4), "delta_share": 0.25, "delta_steps": (4, 4)},
}
STEP_TIMED = ("train_diffusion", "finetune_guidance")
METHODS = ("baseline", "latentdir", "distguide", "invdiff")
# (label, stage module, arguments, labels it needs). The baseline first, so a short budget still scores it.
PLAN = [
    ("prepare_data", "prepare_data", [], []),
    ("train_classifiers", "train_classifiers", [], ["prepare_data"]),
    ("train_diffusion", "train_diffusion", [], ["prepare_data"]),
    ("fid_reference", "fid_reference", [], ["train_classifiers"]),
    ("sample@baseline", "sample", ["--method", "baseline"], ["train_diffusion"]),
    ("score@baseline", "score", ["--method", "baseline"], ["sample@baseline", "fid_reference"]),
    ("fit_directions", "fit_directions", [], ["train_diffusion", "train_classifiers"]),
    ("sample@latentdir", "sample", ["--method", "latentdir"], ["fit_directions"]),
    ("score@latentdir", "score", ["--method", "latentdir"], ["sample@latentdir", "fid_reference"]),
    ("fit_adp", "fit_adp", [], ["train_diffusion", "train_classifiers"]),
    ("sample@distguide", "sample", ["--method", "distguide"], ["fit_adp"]),
    ("score@distguide", "score", ["--method", "distguide"], ["sample@distguide", "fid_reference"]),
    ("fit_grouper", "fit_grouper", [], ["train_diffusion"]),
    ("finetune_guidance@invdiff", "finetune_guidance", ["--variant", "invdiff"], ["fit_grouper"]),
    ("sample@invdiff", "sample", ["--method", "invdiff"], ["finetune_guidance@invdiff"]),
    ("score@invdiff", "score", ["--method", "invdiff"], ["sample@invdiff", "fid_reference"]),
    ("report", "report", [], ["score@baseline"]),
]


# What the stages import beyond the standard library (the device's image lacks some: docs/gpu.md): their versions
# go into the JSON, and one that fails to import is named there before any stage runs.
PACKAGES = {"torch": "torch", "diffusers": "diffusers", "accelerate": "accelerate", "safetensors": "safetensors",
            "huggingface_hub": "huggingface-hub", "pydantic": "pydantic", "zarr": "zarr", "numcodecs": "numcodecs",
            "numpy": "numpy", "pandas": "pandas", "pyarrow": "pyarrow", "scipy": "scipy", "sklearn": "scikit-learn",
            "yaml": "pyyaml", "PIL": "pillow", "matplotlib": "matplotlib", "tqdm": "tqdm"}


def packages() -> dict:
    """{distribution: version, or 'import failed: <error>'} for PACKAGES."""
    import importlib
    from importlib import metadata

    out = {}
    for module, dist in PACKAGES.items():
        try:
            importlib.import_module(module)
            out[dist] = metadata.version(dist)
        except Exception as exc:  # reported, not raised: the JSON says which one is missing
            out[dist] = f"import failed: {type(exc).__name__}: {exc}"[:300]
    return out


class OutOfTime(BaseException):
    """Raised by SIGALRM at the budget (a BaseException, so no stage's `except Exception` swallows it)."""


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for section, values in over.items():
        out.setdefault(section, {}).update(values)
    return out


def build_params(dry: bool) -> dict:
    from pipeline.config import merge_profile

    raw = merge(merge_profile(ROOT / "params_gpu.yaml", ROOT / "params.yaml"), OVERRIDES)
    if dry:
        from tests.tiny import SHRINK

        raw = merge(merge(raw, SHRINK), DRY)
    else:
        raw["score"]["inception_fid"] = inception_available()
    return raw


def inception_available() -> bool:
    from pipeline.errors import UserError
    from pipeline.metrics import inception_weights_path

    try:
        inception_weights_path()
        return True
    except UserError as exc:
        print(f"[gpu_check] Inception FID off: {exc}", flush=True)
        return False


def clamp_round(x: float, lo: int, hi: int, step: int = 50) -> int:
    """Round x to a multiple of `step` (the training loops log every 50 steps), then clamp to [lo, hi]."""
    return int(min(hi, max(lo, round(x / step) * step)))


class GpuSampler(threading.Thread):
    """GPU utilisation (%) and memory used (MiB) every 0.5 s: nvidia-smi, else torch.cuda.utilization()."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples: list[tuple[float, float, float | None]] = []
        self.source, self._halt, self._proc = None, threading.Event(), None
        import torch

        if not torch.cuda.is_available():
            return
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
        if shutil.which("nvidia-smi"):
            self.source = "nvidia-smi"
            self._proc = subprocess.Popen(
                ["nvidia-smi", f"--id={visible if visible.isdigit() else 0}",
                 "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", "-lms", "500"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        else:
            try:
                torch.cuda.utilization()
                self.source = "torch.cuda.utilization"
            except Exception:  # no NVML bindings: utilisation stays unmeasured
                return
        self.start()

    def run(self) -> None:
        if self._proc is not None:
            for line in self._proc.stdout:
                with contextlib.suppress(ValueError):
                    util, mem = (float(v) for v in line.split(","))
                    self.samples.append((time.perf_counter(), util, mem))
            return
        import torch

        while not self._halt.wait(0.5):
            self.samples.append((time.perf_counter(), float(torch.cuda.utilization()), None))

    def stop(self) -> None:
        self._halt.set()
        if self._proc is not None:
            self._proc.terminate()

    def window(self, t0: float, t1: float) -> dict:
        got = [s for s in self.samples if t0 <= s[0] <= t1]
        if not got:
            return {"gpu_util_mean": None, "gpu_util_max": None, "gpu_mem_used_max_mib": None}
        mems = [m for _, _, m in got if m is not None]
        return {"gpu_util_mean": round(sum(u for _, u, _ in got) / len(got), 1),
                "gpu_util_max": max(u for _, u, _ in got), "gpu_mem_used_max_mib": max(mems) if mems else None}


class StepClock:
    """Times the stage's step-tagged metric calls (the training loops log every 50 steps, after a .item() sync):
    steps/s between the first and last of them leaves out start-up, the final save and the first 50 steps."""

    def __init__(self):
        self.marks: list[tuple[float, int]] = []

    def wrap(self, original):
        clock = self

        @contextlib.contextmanager
        def timed_run(*args, **kwargs):
            with original(*args, **kwargs) as run:
                metrics = run.metrics

                def timed(values, step=None):
                    if step is not None:
                        clock.marks.append((time.perf_counter(), step))
                    return metrics(values, step=step)

                run.metrics = timed
                yield run

        return timed_run

    def steps_per_s(self) -> float | None:
        if len(self.marks) < 2 or self.marks[-1][0] <= self.marks[0][0]:
            return None
        (t0, s0), (t1, s1) = self.marks[0], self.marks[-1]
        return (s1 - s0) / (t1 - t0)


class Tee(io.TextIOBase):
    """stderr to the console and a buffer (the stage's one-line error goes into the JSON)."""

    def __init__(self, stream):
        self.stream, self.buffer = stream, io.StringIO()

    def write(self, s):
        self.stream.write(s)
        return self.buffer.write(s)

    def flush(self):
        self.stream.flush()


class Check:
    def __init__(self, args):
        import torch

        from pipeline.diffusion import resolve_mixed_precision

        self.args, self.dry, self.torch = args, args.dry, torch
        self.mode = "dry" if args.dry else "gpu"
        self.cuda = torch.cuda.is_available()
        self.work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_check_")).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        # the stages check CLI names against dvc.yaml's (stages.common.check_name): the DAG's definition travels
        shutil.copy(ROOT / "dvc.yaml", self.work / "dvc.yaml")
        out_dir = os.environ.get("OUT")
        self.out = Path(args.out) if args.out else (Path(out_dir) if out_dir else self.work) / "gpu_check.json"
        self.params = build_params(args.dry)
        self.clock, self.sampler, self.in_stage = StepClock(), GpuSampler(), False
        versions = packages()  # imports them all: the budget starts after
        self.start = time.perf_counter()
        self.deadline = self.start + args.budget
        self.result = {
            "mode": self.mode,
            "machine": {
                "device": torch.cuda.get_device_name(0) if self.cuda else f"CPU: {os.cpu_count()} cores, "
                f"{platform.processor() or platform.machine()}",
                "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
                if self.cuda else None,
                "torch": torch.__version__, "cuda": torch.version.cuda if self.cuda else None,
                "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
                "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            },
            "mixed_precision": resolve_mixed_precision(self.params["diffusion"]["mixed_precision"]),
            "packages": versions, "budget_s": args.budget, "workdir": str(self.work), "overrides": OVERRIDES,
            "training": TRAINING[self.mode], "stages": [], "train": None, "invdiff_train": None, "sampling": {},
            "gpu": None, "scores": {}, "ok": False,
        }

    # ---- running ----------------------------------------------------------------------------------------------
    def write_params(self) -> None:
        (self.work / "params.yaml").write_text(yaml.safe_dump(self.params, sort_keys=False))
        self.result["params"] = self.params

    def timed_sample(self, original):
        """pipeline.sampling.sample, timed: the seconds inside the sampler (no model loading), synchronised."""

        def sample(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                if self.cuda:
                    self.torch.cuda.synchronize()
                self.sample_s += time.perf_counter() - t0

        return sample

    def stage(self, label: str, module: str, argv: list[str]) -> dict:
        import pipeline.sampling as sampling
        import stages.common as common

        torch = self.torch
        if self.deadline - time.perf_counter() < 1:  # the alarm has gone off (or is about to): start nothing
            return {"stage": label, "status": "skipped", "error": "time budget spent"}
        original, original_sample = common.mlflow_run, sampling.sample
        # Steps/s only from the training loops' step log (other stages tag metrics by denoising step or epoch).
        common.mlflow_run = self.clock.wrap(original) if module in STEP_TIMED else original
        sampling.sample, self.sample_s, self.clock.marks = self.timed_sample(original_sample), 0.0, []
        sys.argv, tee = [f"stages.{module}", *argv], Tee(sys.stderr)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        print(f"[gpu_check] {label} ...", flush=True)
        t0, status, error = time.perf_counter(), "ok", None
        try:
            with contextlib.redirect_stderr(tee):
                self.in_stage = True
                runpy.run_module(f"stages.{module}", run_name="__main__", alter_sys=False)
        except SystemExit as exc:
            if exc.code not in (None, 0):
                status, error = "failed", tee.buffer.getvalue().strip().splitlines()[-1:] or [f"exit {exc.code}"]
                error = error[0]
        except OutOfTime:
            status, error = "timeout", f"stopped at the {self.args.budget:g} s budget"
        except Exception as exc:
            traceback.print_exc()
            status, error = "failed", f"{type(exc).__name__}: {exc}"[:500]
        finally:
            self.in_stage = False
            common.mlflow_run, sampling.sample = original, original_sample
        t1 = time.perf_counter()
        row = {"stage": label, "status": status, "wall_s": round(t1 - t0, 2), "error": error,
               "steps_per_s": self.clock.steps_per_s(), "sampler_s": round(self.sample_s, 3),
               **self.sampler.window(t0, t1)}
        if self.cuda:
            row["peak_mem_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            row["peak_mem_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
        print(f"[gpu_check] {label}: {status} in {row['wall_s']:.1f} s" + (f" ({error})" if error else ""),
              flush=True)
        return row

    def calibrate(self) -> None:
        """A short training run: steps/s → the base model's and δ's step counts."""
        t = TRAINING[self.mode]
        self.params["diffusion"]["train_steps"] = t["calibrate"]
        self.write_params()
        row = self.stage("train_diffusion (calibration)", "train_diffusion", [])
        self.result["stages"].append(row)
        ok = row["status"] == "ok"
        rate = (row["steps_per_s"] or t["calibrate"] / row["wall_s"]) if ok else None
        steps = clamp_round(rate * t["train_share"] * self.args.budget, *t["steps"]) if ok else t["steps"][0]
        self.params["diffusion"]["train_steps"] = steps
        self.params["invdiff"]["steps"] = clamp_round(steps * t["delta_share"], *t["delta_steps"])
        self.write_params()
        print(f"[gpu_check] calibration: {fmt(rate)} steps/s → train_steps {steps}, "
              f"invdiff.steps {self.params['invdiff']['steps']}", flush=True)

    def run(self) -> dict:
        os.chdir(self.work)
        os.environ["DEBIAS_TRACKING"] = "off"
        for dist, version in self.result["packages"].items():
            if version.startswith("import failed"):
                print(f"[gpu_check] {dist}: {version} (benchmarks/prepare_gpu_wheels.sh, docs/gpu.md)", flush=True)

        def alarm(signum, frame):  # between stages the loop's own check skips what is left
            if self.in_stage:
                raise OutOfTime

        signal.signal(signal.SIGALRM, alarm)
        signal.alarm(max(1, int(self.args.budget)))
        done: set[str] = set()
        self.write_params()
        try:
            for label, module, argv, needs in PLAN:
                left = self.deadline - time.perf_counter()
                if left < 1 or not set(needs) <= done:
                    why = "time budget spent" if left < 1 else "needs " + ", ".join(sorted(set(needs) - done))
                    self.result["stages"].append({"stage": label, "status": "skipped", "error": why})
                    continue
                if label == "train_diffusion":
                    self.calibrate()
                row = self.stage(label, module, argv)
                self.result["stages"].append(row)
                if row["status"] == "ok":
                    done.add(label)
                self.collect()
                self.save()
        finally:
            signal.alarm(0)
            self.sampler.stop()
        self.result["ok"] = all(r["status"] == "ok" for r in self.result["stages"])
        # What a bare worker must not need: none of the trackers or orchestrators was imported.
        self.result["imported"] = {m: m in sys.modules for m in ("mlflow", "dvc", "prefect")}
        self.collect()
        self.save()
        return self.result

    # ---- figures ----------------------------------------------------------------------------------------------
    def collect(self) -> None:
        rows = {r["stage"]: r for r in self.result["stages"]}
        for label, key, batch in (("train_diffusion", "train", self.params["diffusion"]["batch_size"]),
                                  ("finetune_guidance@invdiff", "invdiff_train", self.params["invdiff"]["batch_size"])):
            r = rows.get(label)
            if r and r["status"] == "ok":
                steps = self.params["diffusion"]["train_steps"] if key == "train" else self.params["invdiff"]["steps"]
                rate = r["steps_per_s"] or steps / r["wall_s"]
                self.result[key] = {"steps": steps, "batch_size": batch, "steps_per_s": round(rate, 3),
                                    "images_per_s": round(rate * batch, 1), "wall_s": r["wall_s"],
                                    "rate_from": "step log" if r["steps_per_s"] else "stage wall time",
                                    "gpu_util_mean": r["gpu_util_mean"]}
        import pandas as pd

        n = self.params["sample"]["num_per_class"]
        for m in METHODS:
            r = rows.get(f"sample@{m}")
            if not (r and r["status"] == "ok"):
                continue
            meta = Path("data/samples") / m / "samples.parquet"
            num = len(pd.read_parquet(meta, columns=["condition"])) if meta.is_file() else None
            seconds = r["sampler_s"] or r["wall_s"]
            self.result["sampling"][m] = {"images": num, "sampler_s": r["sampler_s"], "wall_s": r["wall_s"],
                                          "images_per_s": round((num or n) / seconds, 1),
                                          "gpu_util_mean": r["gpu_util_mean"]}
        base = self.result["sampling"].get("baseline")
        for s in self.result["sampling"].values():
            s["ratio_to_baseline"] = round(s["images_per_s"] / base["images_per_s"], 3) if base else None
        for m in METHODS:
            f = Path("data/scores") / m / "metrics.json"
            if f.is_file():
                self.result["scores"][m] = json.loads(f.read_text())
        ran = [r for r in self.result["stages"] if "wall_s" in r]
        util = self.sampler.window(self.start, time.perf_counter())
        self.result["gpu"] = {
            "utilisation_source": self.sampler.source,
            "peak_mem_allocated_gib": max((r.get("peak_mem_allocated_gib") or 0 for r in ran), default=None)
            if self.cuda else None,
            "peak_mem_reserved_gib": max((r.get("peak_mem_reserved_gib") or 0 for r in ran), default=None)
            if self.cuda else None,
            "util_mean_whole_run": util["gpu_util_mean"], "mem_used_max_mib": util["gpu_mem_used_max_mib"],
        }
        self.result["wall_s"] = round(time.perf_counter() - self.start, 1)

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=str))
        tmp.replace(self.out)


def fmt(v) -> str:
    return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


def summary(r: dict) -> str:
    lines = [f"gpu_check ({r['mode']}) on {r['machine']['device']}, torch {r['machine']['torch']}, "
             f"mixed precision {r['mixed_precision']}, {r['machine']['date']}: {r['wall_s']} s "
             f"(budget {r['budget_s']} s), {'all stages ok' if r['ok'] else 'NOT all stages ok'}"]
    for key, name in (("train", "train_diffusion"), ("invdiff_train", "finetune_guidance@invdiff")):
        t = r[key]
        if t:
            lines.append(f"{name}: {t['steps']} steps at batch {t['batch_size']}: {t['steps_per_s']:.4g} steps/s, "
                         f"{t['images_per_s']:.4g} images/s (from the {t['rate_from']}); "
                         f"GPU util mean {fmt(t['gpu_util_mean'])} %")
    g = r["gpu"] or {}
    lines.append(f"GPU: peak allocated {fmt(g.get('peak_mem_allocated_gib'))} GiB, reserved "
                 f"{fmt(g.get('peak_mem_reserved_gib'))} GiB, max used {fmt(g.get('mem_used_max_mib'))} MiB; "
                 f"utilisation mean over the run {fmt(g.get('util_mean_whole_run'))} % "
                 f"({g.get('utilisation_source') or 'unmeasured: no GPU'})")
    if r["sampling"]:
        lines.append("sampling images/s (ratio to the baseline): " + ", ".join(
            f"{m} {s['images_per_s']:.4g} ({fmt(s['ratio_to_baseline'])})" for m, s in r["sampling"].items()))
    for m, scores in r["scores"].items():
        shown = [f"{k} {fmt(v)}" + (f" [{fmt(scores[k + '_ci95'][0])}, {fmt(scores[k + '_ci95'][1])}]"
                                   if isinstance(scores.get(k + "_ci95"), list) else "")
                 for k, v in scores.items() if not isinstance(v, list | dict)]
        lines.append(f"scores {m}: " + ", ".join(shown))
    lines.append(f"{'stage':<32} {'status':<8} {'wall s':>8} {'steps/s':>8} {'util %':>7} {'peak GiB':>9}")
    for s in r["stages"]:
        lines.append(f"{s['stage']:<32} {s['status']:<8} {fmt(s.get('wall_s')):>8} {fmt(s.get('steps_per_s')):>8} "
                     f"{fmt(s.get('gpu_util_mean')):>7} {fmt(s.get('peak_mem_allocated_gib')):>9}"
                     + (f"  {s['error']}" if s.get("error") else ""))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="on the CPU at tiny size (CUDA hidden)")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the stages (default: 420; dry 600)")
    ap.add_argument("--workdir", default=None, help="where the stages run (default: a new temporary directory)")
    ap.add_argument("--out", default=None, help="results JSON (default: $OUT/gpu_check.json, else in the workdir)")
    args = ap.parse_args()
    if args.dry:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported: the dry run never touches a GPU
    args.budget = args.budget or (600.0 if args.dry else 420.0)
    check = Check(args)
    result = check.run()
    report = check.work / "data/report/report.md"
    if report.is_file() and check.out.parent != check.work:
        shutil.copy(report, check.out.parent / "gpu_check_report.md")
    print(summary(result), flush=True)
    print(f"[gpu_check] results: {check.out}", flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
