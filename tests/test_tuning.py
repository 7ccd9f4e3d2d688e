"""The tuning protocol, version 3 (experiments/tuning.py, scripts/tune.py; docs/protocol.md)."""

import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import record, tuning

ROOT = Path(__file__).resolve().parents[1]

SPEC = {"metric": "accuracy", "higher_is_better": True, "optimizers": ["adamw", "dopr_adamw"], "trials": 8, "seeds": [100, 101, 102],
        "max_rounds": 2,
        "space": {"adamw": {"lr": {"low": 1e-4, "high": 1e-2}, "optimizer.weight_decay": {"low": 1e-3, "high": 1.0},
                            "optimizer.kwargs.beta2": {"low": 1e-3, "high": 1e-1, "scale": "log1m"}},
                  "dopr_adamw": {"lr": {"low": 1e-4, "high": 1e-2}, "optimizer.weight_decay": {"low": 1e-3, "high": 1.0},
                                 "optimizer.kwargs.damping": {"low": 1e-2, "high": 10.0}}},
        "bounds": {"optimizer.kwargs.damping": [1e-4, 10.0]}}


def fake_record(opt, label, values, seed, select, reported):
    return {"schema": record.SCHEMA, "run_id": f"{opt}-{label}-s{seed}", "optimizer": opt, "seed": seed, "status": "done",
            "config": {"tune": {"label": label}, "lr": values["lr"]},
            "evals": [{"step": 10, "select": {"accuracy": select}, "metrics": {"accuracy": reported}}]}


def run_phase(plan, score, records):
    """Fake runs of one phase: select_accuracy from ``score(values)``, a reported accuracy that ranks the other way."""
    for opt, pts in plan["points"].items():
        for p in pts:
            for seed in plan["seeds"]:
                s = score(opt, p["values"]) + 0.001 * (seed - 100)
                records.append(fake_record(opt, p["label"], p["values"], seed, s, reported=1 - s))


def test_points_are_quasirandom_inside_their_log_ranges():
    pts = tuning.sobol_points(SPEC["space"]["adamw"], 8, seed=1)
    assert len(pts) == 8 and len({p["lr"] for p in pts}) == 8
    assert all(1e-4 <= p["lr"] <= 1e-2 and 1e-3 <= p["optimizer.weight_decay"] <= 1 for p in pts)
    assert all(0.9 <= p["optimizer.kwargs.beta2"] <= 0.999 for p in pts)  # log1m: 1 - beta2 in [1e-3, 1e-1]
    assert tuning.sobol_points(SPEC["space"]["adamw"], 8, seed=1) == pts  # a function of the spec: resumable
    assert tuning.overrides({"lr": 1e-3, "optimizer.kwargs.beta2": 0.99}) == {"lr": 1e-3, "optimizer.kwargs.betas": [0.9, 0.99]}


def test_the_protocol_replayed_equal_trials_successive_seeds_selection_set_and_an_edge_extension():
    records = []
    # the selection score rises with the LR (best at the top of the range: an edge), with damping near 1
    score = lambda opt, v: math.log10(v["lr"]) - 0.1 * abs(math.log10(v.get("optimizer.kwargs.damping", 1.0)))  # noqa: E731
    p = tuning.plan(SPEC, records, "accuracy", True)
    assert (p["round"], p["phase"], p["seeds"]) == (1, "explore", [100])
    assert {o: len(v) for o, v in p["points"].items()} == {"adamw": 8, "dopr_adamw": 8}  # equal trials
    run_phase(p, score, records)
    p = tuning.plan(SPEC, records, "accuracy", True)
    assert (p["phase"], p["seeds"]) == ("confirm", [101, 102])
    assert {o: len(v) for o, v in p["points"].items()} == {"adamw": 3, "dopr_adamw": 3}  # the best third goes on
    best_first = {o: max(v, key=lambda q: score(o, q["values"]))["label"] for o, v in tuning.plan(SPEC, [], "accuracy", True)["points"].items()}
    assert all(best_first[o] in [q["label"] for q in p["points"][o]] for o in best_first)  # chosen by select, not by the reported value
    run_phase(p, score, records)
    p = tuning.plan(SPEC, records, "accuracy", True)
    assert (p["round"], p["phase"]) == (2, "explore")  # the LR selection sits at the top edge: a second round, for both
    first = p["history"][0]
    assert all(first["edges"][o].get("lr") == 1 for o in ("adamw", "dopr_adamw"))
    assert all(p["history"][1]["spaces"][o]["lr"]["high"] > 1e-2 for o in ("adamw", "dopr_adamw"))  # moved outward
    run_phase(p, score, records)
    run_phase(tuning.plan(SPEC, records, "accuracy", True), score, records)
    done = tuning.plan(SPEC, records, "accuracy", True)
    assert done["phase"] == "done" and set(done["selection"]) == {"adamw", "dopr_adamw"}
    sel = done["selection"]["dopr_adamw"]
    assert sel["round"] == 2 and sel["seeds"] == [100, 101, 102] and sel["values"]["lr"] > 1e-2
    # a failed run scores last and is not asked for again
    records[0] = {**records[0], "status": "failed"}
    assert tuning.plan(SPEC, records, "accuracy", True)["phase"] == "done"


