"""DoPr-X@10 (dopr_<X>_k10: DoPr-X with update_every=10; issues 45 and 47): its configs build the library's DoPr with
update_every=10; the registry pairs it with X and with DoPr-X, both secondary; the cross-task summary and the
equal-time arm keep it out of the primary family and give it an arm of its own; the robot task's evaluation size."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import dopr
from experiments.engine import build_optimizer
from experiments.protocol import resolve
from experiments.registry import base_of, display, is_primary_pair, pair_rank, pairs, reference_of, variant_suffix

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import equal_time  # noqa: E402


def composed(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("task", ["flow", "robot"])
@pytest.mark.parametrize("base", ["adamw", "muon"])
def test_k10_configs_build_dopr_with_update_every_10_and_everything_else_as_dopr_x(task, base):
    cfg = resolve(composed(f"+experiment={task}/cpu", f"optimizer=dopr_{base}_k10", "logger=none"), given=set())
    ref = resolve(composed(f"+experiment={task}/cpu", f"optimizer=dopr_{base}", "logger=none"), given=set())
    assert cfg.optimizer.name == f"dopr_{base}_k10" and cfg.optimizer.kwargs.update_every == 10
    # the same AP and GP as DoPr-X, its starting LR and damping (configs/task/<task>.yaml) until tuned
    assert cfg.lr == ref.lr and dict(cfg.optimizer.kwargs) == {**dict(ref.optimizer.kwargs), "update_every": 10}
    assert cfg.optimizer.weight_decay == ref.optimizer.weight_decay
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = build_optimizer(model, cfg.optimizer, cfg.lr)
    assert isinstance(opt, dopr.DoPr) and opt.preconditioner.update_every == 10
    assert type(opt.base) is type(build_optimizer(model, ref.optimizer, ref.lr).base)
    x = torch.randn(16, 6)
    for _ in range(3):  # refresh on step 0 only: the statistic is reused on steps 1 and 2
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    assert opt.preconditioner.steps == 3


def test_the_registry_names_and_pairs_a_variant_with_x_and_with_dopr_x():
    assert base_of("dopr_adamw_k10") == "adamw" and reference_of("dopr_adamw_k10") == "dopr_adamw"
    assert reference_of("dopr_adamw") is None and variant_suffix("dopr_muon_k10") == "k10" and variant_suffix("dopr_muon") == ""
    assert display("dopr_adamw_k10") == "DoPr-AdamW@10" and display("dopr_muon") == "DoPr-Muon" and display("adamw") == "AdamW"
    names = ["dopr_muon_k10", "muon", "dopr_adamw_k10", "adamw", "dopr_adamw", "dopr_muon", "signum", "dopr_signum"]
    assert sorted(names, key=pair_rank) == ["adamw", "dopr_adamw", "dopr_adamw_k10", "muon", "dopr_muon", "dopr_muon_k10",
                                            "signum", "dopr_signum"]
    assert pairs(names) == [("dopr_adamw", "adamw"), ("dopr_adamw_k10", "adamw"), ("dopr_adamw_k10", "dopr_adamw"),
                            ("dopr_muon", "muon"), ("dopr_muon_k10", "muon"), ("dopr_muon_k10", "dopr_muon"), ("dopr_signum", "signum")]
    assert [p for p in pairs(names) if is_primary_pair(*p)] == [("dopr_adamw", "adamw"), ("dopr_muon", "muon")]
    assert pairs(["adamw", "dopr_adamw_k10"]) == [("dopr_adamw_k10", "adamw")]  # without its DoPr-X: against X only


def _write(folder: Path, runs: list[dict]):
    folder.mkdir(parents=True)
    with open(folder / "results_runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in runs for k in r)))
        writer.writeheader()
        writer.writerows(runs)
    meta = {"task": folder.parent.name, "scale": "cpu", "metric": "success", "higher_is_better": True, "runs": len(runs),
            "failed": [], "command": "synthetic", "horizon_label": "steps", "lr_sweep": False}
    (folder / "results_meta.json").write_text(json.dumps(meta))


def test_summary_keeps_k10_out_of_the_primary_family_and_pairs_it_with_its_own_equal_time_arm(tmp_path):
    results = tmp_path / "results"
    gains = {"adamw": 0.0, "dopr_adamw": 0.2, "dopr_adamw_k10": 0.1}  # k10 - adamw = +0.1, k10 - dopr_adamw = -0.1
    noise = [0.0, 0.01, -0.01]
    runs = [{"optimizer": o, "lr": 0.001, "seed": s, "final_val_loss": 1.0, "final_success": 0.5 + g + (noise[s] if o != "adamw" else 0)}
            for o, g in gains.items() for s in range(3)]
    _write(results / "robot" / "cpu", runs)
    # equal-time arms: adamw for dopr_adamw's time scores 0.6, for dopr_adamw_k10's time 0.55
    _write(results / "robot" / "cpu_equal_time", [{"optimizer": "adamw", "lr": 0.001, "seed": s, "final_val_loss": 1.0,
                                                   "final_success": 0.6} for s in range(3)])
    _write(results / "robot" / "cpu_equal_time_k10", [{"optimizer": "adamw", "lr": 0.001, "seed": s, "final_val_loss": 1.0,
                                                       "final_success": 0.55} for s in range(3)])
    subprocess.run([sys.executable, "scripts/summary.py", "--results", str(results)], cwd=ROOT, check=True, capture_output=True)
    text = (results / "README.md").read_text()
    assert "1 of the 10 tested" in text and "| robot | DoPr-AdamW vs AdamW | 3 |" in text
    assert "DoPr-AdamW@10" not in text.split("## Verdicts")[1].split("## Did AP help?")[0].split("| task | comparison |")[1]
    verdicts = [[c.strip() for c in line.strip("|").split("|")] for line in text.split("## Verdicts")[1].split("## Headline")[0].splitlines()
                if line.startswith("| [robot]")]
    by_gp = {row[1]: row for row in verdicts}
    assert list(by_gp) == ["adamw", "dopr_adamw_k10 vs adamw", "dopr_adamw_k10 vs dopr_adamw"]
    assert by_gp["adamw"][5] != "secondary" and by_gp["dopr_adamw_k10 vs adamw"][5] == "secondary"
    assert by_gp["dopr_adamw_k10 vs dopr_adamw"][5] == "secondary"
    assert by_gp["adamw"][6].startswith("+0.100")  # dopr_adamw 0.7 against adamw's arm for its time, 0.6
    assert by_gp["dopr_adamw_k10 vs adamw"][6].startswith("+0.050")  # k10 0.6 against adamw's k10 arm, 0.55
    assert by_gp["dopr_adamw_k10 vs dopr_adamw"][6] == "n/a"
    assert by_gp["dopr_adamw_k10 vs dopr_adamw"][4].startswith("-0.100")
    assert "DoPr-X@10 (AP's statistic refreshed every 10 steps, secondary)" in text
    assert "## Other experiments" not in text  # the equal-time arms are read into the verdicts, not listed apart


def rec(opt, seed, seconds, steps=100):
    return {"optimizer": opt, "seed": seed, "status": "done", "provenance": {"cpu": "AMD EPYC", "gpu": None},
            "config": {"trainer": {"steps": steps, "warmup_steps": 10, "eval_every": 20}}, "evals": [{"step": steps, "train_seconds": seconds}]}


def test_the_equal_time_arm_of_k10_is_sized_by_k10_and_apart_from_dopr_xs():
    records = [rec("adamw", s, 10.0) for s in range(3)] + [rec("dopr_adamw", s, 20.0) for s in range(3)] \
        + [rec("dopr_adamw_k10", s, 12.0) for s in range(3)]
    main, k10 = equal_time.plan(records), equal_time.plan(records, "k10")
    assert main["adamw"]["of"] == "dopr_adamw" and main["adamw"]["ratio"] == 2.0 and main["adamw"]["steps"] == 200
    assert k10["adamw"]["of"] == "dopr_adamw_k10" and k10["adamw"]["ratio"] == pytest.approx(1.2) and k10["adamw"]["steps"] == 120


def test_robot_cpu_reports_at_least_100_episodes_with_disjoint_selection_episodes():
    task = composed("task=robot", "scale=cpu").task
    assert task.eval_episodes >= 100 and task.select_episodes >= 1 and task.version >= 5
    reported = set(range(task.eval_seed, task.eval_seed + task.eval_episodes))
    selection = set(range(task.select_seed, task.select_seed + task.select_episodes))
    assert not reported & selection
    assert composed("+experiment=robot/cpu").task.eval_episodes == task.eval_episodes
    # 120 environments at once held 19 GB in one process: version 5 steps them in waves, the pixel task keeps its 10
    assert task.rollout_envs and task.rollout_envs < task.eval_episodes + task.select_episodes
    image = composed("task=robot_image", "scale=cpu").task
    assert (image.eval_episodes, image.rollout_envs) == (50, 10)
