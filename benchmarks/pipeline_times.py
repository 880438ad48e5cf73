"""Wall time of the default pipeline per stage and in total, the no-op `dvc repro`, and the fully cached
Prefect flow — each cached figure a median of several runs, measured side by side in one run.

    python benchmarks/pipeline_times.py                 # the default CPU profile (~10 min)
    python benchmarks/pipeline_times.py --tiny          # tests' tiny params (a minute), to check the script
    python benchmarks/pipeline_times.py --max-parallel 2   # the build as one Prefect flow, two branches at a time

The build is `dvc repro --single-item` stage by stage (each stage's wall time), or with `--max-parallel N` one
`python -m flows.pipeline --max-parallel N` run (independent branches N at a time, each with cpu_count // N
threads: flows/concurrent.py), whose total is the figure; per-stage times are then not separable.

Runs in a fresh temporary git+dvc copy of the project, so the checkout's own outputs are not touched.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.pipeline import select_stages, stage_graph  # noqa: E402
from tests.test_dag import _env, make_project  # noqa: E402


def timed(cmd: list[str], cwd: Path, cpu: list[float] | None = None) -> float:
    """Wall seconds of cmd; with `cpu`, its CPU seconds (user + system of the child and its children) are appended
    there: on a shared machine the wall clock also counts other jobs' turns on the cores."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=_env(cwd), capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    if cpu is not None:
        cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="use the tests' tiny params")
    ap.add_argument("--runs", type=int, default=5, help="repeats of the cached measurements")
    ap.add_argument("--keep", type=Path, help="copy the run's data/ (report, metrics), dvc.lock and mlflow.db here "
                    "before cleaning up")
    ap.add_argument("--out", type=Path, help="also write the summary here as JSON (with the command and machine)")
    ap.add_argument("--max-parallel", type=int, default=1, metavar="N",
                    help="build through the Prefect flow with N branches at a time (default 1: dvc repro per stage)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        make_project(tmp)
        if not args.tiny:
            shutil.copy(ROOT / "params.yaml", tmp / "params.yaml")
        dvc = [sys.executable, "-m", "dvc"]
        order = select_stages(stage_graph(tmp))
        print(f"project copy: {tmp}  params: {'tiny' if args.tiny else 'params.yaml'}")
        stage_times, build_cpu = {}, []
        if args.max_parallel > 1:
            total = timed([sys.executable, "-m", "flows.pipeline", "--project-dir", str(tmp), "--max-parallel",
                           str(args.max_parallel)], tmp, build_cpu)
        else:
            for name in order:
                stage_times[name] = timed([*dvc, "repro", "--single-item", name], tmp, build_cpu)
                print(f"  {name:22s} {stage_times[name]:8.1f} s", flush=True)
            total = sum(stage_times.values())
        print(f"  {'total':22s} {total:8.1f} s  ({total / 60:.1f} min), {sum(build_cpu):.0f} CPU-s")
        if args.keep:  # before the cached runs, so a failure there keeps the build
            shutil.copytree(tmp / "data", args.keep, dirs_exist_ok=True)
            shutil.copy(tmp / "dvc.lock", args.keep / "dvc.lock")
            if (tmp / "mlflow.db").is_file():  # every stage's MLflow run, with its start and end times
                shutil.copy(tmp / "mlflow.db", args.keep / "mlflow.db")
        # Rounds of no-op repro, cached flow, status side by side: the flow's overhead is taken round by round, so
        # a drift in the machine's speed moves both figures of a round alike.
        cpu = {"noop": [], "flow": [], "status": []}
        noop, flow, status = [], [], []
        for _ in range(args.runs):
            noop.append(timed([*dvc, "repro"], tmp, cpu["noop"]))
            flow.append(timed([sys.executable, "-m", "flows.pipeline", "--project-dir", str(tmp)], tmp, cpu["flow"]))
            status.append(timed([*dvc, "status"], tmp, cpu["status"]))
        summary = {
            "stage_seconds": {k: round(v, 2) for k, v in stage_times.items()},
            "total_seconds": round(total, 1),
            "build": (f"python -m flows.pipeline --max-parallel {args.max_parallel}" if args.max_parallel > 1
                      else "dvc repro --single-item, stage by stage"),
            "build_cpu_seconds": round(sum(build_cpu), 1),
            "noop_dvc_repro_median_s": round(statistics.median(noop), 2),
            "dvc_status_median_s": round(statistics.median(status), 2),
            "cached_prefect_flow_median_s": round(statistics.median(flow), 2),
        }
        summary["cpu_median_s"] = {k: round(statistics.median(v), 2) for k, v in cpu.items()}
        summary["load_average"] = list(os.getloadavg())
        summary["flow_minus_noop_s"] = round(summary["cached_prefect_flow_median_s"]
                                             - summary["noop_dvc_repro_median_s"], 2)
        summary["flow_minus_noop_paired_s"] = {  # per round: median and range of (flow − no-op repro)
            "median": round(statistics.median(f - n for f, n in zip(flow, noop, strict=True)), 2),
            "range": [round(min(f - n for f, n in zip(flow, noop, strict=True)), 2),
                      round(max(f - n for f, n in zip(flow, noop, strict=True)), 2)]}
        print(f"no-op dvc repro:      median {summary['noop_dvc_repro_median_s']:.2f} s over {len(noop)} runs")
        print(f"cached Prefect flow:  median {summary['cached_prefect_flow_median_s']:.2f} s over {len(flow)} runs "
              f"(python -m flows.pipeline, ephemeral API server included)")
        paired = summary["flow_minus_noop_paired_s"]
        print(f"flow − no-op repro:   {summary['flow_minus_noop_s']:.2f} s (difference of medians); per round: "
              f"median {paired['median']:.2f} s, range {paired['range'][0]:.2f}–{paired['range'][1]:.2f} s")
        summary["baseline_scores"] = json.loads((tmp / "data/scores/baseline/metrics.json").read_text())
        summary["judges"] = json.loads((tmp / "data/metrics/train_classifiers.json").read_text())
        print(yaml.safe_dump(summary, sort_keys=False))
        if args.out:
            summary = {"command": "python " + " ".join(sys.argv), "machine": f"{os.cpu_count()}-core "
                       f"{platform.machine()} CPU, torch {version('torch')}", **summary}
            args.out.write_text(json.dumps(summary, indent=1) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
