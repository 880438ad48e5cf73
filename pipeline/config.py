"""Typed params: every knob of params.yaml with its allowed range, written down once.

A stage calls `load_params()`; any unknown key, wrong type or out-of-range value raises UserError
with one line that names the key (`data.bias_ratio`) and what was expected.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import UserError
from pipeline.targets import distribution_problem


def _admits(annotation, kind: type) -> bool:
    """Whether a field's type accepts values of `kind` (bool in Literal[True, False, ...] counts)."""
    if annotation is kind:
        return True
    if typing.get_origin(annotation) is Literal:
        return any(type(a) is kind for a in typing.get_args(annotation))
    return any(_admits(a, kind) for a in typing.get_args(annotation))


class _Section(BaseModel):
    # allow_inf_nan=False: a NaN slips through every `ge`/`le` bound (all comparisons with NaN are false) and
    # an inf turns samples black or losses NaN far downstream (docs/bad-input.md).
    model_config = ConfigDict(extra="forbid", strict=False, frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, v, info):
        """YAML `true` is not the number 1: refuse a bool where the field (or its items) is a number."""
        annotation = cls.model_fields[info.field_name].annotation
        items = v if isinstance(v, (list, tuple)) else [v]
        if (any(isinstance(x, bool) for x in items) and not _admits(annotation, bool)
                and (_admits(annotation, int) or _admits(annotation, float))):
            raise ValueError("expected a number, not a boolean")
        return v


class DataParams(_Section):
    source: str = "mnist"
    resolution: int = Field(16, ge=8, le=128)
    bias_ratio: float = Field(0.95, ge=0.0, lt=1.0)
    colour_jitter: float = Field(0.005, ge=0.0, le=0.5)
    n_judge: int = Field(20000, ge=10)
    n_train: int = Field(40000, ge=10)
    n_test: int = Field(10000, ge=10)
    # real-world datasets (pipeline/datasets.py): source is then the dataset's root directory, n_* are caps
    format: Literal["mnist", "waterbirds", "celeba", "fairface", "folder"] = "mnist"
    target_attr: str | None = None
    bias_attr: str | None = None
    class_names: tuple[str, ...] | None = None
    attr_names: tuple[str, ...] | None = None
    aligned: tuple[int, ...] | None = None
    rebalance: bool = False

    @model_validator(mode="after")
    def _fits_mnist(self):
        if self.source == "mnist" and self.n_judge + self.n_train > 60000:
            raise ValueError(f"n_judge + n_train must be <= 60000 for MNIST, got {self.n_judge + self.n_train}")
        return self

    @model_validator(mode="after")
    def _fits_format(self):
        fmt = self.format
        named = {"target_attr": ("celeba", "fairface", "folder"), "bias_attr": ("celeba", "fairface", "folder"),
                 "class_names": ("fairface", "folder"), "attr_names": ("fairface", "folder"),
                 "aligned": ("waterbirds", "celeba", "fairface", "folder")}
        for key, formats in named.items():
            if getattr(self, key) is not None and fmt not in formats:
                raise ValueError(f"{key} applies to format {' / '.join(formats)} only, not {fmt}")
        if self.rebalance and fmt == "mnist":
            raise ValueError("rebalance applies to the real-data formats (Coloured MNIST is built at bias_ratio)")
        if fmt != "mnist" and self.source == "mnist":
            raise ValueError(f"source must be the {fmt} dataset's root directory when format is {fmt}")
        for key in ("class_names", "attr_names"):
            names = getattr(self, key)
            if names is not None and (not names or len(set(names)) != len(names)):
                raise ValueError(f"{key} must list distinct labels, got {list(names)}")
        return self


class ClassifierParams(_Section):
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0)
    width: int = Field(32, ge=4)
    arch: Literal["cnn", "resnet"] = "cnn"
    blocks: tuple[int, ...] = (1, 1, 1)
    attribute_judge: str | None = None
    target_judge: str | None = None

    @model_validator(mode="after")
    def _blocks(self):
        if not 1 <= len(self.blocks) <= 5 or min(self.blocks) < 1:
            raise ValueError(f"blocks must list 1 to 5 stage depths, each >= 1, got {list(self.blocks)}")
        return self


