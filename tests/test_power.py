"""scripts/power.py: the paired SD, the MDD, the target and the seeds needed against a hand computation on
synthetic records; the noise split (seeds against episodes); fewer than 3 seeds, a missing folder and a task
without a target give a message, not a traceback; and it runs on every committed results/<task>/cpu."""

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("power", ROOT / "scripts" / "power.py")
power = importlib.util.module_from_spec(spec)
spec.loader.exec_module(power)


def synthetic_record(task, optimizer, seed, metric, outcomes, task_meta=None):
    """One finished run in the records schema (experiments/record.py) whose final metric is the mean of its outcomes."""
    value = sum(outcomes) / len(outcomes)
    return {"schema": 1, "run_id": f"{optimizer}-s{seed}", "task": task, "experiment": "cpu", "optimizer": optimizer, "seed": seed,
            "lr": 1e-3, "status": "done", "command": "synthetic", "provenance": {"git_commit": "abc1234", "dirty": False},
            "config": {"task": {"name": task, "version": 1}, "optimizer": {"name": optimizer, "weight_decay": 0.0}},
            "evals": [{"step": 10, "train_seconds": 1.0, "val_loss": 0.5, "rollout_seconds": 1.0, "metrics": {metric: value},
                       "select": {}, "intervals": {}, "horizons": {}}],
            "outcomes": {"10": {metric: outcomes}}, "train": [],
            "summary": {"task": task, "scale": "cpu", "optimizer": optimizer, "seed": seed, "lr": 1e-3, "metric_name": metric,
                        "higher_is_better": True, "final": {"step": 10}, "best": {"step": 10, "metric": value, "min_val_loss": 0.5},
                        "task_meta": task_meta or {}, "damping": 1.0 if optimizer.startswith("dopr_") else None}}


def write(folder: Path, records: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "records.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    return folder


def hand_mdd(sd, n):
    return (stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.8, n - 1)) * sd / math.sqrt(n)


def var1(xs):  # sample variance, n - 1
    m = sum(xs) / len(xs)
    return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)


# control: 4 seeds, 3 episodes each; the seeds spread widely (the training seed dominates), the episodes little
CONTROL = {  # seed: (adamw returns, dopr_adamw returns)
    0: ([1000, 1010, 990], [1500, 1520, 1480]),
    1: ([2000, 2030, 1970], [1900, 1890, 1910]),
    2: ([1500, 1500, 1530], [2700, 2680, 2720]),
    3: ([1200, 1190, 1210], [1300, 1330, 1270]),
}


def test_numbers_against_a_hand_computation(tmp_path):
    meta = {"expert_return": 3000.0}
    records = [synthetic_record("control", o, s, "return", ret, meta) for s, (a, d) in CONTROL.items()
               for o, ret in (("adamw", a), ("dopr_adamw", d))]
    result = power.analyse(write(tmp_path / "control" / "cpu", records))
    (c,) = result["comparisons"]
    diffs = [sum(d) / 3 - sum(a) / 3 for a, d in CONTROL.values()]  # 500, -100, 1190, 100
    sd = math.sqrt(var1(diffs))
    assert result["target_mdd"] == pytest.approx(300.0)  # 10% of the expert's return
    assert c["n"] == 4 and c["mean_diff"] == pytest.approx(sum(diffs) / 4) and c["sd"] == pytest.approx(sd)
    assert c["mdd"] == pytest.approx(hand_mdd(sd, 4))
    need = next(n for n in range(2, 101) if hand_mdd(sd, n) <= 300.0)  # counted up by hand: t moves with n
    assert c["seeds_needed"] == need and need > 20 and not c["reaches_target_within_budget"]
    assert c["mdd_at_budget"] == pytest.approx(hand_mdd(sd, 20))
    # the noise split: the pair's runs face the same 3 episodes (common random numbers), so a pair's episode part is
    # the sample variance of the per-episode differences / 3, averaged over seeds; the rest of the paired variance is
    # the seeds'
    episodes = sum(var1([y - x for x, y in zip(a, d)]) / 3 for a, d in CONTROL.values()) / 4
    assert c["noise"]["paired_instances"] and c["noise"]["episodes_var"] == pytest.approx(episodes)
    assert c["noise"]["seed_var"] == pytest.approx(sd ** 2 - episodes) and c["noise"]["dominant"] == "seed"
    independent = sum(var1(a) / 3 + var1(d) / 3 for a, d in CONTROL.values()) / 4
    assert episodes != pytest.approx(independent)  # the pairing is what is measured, not two independent draws
    text = power.table(result)
    assert "20 seeds cannot reach the target" in text and "the seeds dominate" in text and str(need) in text


