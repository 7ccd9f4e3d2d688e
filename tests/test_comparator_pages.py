"""The comparators' records and pages (docs/comparators.md, "Records and pages"): their evaluation runs join the
headline experiment's records (results/<task>/cpu), so results_runs.csv shows them beside the primary four; the
primary family (Holm), the power tool and the equal-time arm leave them out; results/README.md pairs DoPr-X with
each of them by seed (secondary) and puts them in the performance profiles; the budget targets stay the base GPs';
and their tuning joins the primary tuning's page, tuning.md, with every optimizer's trial count. Synthetic records."""

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import equal_time  # noqa: E402
import report  # noqa: E402
import summary  # noqa: E402

spec = importlib.util.spec_from_file_location("power", ROOT / "scripts" / "power.py")
power = importlib.util.module_from_spec(spec)
spec.loader.exec_module(power)

# final accuracy per optimizer (plus a per-seed jitter that sums to 0 over the 5 seeds) and training seconds per run
FINAL = {"adamw": 0.50, "dopr_adamw": 0.60, "muon": 0.55, "dopr_muon": 0.58, "soap": 0.70, "shampoo_input": 0.45, "psgd_kron": 0.52}
SECONDS = {"adamw": 2.0, "dopr_adamw": 4.0, "muon": 2.0, "dopr_muon": 4.0, "soap": 6.0, "shampoo_input": 5.0, "psgd_kron": 3.0}
JITTER = [0.0, 0.01, -0.01, 0.005, -0.005]
COMPARATORS = ("soap", "shampoo_input", "psgd_kron")


def run_record(task, opt, seed, final, seconds, experiment="cpu", tune=None, select=None):
    """One finished run in the records schema: evaluations at steps 5 (60% of the final accuracy) and 10."""
    evals = [{"step": step, "train_seconds": seconds * step / 10, "val_loss": 1.0 - acc / 2, "rollout_seconds": 0.1,
              "metrics": {"accuracy": acc}, "select": {"accuracy": select if select is not None else acc}, "intervals": {}, "horizons": {}}
             for step, acc in ((5, 0.6 * final), (10, final))]
    config = {"task": {"name": task, "version": 3}, "optimizer": {"name": opt, "weight_decay": 0.1},
              "trainer": {"steps": 10, "warmup_steps": 1, "eval_every": 5}, **({"tune": tune[0], "tune_spec": tune[1]} if tune else {})}
    run_id = f"{opt}-{tune[0]['label']}-s{seed}" if tune else f"{opt}-s{seed}"
    return {"schema": 1, "run_id": run_id, "task": task, "experiment": experiment, "optimizer": opt, "seed": seed, "lr": 1e-3,
            "status": "done", "command": f"python -m experiments.train -m +experiment={task}/{experiment}",
            "provenance": {"git_commit": "abc1234", "dirty": False, "cpu": "test cpu", "gpu": None}, "config": config,
            "evals": evals, "outcomes": {}, "train": [],
            "summary": {"task": task, "scale": "cpu", "optimizer": opt, "seed": seed, "lr": 1e-3, "steps": 10, "metric_name": "accuracy",
                        "higher_is_better": True, "metric_range": None, "final": {"step": 10}, "damping": 1.0 if opt.startswith("dopr_") else None,
                        "best": {"step": 10, "metric": final, "min_val_loss": 1.0 - final / 2, "chosen_on": "selection set"}}}