class DiffusionParams(_Section):
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = Field(1, ge=1, le=4)
    attention: bool = True
    num_train_timesteps: int = Field(1000, ge=10)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "v_prediction"
    label_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    train_steps: int = Field(1600, ge=0)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    checkpoint_every: int = Field(500, ge=1)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    # a pre-trained model (pipeline/pretrained.py): a local diffusers directory, fine-tuned for train_steps
    pretrained: str | None = None
    prompt_template: str | None = None  # text conditioning: "a photo of a {class}", {class} = the class's name

    @model_validator(mode="after")
    def _channels(self):
        if not 1 <= len(self.block_out_channels) <= 5 or min(self.block_out_channels) < 8:
            raise ValueError("block_out_channels must list 1 to 5 widths, each >= 8")
        if any(c % 8 for c in self.block_out_channels):
            raise ValueError("block_out_channels must be multiples of 8 (GroupNorm groups)")
        if self.train_steps == 0 and self.pretrained is None:
            raise ValueError("train_steps 0 (adopt the model as it is) needs pretrained")
        if self.prompt_template is not None and "{class}" not in self.prompt_template:
            raise ValueError(f"prompt_template must contain {{class}} (the class's name), got {self.prompt_template!r}")
        if self.prompt_template is not None and self.pretrained is None:
            raise ValueError("prompt_template needs a pretrained latent pipeline (text encoder) in pretrained")
        return self


class SampleParams(_Section):
    num_per_class: int = Field(110, ge=1)
    batch_size: int = Field(250, ge=1)
    scheduler: Literal["ddim", "ddpm"] = "ddim"
    num_inference_steps: int = Field(25, ge=1, le=1000)
    timestep_spacing: Literal["leading", "trailing", "linspace"] = "trailing"
    eta: float = Field(0.0, ge=0.0, le=1.0)
    guidance_scale: float = Field(1.0, ge=0.0, le=50.0)


class ScoreParams(_Section):
    inception_fid: Literal[True, False, "auto"] = "auto"
    pr_k: int = Field(3, ge=1)
    bootstrap: int = Field(1000, ge=20)      # resamples of the bias measures' percentile intervals
    bootstrap_fid: int = Field(100, ge=20)   # resamples of the FID intervals (one eigendecomposition each)
    max_reference: int = Field(10000, ge=10)
    reference_split: Literal["train", "test", "judge"] = "train"
    batch_size: int = Field(500, ge=1)


class LatentDirParams(_Section):
    fit_on: Literal["balanced", "samples"] = "balanced"
    fit_per_class: int = Field(100, ge=2)
    record_steps: tuple[int, ...] = (0, 5, 10, 15, 20)
    svm_c: float = Field(1.0, gt=0)
    holdout: float = Field(0.2, ge=0.0, lt=1.0)
    pool: int = Field(1, ge=0)
    allow_missing: bool = False
    source_step: int = 0
    weight: float = Field(0.25, ge=0.0)  # a fraction of ‖z_T‖
    renormalise: bool = True
    target: tuple[float, ...] | None = None
    sweep_weights: tuple[float, ...] = (0.1, 0.25, 0.4)
    sweep_steps: tuple[int, ...] = (0, 20)
    sweep_per_class: int = Field(20, ge=1)

    @model_validator(mode="after")
    def _consistent(self):
        if any(s < -1 for s in self.record_steps):
            raise ValueError("record_steps: step indices must be >= -1 (-1 = the initial noise z_T)")
        for name, steps in (("source_step", (self.source_step,)), ("sweep_steps", self.sweep_steps)):
            if not set(steps) <= set(self.record_steps):
                raise ValueError(f"{name} {list(steps)} must be among record_steps {list(self.record_steps)}")
        return self

    @field_validator("target")
    @classmethod
    def _distribution(cls, v):
        if v is not None and (problem := distribution_problem(v)):
            raise ValueError(problem)
        return v


