"""Wall time of the whole DAG through the Prefect flow, one stage at a time against `--max-parallel N` stages at
a time (docs/flows.md, "Concurrent branches"), each from scratch in a fresh temporary git+dvc copy of the project.

    python benchmarks/concurrent_flow.py --tiny                 # tests' tiny params, serial then 2 at a time
    python benchmarks/concurrent_flow.py --tiny --max-parallel 4

Every stage gets OMP_NUM_THREADS = MKL_NUM_THREADS = cpu_count // N threads in the concurrent run; the serial run
is given the same budget per stage (`--serial-threads`, default: the same), so with N = the CPU count the
comparison is N single-thread workers against one single-thread worker. The flow runs under a temporary Prefect
API whose start-up is not counted. Prints one JSON line: both wall times, the ratio, the load average around each
run, and whether both runs left the same dvc.lock.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.concurrent import thread_budget  # noqa: E402
from tests.dag import _env, make_project  # noqa: E402


def run(project: Path, max_parallel: int, threads: int) -> dict:
    from flows.pipeline import debias_pipeline

    env = _env(project)
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "PATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update({k: env[k] for k in ("MLFLOW_TRACKING_URI", "PATH")})
    os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))  # the serial run's budget
    try:
        load = os.getloadavg()[0]
        start = time.perf_counter()
        result = debias_pipeline(project_dir=str(project), max_parallel=max_parallel)
        wall = time.perf_counter() - start
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    assert set(result.values()) == {"ran"}, result
    return {"wall_s": round(wall, 1), "stages": len(result), "load_before": load, "load_after": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tests' tiny params (else the checkout's params.yaml)")
    ap.add_argument("--max-parallel", type=int, default=2)
    ap.add_argument("--serial-threads", type=int, default=None)
    args = ap.parse_args()
    from prefect.testing.utilities import prefect_test_harness

    threads = thread_budget(args.max_parallel)
    figures = {"cpus": len(os.sched_getaffinity(0)), "max_parallel": args.max_parallel, "threads": threads}
    locks = {}
    with tempfile.TemporaryDirectory() as tmp, prefect_test_harness(server_startup_timeout=120):
        for mode, n in (("serial", 1), ("concurrent", args.max_parallel)):
            project = make_project(Path(tmp) / mode)
            if not args.tiny:
                (project / "params.yaml").write_bytes((ROOT / "params.yaml").read_bytes())
            figures[mode] = run(project, n, (args.serial_threads or threads) if n == 1 else threads)
            locks[mode] = yaml.safe_load((project / "dvc.lock").read_text())
            print(mode, figures[mode], file=sys.stderr, flush=True)
    figures["speed_up"] = round(figures["serial"]["wall_s"] / figures["concurrent"]["wall_s"], 2)
    figures["same_dvc_lock"] = locks["serial"] == locks["concurrent"]
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
