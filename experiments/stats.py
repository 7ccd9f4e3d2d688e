"""The statistics of the reports: confidence intervals, paired comparisons across seeds, rank
correlation and model-selection regret. scipy does the distributions; the rest is arithmetic
written out so a reader can check it against a hand computation (tests/test_stats.py does)."""

from __future__ import annotations

import math
from collections import defaultdict


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t confidence interval (nan for one value)."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)


def paired(treated: dict, control: dict) -> dict:
    """Paired comparison over the keys (seeds) both have: differences treated - control, their
    mean with a 95% t-interval, and the two-sided paired t-test p-value (scipy.stats.ttest_rel).
    ``n`` < 2 leaves the interval and p-value nan."""
    from scipy import stats

    keys = sorted(set(treated) & set(control))
    diffs = [treated[k] - control[k] for k in keys]
    if not diffs:
        return {"n": 0, "mean": math.nan, "ci": math.nan, "p": math.nan, "seeds": []}
    mean, half = mean_ci(diffs)
    p = math.nan
    if len(diffs) >= 2:
        p = 1.0 if all(d == diffs[0] == 0 for d in diffs) else float(stats.ttest_rel([treated[k] for k in keys], [control[k] for k in keys]).pvalue)
    return {"n": len(diffs), "mean": mean, "ci": half, "p": p, "seeds": keys}


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (scipy; ties get average ranks); nan for fewer than 3 points or
    a constant column."""
    from scipy import stats

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return math.nan
    return float(stats.spearmanr(x, y).statistic)


def selection(rows: list[dict], metric_key: str, higher_is_better: bool, loss_key: str = "final_val_loss", by=lambda r: r["lr"]) -> dict:
    """The one model selection of the suite, over the rows of one optimizer's sweep (one row per run), grouped into
    settings by ``by`` (the LR by default; the tuning protocol groups by (lr, own hyperparameter)): the setting picked
    by mean validation loss, the setting picked by mean rollout metric, and the regret of picking by loss: how much
    mean metric that choice gives up (>= 0, in the metric's units). Ties go to the smaller setting."""
    groups = defaultdict(list)
    for r in rows:
        groups[by(r)].append(r)
    mean = {g: (sum(r[metric_key] for r in rs) / len(rs), sum(r[loss_key] for r in rs) / len(rs)) for g, rs in groups.items()}
    sign = 1 if higher_is_better else -1
    smaller = lambda g: tuple(-(x or 0) for x in g) if isinstance(g, tuple) else -g  # noqa: E731
    by_loss = min(mean, key=lambda g: (mean[g][1], g))
    by_metric = max(mean, key=lambda g: (sign * mean[g][0], smaller(g)))
    return {"by_loss": by_loss, "by_metric": by_metric, "metric_at_loss_choice": mean[by_loss][0],
            "metric_at_metric_choice": mean[by_metric][0], "regret": abs(mean[by_metric][0] - mean[by_loss][0]),
            "settings": len(mean), "groups": dict(groups)}


# ---------------------------------------------------------------------------------------------
# rliable's estimators (Agarwal et al. 2021): interquartile mean, probability of improvement and
# their stratified-bootstrap percentile intervals. Written here, not imported: rliable 1.2 needs
# arch < 8, and arch 7.x does not import next to pandas 3 (TypeError in deprecate_kwarg), which the
# suite's datasets stack installs. The definitions follow rliable.metrics exactly (a 25% trimmed
# mean over every run and task; the Mann-Whitney U statistic over n_x n_y, 0.5 for identical
# samples, averaged over tasks) and are tested against hand computations in tests/test_stats.py.

def _matrix(scores):
    import numpy as np

    a = np.asarray(scores, dtype=float)
    return a[:, None] if a.ndim == 1 else a  # (runs, tasks)


def iqm(scores) -> float:
    """Interquartile mean: the mean of the middle 50% of all scores (runs x tasks, or runs): scipy's
    trim_mean(proportiontocut=0.25) written out (the bootstrap calls it thousands of times, and
    scipy's argument handling cost ~10x the arithmetic)."""
    import numpy as np

    flat = np.sort(_matrix(scores), axis=None)
    cut = int(0.25 * flat.size)
    return float(flat[cut : flat.size - cut].mean())


def probability_of_improvement(x, y) -> float:
    """P(X > Y) + P(X = Y) / 2 for a run of X against a run of Y, averaged over tasks (higher-is-better
    scores: negate both for a lower-is-better metric): per task, the Mann-Whitney U statistic over
    n_x n_y, counted over all pairs (the samples here are a few seeds)."""
    import numpy as np

    x, y = _matrix(x), _matrix(y)
    a, b = x[:, None, :], y[None, :, :]  # (n_x, n_y, tasks)
    return float(((a > b) + 0.5 * (a == b)).mean(axis=(0, 1)).mean())


def bootstrap_ci(func, *samples, reps: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(point estimate, low, high): ``func(*samples)`` and its stratified-bootstrap percentile
    interval. Each sample is (runs,) or (runs, tasks); every replicate redraws, with replacement and
    independently, the runs of each task of each sample (rliable's StratifiedBootstrap)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    mats = [_matrix(s) for s in samples]
    point = float(func(*mats))
    values = np.empty(reps)
    for i in range(reps):
        drawn = []
        for m in mats:
            idx = rng.integers(0, m.shape[0], size=m.shape)  # per task (column), its own runs
            drawn.append(np.take_along_axis(m, idx, axis=0))
        values[i] = func(*drawn)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return point, float(low), float(high)


def nested_bootstrap_ci(groups: list[list[float]], reps: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(point, low, high): the mean over groups (seeds) of each group's mean over its outcomes
    (episodes), with a two-level bootstrap percentile interval: each replicate redraws the groups with
    replacement, then, independently for every drawn group, that group's outcomes with replacement.
    Percentiles of means of observed outcomes, so the interval stays inside their range (inside [0, 1]
    for success rates). rliable's stratified bootstrap does not nest; written out here. A group of one
    value is a seed without per-episode outcomes (then only seeds are redrawn)."""
    import numpy as np

    if not groups or any(len(g) == 0 for g in groups):
        raise ValueError("nested_bootstrap_ci needs at least one group and no empty group")
    rng = np.random.default_rng(seed)
    arrays = [np.asarray(g, dtype=float) for g in groups]
    point = float(np.mean([a.mean() for a in arrays]))
    if len(arrays) < 2 and len(arrays[0]) < 2:
        return point, math.nan, math.nan
    picks = rng.integers(0, len(arrays), size=(reps, len(arrays)))  # which seed fills each slot of each replicate
    means = np.empty(picks.shape)
    for g, a in enumerate(arrays):  # every slot that drew seed g redraws g's outcomes on its own
        slots = picks == g
        draws = rng.integers(0, len(a), size=(int(slots.sum()), len(a)))
        means[slots] = a[draws].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means.mean(axis=1), [tail, 100 - tail])
    return point, float(low), float(high)


def minimum_detectable_difference(diffs: list[float], alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true mean difference a two-sided paired t-test at level ``alpha`` detects with
    probability ``power``, given these paired differences' spread and count:
    (t_{1-alpha/2, n-1} + t_{power, n-1}) * sd / sqrt(n). nan for fewer than 2 pairs."""
    from scipy import stats

    n = len(diffs)
    if n < 2:
        return math.nan
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    return float(stats.t.ppf(1 - alpha / 2, n - 1) + stats.t.ppf(power, n - 1)) * sd / math.sqrt(n)


def mdd_at(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The minimum detectable difference with ``n`` pairs whose differences have standard deviation ``sd``:
    (t_{1-alpha/2, n-1} + t_{power, n-1}) * sd / sqrt(n), the formula of minimum_detectable_difference with the
    spread given, so that it can be projected to other seed counts (nan for n < 2)."""
    from scipy import stats

    if n < 2:
        return math.nan
    return float(stats.t.ppf(1 - alpha / 2, n - 1) + stats.t.ppf(power, n - 1)) * sd / math.sqrt(n)


def seeds_needed(sd: float, target: float, cap: int = 100, alpha: float = 0.05, power: float = 0.8) -> int | None:
    """The smallest n (2..``cap``) with mdd_at(sd, n) <= ``target``, found by counting up (t depends on n, so there
    is no closed form); None when even ``cap`` pairs do not reach it."""
    for n in range(2, cap + 1):
        if mdd_at(sd, n, alpha, power) <= target:
            return n
    return None


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979), in the order given. Written by hand because statsmodels
    (multipletests(method="holm")) is not a dependency of the suite: sort the m p-values ascending, multiply the
    i-th smallest (i = 1..m) by m - i + 1, cap at 1, and make the sequence non-decreasing (the running maximum);
    a hypothesis is rejected at level a when its adjusted p is <= a. tests/test_stats.py checks it by hand."""
    m = len(pvalues)
    if any(math.isnan(p) for p in pvalues):
        raise ValueError("holm: a p-value is nan (a comparison without a test): leave it out of the family")
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, running = [math.nan] * m, 0.0
    for rank_, i in enumerate(order):
        running = max(running, min(1.0, (m - rank_) * pvalues[i]))
        adjusted[i] = running
    return adjusted
