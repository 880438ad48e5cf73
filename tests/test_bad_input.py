"""Bad input never runs and never crashes (issue classes 1–7 of docs/bad-input.md): each case is refused with exit
code 2 (or a UserError) and one line that names the key or the path, and leaves existing outputs untouched.

Stages run in-process (their main(argv) in a temporary working directory), so a case costs milliseconds."""

import hashlib
import importlib
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.config import load_params
from pipeline.errors import UserError
from tests.tiny import tiny_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _project(tmp_path, monkeypatch, tmp_path_factory):
    """A project directory as cwd, one MLflow store for the module (created once: it costs seconds)."""
    monkeypatch.chdir(tmp_path)
    store = tmp_path_factory.getbasetemp() / "bad-input-mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)


def write_params(text: str | bytes | None = None, **sections) -> Path:
    """params.yaml in cwd: `text` verbatim, or the tiny params with `sections` merged in."""
    path = Path("params.yaml")
    if text is None:
        raw = tiny_params()
        for section, values in sections.items():
            raw[section] = {**raw[section], **values} if isinstance(values, dict) else values
        text = yaml.safe_dump(raw)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def refused(path: Path, *needles: str) -> str:
    """load_params(path) raises one short line containing every needle."""
    with pytest.raises(UserError) as exc:
        load_params(path)
    msg = str(exc.value)
    assert "\n" not in msg and len(msg) < 600, msg
    for n in needles:
        assert n in msg, msg
    return msg


