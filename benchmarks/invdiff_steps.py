"""How much InvDiff's fitting can be shortened: δ fine-tuned for fewer steps, or fitted on groups the grouper
inferred from fewer loss draws, on a built project's model, each sampled at the default strength r on validation
seeds (stream `knob_validation`, never the scored samples) and compared, paired on those seeds, with the default's δ.

    python benchmarks/invdiff_steps.py --data <built project>/data --steps 1000 750 --jobs 2
    python benchmarks/invdiff_steps.py --data <built project>/data --loss-draws 2 --out <json>

Each setting runs the stages themselves (their own processes, one torch thread, tracking off) in a work directory
whose data/ links to the built project's inputs and whose params.yaml is the project's with the setting's invdiff
keys replaced (`--warmup-share`: warm-up as a share of the steps): fit_grouper first when a grouper key changes
(the oracle, which reads no inferred groups, is then left out), then finetune_guidance per variant. The default's δ
is the built project's own (`data/methods/<variant>`). Per variant and setting: the stages' CPU seconds, bias
removed against the unguided samples of the same seeds [95%], aligned fraction, fidelity, FID_balanced and the
ratios the knob rule reads; per setting the paired differences to the default's (aligned fraction, fidelity: the
same seeds and classes, resampled together within class) with 95% bootstrap intervals.

The rule for a cheaper default, fixed before the first run (docs/results.md): a setting replaces the default only
if, for every variant it changes, the paired 95% interval of (aligned fraction − the default's) lies below +0.03
and that of (fidelity − the default's) above −0.03; of those, the cheapest. Test figures are read only after.
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

from benchmarks.ddb_table import stage_params  # noqa: E402
from benchmarks.method_diagnostics import _Validation  # noqa: E402
from pipeline.config import load_params  # noqa: E402

VARIANTS = ("invdiff", "invdiff_lambda0", "invdiff_oracle")
INPUTS = ("prepared", "models", "methods/invdiff_groups")  # what finetune_guidance reads under data/
# invdiff keys fit_grouper reads (dvc.yaml): a candidate that changes one infers its own groups (the oracle reads none)
GROUPER_KEYS = frozenset(k.removeprefix("invdiff.") for k in stage_params("fit_grouper")
                         if k.startswith("invdiff."))
ENV = {"OMP_NUM_THREADS": "1", "DEBIAS_TRACKING": "off", "PYTHONPATH": str(ROOT)}


def candidates(steps: list[int], loss_draws: list[int], warmup_share: float | None) -> list[tuple[str, dict]]:
    """(label, invdiff overrides) of each setting compared with the default."""
    out = [(f"steps={n}", {"steps": n, **({} if warmup_share is None else {"warmup_steps": round(warmup_share * n)})})
           for n in steps]
    return out + [(f"loss_draws={n}", {"loss_draws": n}) for n in loss_draws]


def _children_cpu(start) -> float:
    end = os.times()
    return round(end.children_user + end.children_system - start.children_user - start.children_system, 1)


def prepare(data: Path, params_file: Path, work: Path, overrides: dict) -> dict | None:
    """`work`'s data/ links to the built project's inputs and its params.yaml carries `overrides`; a candidate that
    changes a grouper key gets its own groups from fit_grouper (run here, once) → its CPU seconds, else None."""
    regroup = bool(GROUPER_KEYS & overrides.keys())
    for name in INPUTS:
        link = work / "data" / name
        if not link.exists() and not (regroup and name == "methods/invdiff_groups"):
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to((data / name).resolve())
    raw = yaml.safe_load(params_file.read_text())
    raw["invdiff"].update(overrides)
    tmp = work / "params.yaml.tmp"
    tmp.write_text(yaml.safe_dump(raw, sort_keys=False))
    tmp.replace(work / "params.yaml")
    done = work / "fit_grouper.json"
    if not regroup or done.exists():
        return json.loads(done.read_text()) if done.exists() else None
    start = os.times()
    subprocess.run([sys.executable, "-m", "stages.fit_grouper"], cwd=work, env={**os.environ, **ENV}, check=True,
                   stdout=subprocess.DEVNULL)
    result = {"cpu_s": _children_cpu(start)}
    done.write_text(json.dumps(result))
    return result


def train_delta(work: Path, variant: str) -> dict:
    """finetune_guidance@variant in a `prepare`d `work` (reused when its δ is there); → {"dir", "cpu_s"}."""
    out = work / "data" / "methods" / variant
    done = work / f"{variant}.json"
    if (out / "delta").exists() and done.exists():
        return json.loads(done.read_text())
    start = os.times()
    subprocess.run([sys.executable, "-m", "stages.finetune_guidance", "--variant", variant], cwd=work,
                   env={**os.environ, **ENV}, check=True, stdout=subprocess.DEVNULL)
    result = {"dir": str(out), "cpu_s": _children_cpu(start)}
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
        warmup_share: float | None, loss_draws: list[int] = ()) -> dict:
    params_file = data.resolve().parent / "params.yaml"
    params = load_params(params_file)
    default = {"steps": params.invdiff.steps, "loss_draws": params.invdiff.loss_draws}
    todo = [(label, o) for label, o in candidates(steps, list(loss_draws), warmup_share)
            if any(default.get(k, v) != v for k, v in o.items() if k in default)]
    grouper = {label: prepare(data, params_file, work / label.replace("=", "_"), o) for label, o in todo}
    fits = {(v, "default"): {"dir": str(data / "methods" / v), "cpu_s": None} for v in variants}
    # the oracle reads no inferred groups: a grouper setting leaves its δ as it is
    jobs_todo = [(v, label) for label, o in todo for v in variants
                 if not (v == "invdiff_oracle" and GROUPER_KEYS & o.keys())]

    def fit(item):
        v, label = item
        return item, train_delta(work / label.replace("=", "_"), v)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        fits.update(dict(pool.map(fit, jobs_todo)))
    print(f"δ fits: { {f'{v}@{label}': f['cpu_s'] for (v, label), f in fits.items()} }; grouper fits: {grouper}",
          flush=True)

    from pipeline.methods.invdiff import InvDiffHooks, load_delta

    torch.set_num_threads(jobs)
    val = _Validation(data, params, per_class)
    keys = ("aligned_fraction", "fidelity", "fid_balanced", "bias_score_normalised")
    _, base_row = val.point(None, keys)  # the unguided samples: what bias_removed is measured against
    rows, events = [], {}
    for v in variants:
        for label in ["default", *(lab for lab, _ in todo)]:
            if (v, label) not in fits:
                continue
            fitted = Path(fits[(v, label)]["dir"])
            summary = json.loads((fitted / "summary.json").read_text())
            hooks = InvDiffHooks(load_delta(fitted / "delta", "cpu"), params.invdiff.strength,
                                 summary.get("train_timesteps"))
            images, row = val.point(hooks, keys)
            events[(v, label)] = per_sample(images, val.cond, val.scorer)
            rows.append({"variant": v, "setting": label, "steps": summary["steps"],
                         "finetune_cpu_s": fits[(v, label)]["cpu_s"],
                         "grouper_cpu_s": (grouper.get(label) or {}).get("cpu_s"),
                         "strength": params.invdiff.strength, **row})
            print(f"{v}@{label}: removed {row['bias_removed']:.3f} {row['bias_removed_ci95']}, aligned "
                  f"{row['aligned_fraction']:.3f}, fidelity {row['fidelity']:.3f}, FID_bal ×{row['fid_ratio']:.3f}",
                  flush=True)
    paired = []
    for (v, label), (a_al, a_ok) in events.items():
        if label == "default":
            continue
        b_al, b_ok = events[(v, "default")]
        paired.append({"variant": v, "setting": label, "against": default,
                       "aligned_fraction": paired_difference(a_al, b_al, val.cond, seed=params.seed),
                       "fidelity": paired_difference(a_ok, b_ok, val.cond, seed=params.seed)})
    return {"default": default, "settings": {label: o for label, o in todo}, "strength": params.invdiff.strength,
            "samples": len(val.cond), "seeds": "stream knob_validation (not the scored samples)",
            "unguided": base_row, "rows": rows, "paired_to_default": paired}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="a built project's data/ folder (params.yaml beside it)")
    ap.add_argument("--steps", type=int, nargs="*", default=[], help="δ step counts besides the default")
    ap.add_argument("--loss-draws", type=int, nargs="*", default=[],
                    help="the grouper's loss draws per image besides the default (fit_grouper runs for each)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--work", type=Path, default=Path("/tmp/invdiff_steps"), help="where the shorter δs are trained")
    ap.add_argument("--per-class", type=int, default=50, help="validation samples per class")
    ap.add_argument("--jobs", type=int, default=2, help="fine-tunings side by side, one thread each")
    ap.add_argument("--warmup-share", type=float, default=None,
                    help="warm-up as this share of the steps (default: params' warmup_steps unchanged)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "invdiff_steps_cpu.json")
    args = ap.parse_args(argv)
    start = time.process_time()
    result = run(args.data, args.steps, args.variants, args.work, args.per_class, args.jobs, args.warmup_share,
                 args.loss_draws)
    result.update(command="python benchmarks/invdiff_steps.py " + " ".join(argv or sys.argv[1:]),
                  data=str(args.data), cpu_s_sampling_and_scoring=round(time.process_time() - start, 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
