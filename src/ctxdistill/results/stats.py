"""95% intervals and the paired tests, in the standard library and numpy (no scipy).

- :func:`wilson`: a proportion of n examples (one run), Wilson's score interval.
- :func:`t_interval`: a mean over n seeds, Student's t with n - 1 degrees of freedom.
- :func:`example_mean_interval`: a mean over n examples of a value per example (a triple's mean hit), from the
  values' standard deviation: Student's t with n - 1 degrees of freedom.
- :func:`bootstrap_f1`: F1 of one class with its percentile-bootstrap interval over the examples.
- :func:`mean_interval`: which of them a mean over runs gets (:func:`fewest_examples`: over how many examples).
- :func:`mcnemar_exact`: two methods on the same examples, the exact (binomial) McNemar test on the
  examples where exactly one of them is right.
- :func:`sign_flip_test`: two methods on the same examples scored by a number (a reciprocal rank), the
  paired randomisation test of the mean difference (as information retrieval compares systems).
"""

from __future__ import annotations

import functools
import math
import statistics
from typing import Optional, Sequence

import numpy

CONFIDENCE = 0.95
Z = statistics.NormalDist().inv_cdf(0.5 + CONFIDENCE / 2)


def wilson(successes: float, n: int, z: float = Z) -> tuple[float, float]:
    """Wilson's score interval for ``successes`` of ``n`` (Wilson 1927; Newcombe 1998, method 3)."""
    if n <= 0:
        raise ValueError(f"a proportion needs at least one example, got n={n}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # at no success or every one the bound is 0 or 1 exactly (centre -/+ half leaves rounding: 6.9e-18 for 0 of 40)
    return 0.0 if successes <= 0 else max(0.0, centre - half), 1.0 if successes >= n else min(1.0, centre + half)


def _t_two_sided_mass(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with integer ``df`` (the closed forms of Abramowitz & Stegun 26.7.3/4)."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:  # odd: 2/pi (theta + sin cos (1 + 2/3 cos^2 + 2·4/(3·5) cos^4 + ...)), df - 3 terms' power
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        return 2 / math.pi * (theta + s * math.cos(theta) * total)
    term, total = 1.0, 1.0  # even: sin (1 + 1/2 cos^2 + 1·3/(2·4) cos^4 + ...)
    for k in range(1, df // 2):
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return s * total


@functools.lru_cache(maxsize=None)  # a set of thousands of triples takes thousands of terms per bisection step
def t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
    """The t with P(|T| < t) = ``confidence`` (bisection on the closed-form distribution)."""
    low, high = 0.0, 1.0
    while _t_two_sided_mass(high, df) < confidence:
        high *= 2
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if _t_two_sided_mass(mid, df) < confidence else (low, mid)
    return (low + high) / 2


def t_interval(values: list[float]) -> Optional[tuple[float, float]]:
    """The mean's 95% interval over ``values`` (one per seed); None for fewer than two."""
    if len(values) < 2:
        return None
    mean, sem = statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))
    half = t_quantile(len(values) - 1) * sem
    return mean - half, mean + half


def example_mean_interval(mean: float, sd: Optional[float], n: int) -> Optional[tuple[float, float]]:
    """The 95% interval of ``mean``, the mean over ``n`` examples of values in [0, 1] whose sample standard deviation
    is ``sd`` (None: unknown, or one example's): Student's t with n - 1 degrees of freedom. Where every value lies on
    one bound (mean 0 or 1) they are successes or failures, and Wilson's interval over the examples stands for t's
    of width 0. None where the spread is unknown, or values all alike inside the bounds (a spread of 0 says
    nothing)."""
    if mean in (0.0, 1.0) and (sd == 0 or n == 1):
        return wilson(mean * n, n)
    if sd is None or n < 2 or not math.isfinite(sd) or sd == 0:
        return None
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return mean - half, mean + half


def bootstrap_f1(
    predictions: Sequence[int], labels: Sequence[int], positive: int, resamples: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """F1 of the class ``positive`` (2 TP / (2 TP + FP + FN), 0 where it is neither predicted nor a label) and its
    95% percentile-bootstrap interval: the 2.5th and 97.5th percentiles of its values over ``resamples`` seeded
    resamples of the examples with replacement (Efron & Tibshirani 1993, ch. 13). F1 is no mean over examples,
    so it has neither Wilson's nor a t-interval."""
    predicted = numpy.asarray(predictions) == positive
    actual = numpy.asarray(labels) == positive

    def f1(predicted: numpy.ndarray, actual: numpy.ndarray) -> numpy.ndarray:
        doubled_tp = 2 * (predicted & actual).sum(-1)
        denominator = doubled_tp + (predicted != actual).sum(-1)
        return numpy.where(denominator > 0, doubled_tp / numpy.maximum(denominator, 1), 0.0)

    rng, values = numpy.random.default_rng(seed), []
    for start in range(0, resamples, 100):  # [100, n] draws at a time: QQP's 40,430 examples at once take 320 MB
        draws = rng.integers(0, len(actual), size=(min(100, resamples - start), len(actual)))
        values.append(f1(predicted[draws], actual[draws]))
    low, high = numpy.percentile(numpy.concatenate(values), [2.5, 97.5])
    return float(f1(predicted, actual)), float(low), float(high)


def fewest_examples(examples: Sequence[Optional[float]]) -> Optional[int]:
    """The number of examples a Wilson interval over runs that agree is over: the fewest any of them was evaluated
    on (the widest of their own intervals; their sum would count twice the examples they share); None where a
    run's number is unknown."""
    if not examples or not all(examples):
        return None
    return int(min(examples))  # type: ignore[type-var]


def mean_interval(
    values: Sequence[float],
    examples: Sequence[Optional[float]],
    kind: str,
    reported: Optional[Sequence[Sequence[Optional[float]]]] = None,
) -> Optional[tuple[float, float]]:
    """The 95% interval of the mean of ``values`` (one per run, each evaluated on its ``examples``) of a metric of
    ``kind`` (:class:`ctxdistill.results.metrics.Metric`): Student's t over the runs where they differ; for one run,
    or runs that all agree (their spread of 0 says nothing: a t-interval would have width 0), the one-run interval
    of the run with the :func:`fewest_examples`: Wilson's over them for a proportion; for a mean,
    :func:`example_mean_interval` from the standard deviation per example the run reports; for a bootstrapped
    statistic, the interval the run reports (``reported``: what each run reports beside the metric, its
    ``Metric.companions``; None where it reports none, and then no interval); else None. A value that is not a
    finite number (a NaN a run reported) leaves the mean without an interval."""
    if not all(map(math.isfinite, values)):
        return None
    if len(values) > 1 and max(values) > min(values):
        return t_interval(values)
    n = fewest_examples(examples)
    if not values or not n:
        return None
    companions = list(reported[list(examples).index(n)]) if reported else []
    if kind == "proportion":
        return wilson(values[0] * n, n)
    if kind == "mean":
        return example_mean_interval(values[0], companions[0] if companions else None, n)
    if kind == "bootstrap" and companions and None not in companions:
        low, high = companions
        return low, high
    return None


def mcnemar_exact(only_first: int, only_second: int) -> float:
    """Two-sided exact McNemar p-value: under "neither is better", each of the n discordant examples is
    equally likely to favour either method, so the smaller count is Binomial(n, 1/2)."""
    n = only_first + only_second
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_first, only_second) + 1)) / 2**n
    return min(1.0, 2 * tail)