def test_selection_never_reads_the_reported_instances():
    """The tuning reads select_<metric> only: the reported metric can rank the trials in the opposite order, or be
    missing from every record, and the plan and the selection do not change."""
    records = []
    score = lambda opt, v: -abs(math.log10(v["lr"]) + 3)  # noqa: E731  best at lr 1e-3, inside the range
    for _ in range(4):
        p = tuning.plan(SPEC, records, "accuracy", True)
        if p["phase"] == "done":
            break
        run_phase(p, score, records)
    done = tuning.plan(SPEC, records, "accuracy", True)
    blind = copy.deepcopy(records)
    for r in blind:
        del r["evals"][-1]["metrics"]  # no reported instance at all
    assert tuning.plan(SPEC, blind, "accuracy", True)["selection"] == done["selection"]
    swapped = copy.deepcopy(records)
    for r in swapped:  # reported ranks reversed and magnified: nothing moves
        r["evals"][-1]["metrics"]["accuracy"] = -1e6 * r["evals"][-1]["select"]["accuracy"]
    assert tuning.plan(SPEC, swapped, "accuracy", True)["selection"] == done["selection"]


def test_the_tool_writes_the_selection_into_the_task_config(tmp_path):
    from omegaconf import OmegaConf

    task_yaml = tmp_path / "lm.yaml"
    shutil.copy(ROOT / "configs" / "task" / "lm.yaml", task_yaml)
    before = OmegaConf.load(task_yaml)
    selection = {"adamw": {"values": {"lr": 0.0021, "optimizer.weight_decay": 0.031, "optimizer.kwargs.beta2": 0.985}},
                 "dopr_adamw": {"values": {"lr": 0.0045, "optimizer.weight_decay": 0.12, "optimizer.kwargs.damping": 0.7}}}
    tuning.write_selection(task_yaml, selection, source=" (test)")
    after = OmegaConf.load(task_yaml)
    assert after.lr.adamw == 0.0021 and after.lr.dopr_adamw == 0.0045 and after.lr.muon == before.lr.muon  # others kept
    assert OmegaConf.to_container(after.tuned.adamw) == {"weight_decay": 0.031, "kwargs": {"betas": [0.9, 0.985]}}
    assert OmegaConf.to_container(after.tuned.dopr_adamw) == {"weight_decay": 0.12, "kwargs": {"damping": 0.7}}
    assert after.tuned.muon == before.tuned.muon and after.model == before.model and after.version == before.version
    assert "# Autoregressive LM" in task_yaml.read_text()  # comments kept


