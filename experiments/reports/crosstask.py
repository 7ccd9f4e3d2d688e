"""Cross-task sections of results/README.md (scripts/summary.py): time to target, performance profiles, and loss
versus performance on current runs. Each takes the summary's entries: {"meta", "runs" (results_runs.csv rows),
"sweep" (the tuning's meta and rows, or None), "folder"}."""

from __future__ import annotations

import math
from pathlib import Path

from ..registry import COMPARATORS, base_of, colour, has_ap, ordered, rank, reference_of
from ..stats import spearman
from . import budget

PRIMARY = ("adamw", "dopr_adamw", "muon", "dopr_muon")  # docs/protocol.md: the primary family's optimizers and tasks (no DoPr-X@10)
PRIMARY_TASKS = ("lm", "lm_lora", "flow", "control", "robot")


def _times(entry: dict, key: str) -> dict[str, tuple[float, int, int]]:
    """{optimizer: (median over seeds or inf, seeds that reached, seeds)} of one column of the runs (steps_to_target, ...)."""
    out = {}
    for opt in ordered(r["optimizer"] for r in entry["runs"]):
        vals = [float(r[key]) for r in entry["runs"] if r["optimizer"] == opt and key in r]
        if vals and not all(math.isnan(v) for v in vals):
            out[opt] = (budget.optimizer_time(vals), sum(math.isfinite(v) for v in vals), len(vals))
    return out


def _fmt_time(t: float) -> str:
    return "never" if math.isinf(t) else "n/a" if math.isnan(t) else f"{t:.0f}"


def version_note(e: dict) -> str:
    """' (version 3; the task is now version 4)' for a headline of an earlier task version (scripts/summary.py sets
    ``superseded``), else ''."""
    if not e.get("superseded"):
        return ""
    versions, now = e["superseded"]
    return f" (version {'/'.join(map(str, versions))}; the task is now version {now})"


def time_to_target(entries: list[dict]) -> list[str]:
    lines = ["## Time to target", "",
             "AlgoPerf style (docs/protocol.md, \"The budget axis\"): per task the main target lies 90% of the way from the floor "
             "to the tuned best base GP's median final metric (an easier one at 50%); per run the training steps and seconds "
             "(without evaluation, rollouts and checkpoints) of the first evaluation that reaches it; per optimizer the median "
             "over seeds, `never` when more than half of the seeds miss. Runs made before the loop recorded training seconds "
             "have none (`n/a`), and a run evaluated at few points resolves the time only to those points.", "",
             "| task | target (floor -> best base GP) | optimizer | steps to target | seconds to target | seeds reaching it | steps to the 50% target |",
             "|---|---|---|---|---|---|---|"]
    for e in entries:
        t = e["meta"].get("targets") or {}
        if not t:
            continue
        steps, seconds, half = _times(e, "steps_to_target"), _times(e, "seconds_to_target"), _times(e, "steps_to_target50")
        what = f"{e['meta']['metric']} {t['target']:.4g} ({t['floor']:.4g} -> {t['baseline']} {t['baseline_median']:.4g})"
        for opt, (s, hit, n) in steps.items():
            lines.append(f"| {e['meta']['task']}{version_note(e)} | {what} | {opt} | {_fmt_time(s)} | {_fmt_time(seconds.get(opt, (math.nan,))[0])} | "
                         f"{hit}/{n} | {_fmt_time(half.get(opt, (math.nan,))[0])} |")
    costs = [(e["meta"]["task"], c) for e in entries if (c := e["meta"].get("light_rollout_cost"))]
    if costs:  # the points between the full evaluations, and what they cost (the protocol bounds it at 20%)
        lines += ["", "The light rollouts between the full evaluations added, measured per run (their rollout seconds over the "
                  "run's wall time without them; median, and at most): " + "; ".join(
                      f"{task} {c['median']:.1%} (at most {c['max']:.1%}, {c['runs']} runs)" for task, c in costs) + "."]
    return lines + [""]