def sign_flip_test(differences: Sequence[float], resamples: int = 10_000, seed: int = 0) -> float:
    """Two-sided p-value of "the mean paired difference is 0": under that hypothesis each difference is as
    likely to have either sign, so the observed |sum| is compared with the sums of every sign pattern (all
    2^n when there are at most ``resamples`` of them), else of ``resamples`` seeded random ones, counting
    the observed pattern among them (Smucker et al. 2007; Phipson & Smyth 2010)."""
    values = [float(d) for d in differences if d]  # a zero difference is the same under either sign
    observed = abs(sum(values)) - 1e-9 * (1 + sum(map(abs, values)))  # ties of the observed count as extreme
    if 2 ** len(values) <= resamples:
        extreme = sum(
            abs(sum(v if pattern >> i & 1 else -v for i, v in enumerate(values))) >= observed
            for pattern in range(2 ** len(values))
        )
        return extreme / 2 ** len(values)
    rng, column = numpy.random.default_rng(seed), numpy.asarray(values)
    extreme = 0
    for start in range(0, resamples, 1000):  # [1000, n] signs at a time
        signs = rng.choice((-1.0, 1.0), size=(min(1000, resamples - start), len(values)))
        extreme += int((numpy.abs(signs @ column) >= observed).sum())
    return (extreme + 1) / (resamples + 1)
