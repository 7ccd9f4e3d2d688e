"""The report statistics against values computed by hand, and the cross-task summary on
synthetic per-task reports (deterministic, numbers where they should be)."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.stats import mean_ci, paired, selection, spearman

ROOT = Path(__file__).resolve().parents[1]
# Student t quantile t_{0.975} with 2 degrees of freedom, closed form for df=2: (2u - 1) / sqrt(2u(1 - u)).
T2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)


def test_mean_ci_by_hand():
    # [1, 2, 3]: mean 2, sd 1 -> half-width t_{0.975, 2} / sqrt(3) (4.3027 / 1.7321)
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and math.isclose(half, T2 / math.sqrt(3), rel_tol=1e-9)
    assert math.isnan(mean_ci([5.0])[1])


def test_paired_difference_and_t_test_by_hand():
    # differences (seed 0, 1, 2) = 2, 3, 0: mean 5/3, sd sqrt(7/3), t = mean / (sd / sqrt 3);
    # for 2 degrees of freedom the two-sided p-value is 1 - t / sqrt(2 + t^2) exactly.
    out = paired({0: 3.0, 1: 5.0, 2: 4.0, 7: 1.0}, {0: 1.0, 1: 2.0, 2: 4.0})  # seed 7 has no partner: ignored
    sd = math.sqrt(7 / 3)
    t = (5 / 3) / (sd / math.sqrt(3))
    assert out["n"] == 3 and out["seeds"] == [0, 1, 2]
    assert math.isclose(out["mean"], 5 / 3, rel_tol=1e-12)
    assert math.isclose(out["ci"], T2 * sd / math.sqrt(3), rel_tol=1e-9)
    assert math.isclose(out["p"], 1 - t / math.sqrt(2 + t * t), rel_tol=1e-9)


def test_spearman_by_hand():
    # ranks of y: 1, 3, 2, 4; d^2 sums to 2; rho = 1 - 6 * 2 / (4 * (16 - 1)) = 0.8
    assert math.isclose(spearman([1, 2, 3, 4], [10, 30, 20, 40]), 0.8)
    assert math.isclose(spearman([1, 2, 3], [3, 2, 1]), -1.0)
    assert math.isnan(spearman([1, 2], [1, 2])) and math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_selection_regret_by_hand():
    rows = [{"lr": 1e-3, "m": 0.5, "final_val_loss": 1.0}, {"lr": 1e-3, "m": 0.7, "final_val_loss": 1.2},
            {"lr": 1e-2, "m": 0.9, "final_val_loss": 1.3}, {"lr": 1e-2, "m": 0.8, "final_val_loss": 1.3},
            {"lr": 1e-1, "m": 0.2, "final_val_loss": 2.0}]
    up = selection(rows, "m", higher_is_better=True)
    # mean loss: 1.1, 1.3, 2.0 -> 1e-3; mean metric: 0.6, 0.85, 0.2 -> 1e-2; regret 0.85 - 0.6
    assert (up["by_loss"], up["by_metric"], up["settings"]) == (1e-3, 1e-2, 3)
    assert math.isclose(up["regret"], 0.25)
    down = selection(rows, "m", higher_is_better=False)  # e.g. FD: lowest mean metric 0.2 at 1e-1
    assert down["by_metric"] == 1e-1 and math.isclose(down["regret"], 0.4)


def _write_report(folder: Path, metric: str, higher: bool, runs: list[dict], stem="results", **meta_extra):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{stem}_runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in runs for k in r)))
        writer.writeheader()
        writer.writerows(runs)
    meta = {"task": folder.parent.name, "scale": folder.name, "metric": metric, "higher_is_better": higher, "runs": len(runs),
            "failed": [], "command": "synthetic", "horizon_label": "steps", "lr_sweep": stem == "lr_sweep", **meta_extra}
    (folder / f"{stem}_meta.json").write_text(json.dumps(meta))


def test_summary_on_synthetic_reports_is_right_and_deterministic(tmp_path):
    """The primary family is the declared 10 (5 tasks x DoPr-AdamW, DoPr-Muon), Holm-adjusted with the untested at
    p = 1; a task outside the five (robot_image) never joins it; a non-significant comparison reads "no difference"
    only when its MDD reaches the task's target, else "the instrument cannot tell"."""
    from scipy import stats

    results = tmp_path / "results"
    # lm: accuracy up by 0.19, 0.20, 0.21 with AP (sd 0.01: the interval excludes 0 -> better);
    # val loss changed by +0.01, -0.02, +0.015 (the interval includes 0 -> no difference)
    runs = []
    for seed, (acc, loss, d_loss) in enumerate([(0.5, 1.0, 0.01), (0.6, 0.9, -0.02), (0.4, 1.1, 0.015)]):
        runs.append({"optimizer": "adamw", "lr": 0.001, "seed": seed, "final_val_loss": loss, "final_accuracy": acc})
        runs.append({"optimizer": "dopr_adamw", "lr": 0.001, "seed": seed, "final_val_loss": loss + d_loss,
                     "final_accuracy": acc + 0.19 + 0.01 * seed})
    _write_report(results / "lm" / "cpu", "accuracy", True, runs)
    # its tuning: three trials of adamw (LR x weight decay 0.1)
    sweep = [{"optimizer": "adamw", "lr": lr, "weight_decay": 0.1, "seed": 100, "final_val_loss": loss, "final_accuracy": acc}
             for lr, loss, acc in [(1e-3, 1.0, 0.3), (1e-2, 0.8, 0.5), (1e-1, 0.7, 0.2)]]
    _write_report(results / "lm" / "cpu", "accuracy", True, sweep, stem="tuning")
    # flow: FD (lower is better), AP worse by exactly 1.0 on each seed -> CI of width 0
    runs = []
    for seed in range(3):
        runs.append({"optimizer": "muon", "lr": 0.01, "seed": seed, "final_val_loss": 0.3, "final_fd": 2.0 + seed})
        runs.append({"optimizer": "dopr_muon", "lr": 0.01, "seed": seed, "final_val_loss": 0.3, "final_fd": 3.0 + seed,
                     "damping": 1.0})
    _write_report(results / "flow" / "cpu", "fd", False, runs)
    # robot: one seed (a one-seed table): no interval, left out of the headline's count
    _write_report(results / "robot" / "cpu", "accuracy", True,
                  [{"optimizer": o, "lr": 0.001, "seed": 0, "final_val_loss": 1.0, "final_accuracy": a, "damping": 1.0}
                   for o, a in (("adamw", 0.5), ("dopr_adamw", 0.9))])
    # lm_lora: adamw differences 0.1, 0.3, 0.2 (t = 0.2 / (0.1 / sqrt 3), p = 0.074; MDD 0.31 > the target 0.1), in
    # the primary family; and a secondary GP (signum), outside it
    runs = []
    for seed, d in enumerate([0.1, 0.3, 0.2]):
        for base in ("adamw", "signum"):
            runs.append({"optimizer": base, "lr": 0.001, "seed": seed, "final_val_loss": 1.0, "final_accuracy": 0.3, "task_version": 1})
            runs.append({"optimizer": f"dopr_{base}", "lr": 0.001, "seed": seed, "final_val_loss": 1.0, "final_accuracy": 0.3 + d,
                         "damping": 1.0, "task_version": 1})
    _write_report(results / "lm_lora" / "cpu", "accuracy", True, runs)
    # control: return differences +5, -5, +3, -3, 0 (p = 1) with an MDD of about 7, within the target 300 (10% of the
    # expert's 3000): a finding of no difference
    runs = []
    for seed, d in enumerate([5, -5, 3, -3, 0]):
        runs.append({"optimizer": "adamw", "lr": 0.001, "seed": seed, "final_val_loss": 1.0, "final_return": 2000.0})
        runs.append({"optimizer": "dopr_adamw", "lr": 0.001, "seed": seed, "final_val_loss": 1.0, "final_return": 2000.0 + d, "damping": 1.0})
    _write_report(results / "control" / "cpu", "return", True, runs, expert_return=3000.0)
    # robot_image (secondary, outside the five tasks): AP better by 0.1 on 3 seeds, never in the family
    _write_report(results / "robot_image" / "cpu", "success", True,
                  [{"optimizer": o, "lr": 0.001, "seed": s, "final_val_loss": 1.0, "final_success": 0.3 + (0.1 + 0.01 * s if o == "dopr_adamw" else 0)}
                   for s in range(3) for o in ("adamw", "dopr_adamw")])

    def make(*extra):
        subprocess.run([sys.executable, "scripts/summary.py", "--results", str(results), *extra], cwd=ROOT, check=True, capture_output=True)
        return (results / "README.md").read_text()

    text = make()
    assert make() == text  # deterministic
    detail = text.split("## Did AP help?")[1].splitlines()  # the verdict table at the top holds the same rows, in short
    lm = next(line for line in detail if line.startswith("| [lm]"))
    half = T2 * 0.01 / math.sqrt(3)  # differences 0.19, 0.20, 0.21: sd 0.01
    assert f"+0.2000 [{0.2 - half:+.4f}, {0.2 + half:+.4f}]" in lm and "| **better** |" in lm
    assert lm.rstrip(" |").endswith("no difference")
    flow = next(line for line in detail if line.startswith("| [flow]"))
    assert "+1.0000 [+1.0000, +1.0000]" in flow and "**worse**" in flow.split("|")[11]
    # the tuning: val loss picks 0.1 (loss 0.7, accuracy 0.2), accuracy picks 0.01 (0.5): regret 0.3
    sweep_line = next(line for line in text.splitlines() if line.startswith("| lm | adamw |"))
    cells = [c.strip() for c in sweep_line.strip("|").split("|")]
    assert cells[2:8] == ["3", "0.1, 0.1", "0.01, 0.1", "0.2", "0.5", "0.3"]
    # the primary family, 10 declared: lm adamw (p = 2 t.sf(0.2 / (0.01 / sqrt 3), 2)), flow muon (differences all +1:
    # p 0), lm_lora adamw (p 0.074), control adamw (p 1); robot's one seed is named and counts at p = 1; the five not
    # run count at p = 1; lm_lora's signum is secondary, robot_image outside. Holm by hand over 10: sorted 0 (x10),
    # p_lm (x9), p_lora (x8), then 1s, each under the running maximum
    p_lm, p_lora = (2 * stats.t.sf(m / (sd / math.sqrt(3)), 2) for m, sd in ((0.2, 0.01), (0.2, 0.1)))
    assert 0.07 < p_lora < 0.08 and 9 * p_lm < 0.05
    assert "4 of the 10 tested; 2 significant after Holm (adjusted p below 0.05): flow DoPr-Muon (worse, adjusted p 0.000), " \
           f"lm DoPr-AdamW (better, adjusted p {9 * p_lm:.3f})." in text
    assert "Not tested yet, counted at p = 1 (fewer than 2 paired seeds): robot DoPr-AdamW (1 seed)." in text
    assert "Not run yet, counted at p = 1: lm DoPr-Muon, lm_lora DoPr-Muon, flow DoPr-AdamW, control DoPr-Muon, robot DoPr-Muon." in text
    family = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in text.split("## Did AP help?")[0].splitlines()
              if line.startswith("| ") and " vs " in line and not line.startswith("| task")}
    assert set(family) == {"lm", "flow", "lm_lora", "control"}  # robot_image is not a primary task
    assert family["lm"][5:7] == [f"{p_lm:.3f}", f"{9 * p_lm:.3f}"] and family["lm"][8] == "**better**"
    assert family["flow"][8] == "**worse**"
    assert family["lm_lora"][5:7] == [f"{p_lora:.3f}", f"{8 * p_lora:.3f}"]
    mdd_lora = (stats.t.ppf(0.975, 2) + stats.t.ppf(0.8, 2)) * 0.1 / math.sqrt(3)
    assert family["lm_lora"][7] == f"{mdd_lora:.3g} (0.1)" and family["lm_lora"][8] == "the instrument cannot tell (MDD above target)"
    assert family["control"][7].endswith("(300)") and family["control"][8] == "no difference (MDD within target)"
    holm_column = {(line.split("|")[1], line.split("|")[3].strip()): line.split("|")[10].strip() for line in detail
                   if line.startswith("| [")}
    assert holm_column[(" [lm_lora](lm_lora/cpu/results.md) ", "signum")] == "secondary"
    assert holm_column[(" [robot](robot/cpu/results.md) ", "adamw")] == "n/a (not tested)"
    assert holm_column[(" [lm](lm/cpu/results.md) ", "adamw")] == f"{9 * p_lm:.3f}"
    assert "Unadjusted, over all 6 paired DoPr-X vs X comparisons on the rollout metric (6 results folders, secondary GPs " \
           "included), the 95% t-interval over seeds excluded 0 in favour of DoPr in 2, against it in 1, and included 0 in 3." in text
    assert "Left out: 1 with one seed (no interval)." in text
    assert "too few seeds" in next(line for line in detail if line.startswith("| [robot]"))
    # the verdict table at the top: one row per task and GP, the adjusted p, the equal-time arm not run yet
    verdicts = text.split("## Verdicts")[1].split("## Headline")[0]
    row = next(line for line in verdicts.splitlines() if line.startswith("| [lm]"))
    assert f"| {9 * p_lm:.3f} | not run |" in row, row
    assert next(line for line in verdicts.splitlines() if line.startswith("| [lm_lora]") and "| signum |" in line).count("secondary") == 1
    assert cells[8] == "+0.50"

    # lm_lora's runs are task version 1; once its config says version 2 they are superseded: shown, out of the family
    configs = tmp_path / "configs" / "task"
    configs.mkdir(parents=True)
    (configs / "lm_lora.yaml").write_text("version: 2\n")
    (configs / "lm.yaml").write_text("version: 5\n")  # lm's runs carry no version: never marked
    text = make("--configs", str(configs))
    assert "3 of the 10 tested; 2 significant after Holm (adjusted p below 0.05)" in text
    assert "(runs of an earlier task version, shown in the tables but superseded until the task's new version is tuned, " \
           "`make tune-<task>`, and evaluated, `make reproduce-<task>`): lm_lora DoPr-AdamW (version 1; the task is now version 2)." in text
    assert "Superseded task versions included: lm_lora." in text  # the unadjusted tally says what it counts
    verdicts = text.split("## Verdicts")[1].split("## Headline")[0]
    row = next(line for line in verdicts.splitlines() if line.startswith("| [lm_lora]") and "| adamw |" in line)
    assert row.startswith("| [lm_lora](lm_lora/cpu/results.md) (version 1; the task is now version 2) |") and "| superseded |" in row
    assert "(version" not in next(line for line in verdicts.splitlines() if line.startswith("| [lm]"))
    loss_table = text.split("## Loss versus performance")[1].split("\n## ")[0]
    assert next(line for line in loss_table.splitlines() if line.startswith("| lm_lora")).startswith("| lm_lora (version 1; the task is now version 2) |")


