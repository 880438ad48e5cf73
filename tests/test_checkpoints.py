"""pipeline/checkpoints.py's Checkpointer: the one resume/checkpoint skeleton of the training loops."""

import torch

from pipeline.checkpoints import Checkpointer


def test_checkpointer_resumes_the_latest_matching_checkpoint_and_saves_on_schedule(tmp_path):
    ckpt = Checkpointer(tmp_path / "c", "fp", total=10, every=4, names=("model",))
    assert (tmp_path / "c").is_dir() and ckpt.path is None
    assert ckpt.resume(lambda w, s: (_ for _ in ()).throw(AssertionError("nothing to restore"))) == 0
    assert [d for d in range(1, 11) if ckpt.due(d)] == [4, 8]  # never at the last step
    for done in (4, 8):
        ckpt.save(done, {"model": {"w": torch.full((2,), float(done))}}, {"rng": torch.tensor([done])})
    seen = {}
    again = Checkpointer(tmp_path / "c", "fp", total=10, every=4, names=("model",))
    assert again.resume(lambda w, s: seen.update(w=w["model"]["w"], rng=s["rng"])) == 8
    assert torch.equal(seen["w"], torch.full((2,), 8.0)) and torch.equal(seen["rng"], torch.tensor([8]))
    # another config, fewer total steps than the checkpoint, or a worker process: no resume / no write
    assert Checkpointer(tmp_path / "c", "other", total=10, every=4, names=("model",)).resume(None) == 0
    assert Checkpointer(tmp_path / "c", "fp", total=6, every=4, names=("model",)).resume(lambda w, s: None) == 4
    worker = Checkpointer(tmp_path / "w", "fp", total=10, every=4, names=("model",), is_main=False)
    assert not (tmp_path / "w").exists() and not worker.due(4)
    off = Checkpointer(None, "fp", total=10, every=1, names=("model",))
    assert off.resume(None) == 0 and not off.due(1)