class InvDiffParams(_Section):
    # max step: per-sample losses of the frozen model, then the grouper
    loss_timesteps: tuple[int, int] = (10, 100)
    loss_draws: int = Field(2, ge=1, le=1000)
    loss_contrast: bool = True
    loss_batch_size: int = Field(500, ge=1)
    num_groups: int = Field(2, ge=2, le=16)
    min_group_share: Literal["auto"] | float = "auto"
    grouper_init: Literal["ranked", "random"] = "ranked"
    grouper_steps: int = Field(300, ge=0)
    grouper_lr: float = Field(0.05, gt=0)
    conflict_clusters: Literal["auto"] | int = 1  # level 2: split the conflicting-like group (1 = no split)
    conflict_clusters_max: int = Field(12, ge=2, le=64)
    split_module: str = "up_blocks.1"
    split_reference: int = Field(32, ge=1)
    # min step: the guidance module δ
    delta_width: float = Field(0.25, gt=0.0, le=1.0)
    steps: int = Field(1500, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(1e-3, gt=0)
    lam: float = Field(10.0, ge=0.0)
    balanced: bool = True
    paired: bool = False
    target: Literal["uniform", "equal"] | tuple[float, ...] = "uniform"
    hard_groups: bool = False
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    warmup_steps: int = Field(100, ge=0)
    ema_decay: float = Field(0.995, ge=0.0, lt=1.0)
    label_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    checkpoint_every: int = Field(500, ge=1)
    train_timesteps: tuple[int, int] | None = None  # [lo, hi) of δ's t (and of the sampler steps δ acts at)
    # sampling
    strength: float = Field(1.1, ge=0.0, le=20.0)
    sweep_strengths: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0)
    sweep_per_class: int = Field(20, ge=1)
    grid_per_group: int = Field(10, ge=1, le=64)

    @model_validator(mode="after")
    def _consistent(self):
        lo, hi = self.loss_timesteps
        if not 0 <= lo <= hi:
            raise ValueError(f"loss_timesteps must be [t_min, t_max] with 0 <= t_min <= t_max, got {[lo, hi]}")
        if self.min_group_share != "auto" and not 0 < self.min_group_share <= 0.5:
            raise ValueError(f"min_group_share must be 'auto' or in (0, 0.5], got {self.min_group_share}")
        if self.min_group_share != "auto" and self.min_group_share * self.num_groups > 1:
            raise ValueError(f"min_group_share × num_groups must be <= 1, got {self.min_group_share} × "
                             f"{self.num_groups}")
        if self.batch_size < self.num_groups:
            raise ValueError(f"batch_size must be >= num_groups ({self.num_groups}) for group-balanced batches")
        if self.conflict_clusters != "auto" and not 1 <= self.conflict_clusters <= 64:
            raise ValueError(f"conflict_clusters must be 'auto' or an integer in [1, 64], got "
                             f"{self.conflict_clusters}")
        if self.paired and not self.balanced:
            raise ValueError("paired draws need group-balanced batches (balanced: true)")
        if self.paired and self.target != "equal":
            raise ValueError("paired draws need the B/K-per-group layout: set target: equal (or paired: false)")
        if not isinstance(self.target, str) and (problem := distribution_problem(self.target)):
            raise ValueError(f"target must be 'uniform', 'equal' or shares: {problem}")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be < steps ({self.steps})")
        if self.train_timesteps is not None and not 0 <= self.train_timesteps[0] < self.train_timesteps[1]:
            raise ValueError(f"train_timesteps must be null or [lo, hi) with 0 <= lo < hi, got "
                             f"{list(self.train_timesteps)}")
        return self


class ReportParams(_Section):
    grid_per_class: int = Field(10, ge=1, le=64)