@pytest.mark.slow  # about 20 entry-point runs at scale=smoke: .ci/run runs the slow suite
def test_a_tuning_sweep_at_smoke_scale_through_the_entry_point(tmp_path):
    """scripts/tune.py on the LM task at scale=smoke, in a copy of the configs: equal trials, successive seeds,
    selection on the selection problems, one edge extension (every score ties at smoke scale, so the smallest LR
    wins and sits at the bottom edge), and the selected settings written into the copy's task config."""
    configs = tmp_path / "configs"
    shutil.copytree(ROOT / "configs", configs)
    # 4 trials: a scrambled Sobol sequence puts one point in each quarter of every range, so with every score tied
    # (smoke scale) the selection is the smallest LR, inside the bottom quarter: with edge 0.25, an edge
    spec = {**SPEC, "trials": 4, "edge": 0.25}
    (configs / "experiment" / "lm" / "smoke_tune.yaml").write_text("# @package _global_\n" + json.dumps({
        "defaults": [{"override /task": "lm"}, {"override /scale": "smoke"}], "results_dir": str(tmp_path / "results" / "lm" / "smoke_tune"),
        "hydra": {"sweep": {"dir": str(tmp_path / "runs")}}, "tune_spec": spec}))
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "scripts/tune.py", "lm/smoke_tune", "--configs", str(configs), "logger=none",
                          f"task.data_dir={tmp_path / 'data'}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    records = record.read(tmp_path / "results" / "lm" / "smoke_tune")
    labels = {}
    for r in records:
        labels.setdefault((r["optimizer"], r["config"]["tune"]["label"]), []).append(r["seed"])
    for opt in ("adamw", "dopr_adamw"):
        for rnd in (1, 2):  # equal trials per round; the best third (2 of 4) on all three seeds
            trials = {k: v for k, v in labels.items() if k[0] == opt and k[1].startswith(f"r{rnd}")}
            assert len(trials) == 4 and sorted(len(v) for v in trials.values()) == [1, 1, 3, 3], (opt, rnd, trials)
    assert "round 2, explore phase" in out.stdout  # the edge extension ran
    from omegaconf import OmegaConf

    before = (configs / "task" / "lm.yaml").read_text()
    (configs / "task" / "lm.yaml").write_text(before.replace("written by scripts/tune.py", "(look)"))
    look = subprocess.run([sys.executable, "scripts/tune.py", "lm/smoke_tune", "--configs", str(configs), "--plan"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert look.returncode == 0 and "done (round 2)" in look.stdout, look.stdout[-2000:] + look.stderr[-2000:]
    assert "written by scripts/tune.py" not in (configs / "task" / "lm.yaml").read_text()  # --plan writes nothing
    (configs / "task" / "lm.yaml").write_text(before)
    written = OmegaConf.load(configs / "task" / "lm.yaml")
    assert "written by scripts/tune.py" in (configs / "task" / "lm.yaml").read_text()
    for opt in ("adamw", "dopr_adamw"):
        chosen = [r for r in records if r["optimizer"] == opt and len(labels[(opt, r["config"]["tune"]["label"])]) == 3
                  and r["config"]["tune"]["label"].startswith("r2")]
        assert any(math.isclose(float(written.lr[opt]), r["config"]["lr"]) for r in chosen)
    assert (configs / "task" / "lm.yaml").read_text() != (ROOT / "configs" / "task" / "lm.yaml").read_text()
    assert subprocess.run(["git", "status", "--porcelain", "configs"], cwd=ROOT, capture_output=True, text=True).stdout == ""


def test_lr_given_on_the_command_line_says_which_tuned_settings_it_drops(capsys):
    from omegaconf import OmegaConf

    from experiments.protocol import resolve

    cfg = OmegaConf.create({"lr": 0.003, "task": {"name": "lm", "lr": {"adamw": 0.001}, "tuned": {"adamw": {"weight_decay": 0.03}}},
                            "trainer": {"steps": 10}, "scale": {"name": "cpu"}, "optimizer": {"name": "adamw", "weight_decay": 0.1, "kwargs": {}}})
    got = resolve(cfg, given={"lr"})
    assert got.optimizer.weight_decay == 0.1 and "optimizer.weight_decay=0.03" in capsys.readouterr().out
    resolve(cfg, given={"lr", "optimizer.weight_decay"})  # given too: nothing dropped, nothing said
    assert capsys.readouterr().out == ""
    cfg.lr = None  # not given: the tuned LR and weight decay
    got = resolve(cfg, given=set())
    assert (got.lr, got.optimizer.weight_decay) == (0.001, 0.03)
    cfg.task.lr = {}  # no task LR for it: the optimizer config's own, else a message naming the fix
    with pytest.raises(ValueError, match="set lr in the optimizer's config"):
        resolve(cfg, given=set())
    cfg.optimizer.lr = 0.02
    assert resolve(cfg, given=set()).lr == 0.02


def test_an_integer_dimension_is_searched_in_whole_numbers_inside_its_range():
    """SOAP's precondition frequency (the comparators' tuning, docs/comparators.md): ``type: int`` rounds each point to
    a whole number in [low, high], in every round; the edge rule and the extension work in the same log units."""
    space = {"lr": {"low": 1e-4, "high": 1e-2}, "optimizer.kwargs.precondition_frequency": {"low": 1, "high": 100, "type": "int"}}
    pts = tuning.sobol_points(space, 16, seed=1)
    freqs = [p["optimizer.kwargs.precondition_frequency"] for p in pts]
    assert all(isinstance(f, int) and 1 <= f <= 100 for f in freqs) and len(set(freqs)) >= 10
    spec = {**SPEC, "optimizers": ["soap"], "space": {"soap": space}, "bounds": {"optimizer.kwargs.precondition_frequency": [1, 1000]}}
    records = []
    score = lambda opt, v: math.log10(v["optimizer.kwargs.precondition_frequency"])  # noqa: E731  best at the top: an edge
    for _ in range(2):
        run_phase(tuning.plan(spec, records, "accuracy", True), score, records)
    p = tuning.plan(spec, records, "accuracy", True)
    assert (p["round"], p["phase"]) == (2, "explore") and p["history"][0]["edges"]["soap"] == {"optimizer.kwargs.precondition_frequency": 1}
    assert p["history"][1]["spaces"]["soap"]["optimizer.kwargs.precondition_frequency"] == {"low": 10.0, "high": 1000.0, "type": "int"}
    assert all(isinstance(q["values"]["optimizer.kwargs.precondition_frequency"], int) for q in p["points"]["soap"])
    with pytest.raises(ValueError, match="type 'integer'"):
        tuning.sobol_points({"x": {"low": 1, "high": 10, "type": "integer"}}, 2, seed=1)


@pytest.mark.parametrize("task", ["lm", "lm_lora", "flow", "control", "robot"])
def test_the_comparators_tuning_has_the_primary_tunings_budget_and_dimension(task):
    """configs/experiment/<task>/cpu_tune_comparators.yaml: the same trials, seeds, rounds and selection metric as the
    task's primary tuning (cpu_tune.yaml, which it leaves alone), a 3-D space per comparator (LR over AdamW's range,
    weight decay, one of its own), the same run settings, and a documented bound for every searched key."""
    from omegaconf import OmegaConf

    primary = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "experiment" / task / "cpu_tune.yaml").tune_spec)
    spec = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "experiment" / task / "cpu_tune_comparators.yaml").tune_spec)
    assert spec["optimizers"] == ["soap", "shampoo_input", "psgd_kron"]
    assert {k: spec[k] for k in ("metric", "higher_is_better", "trials", "seeds", "max_rounds")} == \
        {k: primary[k] for k in ("metric", "higher_is_better", "trials", "seeds", "max_rounds")}
    runs = {name: {k: OmegaConf.load(ROOT / "configs" / "experiment" / task / f"{name}.yaml").get(k) for k in ("trainer", "task")}
            for name in ("cpu_tune", "cpu_tune_comparators")}
    assert runs["cpu_tune"] == runs["cpu_tune_comparators"]  # the same run settings (rollouts at the end only; robot's episodes)
    steps = OmegaConf.load(ROOT / "configs" / "task_scale" / f"{task}_cpu.yaml").trainer.steps
    assert runs["cpu_tune"]["trainer"]["rollout_every"] == steps  # selection reads the final weights: one rollout a run
    own = {"soap": "optimizer.kwargs.precondition_frequency", "shampoo_input": "optimizer.kwargs.matrix_eps",
           "psgd_kron": "optimizer.kwargs.preconditioner_update_probability"}
    for opt, space in spec["space"].items():
        assert list(space) == ["lr", "optimizer.weight_decay", own[opt]] and space["lr"] == primary["space"]["adamw"]["lr"]
        assert all(key in spec["bounds"] for key in space)
    plan = tuning.plan(spec, [], spec["metric"], spec["higher_is_better"])
    assert {o: len(p) for o, p in plan["points"].items()} == {o: 16 for o in spec["optimizers"]}
    assert all(isinstance(p["values"][own["soap"]], int) for p in plan["points"]["soap"])


