"""pipeline/targets.py: the target distribution p* is checked in one place, so the params sections, the methods and
the fairness discrepancy accept and refuse the same targets with the same words."""

import numpy as np
import pytest

from pipeline.config import parse_params
from pipeline.errors import UserError
from pipeline.methods import distribution_guidance, invdiff, latent_directions
from pipeline.metrics import fairness_discrepancy
from pipeline.targets import distribution_problem, target_distribution
from tests.tiny import tiny_params

BAD = ([0.5, 0.6], [0.7, 0.3, 0.0], [1.2, -0.2], [0.5])


@pytest.mark.parametrize("bad", BAD)
def test_every_place_refuses_a_bad_target_with_the_same_words(bad):
    k = 2 if len(bad) == 2 else 3 if len(bad) == 3 else 2
    problem = distribution_problem(bad, k)
    assert problem and "sum to 1" in problem
    calls = {"latentdir": lambda: latent_directions.validate_target(bad, k),
             "distguide": lambda: distribution_guidance.validate_target(bad, k),
             "invdiff": lambda: invdiff.group_targets(tuple(bad), 2, (0, 1), k)}
    for name, call in calls.items():
        with pytest.raises(UserError) as err:
            call()
        assert str(err.value).endswith(problem), (name, str(err.value))
    if distribution_problem(bad, k, positive=False) is None:  # a zero share is a valid FD target (no division by p*)
        fairness_discrepancy(np.zeros(4, int), np.zeros(4, int), k, target=np.array(bad))
    else:
        with pytest.raises(UserError, match="fairness target"):
            fairness_discrepancy(np.zeros(4, int), np.zeros(4, int), k, target=np.array(bad))
    for section in ("latentdir", "distguide"):
        raw = tiny_params()
        raw[section]["target"] = bad
        with pytest.raises(UserError) as err:
            parse_params(raw)
        assert f"{section}.target" in str(err.value) and distribution_problem(bad) in str(err.value), str(err.value)


def test_none_is_uniform_and_a_good_target_comes_back_as_floats():
    np.testing.assert_array_equal(target_distribution(None, 4), [0.25] * 4)
    assert target_distribution((0.25, 0.75), 2).dtype == np.float64
    assert distribution_problem([0.2, 0.8]) is None and distribution_problem([0.0, 1.0], positive=False) is None
