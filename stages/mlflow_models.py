"""The fitted models as MLflow models (pyfunc's `loader_module` flavour), so they can be registered and loaded
with `mlflow.pyfunc.load_model`: the stage's own safetensors files plus an MLmodel file naming this module. Nothing
is pickled (a pyfunc PythonModel would be cloudpickled); loading needs this project on the Python path.
docs/tracking.md.

    kind        files                             predict({...}) → numpy
    diffusion   unet/, scheduler/ (train_diffusion)   {x_t [N,C,H,W], timestep [N], class_label [N]} → U-Net output
    delta       config.json, *.safetensors (δ)        {x_t, timestep, class_label} → δ's output (class-labelled δ)
    adp         adp.safetensors (fit_adp)             {h [N,...], step, class_label [N]} → attribute logits
"""

import json
from pathlib import Path

import numpy as np
import torch

KIND_FILE = "debias_model.json"


def _tensor(inputs: dict, key: str, dtype) -> torch.Tensor:
    if key not in inputs:
        raise KeyError(f"model input {key!r} missing (expected {key} beside the others, see stages.mlflow_models)")
    return torch.as_tensor(np.asarray(inputs[key]), dtype=dtype)


class _Denoiser:
    """A diffusion U-Net (or InvDiff's δ, the same class and inputs), one forward pass per predict."""

    def __init__(self, unet, prompt_embeds=None):
        self.unet, self.prompt_embeds = unet, prompt_embeds

    @torch.no_grad()
    def predict(self, inputs: dict, params: dict | None = None) -> np.ndarray:
        from pipeline.conditioning import Conditioning, call_unet

        x, t = _tensor(inputs, "x_t", torch.float32), _tensor(inputs, "timestep", torch.int64)
        cond = Conditioning(class_labels=_tensor(inputs, "class_label", torch.int64),
                            prompt_embeds=self.prompt_embeds)
        return call_unet(self.unet, x, t, cond).numpy()


class _Probe:
    """Distribution Guidance's attribute probe on U-Net features h at one sampling step."""

    def __init__(self, adp):
        self.adp = adp

    @torch.no_grad()
    def predict(self, inputs: dict, params: dict | None = None) -> np.ndarray:
        h = _tensor(inputs, "h", torch.float32)
        step = int(np.asarray(inputs.get("step", 0)))
        return self.adp(h, step, _tensor(inputs, "class_label", torch.int64)).numpy()


def _load_pyfunc(path: str):
    """MLflow's entry point: `path` is the logged data directory."""
    path = Path(path)
    kind = json.loads((path / KIND_FILE).read_text())["kind"]
    if kind == "diffusion":
        from pipeline.pretrained import load_model

        model = load_model(path)
        return _Denoiser(model.unet, model.prompt_embeds)
    if kind == "delta":
        from pipeline.methods.invdiff import load_delta

        return _Denoiser(load_delta(path))
    if kind == "adp":
        from pipeline.methods.distribution_guidance import load_adp

        return _Probe(load_adp(path / "adp.safetensors"))
    raise ValueError(f"{path / KIND_FILE}: unknown kind {kind!r} (expected diffusion, delta or adp)")