def snapshot(root: Path = Path(".")) -> dict[str, str]:
    """sha256 of every file under data/ (what a refused run must leave as it was)."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((root / "data").rglob("*"))
            if p.is_file()}


def run_stage(name: str, argv: list[str] | None, capsys) -> str:
    """Run stages.<name>.main in-process; assert exit 2 and one `error:` line on stderr; return that line."""
    main = importlib.import_module(f"stages.{name}").main
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv or []) if "argv" in inspect.signature(main).parameters else main()
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    # progress bars (rewritten in place with \r) may come first; the error is the last line, alone, and the only one
    lines = [line for line in err.replace("\r", "\n").split("\n") if line.strip()]
    assert lines and lines[-1].startswith("error: "), err
    assert sum("error" in line.lower() or "Traceback" in line for line in lines) == 1, err
    assert all(line.startswith(("judge:", "error: ")) for line in lines), err
    return lines[-1]


# ------------------------------------------------------------------------------- 1. non-finite numbers refused

@pytest.mark.parametrize("section,values,key", [
    ("distguide", {"scale": float("inf")}, "distguide.scale"),
    ("latentdir", {"weight": float("inf")}, "latentdir.weight"),
    ("latentdir", {"svm_c": float("inf")}, "latentdir.svm_c"),
    ("invdiff", {"grouper_lr": float("inf")}, "invdiff.grouper_lr"),
    ("distguide", {"target": [float("nan")] * 10}, "distguide.target"),
    ("latentdir", {"target": [0.1] * 9 + [float("nan")]}, "latentdir.target"),
    ("data", {"bias_ratio": float("nan")}, "data.bias_ratio"),
    ("invdiff", {"sweep_strengths": [1.0, float("-inf")]}, "invdiff.sweep_strengths"),
    ("diffusion", {"lr": float("nan")}, "diffusion.lr"),
    ("sample", {"eta": float("nan")}, "sample.eta"),
])
def test_non_finite_numbers_refused(section, values, key):
    refused(write_params(**{section: values}), key, "finite")


def test_nan_as_text_refused():
    """YAML `nan` is the string 'nan', which pydantic reads as a float; a target checked by comparisons passed it."""
    refused(write_params("seed: 0\nlatentdir:\n  target: [nan, 0.5, 0.5]\n"), "latentdir.target", "finite")


# ------------------------------------------------------------------------------- 2. mistakes not silently accepted

@pytest.mark.parametrize("text,needles", [
    ("", ["empty"]),
    ("# only a comment\n", ["empty"]),
    ("{}\n", ["empty"]),
    ("seed: 0\ndata:\n  resolution: 16\ndata:\n  resolution: 32\n", ["duplicate key 'data'", "line 4"]),
    ("seed: 0\nsample:\n  eta: 0.0\n  eta: 1.0\n", ["duplicate key 'eta'"]),
    ("seed: true\n", ["seed", "boolean"]),
    ("seed: 0\nsample:\n  num_per_class: false\n", ["sample.num_per_class", "boolean"]),
    ("seed: 0\ninvdiff:\n  sweep_strengths: [1.0, true]\n", ["invdiff.sweep_strengths", "boolean"]),
    ("seed: 0\ndistguide:\n  scale: yes\n", ["distguide.scale", "boolean"]),
], ids=["empty", "comment-only", "empty-mapping", "duplicate-section", "duplicate-key", "seed-true", "int-false",
        "list-bool", "float-yes"])
def test_silent_mistakes_refused(text, needles):
    refused(write_params(text), *needles)


@pytest.mark.parametrize("sections,needles", [
    ({"diffusion": {"num_train_timesteps": 10}, "sample": {"num_inference_steps": 25}},
     ["sample.num_inference_steps 25", "diffusion.num_train_timesteps 10"]),
    ({"diffusion": {"num_train_timesteps": 10}, "sample": {"num_inference_steps": 3},
      "invdiff": {"loss_timesteps": [1, 5]}, "ddb": {"num_inference_steps": 20}}, ["ddb.num_inference_steps 20"]),
    ({"latentdir": {"record_steps": [0, 2, 7]}}, ["latentdir.record_steps [7]", "sample.num_inference_steps 3"]),
    ({"distguide": {"steps": [0, 9]}}, ["distguide.steps", "sample.num_inference_steps 3"]),
    ({"invdiff": {"loss_timesteps": [10, 1000]}}, ["invdiff.loss_timesteps", "num_train_timesteps 1000"]),
    ({"mlflow": {"experiment": " "}}, ["mlflow.experiment", "empty"]),
    ({"mlflow": {"tracking_uri": ""}}, ["mlflow.tracking_uri", "empty"]),
], ids=["sampler-steps", "ddb-steps", "record-steps", "distguide-steps", "loss-timesteps", "experiment",
        "tracking-uri"])
def test_cross_section_inconsistencies_refused(sections, needles):
    refused(write_params(**sections), *needles)


@pytest.mark.parametrize("sections", [
    {"score": {"inception_fid": True}}, {"data": {"source": "mnist"}, "diffusion": {"attention": False}},
    {"latentdir": {"record_steps": [-1, 0, 2], "source_step": 2}},
])
def test_bools_and_edges_still_accepted(sections):
    """Where a bool is the type (or one of a Literal's values), or -1 names z_T, the value is kept."""
    load_params(write_params(**sections))


def test_shipped_params_files_still_load():
    """params.yaml, and each profile merged onto it (docs/profiles.md)."""
    from pipeline.config import merge_profile, parse_params

    load_params(ROOT / "params.yaml")
    for path in sorted(ROOT.glob("params_*.yaml")):
        parse_params(merge_profile(path, ROOT / "params.yaml"), path.name)


# ------------------------------------------------------------------------------- 3. one line, not a traceback

def test_non_utf8_params(capsys):
    write_params(b"seed: 0\ndata:\n  source: \xff\xfe\n")
    assert "not UTF-8" in run_stage("prepare_data", None, capsys)


def test_checkpoint_of_the_wrong_shape_is_one_line(tmp_path):
    from pipeline.checkpoints import restoring

    model = torch.nn.Linear(4, 3)
    with pytest.raises(UserError, match="step-0000002: checkpoint does not fit the model") as exc:
        with restoring(tmp_path / "step-0000002"):
            model.load_state_dict({"weight": torch.zeros(5, 4), "bias": torch.zeros(5)})
    assert "\n" not in str(exc.value) and "size mismatch" in str(exc.value)


def test_judge_resume_from_a_wrong_shape_checkpoint_with_matching_fingerprint(tmp_path, monkeypatch):
    """The real resume path (pipeline/judges.py): a checkpoint whose fingerprint matches but whose tensors do not."""
    from pipeline import checkpoints, judges

    monkeypatch.setattr(checkpoints, "latest_checkpoint", lambda *a, **k: tmp_path / "step-0000001")
    bad = {"model": {"bogus": torch.zeros(1)}}
    monkeypatch.setattr(checkpoints, "load_checkpoint", lambda path, names: (bad, {}, 1))
    images, labels = torch.rand(8, 3, 16, 16) * 2 - 1, torch.arange(8) % 2
    with pytest.raises(UserError, match="does not fit the model") as exc:
        judges.train_judge(images, labels, num_outputs=2, epochs=2, batch_size=4, lr=1e-3, width=4, seed=0,
                           ckpt_dir=tmp_path, device="cpu")
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("arrays,needles", [
    ({"steps": np.array([0, 2]), "directions": np.zeros((2, 10))}, ["directions [S, attributes >= 2, values]"]),
    ({"steps": np.array([0, 2]), "directions": np.zeros((3, 10, 768))}, ["[3, 10, 768]"]),
    ({"steps": np.array([0, 2]), "directions": np.full((2, 10, 768), np.nan, np.float32)}, ["finite"]),
], ids=["2-d", "steps-mismatch", "nan"])
def test_bad_directions_file(tmp_path, arrays, needles):
    from pipeline.methods.latent_directions import latent_direction_hooks

    path = tmp_path / "directions.npz"
    np.savez(path, **arrays)
    with pytest.raises(UserError) as exc:
        latent_direction_hooks(path, np.arange(10), step=2, weight=1.0, target=None, seed=0)
    assert str(path) in str(exc.value) and all(n in str(exc.value) for n in needles), exc.value


def test_directions_for_another_model(tmp_path):
    from pipeline.methods.latent_directions import latent_direction_hooks
    from pipeline.sampling import StepContext

    path = tmp_path / "directions.npz"
    np.savez(path, steps=np.array([2]), directions=np.ones((1, 10, 12), np.float32))
    hooks = latent_direction_hooks(path, np.arange(10), step=2, weight=1.0, target=None, seed=0)
    ctx = StepContext(step_index=-1, num_steps=3, timestep=0, labels=torch.zeros(2, dtype=torch.long), null_class=10,
                      sample_ids=torch.arange(2))
    with pytest.raises(UserError, match="12 values, the model's noise 768"):
        hooks.initial_noise(torch.zeros(2, 3, 16, 16), ctx)


@pytest.mark.parametrize("W,needle", [
    (np.full((6, 2), np.nan, np.float32), "finite"),
    (np.ones((6, 1), np.float32), "[6, 1]"),
    (np.full((5, 2), 0.5, np.float32), "[5, 2]"),
    (np.full((6, 2), 0.7, np.float32), "sum to 1"),
    (np.tile(np.array([[1.0, 0.0]], np.float32), (6, 1)), "non-empty"),
    (np.ones(6, np.float32), "[6]"),
])
def test_bad_groups_file(W, needle):
    from pipeline.methods.invdiff import check_groups

    with pytest.raises(UserError) as exc:
        check_groups(W, "data/methods/invdiff_groups/groups.npz", rows=6)
    assert "groups.npz" in str(exc.value) and needle in str(exc.value), exc.value


@pytest.mark.parametrize("uri,needles", [
    ("bogus://nowhere", ["$MLFLOW_TRACKING_URI", "bogus://nowhere", "not a tracking URI"]),
    ("sqlite:///params.yaml/mlflow.db", ["$MLFLOW_TRACKING_URI", "params.yaml is a file"]),
    ("params.yaml/runs", ["$MLFLOW_TRACKING_URI", "params.yaml is a file"]),
])
def test_bad_tracking_uri_from_the_environment(monkeypatch, capsys, uri, needles):
    write_params()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    line = run_stage("train_classifiers", None, capsys)
    assert all(n in line for n in needles), line


def test_bad_tracking_uri_in_params(monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    write_params(mlflow={"tracking_uri": "nope+weird://x"})
    assert "mlflow.tracking_uri" in run_stage("train_diffusion", None, capsys)


def test_empty_experiment_name_from_the_environment(monkeypatch, capsys):
    write_params()
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "")
    assert "$MLFLOW_EXPERIMENT_NAME" in run_stage("train_classifiers", None, capsys)


def test_sample_count_past_memory_refused_before_allocating(capsys, tmp_path):
    from pipeline.diffusion import build_unet, make_noise_scheduler

    model = Path("data/models/diffusion")
    build_unet(resolution=16, num_classes=10, block_out_channels=[16, 32], layers_per_block=1,
               attention=False).save_pretrained(model / "unet")
    make_noise_scheduler(1000, "squaredcos_cap_v2", "v_prediction").save_pretrained(model / "scheduler")
    write_params(sample={"num_per_class": 10**12})
    before = snapshot()
    line = run_stage("sample", ["--method", "baseline"], capsys)
    assert "sample.num_per_class" in line and "GiB" in line, line
    assert snapshot() == before and not Path("data/samples").exists()


def test_check_memory_in_the_sampler():
    from pipeline.sampling import available_memory, check_memory

    check_memory(10, 1000, "x")
    with pytest.raises(UserError, match="latentdir.fit_per_class: 3 samples"):
        check_memory(3, available_memory(), "latentdir.fit_per_class")


# ------------------------------------------------------------------------------- 4. outputs untouched on error

@pytest.mark.parametrize("uri", ["bogus://x", "sqlite:///params.yaml/mlflow.db"])
def test_prepare_data_keeps_outputs_on_a_bad_tracking_uri(monkeypatch, capsys, uri):
    """prepare_data writes data/prepared before it opens its MLflow run: the URI is checked before that."""
    write_params()
    for out in ("data/prepared/train.npz", "data/metrics/prepare_data.json"):
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text("previous output")
    before = snapshot()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    run_stage("prepare_data", None, capsys)
    assert snapshot() == before


# ------------------------------------------------------------------------------- 5. bounded error text

def test_alias_bomb_refused_quickly_in_one_short_line():
    import time

    rows = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    rows += [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
    path = write_params("\n".join(rows) + "\nseed: *i\n")
    assert len(path.read_bytes()) < 3000
    start = time.perf_counter()
    refused(path, "aliases")
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("text,key", [
    ("seed: 0\ndata:\n  source: [" + ", ".join(["x" * 50] * 2000) + "]\n", "data.source"),
    ("seed: 0\nsample:\n  eta: '" + "9" * 100_000 + "'\n", "sample.eta"),
    ("seed: 0\n" + "k" * 1000 + ": 1\n", "unknown key"),
])
def test_echoed_values_are_bounded(text, key):
    assert len(refused(write_params(text), key)) < 600


# ------------------------------------------------------------------------------- 6. CLI names that become paths

@pytest.mark.parametrize("stage,name", [
    ("score", "../samples/baseline"), ("score", "/tmp/x"), ("sample", "../scores/baseline"),
    ("sweep", "../samples/baseline"), ("score", "baseline/../../x"),
])
def test_method_names_cannot_escape(capsys, stage, name):
    write_params()
    target = Path("data/samples/baseline")
    target.mkdir(parents=True)
    (target / "images.npz").write_text("previous output")
    before = snapshot()
    line = run_stage(stage, ["--method", name], capsys)
    assert "--method" in line and "dvc.yaml" in line and "baseline" in line, line
    assert snapshot() == before


# ------------------------------------------------------------------------------- 7. no pickle through pretrained/

def _pixel_unet_bin(path: Path) -> Path:
    from pipeline.diffusion import build_unet

    unet = build_unet(resolution=16, num_classes=2, block_out_channels=[16, 32], layers_per_block=1, attention=False)
    unet.save_pretrained(path, safe_serialization=False)
    assert (path / "diffusion_pytorch_model.bin").is_file() and not list(path.glob("*.safetensors"))
    return path


def test_pretrained_pickle_weights_refused_with_the_way_to_convert(tmp_path):
    from pipeline.pretrained import load_pretrained

    path = _pixel_unet_bin(tmp_path / "pre" / "unet").parent
    with pytest.raises(UserError) as exc:
        load_pretrained(path)
    msg = str(exc.value)
    assert "\n" not in msg and "diffusion_pytorch_model.bin" in msg and "scripts/to_safetensors.py" in msg, msg


def test_model_dir_pickle_weights_refused(tmp_path):
    from pipeline.diffusion import make_noise_scheduler
    from pipeline.pretrained import load_model

    _pixel_unet_bin(tmp_path / "m" / "unet")
    make_noise_scheduler(1000, "squaredcos_cap_v2", "v_prediction").save_pretrained(tmp_path / "m" / "scheduler")
    with pytest.raises(UserError, match="pickle files"):
        load_model(tmp_path / "m")


def test_conversion_script_makes_it_loadable(tmp_path):
    import runpy

    from pipeline.pretrained import load_pretrained

    path = _pixel_unet_bin(tmp_path / "pre" / "unet").parent
    convert = runpy.run_path(str(ROOT / "scripts" / "to_safetensors.py"))["convert"]
    assert [p.name for p in convert(path)] == ["diffusion_pytorch_model.safetensors"]
    assert load_pretrained(path).unet.config.num_class_embeds == 3


# ------------------------------------------------------------------------------- every stage from the CLI

def _outs(stage: str, key: str | None) -> list[str]:
    """The paths dvc.yaml declares as the stage's outputs (outs, metrics, plots), with ${key}/${item} filled in."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    spec = spec.get("do", spec)
    paths = []
    for field in ("outs", "metrics", "plots"):
        for entry in spec.get(field, []):
            path = next(iter(entry)) if isinstance(entry, dict) else entry
            paths.append(path.replace("${key}", key or "").replace("${item}", key or ""))
    return paths


STAGES = [  # (dvc stage, module, argv, foreach key, what the missing-input error names)
    ("prepare_data", "prepare_data", None, None, "data.source"),
    ("train_classifiers", "train_classifiers", None, None, "data/prepared"),
    ("train_diffusion", "train_diffusion", None, None, "data/prepared"),
    ("fid_reference", "fid_reference", None, None, "data/judges"),
    ("fit_directions", "fit_directions", None, None, "data/models/diffusion"),
    ("fit_adp", "fit_adp", None, None, "data/models/diffusion"),
    ("fit_grouper", "fit_grouper", None, None, "data/models/diffusion"),
    ("finetune_guidance", "finetune_guidance", ["--variant", "invdiff"], "invdiff", "data/models/diffusion"),
    ("sample", "sample", ["--method", "latentdir"], "latentdir", "data/models/diffusion"),
    ("sweep", "sweep", ["--method", "distguide"], "distguide", "data/models/diffusion"),
    ("score", "score", ["--method", "baseline"], "baseline", "data/samples/baseline"),
    ("sample_bias_aligned", "sample_bias_aligned", None, None, "data/models/diffusion"),
    ("train_bias_amplifier", "train_bias_amplifier", ["--source", "synthetic"], None, "data/methods/ddb_synthetic"),
    ("train_bias_amplifier_real", "train_bias_amplifier", ["--source", "real"], None, "data/prepared"),
    ("debias_classifier", "debias_classifier", ["--method", "recipe1"], "recipe1", "data/prepared"),
    ("report", "report", None, None, "data/scores"),
]


def _previous_outputs(stage: str, key: str | None) -> dict[str, str]:
    for path in map(Path, _outs(stage, key)):
        target = path if path.suffix in (".json", ".parquet", ".npz") else path / "previous.txt"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f"previous output of {stage}")
    return snapshot()


@pytest.mark.parametrize("stage,module,argv,key,path", STAGES, ids=[s[0] for s in STAGES])
def test_every_stage_bad_param_names_the_key_and_keeps_outputs(capsys, stage, module, argv, key, path):
    write_params(distguide={"scale": float("inf")}, seed=True)
    before = _previous_outputs(stage, key)
    line = run_stage(module, argv, capsys)
    assert "distguide.scale" in line and "seed" in line, line
    assert snapshot() == before


@pytest.mark.parametrize("stage,module,argv,key,path", STAGES, ids=[s[0] for s in STAGES])
def test_every_stage_missing_input_names_the_path_and_keeps_outputs(capsys, stage, module, argv, key, path):
    write_params(data={"source": "no/such/mnist"})
    before = _previous_outputs(stage, key)
    assert len(before) == len(_outs(stage, key)) >= 1
    line = run_stage(module, argv, capsys)
    assert path in line, line
    assert snapshot() == before


# ------------------------------------------------------------------------------- 8. after a kill

def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


def test_killed_writers_leftovers_are_tidied_on_the_next_start(capsys):
    """A stale temp is removed, a previous output caught between its two renames is put back, a live one is kept."""
    write_params()
    dead = _dead_pid()
    stale = Path(f"data/methods/.invdiff.tmp-{dead}")
    (stale / "delta").mkdir(parents=True)
    (stale / "stray.txt").write_text("half-written")
    old = Path(f"data/samples/.baseline.old-{dead}")
    old.mkdir(parents=True)
    (old / "images.npz").write_text("previous output")
    live = Path(f"data/scores/.baseline.tmp-{__import__('os').getpid()}")
    live.mkdir(parents=True)
    run_stage("score", ["--method", "latentdir"], capsys)  # fails (no samples), after the tidy-up
    assert not stale.exists() and not old.exists() and live.is_dir()
    assert Path("data/samples/baseline/images.npz").read_text() == "previous output"


def test_killed_run_is_marked_killed_on_the_next_start():
    import mlflow

    from stages.common import mlflow_run

    params = load_params(write_params())
    mlflow.set_tracking_uri(__import__("os").environ["MLFLOW_TRACKING_URI"])
    exp = mlflow.set_experiment(params.mlflow.experiment)
    client = mlflow.MlflowClient()
    host = __import__("socket").gethostname()
    killed = client.create_run(exp.experiment_id, tags={"stage": "fit_grouper", "host": host,
                                                         "pid": str(_dead_pid())}).info.run_id
    other = client.create_run(exp.experiment_id, tags={"stage": "fit_adp", "host": host,
                                                        "pid": str(_dead_pid())}).info.run_id
    with mlflow_run("fit_grouper", params, ("invdiff",)):
        pass
    assert client.get_run(killed).info.status == "KILLED"
    assert client.get_run(other).info.status == "RUNNING"  # another stage's: its own next start ends it
    client.set_terminated(other, "KILLED")


def test_sigterm_ends_the_run_failed_and_removes_temporaries(tmp_path):
    """A stage told to stop (SIGTERM, as Prefect and `timeout` do) leaves no temp and no RUNNING run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import mlflow

    write_params()
    script = tmp_path / "stage.py"
    script.write_text(
        "import time\nfrom pipeline.io import atomic_path\n"
        "from stages.common import load_params, mlflow_run, stage_main\n"
        "@stage_main\ndef main():\n    params = load_params()\n"
        "    with mlflow_run('probe', params, ()), atomic_path('data/out') as tmp:\n"
        "        tmp.mkdir(parents=True)\n        print('ready', flush=True)\n        time.sleep(60)\n"
        "main()\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    assert list(Path("data").glob(".out.tmp-*"))
    proc.send_signal(signal.SIGTERM)
    start = time.perf_counter()
    assert proc.wait(timeout=60) == 143 and time.perf_counter() - start < 30
    assert not list(Path("data").glob(".out.tmp-*")) and not Path("data/out").exists()
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["debias-diffusion"], filter_string="tags.stage = 'probe'")
    assert list(runs["status"]) == ["FAILED"]


# ------------------------------------------------------------------------------- 9. two runs at once

def test_second_run_is_told_in_one_line_that_the_project_is_held(tmp_path):
    """`make run` probes DVC's repro lock first: while DVC holds it (here taken with DVC's own Lock), exit 3 with one
    line naming the lock and how to wait; once released, the probe passes."""
    import subprocess
    import sys

    from dvc.lock import Lock

    (tmp_path / ".dvc" / "tmp").mkdir(parents=True)
    probe = [sys.executable, str(ROOT / "scripts" / "project_lock.py")]
    lock = Lock(str(tmp_path / ".dvc" / "tmp" / "lock"))
    lock.lock()
    try:
        held = subprocess.run(probe, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    finally:
        lock.unlock()
    assert held.returncode == 3 and len(held.stderr.splitlines()) == 1, held.stderr
    assert ".dvc/tmp/lock" in held.stderr and "--wait-for-lock" in held.stderr
    free = subprocess.run(probe, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert free.returncode == 0 and free.stderr == ""


# ------------------------------------------------------------------------------- 4. no half-updated outputs

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """data/prepared and data/judges of the tiny params, built once in-process (a few seconds)."""
    import os

    root = tmp_path_factory.mktemp("prepared")
    cwd = Path.cwd()
    os.chdir(root)
    try:
        write_params()
        for stage in ("prepare_data", "train_classifiers"):
            importlib.import_module(f"stages.{stage}").main()
    finally:
        os.chdir(cwd)
    return root


def _copy_project(source: Path, *dirs: str) -> None:
    import shutil

    for d in dirs:
        shutil.copytree(source / d, Path(d))


def test_train_classifiers_keeps_both_judges_when_the_second_fails(prepared, capsys):
    """The colour judge trains, the digit judge's file is bad: the previous judges must both stay."""
    _copy_project(prepared, "data/prepared")
    Path("data/judges").mkdir()
    for name in ("colour", "digit"):  # differ from what a re-run would write (training is deterministic)
        Path(f"data/judges/{name}.safetensors").write_text("previous output")
    Path("bad-judge.safetensors").write_bytes(b"not a safetensors file")
    write_params(classifiers={"target_judge": "bad-judge.safetensors"})
    before = snapshot()
    line = run_stage("train_classifiers", None, capsys)
    assert "classifiers.target_judge" in line or "bad-judge.safetensors" in line, line
    assert snapshot() == before


def test_fid_reference_keeps_its_outputs_when_a_split_is_missing(prepared, capsys):
    _copy_project(prepared, "data/prepared", "data/judges")
    Path("data/prepared/test.npz").unlink()
    Path("data/reference").mkdir(parents=True)
    Path("data/reference/indomain.npz").write_text("previous output")
    write_params()
    before = snapshot()
    assert "data/prepared/test.npz" in run_stage("fid_reference", None, capsys)
    assert snapshot() == before
