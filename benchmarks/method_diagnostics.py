"""Why a method misses its target: two measured diagnostics on a built project (docs/results.md "Why Distribution
Guidance and the synthetic amplifier fall short").

    python benchmarks/method_diagnostics.py distguide    # needs data/models/diffusion, data/methods/distguide, judges
    python benchmarks/method_diagnostics.py amplifier    # needs data/prepared and data/methods/ddb_amplifier[_real]
    python benchmarks/method_diagnostics.py amplifier --data /tmp/ddb_table/rho_0.99/data   # a ddb_table work dir

distguide: samples sample.num_per_class per class with the Distribution Guidance hook as sample@distguide does, and
at every guided step reads the ADP on h before and after the edit h ← h − s·∇_h L. Printed per step: the share of
samples the ADP calls aligned (its argmax is the class's bias-aligned attribute) before and after the edit, the mean
softmax(ADP/τ) probability of the aligned attribute after it (the target p* gives 1/K), and how often the ADP's
argmax agrees with the colour judge on the *final* image. An edit that moves the ADP but not the image shows as
"aligned after the edit ≈ 0" at every step while the judge still finds the samples aligned, and as "aligned before
the edit" climbing back at the next step (the U-Net restores what the edit changed).

amplifier: how well each bias amplifier flags the real training split's bias-conflicting images (the bias labels
are read here for this diagnostic only; nothing is chosen by it): ROC AUC and average precision of its per-sample
cross-entropy, and for "the amplifier is wrong" (Recipe I's conflicting pseudo-label) the count, the recall of
conflicting images and the precision, with the most frequent (class → predicted) pairs among the aligned images
it gets wrong; and the spread of the stroke colour (each image's bright pixels, divided by their brightness) of the
synthetic images against the real bias-aligned ones, per class, with the median over classes of ‖std_syn‖/‖std_real‖.
Writes benchmarks/results/method_diagnostics_<which>.json (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import load_params  # noqa: E402
from pipeline.data import load_meta, load_split  # noqa: E402


def distguide(data: Path, params_path: Path) -> dict:
    from pipeline.judges import judge_outputs, load_judge
    from pipeline.methods.distribution_guidance import distribution_guidance_hooks
    from pipeline.pretrained import load_model
    from pipeline.sampling import SamplerSettings, sample, sample_seeds

    params = load_params(params_path)
    p = params.distguide
    model = load_model(data / "models" / "diffusion", "cpu")
    meta = load_meta(data / "prepared")
    cond = np.repeat(np.arange(model.num_classes), params.sample.num_per_class)
    hooks = distribution_guidance_hooks(data / "methods" / "distguide" / "adp.safetensors", scale=p.scale,
                                        tau=p.tau, steps=p.steps, group_size=p.batch_size, target=p.target,
                                        beta_power=p.beta_power)
    edit, records = hooks.mid_block, []

    def recording(h, ctx):  # the hook itself, then the ADP read on h before and after its edit
        out = edit(h, ctx)
        if hooks.active(ctx):
            n, y = len(ctx.sample_ids), ctx.labels[:len(ctx.sample_ids)]
            with torch.no_grad():
                before = hooks.adp(h[:n].float().flatten(1), ctx.step_index, y)
                after = hooks.adp(out[:n].float().flatten(1), ctx.step_index, y)
            records.append((ctx.step_index, ctx.sample_ids.cpu().numpy().copy(), before.argmax(1).cpu().numpy(),
                            after.argmax(1).cpu().numpy(), torch.softmax(after / hooks.tau, 1).cpu().numpy()))
        return out

    hooks.mid_block = recording
    images = sample(model, cond, sample_seeds(params.seed, len(cond)), SamplerSettings.from_params(params.sample),
                    hooks=hooks)
    images = torch.as_tensor(np.asarray(images)).float()
    if images.shape[-1] in (1, 3):
        images = images.permute(0, 3, 1, 2)
    judged, _ = judge_outputs(load_judge(data / "judges" / "colour.safetensors"), images)
    aligned = np.asarray(meta.aligned)[cond]
    steps = []
    for s in sorted({r[0] for r in records}):
        rows = [r for r in records if r[0] == s]
        order = np.argsort(np.concatenate([r[1] for r in rows]))
        before, after = (np.concatenate([r[k] for r in rows])[order] for k in (2, 3))
        prob = np.concatenate([r[4] for r in rows])[order]
        steps.append({"step": s, "adp_aligned_before_edit": float((before == aligned).mean()),
                      "adp_aligned_after_edit": float((after == aligned).mean()),
                      "adp_p_aligned_after_edit": float(prob[np.arange(len(cond)), aligned].mean()),
                      "adp_agrees_with_final_judge_before": float((before == judged).mean()),
                      "adp_agrees_with_final_judge_after": float((after == judged).mean())})
    return {"samples": len(cond), "judge_aligned_fraction": float((judged == aligned).mean()),
            "target_p_aligned": float(1.0 / len(meta.attr_names)), "scale": p.scale, "tau": p.tau,
            "guided_steps": list(p.steps), "steps": steps}


def stroke_chromaticity(images: np.ndarray) -> np.ndarray:
    """Per image: the mean RGB of its pixels brighter than 0.6 × its brightest, divided by their mean brightness
    (max over RGB), so the stroke's colour independent of its intensity. images uint8 [N, H, W, 3] → [N, 3]."""
    rgb = images.astype(np.float64)
    bright = rgb.max(-1)
    mask = bright > 0.6 * bright.max(axis=(1, 2), keepdims=True)
    weight = mask.sum(axis=(1, 2)).clip(min=1)
    colour = (rgb * mask[..., None]).sum(axis=(1, 2)) / weight[:, None]
    return colour / ((bright * mask).sum(axis=(1, 2)) / weight + 1e-9)[:, None]


