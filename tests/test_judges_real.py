"""pipeline/judges.py: the ResNet judge trained from scratch, torchvision-layout ResNets, and user-supplied
judge files (declared input size and normalisation) — round trips and one-line errors for bad files."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pipeline.errors import UserError
from pipeline.judges import (
    FEATURE_DIM,
    InputAdapter,
    Judge,
    ResNetJudge,
    TorchvisionResNet,
    adopt_judge,
    build_judge,
    judge_outputs,
    load_judge,
    save_judge,
    train_judge,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def separable(n=64, size=12, seed=0):
    """Two classes that differ only in colour (red vs blue) under pixel noise: trivially separable."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 3, size, size, generator=g) * 0.3
    x[:, 0] += torch.where(y == 0, 0.6, -0.6).view(-1, 1, 1)
    x[:, 2] -= torch.where(y == 0, 0.6, -0.6).view(-1, 1, 1)
    return x.clamp(-1, 1), y


def write_judge(path, state, header):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"judge": json.dumps(header)})


def test_resnet_judge_learns_separable_fixture_and_round_trips(tmp_path):
    x, y = separable()
    judge = train_judge(x, y, 2, width=8, epochs=4, batch_size=16, lr=1e-2, seed=0, arch="resnet", blocks=(1, 1))
    assert isinstance(judge, ResNetJudge) and judge.config["blocks"] == [1, 1]
    x_test, y_test = separable(seed=1)
    pred, feats = judge_outputs(judge, x_test)
    assert (pred == y_test.numpy()).mean() > 0.95 and feats.shape == (64, FEATURE_DIM)
    save_judge(judge, tmp_path / "r.safetensors", {"attribute": "colour"}, labels=["red", "blue"])
    loaded = load_judge(tmp_path / "r.safetensors")
    assert isinstance(loaded, ResNetJudge) and not loaded.training
    torch.testing.assert_close(loaded(x_test), judge(x_test), rtol=0, atol=0)


def test_untrained_resnet_is_not_separating():
    """Control for the test above: the same architecture untrained is near chance."""
    torch.manual_seed(0)
    x, y = separable(seed=1)
    pred, _ = judge_outputs(ResNetJudge(2, width=8, blocks=(1, 1)).eval(), x)
    assert (pred == y.numpy()).mean() < 0.8


def test_cnn_judge_file_format_unchanged(tmp_path):
    """The small CNN's header stays {"config": …, "extra": …} with no arch (so earlier judge files still load)."""
    judge = Judge(3, width=8)
    save_judge(judge, tmp_path / "c.safetensors", {"attribute": "x"})
    from safetensors import safe_open

    with safe_open(str(tmp_path / "c.safetensors"), framework="pt") as f:
        header = json.loads(f.metadata()["judge"])
    assert header == {"config": {"num_outputs": 3, "width": 8, "in_channels": 3}, "extra": {"attribute": "x"}}
    assert type(load_judge(tmp_path / "c.safetensors")) is Judge


def test_torchvision_resnet18_layout():
    """Same parameter names and count as torchvision.models.resnet18() (11,689,512 parameters, 122 state keys)."""
    net = TorchvisionResNet("resnet18", 1000)
    state = net.state_dict()
    assert sum(p.numel() for p in net.parameters()) == 11_689_512
    assert len(state) == 122
    for key in ("conv1.weight", "bn1.running_var", "layer1.0.conv2.weight", "layer2.0.downsample.0.weight",
                "layer4.1.bn2.num_batches_tracked", "fc.weight", "fc.bias"):
        assert key in state, key
    assert "layer1.0.downsample.0.weight" not in state
    assert sum(p.numel() for p in TorchvisionResNet("resnet34", 1000).parameters()) == 21_797_672