def test_summary_without_reports_names_the_fix(tmp_path):
    out = subprocess.run([sys.executable, "scripts/summary.py", "--results", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0 and "make reproduce-" in out.stderr


def test_iqm_is_the_mean_of_the_middle_half():
    from experiments.stats import iqm

    # 8 scores: the 2 lowest and 2 highest are cut, the middle 4 averaged
    assert iqm([10, 1, 2, 3, 4, 5, 6, -7]) == (2 + 3 + 4 + 5) / 4
    assert iqm([[1, 100], [2, 3], [4, 5], [6, -50]]) == (2 + 3 + 4 + 5) / 4  # over runs and tasks together


def test_probability_of_improvement_counts_pairs_by_hand():
    from experiments.stats import probability_of_improvement

    x, y = [3.0, 1.0, 2.0], [2.0, 0.0]
    # pairs (x_i, y_j): 3>2, 3>0, 1<2, 1>0, 2=2 (half), 2>0 -> (4 + 0.5) / 6
    assert abs(probability_of_improvement(x, y) - 4.5 / 6) < 1e-12
    assert probability_of_improvement([1.0, 2.0], [1.0, 2.0]) == 0.5
    assert probability_of_improvement([5.0], [1.0]) == 1.0
    # two tasks: averaged
    assert abs(probability_of_improvement([[1, 0], [2, 0]], [[0, 1], [0, 1]]) - (1.0 + 0.0) / 2) < 1e-12


def test_iqm_and_probability_of_improvement_agree_with_scipy():
    """Both are written out for speed (the bootstrap calls them thousands of times): they equal
    scipy's trim_mean(0.25) and Mann-Whitney U / (n_x n_y) on random samples with ties and odd sizes."""
    import numpy as np
    from scipy import stats

    from experiments.stats import iqm, probability_of_improvement

    rng = np.random.default_rng(0)
    for n, m in [(5, 5), (7, 3), (1, 4), (10, 9)]:
        x, y = rng.integers(0, 6, n).astype(float), rng.integers(0, 6, m).astype(float)
        assert abs(iqm(x) - stats.trim_mean(x, 0.25)) < 1e-12
        assert abs(probability_of_improvement(x, y) - stats.mannwhitneyu(x, y, alternative="greater").statistic / (n * m)) < 1e-12


def test_stratified_bootstrap_is_the_percentile_of_resampled_runs_by_hand():
    import numpy as np

    from experiments.stats import bootstrap_ci

    x, y = np.array([1.0, 2.0, 4.0]), np.array([0.0, 3.0])
    point, low, high = bootstrap_ci(lambda a, b: a.mean() - b.mean(), x, y, reps=500, seed=7)
    assert point == x.mean() - y.mean()
    rng = np.random.default_rng(7)  # the same draws by hand: per sample, per task column, its own runs
    values = []
    for _ in range(500):
        a = x[rng.integers(0, 3, size=(3, 1))[:, 0]]
        b = y[rng.integers(0, 2, size=(2, 1))[:, 0]]
        values.append(a.mean() - b.mean())
    assert (low, high) == tuple(np.percentile(values, [2.5, 97.5]))
    assert low <= point <= high


def test_minimum_detectable_difference_by_hand():
    from scipy import stats

    from experiments.stats import minimum_detectable_difference

    diffs = [0.1, -0.1, 0.2, 0.0, 0.05]
    n, mean = 5, sum(diffs) / 5
    sd = (sum((d - mean) ** 2 for d in diffs) / 4) ** 0.5
    expected = (stats.t.ppf(0.975, 4) + stats.t.ppf(0.8, 4)) * sd / n ** 0.5
    assert abs(minimum_detectable_difference(diffs) - expected) < 1e-12
    assert minimum_detectable_difference([0.3]) != minimum_detectable_difference([0.3])  # nan


def test_nested_bootstrap_redraws_seeds_then_episodes_and_stays_in_the_unit_interval():
    import numpy as np

    from experiments.stats import nested_bootstrap_ci

    # One seed of two episodes {0, 1}: a replicate's mean is 0, 0.5 or 1 with probability 1/4, 1/2, 1/4, so the
    # 2.5th and 97.5th percentiles of many replicates are 0 and 1 (by hand).
    assert nested_bootstrap_ci([[0, 1]], reps=4000, seed=1) == (0.5, 0.0, 1.0)
    # Every episode a success: the interval collapses to [1, 1], never beyond.
    assert nested_bootstrap_ci([[1] * 20] * 5) == (1.0, 1.0, 1.0)
    # The point is the mean over seeds of the per-seed rates, the interval inside [0, 1] and around it.
    seeds = [[1] * 18 + [0] * 2, [1] * 10 + [0] * 10, [1] * 19 + [0], [0] * 20, [1] * 20]
    point, low, high = nested_bootstrap_ci(seeds, seed=3)
    assert point == np.mean([0.9, 0.5, 0.95, 0.0, 1.0]) and 0.0 <= low < point < high <= 1.0
    # The same draws by hand: seeds first, then each drawn seed's episodes, independently per slot.
    rng = np.random.default_rng(3)
    picks = rng.integers(0, 5, size=(2000, 5))
    means = np.empty(picks.shape)
    for g, a in enumerate(np.asarray(seeds, dtype=float)):
        slots = picks == g
        means[slots] = a[rng.integers(0, 20, size=(int(slots.sum()), 20))].mean(axis=1)
    assert (low, high) == tuple(np.percentile(means.mean(axis=1), [2.5, 97.5]))
    # Redrawing episodes too widens the interval over one that redraws seeds only (one value per seed).
    seed_only = nested_bootstrap_ci([[np.mean(g)] for g in seeds], seed=3)
    assert seed_only[0] == point and 0.0 <= seed_only[1] and seed_only[2] <= 1.0
    wide = [[1] * 10 + [0] * 10] * 5  # no seed-to-seed spread: only the episodes make the interval
    assert nested_bootstrap_ci([[0.5]] * 5)[1:] == (0.5, 0.5)
    _, lo, hi = nested_bootstrap_ci(wide)
    assert 0.35 < lo < 0.5 < hi < 0.65




def test_holm_adjusted_p_values_by_hand():
    from experiments.stats import holm

    # m = 4, sorted 0.01 < 0.02 < 0.03 < 0.5: 4 x 0.01 = 0.04; 3 x 0.02 = 0.06; 2 x 0.03 = 0.06 (the running max
    # keeps it at 0.06); 1 x 0.5 = 0.5; returned in the order given
    assert holm([0.03, 0.5, 0.01, 0.02]) == pytest.approx([0.06, 0.5, 0.04, 0.06])
    # the running maximum: 2 x 0.02 = 0.04 < 3 x 0.015 = 0.045 would go down, so it stays 0.045
    assert holm([0.015, 0.02, 0.9]) == pytest.approx([0.045, 0.045, 0.9])
    assert holm([0.6, 0.7]) == [1.0, 1.0]  # 2 x 0.6 capped at 1, and 0.7 under the running maximum
    assert holm([]) == [] and holm([0.2]) == [0.2]
    with pytest.raises(ValueError, match="nan"):
        holm([0.01, math.nan])


def test_mdd_at_projects_the_minimum_detectable_difference_and_seeds_needed_counts_up():
    from scipy import stats

    from experiments.stats import mdd_at, minimum_detectable_difference, seeds_needed

    diffs = [0.1, -0.1, 0.2, 0.0, 0.05]
    sd = (sum((d - 0.05) ** 2 for d in diffs) / 4) ** 0.5
    assert mdd_at(sd, 5) == pytest.approx(minimum_detectable_difference(diffs), rel=1e-12)
    # sd 1, target 1: (t(.975, n-1) + t(.8, n-1)) / sqrt(n) first drops to <= 1 at n = 10 (1.0650 at 9, 0.9947 at 10)
    for n, expected in ((9, 1.0650), (10, 0.9947)):
        assert mdd_at(1.0, n) == pytest.approx((stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.8, n - 1)) / n ** 0.5)
        assert mdd_at(1.0, n) == pytest.approx(expected, abs=1e-4)
    assert seeds_needed(1.0, 1.0) == 10 and seeds_needed(1.0, 0.01, cap=50) is None and seeds_needed(0.0, 0.1) == 2
