"""The Diffusing DeBias table under the selection protocol: every method × bias ratio ρ × seed × hyperparameter point,
chosen on validation, scored on test once; means ± std and 95% t-intervals per (ρ, method).

    python benchmarks/ddb_table.py --profile params_lff.yaml --ratios 0.99 0.995 --seeds 0 1 2   # LfF's setting
    python benchmarks/ddb_table.py --ratios 0.99 --seeds 0 1 2                                  # the CPU profile
    python benchmarks/ddb_table.py --budget my_budget.yaml ...                                  # another budget
    python benchmarks/ddb_table.py --jobs 3 ...                                # the seeds side by side, one thread each

Protocol (docs/protocol.md, "Diffusing DeBias"): every table row (method) gets the same selection budget — the same
number of hyperparameter points, `BUDGET` below or a `--budget` YAML file {method: {ddb.KEY: [values]}} (product per
method) — and every point runs for every seed. Per (ρ, method) the point with the best mean `--select-by` metric (a
`val_…` metric: the validation split) is chosen (`select_and_score`); only the chosen point's test metrics are
reported. The .md output states this protocol, the budget and the chosen points beside the table.

Each ρ gets a work directory (<workdir>/rho_<ρ>: a copy of pipeline/, stages/ and params.yaml — with `--profile`
merged on — with data.bias_ratio = ρ) where the stages run as plain `python -m stages.<name>`, in the DAG's order:
prepare_data → train_classifiers → train_diffusion (once per ρ; each skipped if it finished under the same params,
`per_rho_stamp`), then per seed (ddb.seed = s) sample_bias_aligned →
train_bias_amplifier[_real] (once per seed at the base settings, and again for a point that sets an amplifier key,
`AMPLIFIER_KEYS`: then the amplifier is part of what validation chooses) →
debias_classifier@<method> for every point of every method. With `--jobs N` the seeds run N at a time, each in a
work directory of its own (<workdir>/rho_<ρ>_seed_<s>: the per-ρ stages' outputs linked, data/ of its own) at one
torch thread (OMP_NUM_THREADS, when set); a stage's CPU time is its own process's either way. A run whose row exists
(<workdir>/rows.jsonl) is skipped, so the script resumes. One MLflow run per stage execution (experiment
debias-diffusion, tags method / bias_ratio / ddb_seed) goes to $MLFLOW_TRACKING_URI, default
sqlite:///<workdir>/mlflow.db.

Writes <out>.json (every row, the summary, the comparisons, the choice, the budget, timings) and <out>.md (the table,
the comparisons it is read for — each recipe against LfF, ERM + 15 points and its real-data ablation, Welch 95%
intervals, `COMPARISONS` — and the protocol). `--merge A.json B.json …` runs nothing: the table and comparisons of
result files' already chosen rows, a later file's (ρ, method) replacing an earlier one's.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.methods.diffusing_debias import check_budget, select_and_score, summarise  # noqa: E402

# table row → the debias_classifier method it runs (recipe2_tempered: Recipe II with ddb.ba_temperature > 1, ours)
VARIANTS = {"erm": "erm", "lff": "lff", "recipe1": "recipe1", "recipe2": "recipe2",
            "recipe2_tempered": "recipe2", "recipe1_real": "recipe1_real", "recipe2_real": "recipe2_real"}
LABELS = {"recipe2_tempered": "recipe2, tempered (ours)",
          "recipe1_real": "recipe1 (ablation: real-data amplifier)",
          "recipe2_real": "recipe2 (ablation: real-data amplifier)"}
# The default budget: 2 points per method. Each method's ℓ2 strength (Adam weight decay; Recipe I's own
# dro_weight_decay) over the same two values; the tempered Recipe II's own knob, the amplifier temperature T.
WD = [0.0, 0.003]
BUDGET = {"erm": {"ddb.weight_decay": WD}, "lff": {"ddb.weight_decay": WD},
          "recipe1": {"ddb.dro_weight_decay": WD}, "recipe2": {"ddb.weight_decay": WD},
          "recipe2_tempered": {"ddb.ba_temperature": [3.0, 10.0]},
          "recipe1_real": {"ddb.dro_weight_decay": WD}, "recipe2_real": {"ddb.weight_decay": WD}}
# keys a point may set: read by debias_classifier (the synthetic set is sampled once per seed), or by
# train_bias_amplifier (AMPLIFIER_KEYS: the point's amplifier is retrained with them before its classifier runs)
AMPLIFIER_KEYS = {"ddb.amplifier_epochs", "ddb.amplifier_loss", "ddb.amplifier_shift"}
POINT_KEYS = {"ddb.lr", "ddb.weight_decay", "ddb.dro_weight_decay", "ddb.dro_eta", "ddb.ema", "ddb.gce_q",
              "ddb.ba_temperature", "ddb.pseudo_bias", "ddb.group_sampling", "ddb.epochs", "ddb.batch_size",
              *AMPLIFIER_KEYS}


# what sample_bias_aligned reads from the `ddb` section (`sampling_stamp`), where it writes, and the stamp beside it
SAMPLING_KEYS = {"ddb": ("seed", "num_per_class", "guidance_scale", "num_inference_steps", "sample_batch_size"),
                 "sample": ("scheduler", "timestep_spacing", "eta")}
SYNTHETIC = Path("data/methods/ddb_synthetic/images.npz")
SAMPLED_STAMP = Path("data/ddb_synthetic_stamp.json")
SHARED = ("data/prepared", "data/judges", "data/models")  # the per-ρ stages' outputs every seed's stages read
PER_RHO = ("prepare_data", "train_classifiers", "train_diffusion")  # once per ρ, in this order
LOCK = threading.Lock()  # rows and timings, written by side-by-side seeds (`--jobs`)


def amplifier_source(method: str) -> str | None:
    """The amplifier a table row's classifier reads: synthetic (the recipes), real (the ablations) or none."""
    stage_method = VARIANTS[method]
    return "real" if stage_method.endswith("_real") else "synthetic" if stage_method.startswith("recipe") else None


