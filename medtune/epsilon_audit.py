"""An empirical lower bound on epsilon from one training run (Steinke, Nasr and Jagielski, "Privacy
Auditing with One (1) Training Run", NeurIPS 2023).

A ledger's epsilon is an upper bound proved from the noise; an audit measures from the outside how
much a run actually leaked, so a bug that weakens the noise (or the accounting) shows up as a lower
bound above the ledger's epsilon. Each of m canaries is included with probability 1/2; the auditor
scores every canary from what training produced, guesses "in" for the k highest scores and "out"
for the k lowest, and counts v correct guesses among r = 2k. An (epsilon, delta)-DP run cannot make
many more guesses right than epsilon-randomized response would, whose accuracy is
q = e^eps / (1 + e^eps). The paper's p-value for "the run is (epsilon, delta)-DP" is

    p(eps) = P[Binomial(r, q) >= v] + 2 m delta alpha,
    alpha  = max over i = 1..v of P[v - i <= Binomial(r, q) < v] / i,

and every epsilon with p(eps) < beta is rejected at significance beta; the bound is the edge of that
rejected interval [0, bound), so P[bound > true epsilon] <= beta.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import bdtrc, expit
from scipy.stats import binom

from medtune.errors import ConfigError

TOLERANCE = 1e-6  # the bound is within this of the true edge of the rejected epsilons, and below it


@dataclass(frozen=True)
class EpsilonBound:
    """The lower bound of one audit and the counts it rests on, so a reader can recompute it."""

    epsilon: float  # every epsilon below this is rejected, at the stated confidence
    m: int  # canaries, included or not
    r: int  # guesses made: k "in" plus k "out"
    v: int  # correct guesses
    k: int  # guesses on each side, the best of the grid tried
    confidence: float  # 1 - significance, for the whole grid of k
    delta: float  # the delta the run claims, at which epsilon was tested


def max_certifiable_epsilon(m: int, significance: float = 0.05) -> float:
    """The most any audit of m canaries can certify: all m guessed right at delta = 0.

    Every p(eps) is at least q^m, so no bound passes q^m = beta, i.e. ln(q / (1 - q)) with
    q = beta^(1/m); that is just below ln(m / ln(1/beta)) (about 5.8 at m = 1000, beta = 0.05), so a
    run that leaks everything still audits to only a few units of epsilon unless m is huge.
    """
    _check_count("m", m, low=1)
    _check_significance(significance)
    return max(0.0, -math.log(math.expm1(math.log(1 / significance) / m)))


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, significance: float = 0.05) -> float:
    """The largest epsilon (to within TOLERANCE, from below) that v correct of r guesses among m
    canaries reject for an (epsilon, delta)-DP run at `significance`; 0 when none is rejected.

    p(eps) only grows with epsilon: each term of alpha's max is a positive mix of increasing tail
    probabilities when 2 m delta <= 1 (proved); for larger delta we found no decrease below p = 1 in
    a random search of 20,000 cases, and the paper's code bisects as well. So bisection finds the
    edge, searching [0, max_certifiable_epsilon(m) + 1], past which nothing can be rejected: no
    arbitrary cap.
    """
    _check_count("m", m, low=1)
    _check_count("r (guesses)", r, low=0)
    _check_count("v (correct guesses)", v, low=0)
    if not v <= r <= m:
        raise ConfigError(f"need correct guesses <= guesses <= canaries, got v={v}, r={r}, m={m}")
    _check_delta(delta)
    _check_significance(significance)
    if _p_value(m, r, v, 0.0, delta) >= significance:
        return 0.0
    low, high = 0.0, max_certifiable_epsilon(m, significance) + 1.0
    while high - low > TOLERANCE:
        middle = (low + high) / 2
        if _p_value(m, r, v, middle, delta) < significance:
            low = middle
        else:
            high = middle
    return low


def default_ks(m: int) -> list[int]:
    """Guesses per side to try: 5, 10, 20, 50, 100, ... up to m // 2, and m // 2 itself.

    Fixed by m alone, before any score is seen, so trying them all costs only the Bonferroni split.
    """
    half = m // 2
    ks, scale = [], 1
    while 5 * scale <= half:
        ks += [k for k in (5 * scale, 10 * scale, 20 * scale) if k <= half]
        scale *= 10
    return ks if half in ks else ks + [half]


def audit_scores(
    scores: np.ndarray,
    included: np.ndarray,
    delta: float,
    significance: float = 0.05,
    ks: Sequence[int] | None = None,
    seed: int = 0,
) -> EpsilonBound:
    """Audit one run from each canary's score (higher: more likely in) and whether it was in.

    For each k of `ks` (default_ks(m) when None) the top k are guessed in and the bottom k out, and
    each k's bound is taken at significance / len(ks) (distinct values): by Bonferroni, reporting
    the best k (the smallest among equals) still holds with confidence 1 - significance.

    Tied scores are ordered by a random permutation drawn from `seed`, independent of which canaries
    are in, so a tie is a coin flip to the auditor: the canaries' order (say, included ones first)
    cannot turn ties into right guesses.
    """
    scores, included = _checked_canaries(scores, included)
    _check_delta(delta)
    _check_significance(significance)
    m = len(scores)
    ks = default_ks(m) if ks is None else ks
    if not ks:
        raise ConfigError("ks is empty: give at least one number of guesses per side")
    for k in ks:
        _check_count("k (guesses per side)", k, low=1)
        if 2 * k > m:
            raise ConfigError(f"k={k} guesses per side needs at least {2 * k} canaries, got m={m}")
    ks = sorted(set(ks))
    tie_order = np.random.default_rng(seed).permutation(m)
    ranked = included[np.lexsort((tie_order, scores))]  # lowest score first
    results = []
    for k in ks:
        v = int(ranked[-k:].sum() + (~ranked[:k]).sum())
        epsilon = epsilon_lower_bound(m, 2 * k, v, delta, significance / len(ks))
        results.append(EpsilonBound(epsilon, m, 2 * k, v, k, 1 - significance, delta))
    return max(results, key=lambda result: result.epsilon)


def _p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """p(eps) above, capped at 1. The tail is computed as an upper tail (bdtrc: what binom.sf gives,
    without its per-call overhead), not as 1 - cdf, so the tiny tails of large r stay exact."""
    if v == 0:
        return 1.0
    q = expit(epsilon)
    p = float(bdtrc(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if delta > 0:
        below = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, q))  # P[v - i <= B < v], i = 1..v
        p += 2 * m * delta * float(np.max(below / np.arange(1, v + 1)))
    return min(p, 1.0)


def _checked_canaries(scores: np.ndarray, included: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores as floats and inclusion as bools, both of shape (m,), m >= 2, with both kinds
    present."""
    try:
        scores = np.asarray(scores, dtype=float)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"canary scores are not numbers: {error}") from None
    included = np.asarray(included)
    if scores.ndim != 1 or scores.shape != included.shape:
        raise ConfigError(
            f"need one score per canary: scores {scores.shape}, included {included.shape}"
        )
    if included.dtype != bool:
        raise ConfigError(f"included must be a bool array, got dtype {included.dtype}")
    if len(scores) < 2:
        raise ConfigError(f"an audit needs at least 2 canaries, got {len(scores)}")
    bad = int(np.count_nonzero(~np.isfinite(scores)))
    if bad:
        raise ConfigError(f"{bad} of {len(scores)} canary scores are not finite (NaN or inf)")
    if included.all() or not included.any():
        raise ConfigError(
            f"need both included and excluded canaries, got {int(included.sum())} "
            f"of {len(scores)} in"
        )
    return scores, included


def _check_count(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_delta(delta: float) -> None:
    if not isinstance(delta, numbers.Real) or not 0 <= delta < 1:
        raise ConfigError(f"delta must be in [0, 1), got {delta!r}")


def _check_significance(significance: float) -> None:
    if not isinstance(significance, numbers.Real) or not 0 < significance < 1:
        raise ConfigError(f"significance must be in (0, 1), got {significance!r}")