def test_the_tool_writes_the_comparators_selection_and_the_runs_apply_it(tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import torch

    from experiments.engine import build_optimizer
    from experiments.protocol import resolve

    task_yaml = tmp_path / "lm.yaml"
    shutil.copy(ROOT / "configs" / "task" / "lm.yaml", task_yaml)
    selection = {"soap": {"values": {"lr": 0.002, "optimizer.weight_decay": 0.05, "optimizer.kwargs.precondition_frequency": 16}},
                 "shampoo_input": {"values": {"lr": 0.004, "optimizer.weight_decay": 0.2, "optimizer.kwargs.matrix_eps": 0.0011}},
                 "psgd_kron": {"values": {"lr": 0.0007, "optimizer.weight_decay": 0.01, "optimizer.kwargs.preconditioner_update_probability": 1.0}}}
    before = OmegaConf.load(task_yaml)
    tuning.write_selection(task_yaml, selection, source=" (test)")
    written = OmegaConf.load(task_yaml)
    assert written.tuned.soap.kwargs.precondition_frequency == 16
    assert written.lr.adamw == before.lr.adamw and written.tuned.adamw == before.tuned.adamw  # the primary's entries kept
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    for opt, sel in selection.items():
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = compose("train", overrides=["task=lm", "scale=smoke", f"optimizer={opt}"])
        cfg.task.lr, cfg.task.tuned = written.lr, written.tuned
        cfg = resolve(cfg, given=set())
        built = build_optimizer(model, cfg.optimizer, cfg.lr)
        key = next(k for k in sel["values"] if k.startswith("optimizer.kwargs."))
        assert cfg.lr == sel["values"]["lr"] and cfg.optimizer.weight_decay == sel["values"]["optimizer.weight_decay"]
        group = built.param_groups[0]
        assert group["lr"] == sel["values"]["lr"] and group["weight_decay"] == sel["values"]["optimizer.weight_decay"]
        setting = {"soap": lambda: group["precondition_frequency"], "shampoo_input": lambda: built.matrix_eps,
                   "psgd_kron": lambda: built.precond_schedule}[opt]()
        assert setting == sel["values"][key] and type(setting) is type(sel["values"][key]), (opt, setting)


def test_every_named_experiment_composes_and_keeps_its_records_in_its_own_folder():
    """configs/experiment/<task>/<name>.yaml (a named experiment is one file): it composes with its task, its records go
    to results/<task>/<name> (the comparators' evaluation into its headline's, results/<task>/cpu: docs/protocol.md)
    and its run folders under runs/<task>/, apart from every other experiment's."""
    from hydra import compose, initialize_config_dir

    import experiments.protocol  # noqa: F401  (the resolvers the configs use)

    sweep_dirs = {}
    for path in sorted((ROOT / "configs" / "experiment").glob("*/*.yaml")):
        task, name = path.parent.name, path.stem
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = compose("train", overrides=[f"+experiment={task}/{name}", "optimizer=adamw"], return_hydra_config=True)
        home = f"results/{task}/cpu" if name == "cpu_comparators" else f"results/{task}/{name}"
        assert cfg.task.name == task and cfg.results_dir == home, (path, cfg.task.name, cfg.results_dir)
        sweep = cfg.hydra.sweep.dir
        assert Path(sweep).parts[:2] == ("runs", task) and sweep not in sweep_dirs, (path, sweep, sweep_dirs.get(sweep))
        sweep_dirs[sweep] = path
    assert len(sweep_dirs) >= 29


def test_the_tool_prints_an_estimate_of_each_phase_from_the_finished_runs():
    sys.path.insert(0, str(ROOT / "scripts"))
    import tune

    records = [{"status": "done", "summary": {"wall_seconds": s}} for s in (120, 240)] + [{"status": "failed", "summary": {}}]
    assert tune.eta_text(records, 48, 2) == "; ~72 min at 2 at a time (3.0 min a run so far)"
    assert tune.eta_text([], 48, 2) == "" and tune.eta_text(records, 0, 2) == ""


def test_points_do_not_depend_on_the_order_of_a_spaces_keys_and_match_the_runs_that_used_them():
    """A record stores its config with sorted keys; the page replays the plan from it, the tool from the YAML. Both
    must draw the same points, and the committed lm_lora trials must carry the values their label's point holds
    (a page once showed round 1's selections with two dimensions swapped)."""
    from omegaconf import OmegaConf

    spec = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "experiment" / "lm_lora" / "cpu_tune.yaml").tune_spec)
    space = spec["space"]["adamw"]
    reordered = {k: space[k] for k in sorted(space)}
    assert list(reordered) != list(space) and tuning.sobol_points(reordered, 16, 1) == tuning.sobol_points(space, 16, 1)
    records = [r for r in record.read(ROOT / "results" / "lm_lora" / "cpu_tune") if r["status"] == "done"
               and r["config"]["tune"]["label"].startswith("r1t")]
    assert len(records) >= 64
    for r in records:
        point = tuning.sobol_points(spec["space"][r["optimizer"]], spec["trials"], 1)[int(r["config"]["tune"]["label"][3:])]
        opt = r["config"]["optimizer"]
        applied = {"lr": r["lr"], "optimizer.weight_decay": opt["weight_decay"]}
        kwargs = opt.get("kwargs") or {}
        for key in point:
            if key.startswith("optimizer.kwargs."):
                name = key.split(".")[-1]
                applied[key] = kwargs["betas"][1] if name == "beta2" else kwargs[name]
        assert applied == pytest.approx(point, rel=1e-9), r["run_id"]