class DistGuideParams(_Section):
    # fit_adp: h_t recorded while sampling the biased model, pseudo-labelled by the colour judge
    fit_on: Literal["balanced", "samples"] = "balanced"
    fit_per_class: int = Field(150, ge=2)
    h_module: str = "up_blocks.1"
    pool: int = Field(1, ge=0)
    pool_weights: Literal["activity", "uniform"] = "activity"
    adp: Literal["auto", "linear", "mlp"] = "linear"
    hidden: int = Field(64, ge=4)
    class_offset: bool = False
    epochs: int = Field(40, ge=1)
    lr: float = Field(0.01, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    holdout: float = Field(0.2, ge=0.0, lt=1.0)
    # guidance at step indices in [steps[0], steps[1]): h ← h − s·∇_h L (space h, published) or classifier
    # guidance by ∇_{x_t} L through the U-Net up to h (space x, ours)
    space: Literal["h", "x"] = "x"
    scale: float = Field(30.0, ge=0.0)
    tau: float = Field(2.0, gt=0.0)
    beta_power: float = Field(0.05, ge=0.0)
    steps: tuple[int, int] = (5, 25)
    batch_size: int = Field(100, ge=1)
    guidance_scale: float | None = Field(1.5, ge=0.0, le=50.0)  # the method's own classifier-free w (None: sample's)
    target: tuple[float, ...] | None = None
    sweep_scales: tuple[float, ...] = (10.0, 30.0, 60.0)
    sweep_per_class: int = Field(20, ge=1)

    @field_validator("steps")
    @classmethod
    def _step_range(cls, v):
        if not 0 <= v[0] < v[1]:
            raise ValueError("must be [start, end) with 0 <= start < end")
        return v

    @field_validator("target")
    @classmethod
    def _distribution(cls, v):
        if v is not None and (problem := distribution_problem(v)):
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _auto_needs_holdout(self):
        # auto chooses on the fitting samples' held-out share (docs/protocol.md); with none it would pick blindly
        if self.adp == "auto" and self.holdout == 0:
            raise ValueError("adp 'auto' chooses on the fitting samples' held-out share: set holdout > 0 "
                             "(or adp linear | mlp)")
        return self


class DdbParams(_Section):
    # sample_bias_aligned: synthetic, bias-amplified samples from the biased model
    seed: int = Field(0, ge=0, lt=2**31)
    num_per_class: int = Field(200, ge=1)
    guidance_scale: float = Field(1.0, ge=0.0, le=50.0)
    num_inference_steps: int = Field(20, ge=1, le=1000)
    sample_batch_size: int = Field(250, ge=1)
    # classifiers: the bias amplifiers and the target MLP (LfF's Coloured-MNIST protocol)
    hidden: int = Field(100, ge=1)
    depth: int = Field(3, ge=1, le=8)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(256, ge=2)
    epochs: int = Field(30, ge=1)
    amplifier_epochs: int = Field(100, ge=1)
    amplifier_loss: Literal["gce", "ce"] = "gce"
    amplifier_shift: int = Field(0, ge=0, le=8)
    # the recipes
    ema: float = Field(0.7, ge=0.0, lt=1.0)
    gce_q: float = Field(0.7, gt=0.0, le=1.0)
    dro_eta: float = Field(0.01, gt=0.0)
    dro_weight_decay: float = Field(3e-3, ge=0)
    pseudo_bias: Literal["aligned", "predicted"] = "aligned"
    ba_temperature: float = Field(1.0, gt=0.0, le=1000.0)
    group_sampling: Literal["balanced", "uniform"] = "balanced"


class MlflowParams(_Section):
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "debias-diffusion"

    @field_validator("tracking_uri", "experiment")
    @classmethod
    def _not_blank(cls, v):
        if not v.strip():
            raise ValueError("must not be empty")
        return v


class MethodDag(_Section):
    """An inference-time method in the DAG (params.yaml `methods`; its code: pipeline/methods/registry.py)."""

    fitted: str  # the folder its fit stage writes (the baseline: the model): a dep of sample@<name>, read by its hooks
    knobs: str   # the params its sampling reads (a section or a dotted key): the params of sample@<name>


# The DAG's methods (dvc.yaml's sample/score `foreach: ${methods}`) and those with a sweep (`foreach: ${sweeps}`:
# the params section the sweep reads). The defaults are params.yaml's, like every other section's.
DEFAULT_METHODS = {
    "baseline": MethodDag(fitted="data/models/diffusion", knobs="sample"),
    "latentdir": MethodDag(fitted="data/methods/latentdir", knobs="latentdir"),
    "invdiff": MethodDag(fitted="data/methods/invdiff", knobs="invdiff.strength"),
    "invdiff_lambda0": MethodDag(fitted="data/methods/invdiff_lambda0", knobs="invdiff.strength"),
    "invdiff_oracle": MethodDag(fitted="data/methods/invdiff_oracle", knobs="invdiff.strength"),
    "distguide": MethodDag(fitted="data/methods/distguide", knobs="distguide"),
}
DEFAULT_SWEEPS = {"latentdir": "latentdir", "invdiff": "invdiff", "invdiff_lambda0": "invdiff",
                  "invdiff_oracle": "invdiff", "distguide": "distguide"}
NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")  # a method's name becomes a stage name and a path (data/samples/<name>)


class Params(_Section):
    seed: int = Field(0, ge=0, lt=2**31)
    data: DataParams = DataParams()
    classifiers: ClassifierParams = ClassifierParams()
    diffusion: DiffusionParams = DiffusionParams()
    sample: SampleParams = SampleParams()
    score: ScoreParams = ScoreParams()
    latentdir: LatentDirParams = LatentDirParams()
    invdiff: InvDiffParams = InvDiffParams()
    distguide: DistGuideParams = DistGuideParams()
    ddb: DdbParams = DdbParams()
    report: ReportParams = ReportParams()
    mlflow: MlflowParams = MlflowParams()
    methods: dict[str, MethodDag] = Field(default_factory=lambda: dict(DEFAULT_METHODS), min_length=1)
    sweeps: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_SWEEPS))

    @model_validator(mode="after")
    def _dag_methods(self):
        """Names a stage and a path can carry; knobs and sweep sections that exist; fitted folders under data/."""
        for name, entry in self.methods.items():
            if not NAME.fullmatch(name):
                raise ValueError(f"methods.{_clip(name)}: a method name is lower-case letters, digits and _, "
                                 "starting with a letter")
            if not _has_key(type(self), entry.knobs):
                raise ValueError(f"methods.{name}.knobs: {_clip(entry.knobs)!r} is not a params key")
            parts = Path(entry.fitted).parts
            if Path(entry.fitted).is_absolute() or ".." in parts or parts[:1] != ("data",):
                raise ValueError(f"methods.{name}.fitted: {_clip(entry.fitted)!r} must be a folder under data/")
        for name, section in self.sweeps.items():
            if name not in self.methods:
                raise ValueError(f"sweeps.{_clip(name)}: not a method of `methods`")
            field = type(self).model_fields.get(section)
            model = field.annotation if field is not None else None
            if not (isinstance(model, type) and issubclass(model, BaseModel)
                    and "sweep_per_class" in model.model_fields):
                raise ValueError(f"sweeps.{name}: {_clip(section)!r} is not a params section with sweep_per_class")
        return self

    @model_validator(mode="after")
    def _across_sections(self):
        """What one section's value means depends on another's: checked here, at start, not by a traceback later."""
        t, steps = self.diffusion.num_train_timesteps, self.sample.num_inference_steps
        ddb_steps = self.ddb.num_inference_steps
        for key, n in (("sample.num_inference_steps", steps), ("ddb.num_inference_steps", ddb_steps)):
            if n > t:
                raise ValueError(f"{key} {n} must be <= diffusion.num_train_timesteps {t} (a sampler step is a "
                                 "training timestep)")
        bad = [s for s in self.latentdir.record_steps if s >= steps]
        if bad:
            raise ValueError(f"latentdir.record_steps {bad} must be < sample.num_inference_steps {steps} (step "
                             f"indices 0..{steps - 1}, or -1 for z_T)")
        start, end = self.distguide.steps
        if end > steps:
            raise ValueError(f"distguide.steps [{start}, {end}) must end <= sample.num_inference_steps {steps}")
        lo, hi = self.invdiff.loss_timesteps
        if hi >= t:
            raise ValueError(f"invdiff.loss_timesteps [{lo}, {hi}] must be < diffusion.num_train_timesteps {t}")
        return self


