"""The target attribute distribution p* (docs/metrics.md): what a debiased model's samples of each class should
follow. One check for every place that takes one (the params sections, the methods, the fairness discrepancy):
K entries, each > 0 (≥ 0 where a zero share is meaningful), summing to 1 within 1e-6; None means uniform, 1/K each."""

from __future__ import annotations

import numpy as np

from pipeline.errors import UserError

TOLERANCE = 1e-6


def distribution_problem(values, num: int | None = None, *, positive: bool = True) -> str | None:
    """Why `values` is not a distribution over `num` outcomes (None: any number), or None when it is one."""
    values = [float(v) for v in values]
    bound = "> 0" if positive else ">= 0"
    if num is not None and len(values) != num:
        return f"expected {num} entries, each {bound}, that sum to 1; got {len(values)}: {values}"
    if not values or (min(values) <= 0 if positive else min(values) < 0) or abs(sum(values) - 1.0) > TOLERANCE:
        return f"expected entries each {bound} that sum to 1; got {values}"
    return None


def target_distribution(target, num_attr: int, key: str = "target", *, positive: bool = True) -> np.ndarray:
    """p* as float64 [num_attr]: None → uniform 1/num_attr; otherwise checked (distribution_problem), a one-line
    UserError naming `key` when it is not a distribution."""
    if target is None:
        return np.full(num_attr, 1.0 / num_attr)
    problem = distribution_problem(np.asarray(target, dtype=np.float64).ravel(), num_attr, positive=positive)
    if problem is not None:
        raise UserError(f"{key}: {problem}")
    return np.asarray(target, dtype=np.float64)
