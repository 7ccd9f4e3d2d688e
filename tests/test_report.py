"""scripts/report.py on synthetic run folders: the tuning protocol's selections and regret."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def write_run(folder: Path, optimizer: str, lr: float, hp: float, val_loss: float, accuracy: float, seed: int = 100):
    dopr = optimizer.startswith("dopr_")
    folder.mkdir(parents=True)
    summary = {"task": "lm", "scale": "cpu", "optimizer": optimizer, "lr": lr, "seed": seed, "damping": hp if dopr else None,
               "metric_name": "accuracy", "higher_is_better": True, "git_commit": "abc1234", "status": "done",
               "val_loss_label": "validation loss", "metric_label": "accuracy", "horizon_label": "steps",
               "final": {"step": 10, "val_loss": val_loss, "accuracy": accuracy},
               "best": {"step": 10, "metric": accuracy, "min_val_loss": val_loss}}
    config = {"optimizer": {"name": optimizer, "weight_decay": 0.1 if dopr else hp, "kwargs": {"damping": hp} if dopr else {}}}
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "config.json").write_text(json.dumps(config))


def test_tuning_report_selects_by_loss_and_by_metric_with_the_regret(tmp_path):
    runs = tmp_path / "runs"
    # (optimizer, lr, hp): (val loss, accuracy). For adamw the lowest loss (lr 1e-3, wd 0) is not the best
    # accuracy (lr 3e-3, wd 0.1): regret 0.6 - 0.4 = 0.2. dopr_adamw's two criteria agree: regret 0.
    trials = {("adamw", 1e-3, 0.0): (0.10, 0.40), ("adamw", 1e-3, 0.1): (0.12, 0.45), ("adamw", 3e-3, 0.0): (0.20, 0.50),
              ("adamw", 3e-3, 0.1): (0.15, 0.60), ("dopr_adamw", 1e-3, 1.0): (0.30, 0.30), ("dopr_adamw", 1e-3, 10.0): (0.25, 0.35),
              ("dopr_adamw", 3e-3, 1.0): (0.05, 0.80), ("dopr_adamw", 3e-3, 10.0): (0.08, 0.70)}
    for (opt, lr, hp), (loss, acc) in trials.items():
        write_run(runs / f"{opt}-lr{lr:g}-{hp:g}-s100", opt, lr, hp, loss, acc)
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "report.py"), str(runs), "--out", str(out), "--kind", "tuning"],
                   check=True, capture_output=True, text=True, timeout=120)
    text = (out / "tuning.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| adamw |") or line.startswith("| dopr_adamw |")}
    assert "| adamw | 4 | 1 | 0.001, 0.003 | 0, 0.1 | 0.001, 0 | 0.4 | 0.003, 0.1 | 0.6 | 0.2 |" in text, text
    assert "| dopr_adamw | 4 | 1 | 0.001, 0.003 | 1, 10 | 0.003, 1 | 0.8 | 0.003, 1 | 0.8 | 0 |" in text, text
    assert "| dopr_adamw | 0.003 | 0.003 | 1 | 1 | 0.003 | 0.001 | 3 |" in text  # Observation 4.3 by metric holds; by loss it does not
    assert "Unequal budgets" not in text and rows
    assert "optimizer=dopr_adamw lr=0.003 optimizer.kwargs.damping=1 seed=0,1,2,3,4" in text
    assert "optimizer=adamw lr=0.003 optimizer.weight_decay=0.1 seed=0,1,2,3,4" in text
    assert (out / "tuning.png").stat().st_size > 0 and (out / "tuning_runs.csv").exists()
    # the block to paste into configs/task/lm.yaml: run without lr=, each optimizer gets its selected setting,
    # except a key given on the command line
    from omegaconf import OmegaConf

    from experiments.protocol import resolve

    block = next(b.split("```")[0] for b in text.split("```yaml\n")[1:] if "tuned:" in b)
    task = OmegaConf.merge({"name": "lm"}, OmegaConf.create(block))
    for opt, wd, damping in (("adamw", 0.1, None), ("dopr_adamw", 0.1, 1.0)):
        cfg = OmegaConf.create({"lr": None, "task": task, "trainer": {"steps": 10}, "scale": {"name": "cpu"},
                                "optimizer": {"name": opt, "weight_decay": 0.5, "kwargs": {"damping": 7.0} if damping else {}}})
        got = resolve(cfg, given=set())
        assert got.lr == 0.003 and got.optimizer.weight_decay == (wd if opt == "adamw" else 0.5)
        assert got.optimizer.kwargs.get("damping") == damping
        assert resolve(cfg, given={"optimizer.weight_decay", "optimizer.kwargs.damping"}).optimizer == cfg.optimizer
        cfg.lr = 1e-3  # lr= given: the sweep's own settings, nothing tuned applied
        assert resolve(cfg, given=set()).optimizer == cfg.optimizer
    # a missing trial is called out
    import shutil

    shutil.rmtree(runs / "adamw-lr0.003-0.1-s100")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "report.py"), str(runs), "--out", str(out), "--kind", "tuning"],
                   check=True, capture_output=True, text=True, timeout=120)
    assert "**Unequal budgets**: adamw 3, dopr_adamw 4 trials" in (out / "tuning.md").read_text()


def test_success_rate_intervals_stay_inside_the_unit_interval(tmp_path):
    """A rate metric (metric_range [0, 1]) gets bootstrap intervals over seeds and episodes: inside [0, 1]
    even where a t-interval over seeds would leave it (seeds at 1.0 and 0.6), and the meta file says how
    many episodes each rollout had."""
    import re

    runs = tmp_path / "runs"
    rates = {"adamw": [1.0, 1.0, 0.6], "dopr_adamw": [1.0, 1.0, 1.0]}
    for opt, per_seed in rates.items():
        for seed, rate in enumerate(per_seed):
            run = runs / f"{opt}-s{seed}"
            run.mkdir(parents=True)
            episodes = [1] * round(20 * rate) + [0] * (20 - round(20 * rate))
            summary = {"task": "robot", "scale": "cpu", "optimizer": opt, "lr": 1e-3, "seed": seed, "metric_name": "success",
                       "metric_range": [0, 1], "higher_is_better": True, "git_commit": "abc1234", "status": "done",
                       "final": {"step": 10, "val_loss": 0.5, "success": rate}, "best": {"step": 10, "metric": rate, "min_val_loss": 0.5}}
            if opt == "adamw":  # runs written before summary.json recorded the wall time have none (dopr_adamw here)
                summary["wall_seconds"] = 60.0 * (seed + 1)
            (run / "summary.json").write_text(json.dumps(summary))
            (run / "config.json").write_text(json.dumps({"optimizer": {"name": opt}, "task": {"eval_episodes": 20}}))
            (run / "metrics.jsonl").write_text(json.dumps({"step": 10, "outcomes": {"success": episodes}}) + "\n")
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "report.py"), str(runs), "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=120)
    text = (out / "results.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| adamw |"))
    point, low, high = map(float, re.search(r"\| ([\d.]+) \[([\d.]+), ([\d.]+)\] \|", row).groups())
    assert abs(point - 13 / 15) < 1e-3 and 0.0 <= low < point < high <= 1.0, row
    assert "| dopr_adamw | 3 | 0.5000 ± 0.0000 | 0.5000 ± 0.0000 | 1.000 [1.000, 1.000] |" in text, text
    assert "minutes per run |" in text and row.endswith("| 2.0 |") and "| 1.000 [1.000, 1.000] |  |" in text, text  # mean of 1, 2, 3 minutes
    import csv
    with open(out / "results_runs.csv") as f:
        assert sorted(r["wall_seconds"] for r in csv.DictReader(f) if r["optimizer"] == "adamw") == ["120.0", "180.0", "60.0"]
    meta = json.loads((out / "results_meta.json").read_text())
    assert meta["rollout_episodes"] == 20 and meta["metric_range"] == [0, 1]


def test_a_metrics_floor_gets_its_own_csv_column(tmp_path):
    """The flow task reports fd_floor beside every FD: the per-run CSV carries it as `fd_floor`."""
    import csv

    runs = tmp_path / "runs"
    for seed, (fd, floor) in enumerate([(2.0, 0.5), (3.0, 0.6)]):
        run = runs / f"adamw-s{seed}"
        run.mkdir(parents=True)
        summary = {"task": "flow", "scale": "cpu", "optimizer": "adamw", "lr": 1e-2, "seed": seed, "metric_name": "fd",
                   "higher_is_better": False, "git_commit": "abc1234", "status": "done",
                   "final": {"step": 10, "val_loss": 0.3, "fd": fd, "fd_floor": floor}, "best": {"step": 10, "metric": fd, "min_val_loss": 0.3}}
        (run / "summary.json").write_text(json.dumps(summary))
        (run / "config.json").write_text(json.dumps({"optimizer": {"name": "adamw"}}))
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "report.py"), str(runs), "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=120)
    with open(out / "results_runs.csv") as f:
        assert [(r["final_fd"], r["fd_floor"]) for r in csv.DictReader(f)] == [("2.0", "0.5"), ("3.0", "0.6")]


def test_tuning_report_offers_one_more_learning_rate_to_every_optimizer(tmp_path):
    """At an LR edge, the report proposes a second round that keeps budgets equal: one more rung per optimizer,
    beyond the selected edge, or from the middle beyond the better neighbour (adamw: its upper neighbour 1e-3 scores 0.5, its lower 1e-4 0.3, so 3e-3)."""
    runs = tmp_path / "runs"
    acc = {("adamw", 1e-4): 0.3, ("adamw", 3e-4): 0.6, ("adamw", 1e-3): 0.5,
           ("muon", 1e-4): 0.7, ("muon", 3e-4): 0.5, ("muon", 1e-3): 0.4,
           ("dopr_adamw", 1e-4): 0.2, ("dopr_adamw", 3e-4): 0.4, ("dopr_adamw", 1e-3): 0.9}
    for (opt, lr), a in acc.items():
        for hp in ((1.0, 10.0) if opt.startswith("dopr_") else (0.0, 0.1)):
            write_run(runs / f"{opt}-lr{lr:g}-{hp:g}-s100", opt, lr, hp, 0.1, a - 0.01 * hp)
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "report.py"), str(runs), "--out", str(out), "--kind", "tuning"],
                   check=True, capture_output=True, text=True, timeout=120)
    text = (out / "tuning.md").read_text()
    assert "**One more learning rate each**" in text
    assert "lr_centre: {adamw: 0.003, dopr_adamw: 0.003, muon: 3e-05}" in text, text
    # The second round in (one more LR each, as proposed): the protocol extends once, so no third proposal.
    for (opt, lr), a in {("adamw", 3e-3): 0.55, ("dopr_adamw", 3e-3): 0.95, ("muon", 3e-5): 0.8}.items():
        for hp in ((1.0, 10.0) if opt.startswith("dopr_") else (0.0, 0.1)):
            write_run(runs / f"{opt}-lr{lr:g}-{hp:g}-s100", opt, lr, hp, 0.1, a - 0.01 * hp)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "report.py"), str(runs), "--out", str(out), "--kind", "tuning"],
                   check=True, capture_output=True, text=True, timeout=120)
    text = (out / "tuning.md").read_text()
    assert "**One more learning rate each**" not in text and "lr_centre:" not in text, text
    assert "the protocol extends once" in text and "at the edge for dopr_adamw, muon." in text, text


def test_tuning_pages_show_the_searched_beta2_of_every_adamw_trial():
    """A version-3 tuning searches AdamW's beta2 (as betas[1]): results_runs/tuning_runs carry it where a run set it,
    and the tuning page's table has the column, so a trial's setting can be read from the page."""
    import csv

    from experiments import record

    records = {r["run_id"]: r for r in record.read(ROOT / "results" / "lm_lora" / "cpu_tune" / "records.jsonl")}
    rows = list(csv.DictReader((ROOT / "results" / "lm_lora" / "cpu" / "tuning_runs.csv").open()))
    adamw = [row for row in rows if row["optimizer"] == "adamw"]
    assert adamw
    for row in adamw:
        assert float(row["beta2"]) == records[row["run"]]["config"]["optimizer"]["kwargs"]["betas"][1]
    assert all(row["beta2"] == "" for row in rows if row["optimizer"] != "adamw")  # blank where no run set it
    assert "| beta2 |" in (ROOT / "results" / "lm_lora" / "cpu" / "tuning.md").read_text()


@pytest.mark.slow  # the report's entry point as a subprocess (~10 s): keeps `make test` under 10 minutes
def test_a_page_with_light_rollouts_says_which_steps_they_are(tmp_path):
    """Rows of light rollouts (trainer.light_rollout_every) go into the curves and the record flags them; the page
    says at which steps the metric was measured on fewer instances."""
    runs = tmp_path / "runs"
    for opt in ("adamw", "dopr_adamw"):
        for seed in (0, 1):
            run = runs / f"{opt}-s{seed}"
            run.mkdir(parents=True)
            final = 0.5 + 0.1 * seed
            summary = {"task": "lm", "scale": "cpu", "optimizer": opt, "lr": 1e-3, "seed": seed, "metric_name": "accuracy",
                       "metric_range": [0, 1], "higher_is_better": True, "git_commit": "abc1234", "status": "done", "steps": 10,
                       "final": {"step": 10, "val_loss": 0.5, "accuracy": final}, "best": {"step": 10, "metric": final, "min_val_loss": 0.5},
                       "wall_seconds": 20.1 + seed}  # the light row's 0.1 s adds 0.1 / (20 + seed) to a run
            (run / "summary.json").write_text(json.dumps(summary))
            (run / "config.json").write_text(json.dumps({"optimizer": {"name": opt}, "task": {"name": "lm"}}))
            rows = [{"step": 5, "train_seconds": 5.0, "val_loss": 0.8, "accuracy": 0.2, "light": True, "rollout_seconds": 0.1},
                    {"step": 10, "train_seconds": 10.0, "val_loss": 0.5, "accuracy": final, "select_accuracy": final, "rollout_seconds": 1.0}]
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "report.py"), str(runs), "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=120)
    text = (out / "results.md").read_text()
    assert "Light rollouts (`trainer.light_rollout_every`" in text and "at step(s) 5." in text, text
    assert "| accuracy at step | 5 | 10 |" in text
    # their cost, measured: median over the 4 runs of 0.1 / 20 and 0.1 / 21, at most 0.5%
    assert "they added 0.5% to a run's wall time (median over 4 runs; at most 0.5%)" in text, text
    cost = json.loads((out / "results_meta.json").read_text())["light_rollout_cost"]
    assert cost["runs"] == 4 and abs(cost["max"] - 0.1 / 20) < 1e-12 and abs(cost["median"] - (0.1 / 20 + 0.1 / 21) / 2) < 1e-12


def test_the_tuning_pages_every_run_table_has_one_line_per_trial_in_round_order(tmp_path, monkeypatch):
    """Version-3 trials (config tune.label r<round>t<trial>; a confirmation reruns the trial under its label): the
    "Every run" table of lm_lora's committed tuning shows each label on one line with all its seeds, in round order."""
    from collections import Counter

    from experiments import record

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import report

    records = record.read(ROOT / "results" / "lm_lora" / "cpu_tune" / "records.jsonl")
    seeds = Counter((r["optimizer"], r["config"]["tune"]["label"]) for r in records if r["status"] == "done")
    assert any(n > 1 for n in seeds.values()) and any(label.startswith("r2") for _, label in seeds)
    out = tmp_path / "out"
    assert report.main([str(ROOT / "results" / "lm_lora" / "cpu_tune"), "--out", str(out)]) == 0
    text = (out / "tuning.md").read_text().split("## Every run", 1)[1]
    lines = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and " | r" in line]
    shown = [(cells[0].strip("| "), cells[1]) for cells in lines]
    assert shown == sorted(seeds), shown[:5]  # one line per trial, by optimizer then round and trial
    assert [int(cells[7]) for cells in lines] == [seeds[key] for key in shown]  # the seeds column: all the trial's runs


def test_the_meta_command_of_a_sweep_whose_runs_recorded_their_own_is_one_line(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import report

    runs = [f"python -m experiments.train optimizer={o} seed={s} +experiment=lm_lora/cpu threads=1" for o in ("adamw", "muon") for s in range(3)]
    assert report.command_text(runs) == ("python -m experiments.train +experiment=lm_lora/cpu threads=1 (optimizer, seed per run; "
                                         "each run's command is in its record)")
    assert report.command_text(runs[:2]) == f"{runs[0]} and {runs[1]}" and report.command_text([]) is None
