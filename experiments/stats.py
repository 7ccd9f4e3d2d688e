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


def selection(rows: list[dict], metric_key: str, higher_is_better: bool, loss_key: str = "final_val_loss") -> dict:
    """Model selection over the rows of one optimizer's sweep (one row per run, with "lr"): the
    LR picked by mean validation loss and the LR picked by mean rollout metric, and the regret of
    picking by loss: how much mean metric that choice gives up (>= 0, in the metric's units)."""
    by_lr = defaultdict(list)
    for r in rows:
        by_lr[r["lr"]].append(r)
    mean = {lr: (sum(r[metric_key] for r in rs) / len(rs), sum(r[loss_key] for r in rs) / len(rs)) for lr, rs in by_lr.items()}
    by_loss = min(mean, key=lambda lr: (mean[lr][1], lr))
    by_metric = (max if higher_is_better else min)(mean, key=lambda lr: (mean[lr][0], -lr if higher_is_better else lr))
    regret = abs(mean[by_metric][0] - mean[by_loss][0])
    return {"lr_by_loss": by_loss, "lr_by_metric": by_metric, "metric_at_loss_choice": mean[by_loss][0],
            "metric_at_metric_choice": mean[by_metric][0], "regret": regret, "lrs": len(mean)}
