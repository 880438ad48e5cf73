"""The report: a metrics table (one row per method), sample grids (rows = classes), a bias-vs-FID scatter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import UserError

# Column order and headings of the methods table; "↓"/"↑" say which way is better. FID vs the colour-balanced split
# is the headline quality figure; in-domain FID (vs the biased training split) rises as bias falls (docs/metrics.md).
COLUMNS = [
    ("bias_score_normalised", "normalised bias ↓"), ("bias_score_normalised_corrected", "judge-corrected ↓"),
    ("bias_removed", "bias removed ↑"), ("aligned_fraction", "aligned fraction ↓"),
    ("aligned_fraction_corrected", "aligned, judge-corrected ↓"), ("fd", "FD ↓"), ("fd_unbiased", "FD unbiased ↓"),
    ("bias_score", "bias score ↓"), ("fid_balanced", "FID vs colour-balanced ↓"), ("fidelity", "fidelity ↑"),
    ("fid_indomain", "in-domain FID"), ("fid_inception", "Inception FID ↓"), ("precision", "precision ↑"),
    ("recall", "recall ↑"),
]


SHORT = {"weight": "w", "source_step": "s", "strength": "r", "lam": "λ"}  # knob names in sweep labels



def per_class_counts(per_class: pd.DataFrame) -> np.ndarray:
    """The attribute count table [Y, K] stored in a per-class frame (columns count_attr_0 … count_attr_{K−1})."""
    cols = sorted((c for c in per_class.columns if c.startswith("count_attr_")), key=lambda c: int(c.rsplit("_", 1)[1]))
    if not cols:
        raise UserError("per_class.parquet has no count_attr_* columns (re-run `dvc repro score`)")
    return per_class[cols].to_numpy(np.int64)


def sample_grid(images: np.ndarray, cond: np.ndarray, per_class: int, scale: int = 3, pad: int = 1) -> np.ndarray:
    """uint8 [rows·(H+pad), cols·(W+pad), 3]: row y holds the first `per_class` samples of condition y."""
    classes = np.unique(cond)
    h, w = images.shape[1:3]
    grid = np.full((len(classes) * (h + pad) + pad, per_class * (w + pad) + pad, 3), 64, np.uint8)
    for r, y in enumerate(classes):
        for c, i in enumerate(np.flatnonzero(cond == y)[:per_class]):
            grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = images[i]
    return grid.repeat(scale, 0).repeat(scale, 1)


def discovery_grid(images: np.ndarray, classes: np.ndarray, W: np.ndarray, scores: np.ndarray,
                   per_group: int) -> np.ndarray:
    """InvDiff's discovery grid. Row k: the training images most firmly in group k (ties broken by score: the
    highest-loss group shows its highest scores, the others their lowest), round-robin over the classes (class 0's
    firmest, class 1's, …, then each class's second), so every digit shows."""
    rows = []
    for k in range(W.shape[1]):
        sign = 1.0 if k == W.shape[1] - 1 else -1.0
        ranked = [np.flatnonzero(m)[np.lexsort((-sign * scores[m], -W[m, k].round(3)))]
                  for m in (classes == y for y in np.unique(classes))]
        rows.append([r[j] for j in range(max(map(len, ranked))) for r in ranked if j < len(r)][:per_group])
    return sample_grid(images[np.concatenate(rows)], np.repeat(np.arange(W.shape[1]), [len(r) for r in rows]),
                       per_group)


def save_png(array: np.ndarray, path: str | Path) -> None:
    from PIL import Image

    from pipeline.io import atomic_path

    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def bias_fid_scatter(rows: list[dict], path: str | Path, fid_key: str = "fid_balanced",
                     sweeps: list[dict] = ()) -> None:
    """Normalised bias score against FID, one labelled point per method (lower-left is better); sweep points
    (fewer samples each, so their FID sits higher than the full runs') as small markers joined per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.io import atomic_path

    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    # One colour per method, shared by its point and its sweep lines.
    names = list(dict.fromkeys([r["method"] for r in rows] + [r["method"] for r in sweeps]))
    colour = {m: f"C{i % 10}" for i, m in enumerate(names)}
    for row in rows:
        ax.scatter(row[fid_key], row["bias_score_normalised"], s=40, color=colour[row["method"]])
        ax.annotate(row["method"], (row[fid_key], row["bias_score_normalised"]), xytext=(4, 4),
                    textcoords="offset points", fontsize=8)
    # One line per sweep series (a method at fixed other knobs), in order of its swept knob (`swept`: the weight
    # w or the strength r); the knob-0 point (the baseline at sweep size) starts every series of its method.
    series: dict[str, list[dict]] = {}
    for row in sweeps:
        knob = row.get("swept", "weight")
        if row[knob] == 0:
            continue
        key = f"{row['method']} " + sweep_label({k: v for k, v in row.items() if k != knob})
        series.setdefault(key.strip(), []).append(row)
    for key, points in series.items():
        method, knob = points[0]["method"], points[0].get("swept", "weight")
        start = [r for r in sweeps if r["method"] == method and r[knob] == 0]
        points = start + sorted(points, key=lambda r: r[knob])
        ax.plot([r[fid_key] for r in points], [r["bias_score_normalised"] for r in points], "x:", ms=5,
                alpha=0.7, label=key, color=colour[method])
        for r in points[len(start):]:
            ax.annotate(f"{SHORT.get(knob, knob)}={r[knob]:g}", (r[fid_key], r["bias_score_normalised"]),
                        xytext=(3, -9), textcoords="offset points", fontsize=6, alpha=0.8)
    if sweeps:
        ax.legend(fontsize=7, loc="lower right")
    ax.set_xlabel(f"{fid_key.replace('_', ' ')} (lower is better)")
    ax.set_ylabel("normalised bias score (0 = fair, 1 = all one colour)")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def sweep_label(row: dict) -> str:
    """The knobs of a sweep point, e.g. 'w=10 s=15'."""
    skip = {"method", *dict(COLUMNS), "num_samples", "bias_floor"}
    return " ".join(f"{SHORT.get(k, k)}={v:g}" for k, v in row.items() if k not in skip and isinstance(v, (int, float)))


def _num(x: float) -> str:
    """Three decimals; a value that rounds to zero prints as 0.000, never -0.000."""
    text = f"{x:.3f}"
    return "0.000" if text == "-0.000" else text


def _fmt(v) -> str:
    return "–" if v is None else _num(v) if isinstance(v, float) else str(v)


def overlaps(a, b) -> bool:
    """Whether two intervals [lo, hi] share a point."""
    return a[0] <= b[1] and b[0] <= a[1]


def cell(row: dict, key: str, base: dict | None = None) -> str:
    """'value [lo, hi]' when the row has key_ci95, with ' ≈' when that interval overlaps the baseline's."""
    text, ci = _fmt(row.get(key)), row.get(f"{key}_ci95")
    if ci is None or row.get(key) is None:
        return text
    near = base is not None and base is not row and f"{key}_ci95" in base and overlaps(ci, base[f"{key}_ci95"])
    return f"{text} [{_num(ci[0])}, {_num(ci[1])}]" + (" ≈" if near else "")


def add_bias_removed(rows: list[dict], counts: dict[str, np.ndarray], *, seed: int,
                     n_resamples: int = 1000) -> None:
    """Each non-baseline row gets bias_removed = (B_base − B_m)/(B_base − B_floor) and bias_removed_ci95
    (pipeline.metrics.bias_removed), B_floor = the uniform floor at the method's per-class sample counts;
    `counts` holds each method's attribute count table [Y, K]."""
    from pipeline.metrics import bias_floor, bias_removed

    if "baseline" not in counts:
        return
    for row in rows:
        m = row["method"]
        if m == "baseline" or m not in counts:
            continue
        c = counts[m]
        floor = bias_floor(c.sum(1), c.shape[1], seed=seed)
        row["bias_removed"], row["bias_removed_ci95"] = bias_removed(counts["baseline"], c, floor,
                                                                     n_resamples=n_resamples, seed=seed)
        row["bias_floor"] = floor


def render_markdown(rows: list[dict], *, data_bias: dict, judges: dict, context: dict, grids: dict[str, str],
                    scatter: str, sweeps: list[dict] = (), extras: dict[str, list[str]] | None = None,
                    labels: dict[str, str] | None = None, sections: list[str] = ()) -> str:
    """The report page: methods table, the training data's own bias, judges, grids, scatter, next steps."""
    cols = [(k, h) for k, h in COLUMNS if any(k in r for r in rows)]
    base = next((r for r in rows if r["method"] == "baseline"), None)
    lines = ["# Bias report", "",
             f"Dataset: Coloured MNIST {context['resolution']}×{context['resolution']}, bias ratio "
             f"ρ = {context['bias_ratio']}; {context['num_per_class']} samples per class, "
             f"{context['scheduler'].upper()} {context['num_inference_steps']} steps, guidance scale "
             f"{context['guidance_scale']}.", "",
             "Bias is measured by the colour judge on the generated images; the bias score (InvDiff) is 0 for "
             "uniform colours and 2/K = 0.2 when every sample of a class has one colour, so read it beside the "
             "normalised score (÷ 2/K) and the aligned fraction (share of samples in their class's colour). "
             "FID vs colour-balanced (the headline quality figure) compares with the colour-uniform test split "
             "(what a debiased model should produce); in-domain FID compares with the biased training data (what "
             "the model learned), so removing the bias raises it by construction. Both use the digit judge's "
             "features."
             + (f" For scale: the FID between the two real splits (biased training vs colour-balanced test) is "
                f"{context['fid_real_splits']:.3f}." if "fid_real_splits" in context else ""), "",
             "Each cell: the value and its 95% interval [lo, hi] (bootstrap over samples, Wilson for fractions; "
             "docs/metrics.md). ≈ marks a method whose interval overlaps the baseline's: the difference is within "
             "noise. Judge-corrected: the colour distribution of each class after undoing the colour judge's "
             "confusion matrix, measured on the held-out test split (data/judges/confusion.json). Bias removed: "
             "(B_base − B_m)/(B_base − B_floor) on the normalised bias, 1 = as fair as n samples can show, "
             "0 = no change.", "",
             *([f"Sampling noise alone: a sampler with perfectly uniform colours would score a normalised bias of "
                f"{context['bias_floor']:.3f} on average at {context['num_per_class']} samples per class (the "
                "floor; it falls as 1/√n).", ""] if "bias_floor" in context else []),
             "| method | " + " | ".join(h for _, h in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for r in rows:
        name = f"{r['method']} ({labels[r['method']]})" if r["method"] in (labels or {}) else r["method"]
        lines.append(f"| {name} | " + " | ".join(cell(r, k, base) for k, _ in cols) + " |")
    lines.append("| *training data (real, true colours)* | " + " | ".join(
        _fmt(data_bias.get(k)) for k, _ in cols) + " |")
    lines += ["", "Judges' accuracy on the colour-uniform test split: "
              + ", ".join(f"{k.replace('_test_accuracy', '')} {v:.4f}" for k, v in judges.items()) + ".", ""]
    for method, png in grids.items():
        lines += [f"## Samples: {method}", "", "Rows are the classes 0–9.", "", f"![{method} samples]({png})", ""]
        lines += [*(extras or {}).get(method, [])]
    lines += ["## Bias vs FID", "", f"![bias vs FID]({scatter})", ""]
    if sweeps:
        sweep_cols = [(k, h) for k, h in COLUMNS if k in sweeps[0]]
        lines += ["### Sweeps", "", f"Each point: {sweeps[0]['num_samples']} samples (fewer than the full runs, so "
                  "compare FID within this table; a swept knob at 0 (w = 0, r = 0) is the baseline at the same "
                  "size).", "",
                  "| method | knobs | " + " | ".join(h for _, h in sweep_cols) + " |",
                  "|---|---|" + "---|" * len(sweep_cols)]
        lines += [f"| {r['method']} | {sweep_label(r)} | " + " | ".join(cell(r, k) for k, _ in sweep_cols) + " |"
                  for r in sweeps]
        lines.append("")
    lines += [*sections]
    lines += [
              "## Where to look next", "",
              "- `dvc metrics show` — every stage's metrics; `dvc plots show` — loss curve and bias-vs-FID plot.",
              "- `mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1` — every stage run; the "
              "`report` runs (one per method) line the methods up in the compare view.",
              "- `prefect server start --host 127.0.0.1` then `python -m flows.serve` — trigger and watch the "
              "pipeline from the Prefect UI.", ""]
    return "\n".join(lines)


DDB_COLUMNS = [("unbiased_accuracy", "unbiased acc. ↑"), ("worst_group_accuracy", "worst-group acc. ↑"),
               ("conflicting_accuracy", "bias-conflicting acc. ↑"), ("aligned_accuracy", "bias-aligned acc. ↑")]


def ddb_section(rows: list[dict], *, synthetic: dict | None, amplifiers: dict[str, dict], labels: dict[str, str],
                grid: str | None) -> list[str]:
    """Diffusing DeBias: a debiased *classifier*, so its own table (accuracies on the colour-uniform test split)."""
    lines = ["## Diffusing DeBias (a debiased classifier)", "",
             "LfF's Coloured-MNIST MLP trained on the real biased training set and scored on the colour-uniform test "
             "split; cells = class × colour. Unbiased accuracy is the mean of the cell accuracies, worst-group the "
             "lowest cell.", ""]
    if synthetic:
        lines += [f"Synthetic set: {synthetic['num_samples']} images at guidance scale w = "
                  f"{synthetic['guidance_scale']:g}, aligned fraction {synthetic['aligned_fraction']:.3f} by the "
                  "colour judge (the real training data: ρ = " f"{synthetic['bias_ratio']})."
                  + (f" ![synthetic samples]({grid})" if grid else ""), ""]
    for name, s in amplifiers.items():
        lines.append(f"Bias amplifier ({name}, {s['num_train']} training images): test accuracy on bias-aligned "
                     f"images {s['test_aligned_accuracy']:.3f}, on bias-conflicting "
                     f"{s['test_conflicting_accuracy']:.3f}.")
    lines += ["", "| method | " + " | ".join(h for _, h in DDB_COLUMNS) + " |", "|---|" + "---|" * len(DDB_COLUMNS)]
    for r in rows:
        name = f"{r['method']} ({labels[r['method']]})" if r["method"] in labels else r["method"]
        lines.append(f"| {name} | " + " | ".join(_fmt(r.get(k)) for k, _ in DDB_COLUMNS) + " |")
    return [*lines, ""]


def line_plot(rows: list[dict], x: str, y: str, path: str | Path, title: str = "") -> None:
    """A small line plot of y against x (e.g. per-step probe accuracy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.io import atomic_path

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot([r[x] for r in rows], [r[y] for r in rows], marker="o")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def loss_curves(curves: dict[str, list[dict]], path: str | Path) -> None:
    """Training loss against step, one line per training stage (`name` → [{step, train_loss}]), log-scaled y."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.io import atomic_path

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, points in curves.items():
        points = [p for p in points if "train_loss" in p]
        ax.plot([p["step"] for p in points], [p["train_loss"] for p in points], ".-", ms=3, label=name, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    if curves:
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