def write(folder: Path, records: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "records.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in sorted(records, key=lambda r: r["run_id"])))
    return folder


def headline_records(task="lm", optimizers=tuple(FINAL), seeds=range(5)):
    return [run_record(task, opt, s, FINAL[opt] + JITTER[s] * (1 + i), SECONDS[opt]) for i, opt in enumerate(optimizers) for s in seeds]


def test_comparator_rows_join_the_headline_stay_out_of_the_family_and_get_a_secondary_row_and_a_profile(tmp_path):
    results = tmp_path / "results"
    records = headline_records()
    cpu = write(results / "lm" / "cpu", records)
    write(results / "lm_lora" / "cpu", headline_records("lm_lora", ("adamw", "dopr_adamw"), range(3)))  # no comparator runs yet
    for folder in (cpu, results / "lm_lora" / "cpu"):
        assert report.main([str(folder)]) == 0
    with open(cpu / "results_runs.csv", newline="") as f:
        runs = list(csv.DictReader(f))
    assert {o: sum(r["optimizer"] == o for r in runs) for o in COMPARATORS} == {o: 5 for o in COMPARATORS}
    assert all(f"| {o} |" in (cpu / "results.md").read_text() for o in COMPARATORS)
    # the targets stay the base GPs' (SOAP has the best median but sets nothing): muon's median 0.55, target 90% of it
    targets = json.loads((cpu / "results_meta.json").read_text())["targets"]
    assert targets["baseline"] == "muon" and targets["target"] == pytest.approx(0.9 * 0.55)

    # the power tool and the equal-time arm see DoPr-X vs X only
    assert [c["comparison"] for c in power.analyse(cpu)["comparisons"]] == ["dopr_adamw vs adamw", "dopr_muon vs muon"]
    assert {x: arm["of"] for x, arm in equal_time.plan(records).items()} == {"adamw": "dopr_adamw", "muon": "dopr_muon"}

    assert summary.main(["--results", str(results)]) == 0
    text = (results / "README.md").read_text()
    family = text.split("## Headline")[1].split("## Did AP help?")[0]
    assert "3 of the 10 tested" in family  # lm's two and lm_lora's one: no comparator among them
    assert not any(o in family for o in COMPARATORS)
    assert not any(f"| {o} " in text.split("## Did AP help?")[1].split("## Secondary")[0] for o in COMPARATORS)
    secondary = text.split("## Secondary: DoPr-X against the comparators")[1].split("## Time to target")[0]
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:3]): [c.strip() for c in line.strip("|").split("|")]
            for line in secondary.splitlines() if line.startswith("| lm ")}
    assert set(rows) == {("lm", d, c) for d in ("DoPr-AdamW", "DoPr-Muon") for c in COMPARATORS}
    soap = rows[("lm", "DoPr-AdamW", "soap")]
    # DoPr-AdamW 0.60 against SOAP 0.70, paired over 5 seeds; the jitters sum to 0, so the mean difference is -0.1
    assert soap[3] == "5" and soap[5] == "0.6" and soap[6] == "0.7" and soap[7].startswith("-0.100 [")
    assert soap[10] == "**worse**" and soap[11] == "4 / 6"  # median seconds to the target: 4 for DoPr-AdamW, 6 for SOAP
    assert rows[("lm", "DoPr-AdamW", "shampoo_input")][11] == "4 / never"  # 0.45 never reaches 0.495
    assert "- lm_lora: not run yet (no comparator runs in `lm_lora/cpu`)." in secondary
    profiles = text.split("## Performance profiles")[1].split("## Loss versus performance")[0]
    # in steps: SOAP reaches lm's target at step 10 with the fastest, and has no run on lm_lora (never there)
    assert "| soap | 0.500 | 1.00, inf |" in profiles and "| shampoo_input | 0.000 | inf, inf |" in profiles
    assert "| soap | 0.167 | 3.00, inf |" in profiles  # in seconds: 6 against AdamW's 2
    assert "## Other experiments" not in text  # no cpu_comparators folder to list


SPEC = {"metric": "accuracy", "higher_is_better": True, "trials": 4, "seeds": [100], "max_rounds": 1,
        "space": {}, "bounds": {}}


