"""pipeline/judges.py: the judges (shapes, save/load, resume, bad files); pipeline/diffusion.py: the U-Net builder."""

import shutil

import pytest
import torch

from pipeline.diffusion import build_unet, null_class
from pipeline.errors import UserError
from pipeline.judges import (
    FEATURE_DIM,
    Judge,
    judge_outputs,
    load_judge,
    save_judge,
    train_judge,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n=96, k=3):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, k, (n,), generator=g)
    x = torch.randn(n, 3, 16, 16, generator=g) * 0.1 + y.view(-1, 1, 1, 1).float() - 1.0  # learnable
    return x, y


def test_judge_shapes_and_features():
    judge = Judge(10, width=8)
    x = torch.randn(5, 3, 16, 16)
    assert judge(x).shape == (5, 10)
    pred, feats = judge_outputs(judge.eval(), x, batch_size=2)
    assert pred.shape == (5,) and feats.shape == (5, FEATURE_DIM)


def test_judge_learns_and_round_trips(tmp_path):
    x, y = _data()
    judge = train_judge(x, y, 3, width=8, epochs=10, batch_size=16, lr=1e-2, seed=0)
    pred, _ = judge_outputs(judge, x)
    assert (pred == y.numpy()).mean() > 0.9
    save_judge(judge, tmp_path / "j.safetensors", {"attribute": "toy"})
    loaded = load_judge(tmp_path / "j.safetensors")
    torch.testing.assert_close(loaded(x), judge(x), rtol=0, atol=0)


def test_judge_file_bytes_are_deterministic(tmp_path):
    judge = Judge(3, width=8)
    save_judge(judge, tmp_path / "a.safetensors", {"attribute": "x", "more": 1})
    save_judge(judge, tmp_path / "b.safetensors", {"attribute": "x", "more": 1})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_resumed_judge_training_equals_uninterrupted(tmp_path):
    x, y = _data()
    kwargs = dict(width=8, epochs=3, batch_size=16, lr=1e-2, seed=1)
    full = train_judge(x, y, 3, ckpt_dir=tmp_path / "a", **kwargs)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["step-0000001", "step-0000002"]
    shutil.copytree(tmp_path / "a" / "step-0000001", tmp_path / "b" / "step-0000001")
    resumed = train_judge(x, y, 3, ckpt_dir=tmp_path / "b", **kwargs)
    for k, v in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=0)


def test_nan_loss_stops_judge_training_naming_the_step():
    x, y = _data()
    x[0] = float("nan")
    with pytest.raises(UserError, match=r"judge: loss became nan at step \d+"):
        train_judge(x, y, 3, width=8, epochs=1, batch_size=96, lr=1e-2, seed=0)


@pytest.mark.parametrize("content", [b"", b"not a safetensors file", None])
def test_bad_judge_file_is_a_one_line_error(tmp_path, content):
    path = tmp_path / "j.safetensors"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match="j.safetensors") as err:
        load_judge(path)
    assert "\n" not in str(err.value)


def test_unet_null_class_and_resolution_check():
    unet = build_unet(resolution=16, num_classes=10, block_out_channels=[16, 32], layers_per_block=1, attention=True)
    assert null_class(unet) == 10
    with pytest.raises(UserError, match="divisible"):
        build_unet(resolution=18, num_classes=10, block_out_channels=[16, 32, 32], layers_per_block=1,
                   attention=False)