def test_the_page_reads_edges_from_the_selections_round_and_evaluations_at_the_selected_settings(tmp_path, monkeypatch):
    """While round 2 runs, the page still says which range round 1's selection sat at the edge of (the reason round 2
    exists); an evaluation folder's runs at other settings (an earlier task version) are not the selection's mean."""
    from experiments.reports import tuning as page

    records = []
    score = lambda opt, v: math.log10(v["lr"])  # noqa: E731  best at the top of the LR range: an edge
    for _ in range(2):
        run_phase(tuning.plan(SPEC, records, "accuracy", True), score, records)
    p = tuning.plan(SPEC, records, "accuracy", True)
    assert (p["round"], p["phase"]) == (2, "explore")
    for r in records:
        r["config"]["tune_spec"] = SPEC
    sel = p["selection"]["adamw"]["values"]
    at_sel = {"lr": sel["lr"], "optimizer": {"weight_decay": sel["optimizer.weight_decay"],
                                             "kwargs": {"betas": [0.9, sel["optimizer.kwargs.beta2"]]}}}
    other = {"lr": 1e-3, "optimizer": {"weight_decay": 0.0, "kwargs": {}}}
    evaluation = [{"optimizer": "adamw", "status": "done", "config": cfg, "evals": [{"metrics": {"accuracy": acc}}]}
                  for cfg, acc in ((at_sel, 0.8), (at_sel, 0.6), (other, 0.1))]
    assert page.runs_at(evaluation[0], sel) and not page.runs_at(evaluation[2], sel)
    wrong_beta2 = copy.deepcopy(evaluation[0])
    wrong_beta2["config"]["optimizer"]["kwargs"]["betas"][1] = 0.5
    assert not page.runs_at(wrong_beta2, sel)
    monkeypatch.setattr(page, "evaluated_by", lambda d: tmp_path)
    (tmp_path / record.RECORDS).write_text("")
    monkeypatch.setattr(page.record, "read", lambda d, missing_ok=False: evaluation)
    lines = "\n".join(page.protocol3_section(records, tmp_path, "accuracy"))
    row = next(line for line in lines.splitlines() if line.startswith("| adamw |"))
    assert "lr (+)" in row  # round 1's edge, though round 2 has no edges yet
    assert "| 0.7 (2) |" in row  # the two runs at the selected settings; the run at lr 1e-3 left out
    dopr = next(line for line in lines.splitlines() if line.startswith("| dopr_adamw |"))
    assert "not run at these settings" not in dopr and "| not run |" in dopr