def tuning_records(optimizers, own, task="lm", experiment="cpu_tune", trials=4):
    from experiments import tuning

    spec = {**SPEC, "optimizers": list(optimizers),
            "space": {o: {"lr": {"low": 1e-4, "high": 1e-2}, "optimizer.weight_decay": {"low": 1e-3, "high": 1.0},
                          f"optimizer.kwargs.{own}": {"low": 0.01, "high": 1.0}} for o in optimizers}}
    plan = tuning.plan(spec, [], "accuracy", True)
    return [run_record(task, opt, 100, 0.3 + 0.1 * i, 1.0, experiment, ({"label": p["label"]}, spec), select=0.3 + 0.1 * i)
            for opt, pts in plan["points"].items() for i, p in enumerate(pts[:trials])]


def at_selection(headline: list[dict], *tunings: list[dict]) -> list[dict]:
    """The headline runs as a real evaluation runs them: each optimizer at its tuning's selected settings (the tuning
    page counts only evaluation runs at those settings); an optimizer that no tuning selected keeps its config."""
    from experiments import tuning

    chosen = {}
    for records in tunings:
        spec = records[0]["config"]["tune_spec"]
        chosen.update({o: s["values"] for o, s in tuning.plan(spec, records, "accuracy", True)["selection"].items()})
    for r in headline:
        for key, value in tuning.overrides(chosen.get(r["optimizer"], {})).items():
            node, *path = key.split(".")
            target = r["config"].setdefault(node, {}) if path else r["config"]
            for part in path[:-1]:
                target = target.setdefault(part, {})
            target[path[-1] if path else node] = value
    return headline


def test_the_comparators_tuning_shares_tuning_md_with_the_primary_tuning_and_both_trial_counts(tmp_path):
    results = tmp_path / "results"
    primary = tuning_records(("adamw", "dopr_adamw"), "damping")
    comparators = tuning_records(COMPARATORS, "precondition_frequency", experiment="cpu_tune_comparators")
    write(results / "lm" / "cpu", at_selection(headline_records(), primary, comparators))
    write(results / "lm" / "cpu_tune", primary)
    write(results / "lm" / "cpu_tune_comparators", comparators)
    assert report.main([str(results / "lm" / "cpu_tune_comparators")]) == 0
    page = results / "lm" / "cpu" / "tuning.md"
    text = page.read_text()
    for opt in ("adamw", "dopr_adamw"):
        assert f"| {opt} | cpu_tune | 3 | 4 | 4 | 1 | 4 |" in text
    for opt in COMPARATORS:
        assert f"| {opt} | cpu_tune_comparators | 3 | 4 | 4 | 1 | 4 |" in text
    assert "Equal trial counts: every optimizer searched 4 trials." in text
    assert "## cpu_tune\n" in text and "## cpu_tune_comparators\n" in text and "### Selection (protocol version 3)" in text
    soap = next(line for line in text.splitlines() if line.startswith("| soap | 1 |"))
    assert "| 0.7 (5) |" in soap  # its evaluation mean from the headline's records, where its runs now are
    assert not (results / "lm" / "cpu_comparators").exists()
    with open(results / "lm" / "cpu" / "tuning_runs.csv", newline="") as f:
        assert {r["optimizer"] for r in csv.DictReader(f)} == {"adamw", "dopr_adamw", *COMPARATORS}
    # the same page whichever tuning renders it, and from --all (the primary tuning's page is not overwritten)
    assert report.main([str(results / "lm" / "cpu_tune")]) == 0 and page.read_text() == text
    assert report.main(["--all", str(results)]) == 0 and page.read_text() == text
    # a comparator short of a trial: the page says so
    write(results / "lm" / "cpu_tune_comparators", tuning_records(COMPARATORS, "precondition_frequency", experiment="cpu_tune_comparators")[:-1])
    assert report.main([str(results / "lm" / "cpu_tune")]) == 0
    assert "**Unequal trial counts**: adamw 4, dopr_adamw 4, soap 4, shampoo_input 4, psgd_kron 3" in page.read_text()
