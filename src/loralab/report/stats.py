"""Statistics over seeds: mean, sample standard deviation, a 95 % bootstrap interval of the mean,
and a paired comparison of two methods (difference, bootstrap interval, sign test).

The interval is scipy's ``scipy.stats.bootstrap`` with the *percentile* method (Efron &
Tibshirani, *An Introduction to the Bootstrap*, 1993, ch. 13), not scipy's default BCa: BCa's
acceleration is a jackknife estimate that is undefined or unstable for the 2-5 seeds a
fine-tuning comparison has (scipy returns NaN with a warning for degenerate samples). With so few
seeds any bootstrap interval is too narrow (it cannot see variation the few seeds missed); tables
therefore mark cells with fewer than ``MIN_SEEDS`` seeds. The resampling is seeded, so a report is
reproducible. The sign test is ``scipy.stats.binomtest`` (two-sided, p = 0.5) on wins and losses,
ties dropped (Conover, *Practical Nonparametric Statistics*, 3rd ed., §3.4).

Degenerate scores (``loralab.tasks.metrics``: a constant prediction's correlation, recorded as 0
by convention and flagged) count in the paired comparison as what they are: **a degenerate score
loses to a non-degenerate one, whatever the two numbers** (a real correlation of -0.02 beats a
collapsed seed's conventional 0), and two degenerate scores tie. The mean difference and its
interval still use the recorded numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
N_RESAMPLES = 10_000
MIN_SEEDS = 3  # cells with fewer seeds are marked
RESAMPLING_SEED = 0


@dataclass
class Summary:
    """mean, sd (ddof=1; None for n=1), the bootstrap interval of the mean (None for n=1) and n."""

    mean: float
    sd: float | None
    low: float | None
    high: float | None
    n: int

    def to_dict(self) -> dict:
        return {"mean": self.mean, "sd": self.sd, "ci_low": self.low, "ci_high": self.high, "n": self.n}


def bootstrap_interval(values, confidence: float = CONFIDENCE) -> tuple[float, float] | tuple[None, None]:
    """Percentile-bootstrap interval of the mean of ``values`` (1-D, n >= 2), via scipy.
    Identical values give the degenerate interval (v, v); n < 2 gives (None, None)."""
    from scipy.stats import bootstrap

    v = np.asarray(values, dtype=float)
    if v.size < 2 or not np.isfinite(v).all():
        return None, None
    if np.ptp(v) == 0:
        return float(v[0]), float(v[0])
    res = bootstrap((v,), np.mean, confidence_level=confidence, n_resamples=N_RESAMPLES, method="percentile",
                    vectorized=True, rng=np.random.default_rng(RESAMPLING_SEED))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def summarize(values) -> Summary:
    """Summary of one cell's per-seed values. Raises ValueError on an empty list."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        raise ValueError("summarize needs at least one value")
    low, high = bootstrap_interval(v)
    with np.errstate(over="ignore", invalid="ignore"):  # a degenerate perplexity is the largest float
        mean = float(np.sum(v / v.size))
        sd = float(v.std(ddof=1)) if v.size > 1 else None
    return Summary(mean, sd if sd is None or math.isfinite(sd) else None, low, high, int(v.size))


@dataclass
class Paired:
    """A − B over the keys (task, seed) both have: mean difference with its bootstrap interval,
    wins/losses/ties of A and the two-sided sign-test p (None when every pair ties)."""

    a: str
    b: str
    n: int
    mean_diff: float
    low: float | None
    high: float | None
    wins: int
    losses: int
    ties: int
    p: float | None
    keys: list

    def to_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "n_pairs": self.n, "mean_diff": self.mean_diff, "ci_low": self.low,
                "ci_high": self.high, "wins": self.wins, "losses": self.losses, "ties": self.ties,
                "sign_test_p": self.p, "pairs": [list(k) for k in self.keys]}


def outcome(diff: float, a_degenerate: bool = False, b_degenerate: bool = False) -> int:
    """+1 (A wins), -1 (A loses) or 0 (tie) for one pair: a degenerate side loses to a
    non-degenerate one whatever the numbers; otherwise the sign of ``diff`` (A − B)."""
    if a_degenerate != b_degenerate:
        return -1 if a_degenerate else 1
    if a_degenerate:
        return 0
    return int(np.sign(diff))


def paired(a_name: str, a: dict, b_name: str, b: dict, a_degenerate=(), b_degenerate=()) -> Paired | None:
    """Compare two methods on the keys both have (``a``, ``b``: key → value, e.g. (task, seed) →
    score; ``a_degenerate`` / ``b_degenerate``: the keys whose score is degenerate). None when they
    share no key."""
    from scipy.stats import binomtest

    keys = sorted(set(a) & set(b), key=str)
    if not keys:
        return None
    with np.errstate(over="ignore", invalid="ignore"):
        d = np.array([a[k] - b[k] for k in keys], dtype=float)
    low, high = bootstrap_interval(d)
    signs = [outcome(diff, k in set(a_degenerate), k in set(b_degenerate)) for diff, k in zip(d, keys)]
    wins, losses = signs.count(1), signs.count(-1)
    p = binomtest(wins, wins + losses, 0.5, alternative="two-sided").pvalue if wins + losses else None
    with np.errstate(over="ignore", invalid="ignore"):
        mean_diff = float(np.sum(d / d.size))
    return Paired(a_name, b_name, len(keys), mean_diff, low, high, wins, losses, len(keys) - wins - losses,
                  None if p is None else float(p), keys)


def pareto_front(points) -> list[int]:
    """Indices of the points no other point dominates, for (cost, score) pairs where lower cost
    and higher score are better: i is dominated if some j has cost_j <= cost_i and score_j >=
    score_i with one of them strict. NaN points are never on the front."""
    pts = [(c, s) for c, s in points]
    front = []
    for i, (ci, si) in enumerate(pts):
        if any(map(math.isnan, (ci, si))):
            continue
        dominated = any(
            (cj <= ci and sj >= si and (cj < ci or sj > si)) for j, (cj, sj) in enumerate(pts) if j != i
            and not any(map(math.isnan, (cj, sj)))
        )
        if not dominated:
            front.append(i)
    return front
