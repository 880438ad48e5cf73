"""How long InvDiff's δ has to train: δ fine-tuned for several step counts on a built project's model and groups,
each sampled at the default strength r on validation seeds (stream `knob_validation`, never the scored samples)
and compared, paired on those seeds, with the δ of the default step count.

    python benchmarks/invdiff_steps.py --data <built project>/data --steps 750 --jobs 2

Each δ is trained by the finetune_guidance stage itself (its own process, one torch thread, tracking off) in a work
directory whose data/ links to the built project's inputs and whose params.yaml is the project's with
`invdiff.steps` (and, with --warmup-share, `invdiff.warmup_steps`) replaced; the default step count's δ is the
built project's own (`data/methods/<variant>`). Per variant and step count: the fine-tuning's CPU seconds, bias
removed against the unguided samples of the same seeds [95%], aligned fraction, fidelity, FID_balanced and the
ratios the knob rule reads; per shorter δ the paired differences to the default's (aligned fraction, fidelity:
the same seeds and classes, resampled together within class) with 95% bootstrap intervals.

The rule for a shorter default, fixed before the first run (docs/results.md): a step count replaces the default
only if, for every variant, the paired 95% interval of (aligned fraction − the default's) lies below +0.03 and
that of (fidelity − the default's) above −0.03; of those, the fewest steps. Test figures are read only after.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.method_diagnostics import _Validation  # noqa: E402
from pipeline.config import load_params  # noqa: E402

VARIANTS = ("invdiff", "invdiff_lambda0", "invdiff_oracle")
INPUTS = ("prepared", "models", "methods/invdiff_groups")  # what finetune_guidance reads under data/


def train_delta(data: Path, params_file: Path, work: Path, variant: str, steps: int, warmup: int | None) -> dict:
    """finetune_guidance@variant at `steps` in `work` (reused when its δ is there); → {"dir", "cpu_s"}."""
    out = work / "data" / "methods" / variant
    done = work / f"{variant}.json"
    if (out / "delta").exists() and done.exists():
        return json.loads(done.read_text())
    for name in INPUTS:
        link = work / "data" / name
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to((data / name).resolve())
    raw = yaml.safe_load(params_file.read_text())
    raw["invdiff"]["steps"] = steps
    if warmup is not None:
        raw["invdiff"]["warmup_steps"] = warmup
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DEBIAS_TRACKING": "off", "PYTHONPATH": str(ROOT)}
    start = os.times()
    subprocess.run([sys.executable, "-m", "stages.finetune_guidance", "--variant", variant], cwd=work, env=env,
                   check=True, stdout=subprocess.DEVNULL)
    end = os.times()
    result = {"dir": str(out), "cpu_s": round(end.children_user + end.children_system
                                              - start.children_user - start.children_system, 1)}
    done.write_text(json.dumps(result))
    return result


def per_sample(images: torch.Tensor, cond: np.ndarray, scorer) -> tuple[np.ndarray, np.ndarray]:
    """(aligned [n] bool: the colour judge says the class's bias-aligned colour, correct [n] bool: the digit judge
    says the class) — the per-sample events behind aligned_fraction and fidelity."""
    from pipeline.data import to_tensor, to_uint8
    from pipeline.judges import judge_outputs

    x = to_tensor(to_uint8(images))
    attr, _ = judge_outputs(scorer.colour, x, scorer.batch_size)
    digit, _ = judge_outputs(scorer.digit, x, scorer.batch_size)
    return attr == np.asarray(scorer.meta.aligned)[cond], digit == cond


def paired_difference(a: np.ndarray, b: np.ndarray, cond: np.ndarray, *, seed: int, resamples: int = 2000
                      ) -> dict:
    """mean(a) − mean(b) for per-sample outcomes of the same seeds, with a 95% percentile interval from resampling
    the seeds within each class (a seed's two outcomes move together)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = a - b
    rng = np.random.default_rng(seed)
    boot = np.zeros(resamples)
    for y in np.unique(cond):
        rows = np.flatnonzero(cond == y)
        boot += d[rows][rng.integers(0, len(rows), size=(resamples, len(rows)))].sum(1)
    boot /= len(d)
    return {"difference": float(d.mean()), "ci95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))],
            "only_a": int(((a == 1) & (b == 0)).sum()), "only_b": int(((a == 0) & (b == 1)).sum())}


def run(data: Path, steps: list[int], variants: list[str], work: Path, per_class: int, jobs: int,
        warmup_share: float | None) -> dict:
    params_file = data.resolve().parent / "params.yaml"
    params = load_params(params_file)
    default = params.invdiff.steps
    fits = {(v, default): {"dir": str(data / "methods" / v), "cpu_s": None} for v in variants}
    todo = [(v, s) for v in variants for s in steps if s != default]

    def fit(item):
        v, s = item
        warmup = None if warmup_share is None else round(warmup_share * s)
        return item, train_delta(data, params_file, work / f"steps_{s}", v, s, warmup)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        fits.update(dict(pool.map(fit, todo)))
    print(f"δ fits: { {f'{v}@{s}': f['cpu_s'] for (v, s), f in fits.items()} }", flush=True)

    from pipeline.methods.invdiff import InvDiffHooks, load_delta

    torch.set_num_threads(jobs)
    val = _Validation(data, params, per_class)
    keys = ("aligned_fraction", "fidelity", "fid_balanced", "bias_score_normalised")
    _, base_row = val.point(None, keys)  # the unguided samples: what bias_removed is measured against
    rows, events = [], {}
    for v in variants:
        for s in sorted({default, *steps}, reverse=True):
            fitted = Path(fits[(v, s)]["dir"])
            summary = json.loads((fitted / "summary.json").read_text())
            hooks = InvDiffHooks(load_delta(fitted / "delta", "cpu"), params.invdiff.strength,
                                 summary.get("train_timesteps"))
            images, row = val.point(hooks, keys)
            events[(v, s)] = per_sample(images, val.cond, val.scorer)
            rows.append({"variant": v, "steps": s, "finetune_cpu_s": fits[(v, s)]["cpu_s"],
                         "strength": params.invdiff.strength, **row})
            print(f"{v}@{s}: removed {row['bias_removed']:.3f} {row['bias_removed_ci95']}, aligned "
                  f"{row['aligned_fraction']:.3f}, fidelity {row['fidelity']:.3f}, FID_bal ×{row['fid_ratio']:.3f}",
                  flush=True)
    paired = []
    for v in variants:
        for s in steps:
            if s == default:
                continue
            (a_al, a_ok), (b_al, b_ok) = events[(v, s)], events[(v, default)]
            paired.append({"variant": v, "steps": s, "against": default,
                           "aligned_fraction": paired_difference(a_al, b_al, val.cond, seed=params.seed),
                           "fidelity": paired_difference(a_ok, b_ok, val.cond, seed=params.seed)})
    return {"default_steps": default, "steps": steps, "strength": params.invdiff.strength,
            "warmup_share": warmup_share, "samples": len(val.cond),
            "seeds": "stream knob_validation (not the scored samples)", "unguided": base_row, "rows": rows,
            "paired_to_default": paired}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="a built project's data/ folder (params.yaml beside it)")
    ap.add_argument("--steps", type=int, nargs="+", required=True, help="δ step counts besides the default")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--work", type=Path, default=Path("/tmp/invdiff_steps"), help="where the shorter δs are trained")
    ap.add_argument("--per-class", type=int, default=50, help="validation samples per class")
    ap.add_argument("--jobs", type=int, default=2, help="fine-tunings side by side, one thread each")
    ap.add_argument("--warmup-share", type=float, default=None,
                    help="warm-up as this share of the steps (default: params' warmup_steps unchanged)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "invdiff_steps_cpu.json")
    args = ap.parse_args(argv)
    start = time.process_time()
    result = run(args.data, args.steps, args.variants, args.work, args.per_class, args.jobs, args.warmup_share)
    result.update(command="python benchmarks/invdiff_steps.py " + " ".join(argv or sys.argv[1:]),
                  data=str(args.data), cpu_s_sampling_and_scoring=round(time.process_time() - start, 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
