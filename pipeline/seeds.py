"""Named seed streams: every random draw of a run comes from the configured seed through a name, so two uses never
share a stream by accident and a new use cannot silently take an old one's numbers.

    stream(seed, name) = seed + OFFSETS[name]     an integer seed (a torch generator, or sample_seeds' base seed)
    key(seed, name)    = [seed, KEYS[name]]       numpy entropy (np.random.default_rng / SeedSequence)
The numbers are the ones the stages always used, so outputs stay byte-identical; tests/test_seeds.py pins them.
"""

from __future__ import annotations

OFFSETS = {
    "judge:colour": 0,          # train_classifiers: the attribute judge
    "judge:digit": 1,           # train_classifiers: the target judge
    "latentdir_fit": 1,         # fit_directions (fit_on: samples): the biased model's samples, not the scored ones
    "distguide_fit": 2,         # fit_adp (fit_on: samples): likewise
    "ddb_synthetic": 1000,      # sample_bias_aligned: Diffusing DeBias's synthetic set (from ddb.seed)
    "knob_validation": 2000,    # sweep@ and benchmarks/method_diagnostics.py: the seeds knobs are chosen on
}

KEYS = {
    "bootstrap:counts": 1,        # scoring: the bias measures' interval
    "bootstrap:fid_indomain": 2,  # scoring: the in-domain FID's interval
    "bootstrap:fid_balanced": 3,  # scoring: the FID-vs-balanced interval
    "bootstrap:fid_inception": 4,  # scoring: the Inception FID's interval
    "latentdir_subset": 7,        # fit_directions (fit_on: balanced): which judge-split images are inverted
    "distguide_subset": 11,       # fit_adp (fit_on: balanced): likewise
}


def stream(seed: int, name: str) -> int:
    """The integer seed of stream `name` (OFFSETS) for the run seed `seed`."""
    return seed + OFFSETS[name]


def key(seed: int, name: str) -> list[int]:
    """numpy entropy [seed, k] of sub-stream `name` (KEYS): independent of the plain `seed` stream."""
    return [seed, KEYS[name]]
