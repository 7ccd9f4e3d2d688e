"""The budget axis (experiments/reports/budget.py): targets, time to target and performance profiles, by hand."""

import math

from experiments.reports import budget


def run(opt, seed, curve, seconds_per_step=0.5):
    """A record with one evaluation per (step, metric) of ``curve``; its final row is the last."""
    evals = [{"step": s, "train_seconds": s * seconds_per_step, "val_loss": 1.0, "metrics": {"acc": v}, "select": {}, "intervals": {},
              "horizons": {}} for s, v in curve]
    return {"run_id": f"{opt}-s{seed}", "optimizer": opt, "seed": seed, "evals": evals, "summary": {"final": {"step": curve[-1][0]}}}


def test_targets_and_steps_to_target_by_hand():
    done = [run("adamw", 0, [(100, 0.2), (200, 0.5), (300, 0.6)]), run("adamw", 1, [(100, 0.1), (200, 0.3), (300, 0.8)]),
            run("adamw", 2, [(100, 0.4), (200, 0.7), (300, 0.7)]), run("muon", 0, [(100, 0.1), (200, 0.2), (300, 0.4)]),
            run("dopr_adamw", 0, [(100, 0.65), (200, 0.9), (300, 0.95)], seconds_per_step=1.0)]
    t = budget.targets(done, "acc", True)
    # the best base GP by median final: adamw (0.7) over muon (0.4); floor 0; targets 0.63 and 0.35
    assert t["baseline"] == "adamw" and t["baseline_median"] == 0.7 and t["floor"] == 0.0
    assert math.isclose(t["target"], 0.63) and math.isclose(t["target50"], 0.35)
    cols = budget.run_columns(done, "acc", True)
    assert (cols["adamw-s0"]["steps_to_target"], cols["adamw-s0"]["steps_to_target50"]) == (math.inf, 200.0)
    assert (cols["adamw-s2"]["steps_to_target"], cols["adamw-s2"]["seconds_to_target"]) == (200.0, 100.0)
    assert (cols["dopr_adamw-s0"]["steps_to_target"], cols["dopr_adamw-s0"]["seconds_to_target"]) == (100.0, 100.0)
    # per optimizer: the median over seeds, infinite when more than half miss
    assert budget.optimizer_time([200.0, math.inf, 300.0]) == 300.0 and budget.optimizer_time([math.inf, math.inf, 100.0]) == math.inf
    assert all(math.isnan(budget.optimizer_time(v)) for v in ([math.nan, 100.0, 200.0], [100.0, math.nan, 200.0]))  # unknown: not by order
    # lower is better: the floor is the base GPs' median first evaluation
    fd = [run("adamw", s, [(100, v0), (200, v1)]) for s, (v0, v1) in enumerate([(90, 50), (100, 40), (80, 60)])]
    t = budget.targets(fd, "acc", False)
    assert t["floor"] == 90 and t["baseline_median"] == 50 and math.isclose(t["target"], 90 - 0.9 * 40)


def test_a_light_rollout_counts_for_the_time_to_target():
    """Light rollouts (trainer.light_rollout_every: the headline metric on fewer instances) are points of the budget
    axis: a run that reaches the target at one is timed there; the final (full) row still sets the baseline."""
    done = [run("adamw", s, [(100, 0.1), (200, 0.5), (300, 0.8)]) for s in range(3)]
    dopr = run("dopr_adamw", 0, [(50, 0.2), (100, 0.75), (200, 0.9), (300, 0.9)])
    dopr["evals"][1]["light"] = True  # step 100: a light rollout
    cols = budget.run_columns([*done, dopr], "acc", True)
    assert budget.targets([*done, dopr], "acc", True)["baseline_median"] == 0.8
    assert (cols["dopr_adamw-s0"]["steps_to_target"], cols["dopr_adamw-s0"]["seconds_to_target"]) == (100.0, 50.0)


def test_the_light_rollouts_cost_is_measured_on_the_runs():
    """The added cost the protocol bounds (20%): per run, the light rows' rollout seconds over the wall time without
    them; median and max over the runs that rolled out light; nothing where none did."""
    a = run("adamw", 0, [(100, 0.1), (200, 0.5), (300, 0.8)])
    b = run("adamw", 1, [(100, 0.1), (200, 0.5), (300, 0.8)])
    for r, (light_s, wall) in zip((a, b), ((6.0, 106.0), (10.0, 60.0))):
        r["evals"][0].update(light=True, rollout_seconds=light_s / 2)
        r["evals"][1].update(light=True, rollout_seconds=light_s / 2)
        r["evals"][2]["rollout_seconds"] = 20.0  # a full row: not the light rollouts' cost
        r["summary"]["wall_seconds"] = wall
    plain = run("muon", 0, [(100, 0.1), (300, 0.8)])
    plain["summary"]["wall_seconds"] = 50.0
    cost = budget.light_cost([a, b, plain])
    assert cost["runs"] == 2 and math.isclose(cost["max"], 10 / 50) and math.isclose(cost["median"], (6 / 100 + 10 / 50) / 2)
    assert budget.light_cost([plain]) == {}