def grid_points(spec: dict[str, list]) -> list[dict]:
    """The product of one method's {ddb.KEY: [values]} as a list of override dicts."""
    bad = sorted(set(spec) - POINT_KEYS)
    if bad:
        raise SystemExit(f"budget: {bad} may not vary per point (allowed: {sorted(POINT_KEYS)})")
    return [dict(zip(spec, values, strict=True)) for values in itertools.product(*spec.values())]


def point_label(over: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in over.items()) or "(params)"


def copy_code(src: Path, dst: Path) -> None:
    """Fresh copies of src's pipeline/ and stages/ in dst (what a work directory runs its stages with)."""
    for name in ("pipeline", "stages"):
        if (dst / name).exists():
            shutil.rmtree(dst / name)
        shutil.copytree(src / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))


def workdir_for(root: Path, rho: float) -> Path:
    w = root / f"rho_{rho}"
    copy_code(ROOT, w)
    return w


def base_params(profile: Path | None) -> dict:
    """params.yaml, or params.yaml with a profile merged on (pipeline.config.merge_profile, docs/profiles.md)."""
    from pipeline.config import merge_profile

    base = ROOT / "params.yaml"
    return merge_profile(profile, base) if profile else yaml.safe_load(base.read_text())


def set_params(w: Path, rho: float, seed: int, overrides: dict, profile: Path | None = None) -> None:
    raw = base_params(profile)
    raw["data"]["bias_ratio"] = rho
    raw["ddb"]["seed"] = seed
    for key, value in overrides.items():
        section, leaf = key.split(".", 1)
        raw[section][leaf] = value
    (w / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def stage_params(stage: str) -> list[str]:
    """The params.yaml keys (sections or dotted keys) dvc.yaml lists under a stage's `params`: what it reads."""
    names = (yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage] or {}).get("params", [])
    bad = [n for n in names if not isinstance(n, str)]  # `- other_file.yaml: [keys]`: not params.yaml's
    if bad:
        raise SystemExit(f"dvc.yaml: {stage}'s params entries {bad}: expected params.yaml keys")
    return names


