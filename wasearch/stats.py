"""The noise of an accuracy, and the pick that respects it (no torch, no numpy).

An accuracy measured on ``n`` images is a binomial proportion: its standard error is
``sqrt(p (1 - p) / n)`` (:func:`binomial_se`). Near 67 % on 5,000 validation images that is
about 0.66 points, so two architectures 0.1 point apart are the same to any measurement the
search can make. Everything that prints or stores an accuracy (the search's trials, ``train.py``,
the report, the benchmarks) takes its standard error from here.

Two accuracies are *indistinguishable* at ``tolerance`` (in standard errors) when their
difference is within ``tolerance`` standard errors *of the difference*:
``|a - b| <= tolerance * sqrt(se_a^2 + se_b^2)`` (:func:`indistinguishable`). That is the
standard error of a difference of two independent estimates, the usual test a reader does in
their head; ``max(se)`` would call a pair distinguishable about 1.4 times sooner. Trials of one
study are scored on the same validation images, which makes their errors correlated and the
paired standard error of their difference smaller than this one; but the binomial term leaves out
the noise of training (seed, data order), which is of the same order, so the independent form is
the honest middle and needs nothing but the two accuracies and their ``n``.

The pick (:func:`pick_fastest`): of the candidates, the cheapest whose accuracy is
indistinguishable from the best accuracy (ties: the more accurate, then the earlier). With
``tolerance`` 0 it is the cheapest of the most accurate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_TOLERANCE",
    "Pick",
    "binomial_se",
    "diff_se",
    "fmt_acc_se",
    "indistinguishable",
    "pick_fastest",
    "picks",
    "spread",
    "trial_se",
]

#: The default tolerance, in standard errors of the difference (``report.tolerance``).
DEFAULT_TOLERANCE = 1.0


def binomial_se(acc: float | None, n: int | None) -> float | None:
    """Standard error of an accuracy ``acc`` (a fraction) measured on ``n`` independent images:
    ``sqrt(acc (1 - acc) / n)``. None when either is unknown, not finite or ``n < 1``."""
    if acc is None or n is None or isinstance(acc, bool) or isinstance(n, bool):
        return None
    try:
        p, k = float(acc), int(n)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(p) or k < 1:
        return None
    p = min(max(p, 0.0), 1.0)
    return math.sqrt(p * (1.0 - p) / k)


def spread(values: Sequence[float]) -> float | None:
    """The spread of repeated measurements of one accuracy (several seeds, several
    evaluations): their sample standard deviation; None for fewer than two finite values."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if len(xs) < 2:
        return None
    mean = sum(xs) / len(xs)
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


def diff_se(se_a: float | None, se_b: float | None) -> float:
    """Standard error of the difference of two independent estimates; an unknown one counts
    as 0 (an older study without image counts: only equal accuracies are then the same)."""
    return math.sqrt((se_a or 0.0) ** 2 + (se_b or 0.0) ** 2)


def indistinguishable(
    acc_a: float,
    se_a: float | None,
    acc_b: float,
    se_b: float | None,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
) -> bool:
    """Whether two accuracies are the same within ``tolerance`` standard errors of their
    difference: ``|a - b| <= tolerance * sqrt(se_a^2 + se_b^2)`` (see the module docstring)."""
    return abs(acc_a - acc_b) <= tolerance * diff_se(se_a, se_b) + 1e-12


def trial_se(attrs: Mapping[str, Any]) -> float | None:
    """The standard error of a trial's ``val_acc`` from its user attributes: ``val_se`` when
    recorded, else computed from ``val_images``; None for a study from before either."""
    se = attrs.get("val_se")
    if isinstance(se, int | float) and not isinstance(se, bool) and math.isfinite(se):
        return float(se)
    return binomial_se(attrs.get("val_acc"), attrs.get("val_images"))


def fmt_acc_se(acc: float | None, se: float | None, *, digits: int = 2) -> str:
    """``66.72% ± 0.67``: an accuracy in percent and its standard error in points; the bare
    accuracy when the error is unknown, ``-`` when the accuracy is."""
    if acc is None or not math.isfinite(float(acc)):
        return "-"
    text = f"{100 * acc:.{digits}f}%"
    if se is not None and math.isfinite(se):
        text += f" ± {100 * se:.{digits}f}"
    return text


@dataclass(frozen=True)
class Pick:
    """What :func:`pick_fastest` chose: the index of the pick, of the best (most accurate)
    candidate, and of every candidate indistinguishable from the best."""

    index: int
    best: int
    within: tuple[int, ...]


def pick_fastest(
    acc: Sequence[float],
    se: Sequence[float | None],
    cost: Sequence[float | None],
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    reference: tuple[float, float | None] | None = None,
) -> Pick | None:
    """The cheapest candidate whose accuracy is indistinguishable from the best accuracy.

    ``acc[i]``, ``se[i]`` and ``cost[i]`` describe candidate ``i`` (cost: latency, or another
    smaller-is-better size; None when unknown, which ranks last). ``reference`` = ``(acc, se)``
    replaces the best accuracy as the bar (all-normal's accuracy: "as good as all-normal");
    candidates better than the bar pass it too. Ties of cost go to the more accurate, then the
    lower index. None when there is no candidate (or, with a reference, none reaches it).
    """
    idx = [i for i, a in enumerate(acc) if a is not None and math.isfinite(a)]
    if not idx:
        return None
    best = max(idx, key=lambda i: (acc[i], -i))
    bar_acc, bar_se = (acc[best], se[best]) if reference is None else reference
    within = tuple(
        i
        for i in idx
        if acc[i] >= bar_acc
        or indistinguishable(acc[i], se[i], bar_acc, bar_se, tolerance=tolerance)
    )
    if not within:
        return None

    def key(i: int) -> tuple[float, float, int]:
        c = cost[i]
        known = c is not None and math.isfinite(c)
        return (c if known else math.inf, -acc[i], i)

    return Pick(index=min(within, key=key), best=best, within=within)


def picks(
    acc: Sequence[float],
    se: Sequence[float | None],
    cost: Sequence[float | None],
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    reference: int | None = None,
) -> tuple[Pick | None, Pick | None]:
    """The two picks a study states: :func:`pick_fastest` against the best accuracy, and against
    candidate ``reference``'s accuracy (the all-normal trial: "as good as all-normal"; None
    when there is no reference)."""
    best = pick_fastest(acc, se, cost, tolerance=tolerance)
    if reference is None:
        return best, None
    bar = (acc[reference], se[reference])
    return best, pick_fastest(acc, se, cost, tolerance=tolerance, reference=bar)
