"""The equal-time arm (scripts/equal_time.py): X given DoPr-X's measured training time."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import equal_time  # noqa: E402


def rec(opt, seed, seconds, steps=100):
    return {"optimizer": opt, "seed": seed, "status": "done", "provenance": {"cpu": "AMD EPYC", "gpu": None},
            "config": {"trainer": {"steps": steps, "warmup_steps": 10, "eval_every": 20, "rollout_every": 50, "checkpoint_every": 50,
                                   "log_every": 10}},
            "evals": [{"step": steps, "train_seconds": seconds}]}


def test_the_ratio_is_the_median_over_seeds_and_every_period_scales_with_it():
    records = [rec("adamw", 0, 10.0), rec("adamw", 1, 10.0), rec("adamw", 2, 20.0),
               rec("dopr_adamw", 0, 15.0), rec("dopr_adamw", 1, 30.0), rec("dopr_adamw", 2, 40.0), rec("muon", 0, 5.0)]
    arms = equal_time.plan(records)
    assert list(arms) == ["adamw"]  # muon has no DoPr-Muon here
    arm = arms["adamw"]
    assert arm["ratio"] == 2.0 and arm["seeds"] == [0, 1, 2]  # ratios 1.5, 3, 2: median 2
    assert arm["trainer"] == {"steps": 200, "warmup_steps": 20, "eval_every": 40, "rollout_every": 100, "checkpoint_every": 100, "log_every": 20}
    assert arm["machine"] == ["AMD EPYC"]
    old = [dict(r, evals=[{"step": 100, "train_seconds": None}]) for r in records]
    with pytest.raises(SystemExit, match="no training seconds"):
        equal_time.plan(old)


def test_only_the_current_task_versions_runs_set_the_arm(tmp_path, monkeypatch, capsys):
    """The arm runs the task's current config: headline runs of an older version (before a recalibration) neither
    set its budget nor mix with the current ones; with none current it stops and names the command."""
    source = tmp_path / "lm" / "cpu"
    source.mkdir(parents=True)
    (source / "records.jsonl").write_text("")

    def versioned(r, version):
        r["config"]["task"] = {"name": "lm", "version": version}
        return r

    now = equal_time.load.current_version(ROOT / "configs" / "task", "lm")
    old = [versioned(rec(o, s, 10.0 if o == "adamw" else 50.0, steps=300), now - 1) for o in ("adamw", "dopr_adamw") for s in (0, 1)]
    new = [versioned(rec(o, s, 10.0 if o == "adamw" else 12.0, steps=800), now) for o in ("adamw", "dopr_adamw") for s in (0, 1)]
    monkeypatch.setattr(equal_time.record, "read", lambda folder: old + new)
    assert equal_time.main(["lm", "--results", str(tmp_path), "--plan"]) == 0
    out = capsys.readouterr().out
    assert f"left out: the runs of task version {now - 1}" in out and "1.200x" in out and "adamw runs 960 steps" in out
    monkeypatch.setattr(equal_time.record, "read", lambda folder: old)
    with pytest.raises(SystemExit):
        equal_time.main(["lm", "--results", str(tmp_path), "--plan"])
    err = capsys.readouterr().err
    assert f"holds runs of task version {now - 1} only" in err and "make reproduce-lm" in err


@pytest.mark.slow  # entry-point runs: .ci/run runs the slow suite
def test_the_arm_runs_x_for_doprs_time_and_the_summary_shows_it(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    results = tmp_path / "results"
    common = ["scale=smoke", "logger=none", f"task.data_dir={tmp_path / 'data'}"]
    subprocess.run([sys.executable, "-m", "experiments.train", "-m", "+experiment=lm/cpu", "optimizer=adamw,dopr_adamw", "seed=0,1",
                    f"results_dir={results / 'lm' / 'cpu'}", f"hydra.sweep.dir={tmp_path / 'runs'}", "hydra/launcher=local",
                    "hydra.launcher.n_jobs=2", "threads=1", *common], cwd=ROOT, env=env, check=True, capture_output=True, timeout=900)
    subprocess.run([sys.executable, "scripts/report.py", str(results / "lm" / "cpu")], cwd=ROOT, env=env, check=True, capture_output=True)
    out = subprocess.run([sys.executable, "scripts/equal_time.py", "lm", "--results", str(results), "--runs", str(tmp_path / "runs"), *common],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    base = [json.loads(line) for line in (results / "lm" / "cpu" / "records.jsonl").read_text().splitlines()]
    secs = {(r["optimizer"], r["seed"]): r["evals"][-1]["train_seconds"] for r in base}
    ratio = sorted(secs[("dopr_adamw", s)] / secs[("adamw", s)] for s in (0, 1))
    ratio = (ratio[0] + ratio[1]) / 2  # the median of two
    arm = [json.loads(line) for line in (results / "lm" / "cpu_equal_time" / "records.jsonl").read_text().splitlines()]
    assert sorted((r["optimizer"], r["seed"]) for r in arm) == [("adamw", 0), ("adamw", 1)]
    assert all(r["summary"]["steps"] == max(1, round(6 * ratio)) and abs(r["config"]["equal_time"]["ratio"] - ratio) < 1e-3 for r in arm)
    assert "Equal-time arm: adamw ran" in (results / "lm" / "cpu_equal_time" / "results.md").read_text()
    subprocess.run([sys.executable, "scripts/summary.py", "--results", str(results)], cwd=ROOT, env=env, check=True, capture_output=True)
    row = next(line for line in (results / "README.md").read_text().split("## Verdicts")[1].splitlines() if line.startswith("| [lm]"))
    assert row.split("|")[7].strip() != "not run", row  # the equal-time column has the paired difference
