"""pipeline/io.py: atomic writes and one-line read errors."""

import numpy as np
import pytest

from pipeline.errors import UserError
from pipeline.io import atomic_path, load_json, load_npz, save_json, save_npz


def _leftovers(directory):
    """Dot-prefixed temp names left beside the target."""
    return [p.name for p in directory.iterdir() if p.name.startswith(".")]


def test_atomic_file_not_created_when_body_raises(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert not target.exists()
    assert _leftovers(tmp_path) == []


def test_atomic_dir_not_created_when_body_raises(tmp_path):
    target = tmp_path / "outdir"
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "a").write_text("x")
        raise KeyboardInterrupt
    assert not target.exists()
    assert _leftovers(tmp_path) == []


def test_atomic_failure_keeps_existing_target(tmp_path):
    """A failed rewrite leaves the previous version untouched."""
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(ValueError), atomic_path(target) as tmp:
        tmp.write_text("new")
        raise ValueError
    assert target.read_text() == "old"


def test_atomic_replaces_existing_dir(tmp_path):
    """An existing directory is swapped for the new one as a whole: no stale files survive."""
    target = tmp_path / "outdir"
    target.mkdir()
    (target / "stale").write_text("old")
    (target / "kept").write_text("old")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "kept").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["kept"]
    assert (target / "kept").read_text() == "new"
    assert _leftovers(tmp_path) == []


def test_atomic_creates_parents_and_replaces_file(tmp_path):
    target = tmp_path / "a" / "b" / "f.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("1")
    with atomic_path(target) as tmp:
        tmp.write_text("2")
    assert target.read_text() == "2"
    assert _leftovers(target.parent) == []


def test_npz_round_trip(tmp_path):
    a, b = np.arange(12, dtype=np.uint8).reshape(3, 4), np.linspace(0, 1, 5)
    save_npz(tmp_path / "x.npz", a=a, b=b)
    got = load_npz(tmp_path / "x.npz", "a")
    assert list(got) == ["a"] and np.array_equal(got["a"], a)
    both = load_npz(tmp_path / "x.npz")
    assert set(both) == {"a", "b"} and np.array_equal(both["b"], b)


def test_load_npz_refuses_pickled_objects(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, images=np.array([{"evil": 1}, None], dtype=object))
    with pytest.raises(UserError, match="obj.npz"):
        load_npz(path, "images")


def test_load_npz_missing_key(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, images=np.zeros(3))
    with pytest.raises(UserError, match="labels") as exc:
        load_npz(path, "images", "labels")
    assert str(path) in str(exc.value)


def test_load_npz_missing_file(tmp_path):
    with pytest.raises(UserError, match="nope.npz"):
        load_npz(tmp_path / "nope.npz", "images")


def test_load_npz_truncated_names_path(tmp_path):
    path = tmp_path / "trunc.npz"
    save_npz(path, images=np.random.default_rng(0).integers(0, 255, (50, 8, 8, 3), dtype=np.uint8))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError) as exc:
        load_npz(path, "images")
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)


def test_load_npz_not_an_npz(tmp_path):
    path = tmp_path / "text.npz"
    path.write_text("hello")
    with pytest.raises(UserError, match="text.npz"):
        load_npz(path)


def test_json_round_trip_and_invalid(tmp_path):
    save_json(tmp_path / "m.json", {"b": 1, "a": [1.5]})
    assert load_json(tmp_path / "m.json") == {"a": [1.5], "b": 1}
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1,')
    with pytest.raises(UserError) as exc:
        load_json(bad)
    assert str(bad) in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(UserError, match="missing.json"):
        load_json(tmp_path / "missing.json")


def test_loss_history_survives_a_checkpoint_exactly(tmp_path):
    """A record made before the checkpoint and an open window: after save/load through state.json +
    state.safetensors, the resumed history replays the same records and closes the window to the same means
    (float32 group losses included) as the uninterrupted one."""
    from pipeline.checkpoints import LossHistory, load_state_files, save_state_files

    rng = np.random.default_rng(0)
    losses, groups = rng.random(7).tolist(), list(rng.random((7, 3)).astype(np.float32))
    whole, part = LossHistory(), LossHistory()
    for i in range(4):
        for h in (whole, part):
            h.add(losses[i], groups[i])
        if i == 1:
            for h in (whole, part):
                h.close_window(2)
    save_state_files(tmp_path, {"other": 1, **part.state()})
    resumed = LossHistory.from_state(load_state_files(tmp_path))
    for i in range(4, 7):
        whole.add(losses[i], groups[i])
        resumed.add(losses[i], groups[i])
    assert resumed.close_window(7) == whole.close_window(7)
    assert resumed == LossHistory(points=whole.points, group_points=whole.group_points)
    replayed = []
    resumed.replay(lambda step, m: replayed.append((step, m)))
    assert [s for s, _ in replayed] == [2, 7] and set(replayed[0][1]) == {"train_loss", *(f"group_loss_{k}"
                                                                                        for k in range(3))}
    assert LossHistory.from_state({"optimizer": {}}) == LossHistory()  # checkpoints written before records
