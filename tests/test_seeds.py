"""pipeline/seeds.py: the named seed streams keep the integers the stages always used (so outputs stay
byte-identical), and no stage derives a seed by arithmetic of its own."""

import re
from pathlib import Path

import numpy as np

from pipeline.data import balanced_subset
from pipeline.seeds import KEYS, OFFSETS, key, stream

ROOT = Path(__file__).resolve().parents[1]


def test_streams_keep_the_historical_integers():
    # the values every output depends on: changing one changes the bytes of its stage's outputs
    assert {n: stream(100, n) for n in OFFSETS} == {"judge:colour": 100, "judge:digit": 101, "latentdir_fit": 101,
                                                    "distguide_fit": 102, "ddb_synthetic": 1100,
                                                    "knob_validation": 2100}
    assert {n: key(100, n) for n in KEYS} == {"bootstrap:counts": [100, 1], "bootstrap:fid_indomain": [100, 2],
                                              "bootstrap:fid_balanced": [100, 3], "bootstrap:fid_inception": [100, 4],
                                              "latentdir_subset": [100, 7], "distguide_subset": [100, 11]}


def test_balanced_subset_draws_what_the_stages_drew():
    classes = np.repeat(np.arange(4), 30)[np.random.default_rng(0).permutation(120)]
    rng = np.random.default_rng([5, 7])  # fit_directions' own draw before the streams had names
    old = np.sort(np.concatenate([rng.permutation(np.flatnonzero(classes == y))[:6] for y in range(4)]))
    new = balanced_subset(classes, 6, key(5, "latentdir_subset"))
    assert np.array_equal(new, old) and len(new) == 24 and np.bincount(classes[new]).tolist() == [6] * 4
    assert not np.array_equal(balanced_subset(classes, 6, key(5, "distguide_subset")), new)


def test_no_stage_derives_a_seed_by_arithmetic():
    pattern = re.compile(r"seed\s*[+-]\s*\w|\w\s*\+\s*(?:p\.|params\.)?seed\b|\[\s*(?:params\.)?seed\s*,\s*\d")
    found = [f"{path.name}:{i}: {line.strip()}" for path in sorted((ROOT / "stages").glob("*.py"))
             + sorted(p for p in (ROOT / "pipeline").glob("*.py") if p.name != "seeds.py")
             for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, found