def test_user_judge_with_input_spec_round_trip(tmp_path):
    """A user file with input size 20 and ImageNet mean/std: the loaded judge resizes and normalises, matching an
    independent computation of the same network on the prepared input."""
    torch.manual_seed(0)
    net = ResNetJudge(2, width=8, blocks=(1,)).eval()
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    header = {"config": net.config, "input": {"size": 20, "mean": mean, "std": std}, "labels": ["no", "yes"]}
    write_judge(tmp_path / "u.safetensors", net.state_dict(), header)
    judge = load_judge(tmp_path / "u.safetensors")
    assert isinstance(judge, InputAdapter) and judge.config["num_outputs"] == 2
    x = torch.rand(5, 3, 12, 12) * 2 - 1
    ref_in = F.interpolate((x + 1) / 2, size=(20, 20), mode="bilinear", antialias=True, align_corners=False)
    ref_in = (ref_in - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(judge(x), net(ref_in))
    pred, feats = judge_outputs(judge, x)
    assert pred.shape == (5,) and feats.shape == (5, FEATURE_DIM)
    # no resize when the images already have the declared size; [H, W] sizes are accepted
    header["input"]["size"] = [12, 12]
    write_judge(tmp_path / "v.safetensors", net.state_dict(), header)
    same = load_judge(tmp_path / "v.safetensors")
    plain = (((x + 1) / 2) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(same(x), net(plain))


def test_user_torchvision_resnet18_state_dict_loads(tmp_path):
    """A torchvision-style state_dict (here from our own layout, same names) with a 2-way fc loads as a judge."""
    torch.manual_seed(0)
    net = TorchvisionResNet("resnet18", 2).eval()
    header = {"config": {"arch": "resnet18", "num_outputs": 2},
              "input": {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}
    write_judge(tmp_path / "t.safetensors", net.state_dict(), header)
    judge = load_judge(tmp_path / "t.safetensors")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(judge(x), net(x))  # mean = std = 0.5 maps [0, 1] back to [-1, 1]
    assert judge_outputs(judge, x)[1].shape == (2, 512)


def _good(tmp_path):
    torch.manual_seed(0)
    net = ResNetJudge(2, width=8, blocks=(1,))
    header = {"config": net.config, "input": {"size": 16, "mean": [0.5] * 3, "std": [0.25] * 3},
              "labels": ["a", "b"]}
    return net.state_dict(), header


@pytest.mark.parametrize(("case", "needle"), [
    ("no-metadata", "KeyError"),
    ("not-json", "JSONDecodeError"),
    ("no-config", '"config" object'),
    ("unknown-arch", "unknown judge architecture 'vit'"),
    ("bad-config-key", "config does not fit"),
    ("missing-tensor", "1 missing ['head.bias']"),
    ("extra-tensor", "1 unexpected ['bogus']"),
    ("wrong-shape", "tensor head.weight has shape (3, 128)"),
    ("labels-length", "labels must list 2 names"),
    ("bad-size", "input.size"),
    ("bad-mean", "input.mean must list 3 numbers"),
    ("zero-std", "input.std must be > 0"),
    ("not-safetensors", "not a valid judge checkpoint"),
])
def test_bad_user_judge_one_line_error(tmp_path, case, needle):
    state, header = _good(tmp_path)
    path = tmp_path / "bad.safetensors"
    meta = None
    if case == "no-metadata":
        meta = {"other": "x"}
    elif case == "not-json":
        meta = {"judge": "{not json"}
    elif case == "no-config":
        header = {"labels": ["a", "b"]}
    elif case == "unknown-arch":
        header["config"] = {**header["config"], "arch": "vit"}
    elif case == "bad-config-key":
        header["config"] = {**header["config"], "depth": 3}
    elif case == "missing-tensor":
        state.pop("head.bias")
    elif case == "extra-tensor":
        state["bogus"] = torch.zeros(1)
    elif case == "wrong-shape":
        state["head.weight"] = torch.zeros(3, 128)
    elif case == "labels-length":
        header["labels"] = ["a"]
    elif case == "bad-size":
        header["input"]["size"] = "big"
    elif case == "bad-mean":
        header["input"]["mean"] = [0.5, 0.5]
    elif case == "zero-std":
        header["input"]["std"] = [0.2, 0.0, 0.2]
    if case == "not-safetensors":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}garbage")
    elif meta is not None:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=meta)
    else:
        write_judge(path, state, header)
    with pytest.raises(UserError) as exc:
        load_judge(path)
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg and needle in msg, msg


def test_adopt_judge_copies_and_checks_output_count(tmp_path):
    state, header = _good(tmp_path)
    write_judge(tmp_path / "u.safetensors", state, header)
    judge = adopt_judge(str(tmp_path / "u.safetensors"), 2, tmp_path / "judges" / "colour.safetensors",
                        "classifiers.attribute_judge")
    assert (tmp_path / "judges" / "colour.safetensors").read_bytes() == (tmp_path / "u.safetensors").read_bytes()
    assert isinstance(judge, InputAdapter)
    with pytest.raises(UserError) as exc:
        adopt_judge(str(tmp_path / "u.safetensors"), 7, tmp_path / "x.safetensors", "classifiers.target_judge")
    msg = str(exc.value)
    assert msg.startswith("classifiers.target_judge: ") and "2 outputs" in msg and "7 labels" in msg
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(UserError, match="classifiers.attribute_judge: .*nope.safetensors: judge file not found"):
        adopt_judge(str(tmp_path / "nope.safetensors"), 2, tmp_path / "y.safetensors", "classifiers.attribute_judge")


def test_build_judge_dispatch():
    assert type(build_judge({"num_outputs": 4, "width": 8, "in_channels": 3})) is Judge
    assert type(build_judge({"arch": "resnet", "num_outputs": 4, "width": 8, "blocks": [1, 2]})) is ResNetJudge
    r = build_judge({"arch": "resnet", "num_outputs": 4, "width": 8, "blocks": [1, 2]})
    assert r(torch.zeros(2, 3, 16, 16)).shape == (2, 4)
    assert sum(1 for m in r.stages if m.downsample is not None) == 1  # stage 2 halves and widens