def _has_key(model: type[BaseModel], dotted: str) -> bool:
    """Whether `a.b` names a field of the typed params (a section or a knob in one)."""
    for part in dotted.split("."):
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return False
        model = field.annotation
    return True


ECHO = 80  # characters of a bad value echoed in an error (an alias bomb's repr runs to 100s of MB)
MAX_LISTED = 4  # bad keys listed in one error line
MAX_NODES = 100_000  # YAML nodes after alias expansion; the real params.yaml has a few hundred


def _clip(text: str, limit: int = ECHO) -> str:
    """`text` cut to `limit` characters (echoed user input stays short)."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def _describe(err: dict) -> str:
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"{_clip(key)}: unknown key"
    got = err.get("input")
    got = "" if isinstance(got, dict) else f" (got {_clip(_bounded_repr(got))})"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{_clip(key)}: {msg}{got}" if key else msg


def _bounded_repr(value, budget: int = ECHO + 1) -> str:
    """repr(value) cut after about `budget` characters, without building the whole string first."""
    if isinstance(value, (list, tuple)):
        parts, used = [], 0
        for item in value:
            if used > budget:
                parts.append("...")
                break
            parts.append(_bounded_repr(item, budget - used))
            used += len(parts[-1]) + 2
        return "[" + ", ".join(parts) + "]"
    return repr(value)[: budget + 1] if not isinstance(value, dict) else "{...}"


def parse_params(raw: dict, origin: str = "params.yaml") -> Params:
    """Validate a params mapping; raise UserError with one line listing every bad key."""
    try:
        return Params.model_validate(raw or {})
    except ValidationError as exc:
        errors = exc.errors()
        shown = [_describe(e) for e in errors[:MAX_LISTED]]
        more = f"; and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
        raise UserError(f"{origin}: " + "; ".join(shown) + more) from None


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses what DVC refuses: a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {_clip(str(key))!r} (line {key_node.start_mark.line + 1})",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node, budget: int) -> int:
    """Nodes of the YAML graph counted as if every alias were copied out; stops past `budget`."""
    count, stack = 0, [node]
    while stack and count <= budget:
        n = stack.pop()
        count += 1
        if isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)
        elif isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                stack.extend((k, v))
    return count


def read_params(path: str | Path = "params.yaml") -> dict:
    """The raw mapping of a params file, not yet validated.

    Refused with one line: a missing, empty or non-UTF-8 file, invalid YAML, a duplicated key, more than
    MAX_NODES values once aliases are expanded, anything but a mapping at the top."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: params file not found (run from the project root)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})") from None
    try:
        loader = _StrictLoader(text)
        try:
            node = loader.get_single_node()
            if node is not None and _expanded_size(node, MAX_NODES) > MAX_NODES:
                raise UserError(f"{path}: more than {MAX_NODES} values once YAML aliases are expanded (an alias "
                                "bomb?); write the values out")
            raw = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({_clip(str(exc).splitlines()[0], 200)})") from None
    if raw is None or raw == {}:
        raise UserError(f"{path}: empty; it must hold the params sections (copy the project's params.yaml)")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml (the DVC-tracked file in the working directory); refusals: read_params."""
    return parse_params(read_params(path), str(path))


def foreach_names(dvc_yaml: str | Path, stage: str, params: str | Path = "params.yaml") -> list[str]:
    """The item names of a dvc.yaml stage's `foreach`: its keys (or list items), or, for `foreach: ${methods}`,
    the keys of that params map in `params` (what DVC expands; the stage names sample@<name>)."""
    loop = yaml.safe_load(Path(dvc_yaml).read_text())["stages"][stage]["foreach"]
    ref = re.fullmatch(r"\$\{\s*([\w.]+)\s*\}", loop) if isinstance(loop, str) else None
    if ref:
        loop = read_params(params)
        for part in ref.group(1).split("."):
            loop = loop.get(part) if isinstance(loop, dict) else None
        if not isinstance(loop, dict | list):
            raise UserError(f"{params}: {ref.group(1)}: missing or not a mapping (dvc.yaml's {stage} stages are its "
                            "keys)")
    return [str(k) for k in loop]


def set_override(raw: dict, dotted_key: str, value) -> dict:
    """Return a copy of `raw` with `a.b.c = value` set (used by the Prefect flow's param overrides)."""
    import copy

    out = copy.deepcopy(raw)
    node = out
    *parents, leaf = dotted_key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise UserError(f"override {dotted_key}: {p} is not a section")
    node[leaf] = value
    return out


def override_keys(raw: dict, prefix: str = "") -> dict:
    """A profile's keys as dotted overrides: its mappings followed down to the leaves (a scalar or a list), so
    `{data: {resolution: 32}}` is `{"data.resolution": 32}` and sets that key alone."""
    out = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        out.update(override_keys(value, dotted + ".") if isinstance(value, dict) and value else {dotted: value})
    return out


def apply_overrides(raw: dict, overrides: dict, origin: str) -> dict:
    """`raw` with every dotted override set (set_override), validated as a whole before it is returned (one
    UserError line naming `origin` and the key): the Prefect flow's overrides and the profiles both come here."""
    try:
        for key, value in overrides.items():
            raw = set_override(raw, key, value)
    except UserError as exc:
        raise UserError(f"{origin}: {exc}") from None
    parse_params(raw, origin)
    return raw


# Profiles (docs/profiles.md): a params_<name>.yaml holds only the keys it changes relative to params.yaml.
PROFILE_MARK = "# profile: "  # the first line of a params.yaml that a profile was applied to


def applied_profile(path: str | Path = "params.yaml") -> str | None:
    """The profile already applied to a params file (its first line names it), else None."""
    first = Path(path).read_text(encoding="utf-8", errors="replace").split("\n", 1)[0]
    return first.removeprefix(PROFILE_MARK).split()[0] if first.startswith(PROFILE_MARK) else None


def merge_profile(profile: str | Path, base: str | Path = "params.yaml") -> dict:
    """The raw params of `profile` applied to `base`: every key of the profile set (override_keys, apply_overrides)
    on the base's mapping, the whole validated. A base that already carries a profile is refused (the result
    would mix two profiles)."""
    profile, base = Path(profile), Path(base)
    if profile.resolve() == base.resolve():
        raise UserError(f"{profile}: is the base params file itself, not a profile")
    done = applied_profile(base) if base.is_file() else None
    if done:
        raise UserError(f"{base}: profile {done} is applied already; restore the base first "
                        f"(git checkout {base.name}), then apply {profile.name}")
    return apply_overrides(read_params(base), override_keys(read_params(profile)), f"{profile} on {base}")


def apply_profile(profile: str | Path, params: str | Path = "params.yaml") -> int:
    """Write `profile` applied to `params` back to `params` (comments kept; the first line names the profile);
    returns the number of keys set. The written file is read back and must equal merge_profile's mapping."""
    import io
    import os

    from ruamel.yaml import YAML

    profile, params = Path(profile), Path(params)
    merged = merge_profile(profile, params)
    rt = YAML()  # round trip: params.yaml keeps its comments and layout, the profile's lists their flow style
    rt.preserve_quotes = True
    rt.width = 4096
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc, keys = rt.load(params.read_text()), override_keys(rt.load(profile.read_text()))
    for dotted, value in keys.items():
        node = doc
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    out = io.StringIO()
    rt.dump(doc, out)
    text = (f"{PROFILE_MARK}{profile.name} applied to the base params (python -m pipeline.config apply); "
            f"`git checkout {params.name}` restores the base\n" + out.getvalue())
    if yaml.safe_load(text) != merged:  # YAML 1.1 (PyYAML, DVC's reader) and 1.2 (the writer) read it alike
        raise UserError(f"{profile}: its values do not survive a YAML round trip unchanged; write them as the "
                        "base file does")
    tmp = params.with_name(f".{params.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, params)
    return len(keys)


def main(argv=None) -> None:
    """`python -m pipeline.config apply params_gpu.yaml`: apply a profile to params.yaml (docs/profiles.md);
    `show` prints the merged params without writing them."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m pipeline.config", description=main.__doc__)
    ap.add_argument("command", choices=["apply", "show"])
    ap.add_argument("profile", help="a profile file, e.g. params_gpu.yaml")
    ap.add_argument("--params", default="params.yaml", help="the base params file (default: params.yaml)")
    args = ap.parse_args(argv)
    try:
        if args.command == "show":
            print(yaml.safe_dump(merge_profile(args.profile, args.params), sort_keys=False), end="")
        else:
            n = apply_profile(args.profile, args.params)
            print(f"{args.params}: {args.profile} applied ({n} keys set); `git checkout {args.params}` restores it")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