def test_the_time_to_target_section_states_the_measured_light_rollout_cost():
    """results/README.md's time-to-target section (experiments/reports/crosstask.py) names each task's measured cost
    of its light rollouts, from the task page's meta, and says nothing for a task without them."""
    from experiments.reports import crosstask

    runs = [{"optimizer": "adamw", "steps_to_target": 200.0, "seconds_to_target": 50.0, "steps_to_target50": 100.0}]
    target = {"floor": 0.0, "baseline": "adamw", "baseline_median": 0.8, "target": 0.72, "target50": 0.4}
    lm = {"meta": {"task": "lm", "metric": "accuracy", "targets": target, "light_rollout_cost": {"runs": 40, "median": 0.052, "max": 0.081}},
          "runs": runs}
    flow = {"meta": {"task": "flow", "metric": "fd", "targets": target}, "runs": runs}
    text = "\n".join(crosstask.time_to_target([lm, flow]))
    assert "| lm | accuracy 0.72 (0 -> adamw 0.8) | adamw | 200 | 50 | 1/1 | 100 |" in text
    assert "lm 5.2% (at most 8.1%, 40 runs)." in text and "flow 0" not in text
    assert "light rollouts" not in "\n".join(crosstask.time_to_target([flow]))


def test_performance_profile_by_hand():
    times = {"a": {"x": 100.0, "y": 200.0}, "b": {"x": 300.0, "y": 150.0}, "c": {"x": math.inf, "y": 50.0},
             "d": {"x": math.inf, "y": math.inf}}  # d: nobody reaches the target: a miss for both (AlgoPerf)
    prof = budget.profile(times, taus=[1.0, 2.0, 4.0])
    assert prof["x"]["ratios"] == [1.0, 2.0, math.inf, math.inf] and prof["y"]["ratios"] == [2.0, 1.0, 1.0, math.inf]
    assert prof["x"]["rho"] == [1 / 4, 2 / 4, 2 / 4] and prof["y"]["rho"] == [2 / 4, 3 / 4, 3 / 4]
    # area under rho on [1, 4] over 3: x has tasks at r=1 (area 3) and r=2 (area 2): (3 + 2) / 4 tasks / 3
    assert math.isclose(prof["x"]["score"], 5 / 12) and math.isclose(prof["y"]["score"], (2 + 3 + 3) / 12)


def test_lr_schedules_follow_their_formulas_and_reject_unknown_names():
    import math

    import pytest

    from experiments.engine import lr_factor

    warm, total = 10, 100
    assert [lr_factor(s, warm, total, "constant") for s in (0, 4, 9)] == [0.1, 0.5, 1.0]  # the same warmup for all
    assert all(lr_factor(s, warm, total, "constant") == 1.0 for s in range(warm, total))
    for s in range(warm, total):
        assert lr_factor(s, warm, total) == pytest.approx(0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm))))
    # wsd: flat until the last 20% of the steps, then linear to 0 (one step before the end: 1/20)
    assert lr_factor(79, warm, total, "wsd") == 1.0 and lr_factor(90, warm, total, "wsd") == pytest.approx(0.5)
    assert lr_factor(99, warm, total, "wsd", 0.2) == pytest.approx(1 / 20)
    with pytest.raises(ValueError, match="trainer.schedule='linear'.*cosine, constant or wsd"):
        lr_factor(0, warm, total, "linear")  # named even during warmup, before the first decayed step


def test_the_final_weights_steadiness_by_hand():
    """Per optimizer: the seed SD of the final metric and, per run, the change from its previous rollout (a light one
    counts) to the final; the largest fall is in the worse direction of the metric (higher or lower is better)."""
    a = run("adamw", 0, [(100, 0.2), (200, 0.6), (300, 0.5)])  # falls 0.1 at the end
    b = run("adamw", 1, [(100, 0.1), (200, 0.7), (300, 0.9)])
    b["evals"].insert(2, {"step": 250, "val_loss": 1.0, "metrics": {"acc": 0.95}, "light": True})  # previous: the light row
    c = run("muon", 0, [(300, 0.4)])  # one rollout: no previous one
    s = budget.last_change([a, b, c], "acc", True)
    assert s["adamw"]["seeds"] == 2 and math.isclose(s["adamw"]["sd"], math.sqrt(0.08))  # finals 0.5 and 0.9
    assert s["adamw"]["steps"] == [200, 250] and math.isclose(s["adamw"]["mean_change"], (-0.1 - 0.05) / 2)
    assert math.isclose(s["adamw"]["worst_fall"], 0.1) and s["adamw"]["worst_run"] == "adamw-s0"
    assert s["muon"]["steps"] == [] and math.isnan(s["muon"]["sd"]) and s["muon"]["worst_run"] is None
    # lower is better (FD): a rise is the fall; a run that only improved has none
    fd = budget.last_change([run("adamw", 0, [(100, 50.0), (200, 40.0)]), run("adamw", 1, [(100, 45.0), (200, 47.0)])], "acc", False)
    assert math.isclose(fd["adamw"]["worst_fall"], 2.0) and fd["adamw"]["worst_run"] == "adamw-s1"
    up = budget.last_change([run("adamw", 0, [(100, 0.1), (200, 0.4)])], "acc", True)
    assert up["adamw"]["worst_fall"] == 0.0 and up["adamw"]["worst_run"] is None
