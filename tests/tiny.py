"""Tiny params derived from the real params.yaml (lightning-hydra-template habit: take the real config, shrink it)."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

SHRINK = {
    "data": {"resolution": 16, "n_judge": 400, "n_train": 600, "n_test": 200},
    "classifiers": {"epochs": 1, "batch_size": 64, "width": 8},
    "diffusion": {"block_out_channels": [16, 32], "train_steps": 4, "batch_size": 8, "checkpoint_every": 2,
                  "warmup_steps": 1},
    "sample": {"num_per_class": 2, "batch_size": 8, "num_inference_steps": 3},
    "score": {"max_reference": 100, "batch_size": 100, "inception_fid": False},
    "latentdir": {"fit_per_class": 6, "record_steps": [0, 2], "source_step": 2, "sweep_steps": [2],
                  "sweep_weights": [0.25], "sweep_per_class": 2, "allow_missing": True},
    "invdiff": {"loss_draws": 2, "loss_batch_size": 200, "min_group_share": 0.1, "grouper_steps": 20,
                "steps": 4, "warmup_steps": 1, "ema_decay": 0.5, "batch_size": 8, "checkpoint_every": 2,
                "sweep_strengths": [2.0], "sweep_per_class": 2, "grid_per_group": 4},
    "distguide": {"fit_per_class": 6, "hidden": 8, "epochs": 2, "steps": [0, 2], "batch_size": 10,
                  "sweep_scales": [1.0], "sweep_per_class": 2},
    "report": {"grid_per_class": 2},
    "ddb": {"num_per_class": 3, "num_inference_steps": 2, "sample_batch_size": 30, "hidden": 8, "batch_size": 64,
            "epochs": 1, "amplifier_epochs": 1},
}


def tiny_params() -> dict:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in SHRINK.items():
        raw[section].update(values)
    return raw