def per_rho_stamp(w: Path, stage: str) -> dict:
    """The params a per-ρ stage reads (its `params` in dvc.yaml: sections or dotted keys) as work directory `w` sets
    them, the bias ratio and any `--set` of them included: what its outputs depend on besides the code."""
    raw = yaml.safe_load((w / "params.yaml").read_text())
    stamp = {}
    for name in stage_params(stage):
        node = raw
        for part in name.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        stamp[name] = node
    return stamp


def per_rho_done(w: Path, stage: str) -> Path:
    """The file that says `stage` finished in `w`, holding the per_rho_stamp it ran under."""
    return w / "data" / f"ddb_done_{stage}.json"


def run_per_rho(w: Path, timings: dict) -> None:
    """The per-ρ stages, each skipped if it finished under the same stamp; once one runs, every later one runs too
    (it reads the new outputs). A table killed mid-way resumes at the stage it was in."""
    stale = False
    for stage in PER_RHO:
        done, stamp = per_rho_done(w, stage), per_rho_stamp(w, stage)
        if stale or not done.is_file() or json.loads(done.read_text()) != stamp:
            done.unlink(missing_ok=True)
            run(w, [f"stages.{stage}"], timings, stage)
            done.write_text(json.dumps(stamp))
            stale = True


def run(w: Path, args: list[str], timings: dict, label: str, threads: int | None = None) -> None:
    """`python -m <args>` in work directory `w`; its wall and CPU seconds go to timings[label]. The CPU time is the
    child's own rusage (os.wait4), so it stays exact while other seeds' stages run beside it (`--jobs`); `threads`:
    the child's OMP_NUM_THREADS."""
    env = {**os.environ, "PYTHONPATH": str(w), **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    start = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as out:
        proc = subprocess.Popen([sys.executable, "-m", *args], cwd=w, env=env,
                                stdout=out, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        lines = [ln for ln in out.read().splitlines() if "it/s]" not in ln and "s/it]" not in ln]
    t = {"wall_s": time.perf_counter() - start, "cpu_s": usage.ru_utime + usage.ru_stime}
    with LOCK:
        timings[label] = t
    print(f"  [{t['wall_s']:6.0f} s wall, {t['cpu_s']:6.0f} s CPU] {label}: " + (lines[-1] if lines else ""),
          flush=True)
    if proc.returncode:
        raise SystemExit(f"{label} failed in {w}:\n" + "\n".join(lines[-20:]))


def ensure_amplifier(w: Path, source: str, amp: dict, trained: dict, ran: list, timings: dict, seed: int,
                     threads: int | None = None) -> None:
    """(Re)train the seed's `source` amplifier if its current model was trained with other amplifier keys than
    `amp` (params.yaml in `w` already holds them); `trained` maps source → those keys, `ran` the stages run."""
    if trained.get(source) != amp:
        name = "train_bias_amplifier" + ("_real" if source == "real" else "")
        run(w, ["stages.train_bias_amplifier", "--source", source], timings,
            f"{name} seed {seed}" + (f" [{point_label(amp)}]" if amp else ""), threads=threads)
        trained[source] = amp
        ran.append(name)


def seed_workdir(w: Path, seed: int) -> Path:
    """One seed's own work directory beside the ρ one (`--jobs` > 1): copies of its pipeline/ and stages/, links to
    the per-ρ stages' outputs (`SHARED`, read only), and data/ of its own for everything the seed's stages write."""
    ws = w.parent / f"{w.name}_seed_{seed}"
    copy_code(w, ws)
    for rel in SHARED:
        link = ws / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to((w / rel).resolve())
    (ws / "data" / "metrics").mkdir(parents=True, exist_ok=True)
    return ws


def sampling_stamp(w: Path) -> dict:
    """What sample_bias_aligned's images depend on in work directory `w`: its sampling params, the bias ratio
    and the diffusion model's files (sha256). A seed whose synthetic set was made with the same stamp reuses it (the
    sampler is seeded: the same stamp gives the same images), so a table re-run with other classifier or amplifier
    settings does not sample again — the costliest stage of the branch."""
    raw = yaml.safe_load((w / "params.yaml").read_text())
    model = w / "data/models/diffusion"
    files = {str(f.relative_to(model)): hashlib.sha256(f.read_bytes()).hexdigest()
             for f in sorted(model.rglob("*")) if f.is_file()}
    return {"bias_ratio": raw["data"]["bias_ratio"], "model": files,
            **{f"{section}.{k}": raw[section][k] for section, keys in SAMPLING_KEYS.items() for k in keys}}


def run_seed(w: Path, rho: float, seed: int, todo: list, base: dict, profile: Path | None, timings: dict,
             record, threads: int | None = None) -> None:
    """One seed's stages in work directory `w`: sample_bias_aligned (if a row reads the synthetic amplifier), the
    amplifiers at the base settings, then each (method, point) of `todo` — its amplifier retrained first if the point
    sets `AMPLIFIER_KEYS` — and its classifier; `record(row)` gets each finished row."""
    set_params(w, rho, seed, base, profile)
    ran = []  # this seed's amplifier stages: only their metrics files describe this seed
    trained = {}  # source → the amplifier keys its current model was trained with
    sources = {amplifier_source(m) for m, _ in todo} - {None}
    if "synthetic" in sources:
        stamp, made = sampling_stamp(w), w / SAMPLED_STAMP
        if made.is_file() and json.loads(made.read_text()) == stamp and (w / SYNTHETIC).is_file():
            print(f"  sample_bias_aligned seed {seed}: reused ({made}: the same model and sampling params)",
                  flush=True)
        else:
            made.unlink(missing_ok=True)
            run(w, ["stages.sample_bias_aligned"], timings, f"sample_bias_aligned seed {seed}", threads=threads)
            made.write_text(json.dumps(stamp))
        ran.append("sample_bias_aligned")
    for source in sorted(sources, reverse=True):  # at the base settings first: every row records them
        ensure_amplifier(w, source, {}, trained, ran, timings, seed, threads)
    for m, pt in todo:
        label, stage_method = point_label(pt), VARIANTS[m]
        set_params(w, rho, seed, {**base, **pt}, profile)
        if source := amplifier_source(m):
            ensure_amplifier(w, source, {k: v for k, v in pt.items() if k in AMPLIFIER_KEYS},
                             trained, ran, timings, seed, threads)
        key = f"debias_classifier@{m} [{label}] seed {seed}"
        run(w, ["stages.debias_classifier", "--method", stage_method], timings, key, threads=threads)
        row = json.loads((w / "data/metrics" / f"debias_classifier_{stage_method}.json").read_text())
        row.update(method=m, bias_ratio=rho, seed=seed, point=label, set=point_label(base),
                   cpu_s=timings[key]["cpu_s"])
        for stage in ran:  # not a file an earlier seed (or a copied work directory) left behind
            f = w / "data/metrics" / f"{stage}.json"
            if f.is_file():
                extra = json.loads(f.read_text())
                row[f"{stage}.aligned_fraction" if stage == "sample_bias_aligned" else
                    f"{stage}.test_conflicting_accuracy"] = extra.get(
                    "aligned_fraction", extra.get("test_conflicting_accuracy"))
        record(row)


def t_interval(row: dict, key: str) -> float:
    """Half-width of the 95% t-interval of the seed mean, t_{0.975, n−1} · sd / √n (nan for one seed)."""
    from scipy.stats import t

    n = row["n_seeds"]
    return float(t.ppf(0.975, n - 1) * row[key + "_std"] / np.sqrt(n)) if n > 1 else float("nan")


# The comparisons the table is read for (docs/methods.md, "The table and its protocol"): (row, against, margin),
# read as row − (against + margin)
COMPARISONS = (("recipe1", "lff", 0.0), ("recipe2", "lff", 0.0), ("recipe1", "erm", 0.15), ("recipe2", "erm", 0.15),
               ("recipe1", "recipe1_real", 0.0), ("recipe2", "recipe2_real", 0.0))


def welch_difference(a, b, confidence: float = 0.95) -> tuple[float, float, float]:
    """mean(a) − mean(b) and its Welch interval: d ± t_{(1+c)/2, ν} · √(s_a²/n_a + s_b²/n_b), ν the
    Welch–Satterthwaite degrees of freedom (scipy's `ttest_ind(equal_var=False)`); nan bounds under two seeds a side."""
    from scipy.stats import ttest_ind

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    d = float(a.mean() - b.mean())
    if min(len(a), len(b)) < 2:
        return d, float("nan"), float("nan")
    if a.std() == 0 and b.std() == 0:  # no spread on either side: the interval is the point
        return d, d, d
    ci = ttest_ind(a, b, equal_var=False).confidence_interval(confidence)
    return d, float(ci.low), float(ci.high)


def comparisons(reported: list[dict], key: str = "unbiased_accuracy") -> list[dict]:
    """Per ρ, each of COMPARISONS whose two rows are in `reported` (the chosen points' per-seed rows): the seed-mean
    difference row − (against + margin) with its Welch 95% interval, and how it reads: above / below when the
    interval excludes 0, else inside the noise."""
    by = {}
    for r in reported:
        by.setdefault((r["bias_ratio"], r["method"]), []).append(r[key])
    out = []
    for rho in sorted({k[0] for k in by}):
        for row, against, margin in COMPARISONS:
            if (rho, row) not in by or (rho, against) not in by:
                continue
            d, lo, hi = welch_difference(by[rho, row], np.asarray(by[rho, against]) + margin)
            reading = "above" if lo > 0 else "below" if hi < 0 else "inside the noise"
            out.append({"bias_ratio": rho, "row": row, "against": against, "margin": margin, "difference": d,
                        "ci95_low": lo, "ci95_high": hi, "reading": reading})
    return out


def comparison_lines(rows: list[dict]) -> list[str]:
    """The comparisons as a markdown table (points of accuracy)."""
    if not rows:
        return []
    lines = ["", "| ρ | comparison (unbiased acc.) | difference [Welch 95% interval] | reading |", "|---|---|---|---|"]
    for c in rows:
        against = LABELS.get(c["against"], c["against"])
        against = f"({against} + {100 * c['margin']:.0f})" if c["margin"] else against
        lines.append(f"| {c['bias_ratio']} | {LABELS.get(c['row'], c['row'])} − {against} | "
                     f"{100 * c['difference']:+.1f} [{100 * c['ci95_low']:+.1f}, {100 * c['ci95_high']:+.1f}] | "
                     f"{c['reading']} |")
    return lines


def protocol_note(budget: dict, select_by: str, chosen: dict, profile, seeds, timings, jobs: int = 1,
                  overrides: str = "(params)") -> list[str]:
    """The protocol, stated beside the table (docs/protocol.md)."""
    n = check_budget({m: grid_points(s) for m, s in budget.items()})
    cpu = sum(t["cpu_s"] for rho in timings.values() for t in rho.values() if isinstance(t, dict))
    lines = ["", "**Protocol.** Every method gets the same selection budget: "
             f"{n} hyperparameter points, each run for every seed ({', '.join(map(str, seeds))}). Per (ρ, method) the "
             f"point with the best seed-mean `{select_by}` on the validation split (the judge split: class × colour "
             "balanced, held out of all training) is chosen; the test split (colour-uniform) is read only to score "
             "the chosen point. Cells: test mean ± sample std over seeds [95% t-interval half-width]. "
             f"Profile: {profile or 'params.yaml (CPU base)'}"
             + (f", with {overrides} on every row" if overrides != "(params)" else "")
             + f". Machine: {platform.machine()} CPU, "
             + (f"{os.environ.get('OMP_NUM_THREADS', 'all')} torch thread(s)" if jobs == 1 else
                f"the seeds {jobs} at a time at {os.environ.get('OMP_NUM_THREADS', '1')} torch thread(s) each")
             + f", {os.cpu_count()} cores, load average "
             f"{os.getloadavg()[0]:.1f} at the end; "
             f"{cpu:.0f} CPU-s in all stage runs of the work directory.", "", "| method | budget | chosen (per ρ) |",
             "|---|---|---|"]
    for m, spec in budget.items():
        picks = "; ".join(f"ρ={k[0]}: {v}" for k, v in sorted(chosen.items()) if k[1] == m)
        lines.append(f"| {LABELS.get(m, m)} | {', '.join(f'{k} ∈ {v}' for k, v in spec.items())} | {picks} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.95, 0.98, 0.99, 0.995])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/ddb_table"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ddb_table")
    ap.add_argument("--profile", type=Path, default=None, help="a params_<name>.yaml merged onto params.yaml")
    ap.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE", help="extra params overrides")
    ap.add_argument("--budget", type=Path, default=None, help="YAML {method: {ddb.KEY: [values]}}; default BUDGET")
    ap.add_argument("--jobs", type=int, default=1, help="seeds run side by side, each in its own work directory "
                    "(<workdir>/rho_<ρ>_seed_<s>) at one torch thread (OMP_NUM_THREADS, when set)")
    ap.add_argument("--select-by", default="val_unbiased_accuracy", help="validation metric that chooses the point")
    ap.add_argument("--merge", type=Path, nargs="+", default=None, metavar="RESULT.json", help="run nothing: the "
                    "table and comparisons of these result files' chosen rows (a later file's (ρ, method) wins)")
    args = ap.parse_args()
    if args.merge:
        reported, chosen, source = merge_results(args.merge)
        table, compared = summary_table(reported, chosen), comparisons(reported)
        md = table_lines(table) + comparison_lines(compared) + [
            "", "Merged from (per ρ, method): " + "; ".join(f"ρ={k[0]} {k[1]}: {v}" for k, v in sorted(source.items()))]
        write_outputs(args.out, {"summary": table, "comparisons": compared, "chosen": by_key(chosen),
                                 "sources": by_key(source)}, md)
        return
    base = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    budget = yaml.safe_load(args.budget.read_text()) if args.budget else BUDGET
    budget = {m: budget[m] for m in args.methods}
    points = {m: grid_points(spec) for m, spec in budget.items()}
    check_budget(points)  # the same number of points for every method, before anything runs
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{args.workdir.resolve()}/mlflow.db")
    args.workdir.mkdir(parents=True, exist_ok=True)
    results_path = args.workdir / "rows.jsonl"
    done = [json.loads(line) for line in results_path.read_text().splitlines()] if results_path.is_file() else []
    timings_path = args.workdir / "timings.json"  # kept across resumed invocations: the CPU figures cover them all
    timings_all = json.loads(timings_path.read_text()) if timings_path.is_file() else {}

    overrides = point_label(base)  # `--set`: a row made under other overrides is another run's, never reused

    def have(rho, seed, m, label):
        return any(r["bias_ratio"] == rho and r["seed"] == seed and r["method"] == m and r["point"] == label
                   and r.get("set", "(params)") == overrides for r in done)

    def record(row: dict) -> None:  # one finished classifier run; seeds may finish side by side (`--jobs`)
        with LOCK:
            done.append(row)
            timings_path.write_text(json.dumps(timings_all, indent=1))
            with results_path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    # side-by-side seeds run their stages at one thread each unless OMP_NUM_THREADS says otherwise
    seed_threads = int(os.environ.get("OMP_NUM_THREADS") or 1)
    for rho in args.ratios:
        w = workdir_for(args.workdir, rho)
        print(f"ρ = {rho}: {w}", flush=True)
        set_params(w, rho, args.seeds[0], base, args.profile)
        timings = timings_all.setdefault(str(rho), {})
        run_per_rho(w, timings)
        timings_path.write_text(json.dumps(timings_all, indent=1))
        todo = {seed: [(m, pt) for m in args.methods for pt in points[m]
                       if not have(rho, seed, m, point_label(pt))] for seed in args.seeds}
        todo = {seed: runs for seed, runs in todo.items() if runs}

        def one_seed(item, w=w, rho=rho, timings=timings):
            seed, runs = item
            ws = w if args.jobs == 1 else seed_workdir(w, seed)
            print(f"  seed {seed}: {len(runs)} classifier runs" + (f" in {ws}" if ws != w else ""), flush=True)
            run_seed(ws, rho, seed, runs, base, args.profile, timings, record,
                     threads=None if args.jobs == 1 else seed_threads)

        if args.jobs == 1:
            for item in todo.items():
                one_seed(item)
        else:
            with ThreadPoolExecutor(args.jobs) as pool:
                list(pool.map(one_seed, todo.items()))  # re-raises a seed's failure here
    labels = {m: {point_label(pt) for pt in points[m]} for m in args.methods}
    rows = [r for r in done if r["bias_ratio"] in args.ratios and r["seed"] in args.seeds
            and r["method"] in args.methods and r["point"] in labels[r["method"]]
            and r.get("set", "(params)") == overrides]
    reported, chosen = select_and_score(rows, args.select_by)  # validation decides; test read here, once
    table = summary_table(reported, chosen)
    note = protocol_note(budget, args.select_by, chosen, args.profile, args.seeds, timings_all, args.jobs,
                         overrides)
    compared = comparisons(reported)
    write_outputs(args.out, {"rows": rows, "summary": table, "comparisons": compared, "timings": timings_all,
                             "selected_by": args.select_by, "budget": budget, "chosen": by_key(chosen),
                             "profile": str(args.profile) if args.profile else None},
                  table_lines(table) + comparison_lines(compared) + note)


def by_key(d: dict) -> dict:
    """A {(ρ, method): value} map with JSON keys "ρ|method" (what merge_results reads back)."""
    return {f"{k[0]}|{k[1]}": v for k, v in d.items()}


def write_outputs(out: Path, payload: dict, md: list[str]) -> None:
    """<out>.json and <out>.md, and the .md printed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(payload, indent=2) + "\n")
    Path(f"{out}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def summary_table(reported: list[dict], chosen: dict) -> list[dict]:
    """Per (ρ, method): the chosen point, its test mean ± std over seeds and 95% t-interval half-widths."""
    table = summarise(reported)
    for r in table:
        r["point"] = chosen[(r["bias_ratio"], r["method"])]
        for k in ("unbiased_accuracy", "worst_group_accuracy", "conflicting_accuracy", "aligned_accuracy"):
            r[k + "_ci95"] = t_interval(r, k)
    return table


def table_lines(table: list[dict]) -> list[str]:
    md = ["| ρ | method | unbiased acc. | worst-group acc. | conflicting acc. | aligned acc. | seeds |",
          "|---|---|---|---|---|---|---|"]
    for r in table:
        cells = [f"{100 * r[k]:.1f} ± {100 * r[k + '_std']:.1f}"
                 + (f" [±{100 * r[k + '_ci95']:.1f}]" if r["n_seeds"] > 1 else "") for k in
                 ("unbiased_accuracy", "worst_group_accuracy", "conflicting_accuracy", "aligned_accuracy")]
        md.append(f"| {r['bias_ratio']} | {LABELS.get(r['method'], r['method'])} | " + " | ".join(cells)
                  + f" | {r['n_seeds']} |")
    return md


def merge_results(files: list[Path]) -> tuple[list[dict], dict, dict]:
    """The chosen points' per-seed rows of several result files, each chosen by its own protocol run (its `chosen`
    and `rows`); a later file's (ρ, method) replaces an earlier one's. Returns (rows, chosen, source file per
    (ρ, method)). Nothing is re-selected: a merged table is the union of already validation-chosen rows."""
    picked, chosen, source = {}, {}, {}
    for f in files:
        try:
            d = json.loads(Path(f).read_text())
            problem = None if isinstance(d, dict) and isinstance(d.get("chosen"), dict) and isinstance(
                d.get("rows"), list) else "no 'chosen' map and 'rows' list"
        except (OSError, ValueError) as e:
            problem = f"{type(e).__name__}: {e}"
        if problem:
            print(f"error: --merge {f}: expected a result file of this script (JSON with 'chosen' and 'rows'): "
                  f"{problem}", file=sys.stderr)
            raise SystemExit(2)
        for key, point in d["chosen"].items():
            rho, method = key.split("|")
            k = (float(rho), method)
            picked[k] = [r for r in d["rows"] if (r["bias_ratio"], r["method"]) == k and r["point"] == point]
            chosen[k], source[k] = point, Path(f).name
    return [r for k in sorted(picked) for r in picked[k]], chosen, source

if __name__ == "__main__":
    main()