def test_a_rate_uses_p_one_minus_p_and_names_the_episodes_when_they_dominate(tmp_path):
    # robot: 10 episodes per adamw run, 20 per dopr_adamw run (the instances do not align: each run's variance, as
    # independent draws), the same success rate per optimizer on every seed up to episode noise
    succ = {0: ([1] * 5 + [0] * 5, [1] * 7 + [0] * 3), 1: ([1] * 6 + [0] * 4, [1] * 4 + [0] * 6),
            2: ([1] * 5 + [0] * 5, [1] * 7 + [0] * 3), 3: ([0] * 4 + [1] * 6, [0] * 6 + [1] * 4)}
    succ = {s: (a, d * 2) for s, (a, d) in succ.items()}
    records = [synthetic_record("robot", o, s, "success", x) for s, (a, d) in succ.items() for o, x in (("adamw", a), ("dopr_adamw", d))]
    result = power.analyse(write(tmp_path / "robot" / "cpu", records))
    (c,) = result["comparisons"]
    p = lambda xs: sum(xs) / len(xs)  # noqa: E731
    episodes = sum(p(a) * (1 - p(a)) / 10 + p(d) * (1 - p(d)) / 20 for a, d in succ.values()) / 4
    assert c["noise"]["paired_instances"] is False
    diffs = [p(d) - p(a) for a, d in succ.values()]  # 0.2, -0.2, 0.2, -0.2
    assert result["target_mdd"] == 0.1 and c["sd"] == pytest.approx(math.sqrt(var1(diffs)))
    assert c["noise"]["episodes_var"] == pytest.approx(episodes) and c["noise"]["dominant"] == "episodes"
    need = next(n for n in range(2, 101) if hand_mdd(c["sd"], n) <= 0.1)
    assert c["seeds_needed"] == need > 20 and "the episodes / instances dominate" in c["note"]
    capped = power.analyse(tmp_path / "robot" / "cpu", cap=need - 1)  # counted up to a cap below it: said so
    assert capped["comparisons"][0]["seeds_needed"] is None and f"more than {need - 1}" in power.table(capped)


def test_only_the_current_task_version_is_paired_and_the_seeds_to_run_keep_the_floor_of_ten(tmp_path):
    """Runs of an older task version (the same seeds, before a recalibration) are not paired with the new ones; where
    every run is older the newest version's are read and the answer says so; the seeds to run are power's count, never below the protocol's 10."""
    configs = tmp_path / "configs" / "task"
    configs.mkdir(parents=True)
    (configs / "robot.yaml").write_text("version: 2\n")
    old = {0: (0.2, 0.9), 1: (0.9, 0.1), 2: (0.1, 0.8)}  # version 1: wild differences
    new = {0: (0.50, 0.60), 1: (0.52, 0.60), 2: (0.48, 0.61)}  # version 2: about +0.1, tight
    records = []
    for version, table in ((1, old), (2, new)):
        for s, (a, d) in table.items():
            for o, v in (("adamw", a), ("dopr_adamw", d)):
                r = synthetic_record("robot", o, s, "success", [v])
                r["config"]["task"]["version"] = version
                r["run_id"] = f"{o}-s{s}-v{version}"
                records.append(r)
    folder = write(tmp_path / "robot" / "cpu", records)
    result = power.analyse(folder, configs=configs)
    (c,) = result["comparisons"]
    diffs = [d - a for a, d in new.values()]
    assert c["n"] == 3 and c["sd"] == pytest.approx(math.sqrt(var1(diffs))) and result["superseded"] is None
    need = next(n for n in range(2, 101) if hand_mdd(c["sd"], n) <= 0.1)
    assert c["seeds_needed"] == need < 10 and c["seeds_to_run"] == 10
    (configs / "robot.yaml").write_text("version: 3\n")  # every run is older now
    result = power.analyse(folder, configs=configs)
    assert result["superseded"].startswith("these runs are of task version 2; the task is at version 3")
    assert result["comparisons"][0]["sd"] == pytest.approx(c["sd"])  # the newest version's runs, not both
    assert "warning: these runs are of task version" in power.table(result)


def test_fewer_than_three_seeds_is_said_not_printed_as_nan(tmp_path):
    records = [synthetic_record("robot", o, s, "success", [1, 0, 1]) for s in (0, 1) for o in ("muon", "dopr_muon")]
    folder = write(tmp_path / "robot" / "cpu", records)
    out = subprocess.run([sys.executable, "scripts/power.py", "--runs", str(folder)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "only 2 paired seeds" in out.stdout and "at least 3" in out.stdout
    assert not re.search(r"\bnan\b", out.stdout, re.I)
    data = json.loads(subprocess.run([sys.executable, "scripts/power.py", "--runs", str(folder), "--json"], cwd=ROOT,
                                     capture_output=True, text=True, check=True).stdout)
    assert data["comparisons"][0]["n"] == 2 and "sd" not in data["comparisons"][0]


def test_a_missing_folder_or_an_unknown_task_names_the_fix(tmp_path):
    out = subprocess.run([sys.executable, "scripts/power.py", "--runs", str(tmp_path / "results" / "lm" / "nope")], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "no such folder" in out.stderr and "--runs results/control/cpu" in out.stderr
    records = [synthetic_record("juggling", o, s, "drops", [1.0, 2.0]) for s in range(3) for o in ("adamw", "dopr_adamw")]
    folder = write(tmp_path / "juggling" / "cpu", records)
    assert power.main(["--runs", str(folder)]) == 2
    with pytest.raises(power.Refusal, match="no target MDD for task 'juggling'.*--target"):
        power.analyse(folder)
    assert power.analyse(folder, target=0.5)["target_rule"] == "given with --target"


# A task between its tuning and its evaluation has no headline records (the older version's are removed when the new
# selection is written); every other task's are read.
HEADLINES = [t for t in ("lm", "lm_lora", "flow", "control", "robot", "robot_image") if (ROOT / "results" / t / "cpu" / "records.jsonl").exists()]


def test_most_tasks_have_headline_records():
    assert len(HEADLINES) >= 4, HEADLINES


@pytest.mark.parametrize("task", HEADLINES)
def test_runs_on_every_committed_headline_experiment(task, capsys):
    assert power.main(["--runs", str(ROOT / "results" / task / "cpu")]) == 0
    out = capsys.readouterr().out
    assert "dopr_adamw vs adamw" in out and "dopr_muon vs muon" in out and not re.search(r"\bnan\b", out, re.I)