def amplifier(data: Path) -> dict:
    from sklearn.metrics import average_precision_score, roc_auc_score

    from pipeline.methods.diffusing_debias import amplifier_ce, flatten_images, load_classifier, predict

    meta = load_meta(data / "prepared")
    train = load_split(data / "prepared", "train", with_bias=True)
    x, y = flatten_images(train.images), torch.from_numpy(train.classes)
    conflicting = train.bias != np.asarray(meta.aligned)[train.classes]
    out = {"train_images": len(y), "train_conflicting": int(conflicting.sum())}
    synthetic = data / "methods" / "ddb_synthetic" / "images.npz"
    if synthetic.is_file() and train.images.shape[-1] == 3:
        with np.load(synthetic) as z:
            s_images, s_classes = z["images"], z["classes"]
        spread = []
        for c in range(len(meta.class_names)):
            real = train.images[(train.classes == c) & ~conflicting]
            spread.append({"class": c, "real_std": stroke_chromaticity(real).std(0).round(4).tolist(),
                           "synthetic_std": stroke_chromaticity(s_images[s_classes == c]).std(0).round(4).tolist()})
        ratio = [np.linalg.norm(r["synthetic_std"]) / max(np.linalg.norm(r["real_std"]), 1e-9) for r in spread]
        out["stroke_colour_spread"] = {"synthetic_over_real_median": float(np.median(ratio)), "per_class": spread}
    for name in ("ddb_amplifier", "ddb_amplifier_real"):
        path = data / "methods" / name / "model.safetensors"
        if not path.is_file():
            continue
        pred, logits = predict(load_classifier(path), x)
        ce = amplifier_ce(logits, y).numpy()
        wrong = pred != train.classes
        flagged_conflicting = int((wrong & conflicting).sum())
        aligned_wrong = wrong & ~conflicting
        errors = Counter(zip(train.classes[aligned_wrong].tolist(), pred[aligned_wrong].tolist(), strict=True))
        out[name] = {"ce_auc": float(roc_auc_score(conflicting, ce)),
                     "ce_average_precision": float(average_precision_score(conflicting, ce)),
                     "wrong": int(wrong.sum()), "wrong_conflicting": flagged_conflicting,
                     "wrong_aligned": int(aligned_wrong.sum()),
                     "recall": flagged_conflicting / max(1, int(conflicting.sum())),
                     "precision": flagged_conflicting / max(1, int(wrong.sum())),
                     "aligned_errors_top": [[c, q, k] for (c, q), k in errors.most_common(5)]}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", choices=("distguide", "amplifier"))
    ap.add_argument("--data", type=Path, default=ROOT / "data", help="the project's data/ folder")
    ap.add_argument("--params", type=Path, default=None, help="params.yaml (default: next to --data)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    start = time.process_time()
    params = args.params or args.data.resolve().parent / "params.yaml"
    result = distguide(args.data, params) if args.which == "distguide" else amplifier(args.data)
    result.update(data=str(args.data), cpu_s=round(time.process_time() - start, 1))
    text = json.dumps(result, indent=1)
    out = args.out or ROOT / "benchmarks" / "results" / f"method_diagnostics_{args.which}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
