"""fid_reference: feature statistics of real images, computed once for every score@<method>.

In-domain: the digit judge's penultimate features (mean, covariance, and the features for precision/recall) of
the reference split (the biased training split by default), and of the colour-balanced test split.
Inception: FID Inception-v3 pool features, when score.inception_fid is on (or 'auto' with CUDA present).
Also the bias of the real training split itself, as the reference row of the report, and a copy of the prepared
data's meta.json (class and attribute names, aligned values) for the scoring stages; Coloured MNIST has none.
"""

import shutil
from pathlib import Path

import numpy as np

from pipeline.data import load_meta, load_split, to_tensor
from pipeline.io import atomic_path, save_json, save_npz
from pipeline.judges import judge_outputs, load_judge
from pipeline.metrics import InceptionFeatures, aligned_fraction, bias_score, feature_statistics
from stages.common import device, load_params, mlflow_run, stage_main

PREPARED, JUDGES, OUT = Path("data/prepared"), Path("data/judges"), Path("data/reference")


def inception_enabled(setting) -> bool:
    import torch

    return bool(torch.cuda.is_available()) if setting == "auto" else bool(setting)


@stage_main
def main() -> None:
    params = load_params()
    p = params.score
    dev = device()
    judge = load_judge(JUDGES / "digit.safetensors", dev)
    ref = load_split(PREPARED, p.reference_split, with_bias=True)
    rng = np.random.default_rng(params.seed)
    keep = np.sort(rng.permutation(len(ref.classes))[: p.max_reference])
    images = ref.images[keep]
    _, feats = judge_outputs(judge, to_tensor(images), p.batch_size)
    mu, sigma = feature_statistics(feats)
    # The colour-balanced test split: the distribution a debiased model should produce.
    balanced = load_split(PREPARED, "test", with_bias=False)
    _, feats_bal = judge_outputs(judge, to_tensor(balanced.images[: p.max_reference]), p.batch_size)
    mu_b, sigma_b = feature_statistics(feats_bal)
    train = load_split(PREPARED, "train", with_bias=True)
    meta = load_meta(PREPARED)
    bias = bias_score(train.bias, train.classes, meta.num_attributes)
    aligned = aligned_fraction(train.bias, train.classes, np.asarray(meta.aligned))
    data_bias = {"bias_score": bias["bias_score"], "bias_score_normalised": bias["bias_score_normalised"],
                 "aligned_fraction": aligned["aligned_fraction"]}
    summary = {"n_reference": len(keep), "reference_split": p.reference_split, "train_data_bias": data_bias,
               "inception": inception_enabled(p.inception_fid)}
    # Everything read and computed first, then the whole directory replaced at once (no half-updated reference)
    with mlflow_run("fid_reference", params, ("score",)) as run, atomic_path(OUT) as tmp:
        tmp.mkdir(parents=True)
        save_npz(tmp / "indomain.npz", mu=mu, sigma=sigma, features=feats.astype(np.float32))
        save_npz(tmp / "balanced.npz", mu=mu_b, sigma=sigma_b)
        if (PREPARED / "meta.json").is_file():
            shutil.copy(PREPARED / "meta.json", tmp / "meta.json")
        if summary["inception"]:
            inc = InceptionFeatures(device=str(dev))(images, batch_size=50)
            mu_i, sigma_i = feature_statistics(inc)
            save_npz(tmp / "inception.npz", mu=mu_i, sigma=sigma_i)
        save_json(tmp / "summary.json", summary)
        run.metrics({"n_reference": len(keep), **{f"train_data_{k}": v for k, v in data_bias.items()}})
    print(f"reference: {len(keep)} {p.reference_split} images; inception {'on' if summary['inception'] else 'off'}")


if __name__ == "__main__":
    main()