def performance_profiles(entries: list[dict], out: Path) -> list[str]:
    """Profiles over the tasks, in steps and in seconds, for the optimizers every primary comparison has and the
    comparators (SOAP, one-sided Shampoo, PSGD-Kron) where their runs are in a task's headline experiment."""
    lines = ["## Performance profiles", "",
             "Over the tasks, for each optimizer: r = its time to the main target / the fastest optimizer's on that task, "
             "rho(tau) = the share of tasks with r <= tau, and the score = the area under rho on tau in [1, 4] / 3 (1: fastest "
             "everywhere; 0: never within 4x of the fastest). A task where no optimizer has a time drops out. The optimizers: the "
             "primary family's four and the comparators (docs/comparators.md) once their runs are in a task's headline "
             "experiment; an optimizer not run on a task counts there as never reaching the target.", ""]
    stale = [e["meta"]["task"] for e in entries if e.get("superseded")]
    if stale:
        lines += [f"Left out: {', '.join(stale)}, whose headline runs are of an earlier task version (superseded).", ""]
    entries = [e for e in entries if not e.get("superseded")]
    made = []
    for unit, key in (("steps", "steps_to_target"), ("seconds", "seconds_to_target")):
        times = {e["meta"]["task"]: {o: v[0] for o, v in _times(e, key).items() if o in PRIMARY + COMPARATORS}
                 for e in entries if e["meta"]["task"] in PRIMARY_TASKS}
        prof = budget.profile(times)
        if not prof:
            lines += [f"In {unit}: no task has a time" + (" among the current task versions" if stale else
                      " (runs before the budget axis recorded no training seconds)") + ".", ""]
            continue
        tasks = [t for t, ts in times.items() if any(math.isfinite(v) and v > 0 for v in ts.values())]
        lines += [f"In {unit}, over {len(tasks)} task{'s' if len(tasks) != 1 else ''} ({', '.join(tasks)}):", "", "| optimizer | score | ratios per task |", "|---|---|---|"]
        lines += [f"| {o} | {p['score']:.3f} | {', '.join('inf' if math.isinf(r) else f'{r:.2f}' for r in p['ratios'])} |"
                  for o, p in sorted(prof.items(), key=lambda kv: rank(kv[0]))]
        lines.append("")
        made.append((unit, prof))
    if made:
        from .figures import _pyplot, _save_png

        plt = _pyplot()
        fig, axes = plt.subplots(1, len(made), figsize=(5.2 * len(made), 3.8), dpi=120, squeeze=False)
        for ax, (unit, prof) in zip(axes[0], made):
            for o, p in sorted(prof.items(), key=lambda kv: rank(kv[0])):
                ax.step(p["taus"], p["rho"], where="post", color=colour(o), label=f"{o} ({p['score']:.2f})",
                        linestyle="-" if has_ap(o) else "--")
            ax.set_xlabel(f"tau (time ratio to the fastest, {unit})")
            ax.set_ylabel("share of tasks within tau")
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        _save_png(fig, out / "performance_profiles.png")
        lines += ["![performance profiles](performance_profiles.png)", ""]
    return lines


def _ap_at_matched_loss(runs: list[dict], key: str) -> tuple[float, float, int]:
    """AP's effect on the metric at matched validation loss: the AP coefficient of an ordinary least-squares fit of
    metric ~ val_loss + AP + base GP over the runs, with its 95% t half-width. (numpy's lstsq; the t quantile from
    scipy: no kept library offers this small a regression with its interval without pulling in statsmodels.)
    Variants (DoPr-X@10) are left out: the AP indicator is DoPr-X's; so are the comparators, which are no base GP."""
    runs = [r for r in runs if reference_of(r["optimizer"]) is None and base_of(r["optimizer"]) not in COMPARATORS]
    import numpy as np
    from scipy import stats

    bases = sorted({base_of(r["optimizer"]) for r in runs})
    X = [[1.0, float(r["final_val_loss"]), float(has_ap(r["optimizer"]))] + [float(base_of(r["optimizer"]) == b) for b in bases[1:]]
         for r in runs]
    y = [float(r[key]) for r in runs]
    X, y = np.asarray(X), np.asarray(y)
    n, k = X.shape
    if n <= k or np.linalg.matrix_rank(X) < k:
        return math.nan, math.nan, n
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ beta
    cov = (resid @ resid / (n - k)) * np.linalg.inv(X.T @ X)
    return float(beta[2]), float(stats.t.ppf(0.975, n - k) * math.sqrt(cov[2, 2])), n


def _rho_ci(rows: list[dict], key: str) -> str:
    x, y = [float(r["final_val_loss"]) for r in rows], [float(r[key]) for r in rows]
    if len(x) < 8:  # too few runs for a bootstrap interval to mean anything
        rho = spearman(x, y)
        return "n/a" if math.isnan(rho) else f"{rho:+.2f}"
    from scipy import stats

    point = spearman(x, y)
    if math.isnan(point):
        return "n/a"
    import warnings

    with warnings.catch_warnings():  # a resample of tied values has no rank correlation: it counts as nan, dropped
        warnings.simplefilter("ignore")
        res = stats.bootstrap((x, y), lambda a, b: stats.spearmanr(a, b).statistic, paired=True, vectorized=False,
                              n_resamples=1000, method="percentile", random_state=0)  # runs resampled in pairs
    low, high = res.confidence_interval
    return f"{point:+.2f} [{low:+.2f}, {high:+.2f}]"