def centred(spec):
    """A selection score peaked at the middle of every round-1 range: each selection is interior (no edge)."""
    return lambda opt, v: -sum((tuning._to_unit(spec["space"][opt][k], x) - 0.5) ** 2 for k, x in v.items())


def test_min_rounds_runs_further_rounds_without_an_edge_and_narrows_them():
    """``min_rounds`` (set by scripts/tune.py from ``rounds_of``): a tuning whose selections are all interior after
    round 1 still runs round 2 for every optimizer, over ranges narrowed around the selection; without it, it stops."""
    records, score = [], centred(SPEC)
    for _ in range(2):
        run_phase(tuning.plan(SPEC, records, "accuracy", True), score, records)
    assert tuning.plan(SPEC, records, "accuracy", True)["phase"] == "done"  # interior after round 1
    assert tuning.matched_rounds(tuning.plan(SPEC, records, "accuracy", True)) == 1
    with pytest.raises(ValueError, match="round 1, explore phase"):
        tuning.matched_rounds(tuning.plan(SPEC, [], "accuracy", True))
    two = {**SPEC, "min_rounds": 2, "max_rounds": 2}
    p = tuning.plan(two, records, "accuracy", True)
    assert (p["round"], p["phase"]) == (2, "explore") and not any(p["history"][0]["edges"].values())
    first, second = p["history"][0]["spaces"]["adamw"]["lr"], p["history"][1]["spaces"]["adamw"]["lr"]
    assert first["low"] < second["low"] < second["high"] < first["high"]  # narrowed, not moved out
    for _ in range(2):
        run_phase(tuning.plan(two, records, "accuracy", True), score, records)
    done = tuning.plan(two, records, "accuracy", True)
    assert done["phase"] == "done" and done["round"] == 2