def agreement(entry: dict) -> tuple[float, str]:
    """(Spearman of final val loss against the final metric, pooled over the task's tuning runs, else its seed runs;
    its reading: "agree" when lower loss goes with a better metric, else "inverted")."""
    key, higher = f"final_{entry['meta']['metric']}", entry["meta"]["higher_is_better"]
    for rows in ((entry["sweep"] or (None, []))[1], entry["runs"]):
        rows = [r for r in rows if key in r and "final_val_loss" in r]
        rho = spearman([float(r["final_val_loss"]) for r in rows], [float(r[key]) for r in rows])
        if not math.isnan(rho):
            return rho, "agree" if (rho < 0) == higher else "inverted: lower loss, worse metric"
    return math.nan, "n/a"


def loss_versus_performance(entries: list[dict]) -> list[str]:
    lines = ["## Loss versus performance", "",
             "Does the validation loss predict the rollout metric, and does AP change the metric at a matched loss? Spearman's "
             "rank correlation of final validation loss against the final metric, with a 95% bootstrap interval (runs "
             "resampled), over all of a task's tuning runs and over its evaluation (seed) runs, pooled over optimizers: for a "
             "higher-is-better metric a negative rho means the two agree, for FD a positive one. AP's effect at matched loss "
             "is the AP coefficient of metric ~ val loss + AP + base GP over the evaluation runs (least squares, 95% t "
             "interval). The per-optimizer rows and the regret of selecting by validation loss follow below.", "",
             "| task | metric | Spearman, tuning runs (n) | Spearman, seed runs (n) | reading | AP's effect at matched loss [95% CI] (n) |",
             "|---|---|---|---|---|---|"]
    for e in entries:
        m, key = e["meta"], f"final_{e['meta']['metric']}"
        tune_rows = [r for r in (e["sweep"] or (None, []))[1] if key in r and "final_val_loss" in r]
        seed_rows = [r for r in e["runs"] if key in r and "final_val_loss" in r]
        reading = agreement(e)[1]
        effect, half, n = _ap_at_matched_loss(seed_rows, key)
        eff = "n/a" if math.isnan(effect) else f"{effect:+.4g} [{effect - half:+.4g}, {effect + half:+.4g}] ({n})"
        lines.append(f"| {m['task']}{version_note(e)} | {m['metric']} | {_rho_ci(tune_rows, key)} ({len(tune_rows)}) | {_rho_ci(seed_rows, key)} "
                     f"({len(seed_rows)}) | {reading} | {eff} |")
    return lines + [""]


def delta_figure(entry: dict, out: Path) -> str | None:
    """The paper's picture for one task: per seed, DoPr-X minus X in validation loss (x) against the same in the
    metric (y), one colour per base GP (and per variant, DoPr-X@10 minus X). Returns the file name, or None without pairs."""
    key = f"final_{entry['meta']['metric']}"
    by = {(r["optimizer"], int(float(r["seed"]))): r for r in entry["runs"]}
    pairs = {}
    for (opt, seed), r in by.items():
        if has_ap(opt) and (base_of(opt), seed) in by:
            b = by[(base_of(opt), seed)]
            pairs.setdefault(opt, []).append((float(r["final_val_loss"]) - float(b["final_val_loss"]), float(r[key]) - float(b[key])))
    if not pairs:
        return None
    from .figures import _pyplot, _save_png

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.4, 4.2), dpi=120)
    for opt in sorted(pairs, key=rank):
        pts, base = pairs[opt], base_of(opt)
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=colour(opt), label=f"DoPr-{base} - {base}" if opt == f"dopr_{base}"
                   else f"{opt} - {base}", edgecolors="black", linewidths=0.5, marker="o" if opt == f"dopr_{base}" else "^")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.axvline(0, color="grey", linewidth=0.8)
    better = "up" if entry["meta"]["higher_is_better"] else "down"
    ax.set_xlabel("difference in final validation loss (DoPr-X - X)")
    ax.set_ylabel(f"difference in final {entry['meta']['metric']} (better: {better})")
    ax.set_title(f"{entry['meta']['task']}: one point per seed", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    name = f"delta_{entry['meta']['task']}.png"
    _save_png(fig, out / name)
    return name