def test_the_comparators_tuning_runs_as_many_rounds_as_the_primary_ran(monkeypatch, capsys):
    """scripts/tune.py with ``rounds_of: cpu_tune`` (every cpu_tune_comparators.yaml): it refuses to start while the
    primary tuning is unfinished, naming the command; once the primary finished after N rounds, it runs exactly N
    (also when a comparator still sits at an edge) and passes N to every run, so the page replays the same plan; runs
    that matched another count are refused as stale."""
    from omegaconf import OmegaConf

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import tune

    load = lambda name: OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "experiment" / "lm" / f"{name}.yaml").tune_spec)  # noqa: E731
    primary, secondary = load("cpu_tune"), load("cpu_tune_comparators")
    assert secondary["rounds_of"] == "cpu_tune"
    held = {"cpu_tune": [], "cpu_tune_comparators": []}
    monkeypatch.setattr(tune, "records_of", lambda results: held[Path(results).name])
    launched = []
    monkeypatch.setattr(tune.subprocess, "run", lambda cmd, **kw: launched.append(cmd))
    with pytest.raises(SystemExit):
        tune.main(["lm/cpu_tune_comparators", "--plan"])
    assert "run python scripts/tune.py lm/cpu_tune first" in capsys.readouterr().err
    for _ in range(2):  # the primary: interior selections, done after one round
        run_phase(tuning.plan(primary, held["cpu_tune"], "accuracy", True), centred(primary), held["cpu_tune"])
    assert tuning.plan(primary, held["cpu_tune"], "accuracy", True)["phase"] == "done"
    # the comparators' selections rise with the LR (an edge): one round all the same, as the primary ran
    edge = lambda opt, v: math.log10(v["lr"])  # noqa: E731
    matched = {**secondary, "min_rounds": 1, "max_rounds": 1}
    for _ in range(2):
        run_phase(tuning.plan(matched, held["cpu_tune_comparators"], "accuracy", True), edge, held["cpu_tune_comparators"])
    for r in held["cpu_tune_comparators"]:
        r["config"]["tune_spec"] = matched
    assert tune.main(["lm/cpu_tune_comparators", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "1 round(s), as lm/cpu_tune ran" in out and "done (round 1)" in out and not launched
    assert any(tuning.plan(matched, held["cpu_tune_comparators"], "accuracy", True)["history"][0]["edges"].values())
    held["cpu_tune_comparators"] = held["cpu_tune_comparators"][:5]  # a phase left to run: the runs get the count
    monkeypatch.setattr(tune, "records_of", lambda results: held[Path(results).name])
    with pytest.raises(SystemExit):  # the fake launch adds no record: the tool stops on the second pass
        tune.main(["lm/cpu_tune_comparators", "--launcher", ""])
    assert launched and "++tune_spec.min_rounds=1" in launched[0] and "++tune_spec.max_rounds=1" in launched[0]
    for r in held["cpu_tune_comparators"]:
        r["config"]["tune_spec"] = {**secondary, "max_rounds": 2}
    with pytest.raises(SystemExit):
        tune.main(["lm/cpu_tune_comparators", "--plan"])
    assert "matched 2 rounds of lm/cpu_tune" in capsys.readouterr().err


def test_the_selection_is_the_best_confirmed_trial_of_any_round_and_its_edge_is_judged_on_everything_searched():
    """A narrowing round may score below the selection it narrows around: the earlier trial stays selected. A round's
    selection at the edge of its narrowed range starts another round, but the final selection is 'at an edge' only in
    the outer sixth of the span of every round's range."""
    spec = {**SPEC, "optimizers": ["adamw"], "max_rounds": 2, "space": {"adamw": SPEC["space"]["adamw"]}}
    records = []
    # round 1: the score peaks inside the ranges (no edge) and min_rounds=2 forces a narrowing round 2, which scores
    # everything 5 lower: round 1's best confirmed trial must stay the selection
    peak = lambda v: -abs(math.log10(v["lr"]) + 3) - abs(math.log10(v["optimizer.weight_decay"]) + 1.5) - abs(math.log10(1 - v["optimizer.kwargs.beta2"]) + 2)  # noqa: E731
    spec2 = {**spec, "min_rounds": 2}
    for _ in range(4):
        p = tuning.plan(spec2, records, "accuracy", True)
        if p["phase"] == "done":
            break
        run_phase(p, lambda opt, v, r=p["round"]: peak(v) - (5.0 if r == 2 else 0.0), records)
    done = tuning.plan(spec2, records, "accuracy", True)
    assert done["phase"] == "done" and len(done["history"]) == 2
    sel, round2 = done["selection"]["adamw"], done["history"][1]["selection"]["adamw"]
    assert sel["round"] == 1 and sel["label"].startswith("r1") and sel["score"] > round2["score"]
    assert sel["edges"] == {}  # inside everything searched
    # the span of every round's range: an edge of round 2's narrowed range is not an edge of the search
    hull = tuning.searched_hull(done["history"], "adamw")
    assert hull["lr"]["low"] == 1e-4 and hull["lr"]["high"] == 1e-2
    narrowed = done["history"][1]["spaces"]["adamw"]["lr"]
    ends = [{**sel["values"], "lr": narrowed[end]} for end in ("low", "high")]  # the ends of round 2's LR range
    assert all("lr" in tuning.at_edge(done["history"][1]["spaces"]["adamw"], {}, e) for e in ends)
    assert any("lr" not in tuning.at_edge(hull, {}, e) for e in ends)  # one of them well inside round 1's
    assert tuning.at_edge(hull, {}, {**sel["values"], "lr": 9e-3}).get("lr") == 1  # the top of everything searched


def test_the_tool_checks_that_the_written_selection_reproduces_its_trials(tmp_path):
    """A task that builds on another's config (lm_lora on lm.yaml) merges that task's tuned block under its own: a key
    its selection does not set (lm's DoPr-AdamW betas) would reach the evaluation runs but not the trials. The tool
    compares a run at the tuned settings with each selected trial and names the leak."""
    import argparse

    from omegaconf import OmegaConf

    sys.path.insert(0, str(ROOT / "scripts"))
    import tune

    configs = tmp_path / "configs"
    shutil.copytree(ROOT / "configs", configs)
    args = argparse.Namespace(configs=configs, overrides=[])
    cfg = tune.compose(configs, ["+experiment=lm_lora/cpu_tune"])
    spec = OmegaConf.to_container(cfg.tune_spec, resolve=True)
    records = record.read(ROOT / "results" / "lm_lora" / "cpu_tune")
    selection = tuning.plan(spec, records, "accuracy", True)["selection"]
    assert tune.misapplied(args, cfg, selection, records) == []  # the committed selection reproduces its trials
    lm = configs / "task" / "lm.yaml"
    lm.write_text(lm.read_text().replace("dopr_adamw: {weight_decay: 0.03, kwargs: {damping: 1}}",
                                         "dopr_adamw: {weight_decay: 0.03, kwargs: {damping: 1, betas: [0.9, 0.95]}}"))
    wrong = tune.misapplied(args, cfg, selection, records)
    assert len(wrong) == 1 and wrong[0].startswith("dopr_adamw:") and "0.95" in wrong[0]
