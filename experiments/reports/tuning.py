"""The tuning page (make tune-<task>): per optimizer the trials, the setting selected by the metric and by the
validation loss with the regret between them, grid edges and the extension round, Observation 4.3, the tuning
surface, and the selected settings as commands and as the task config's `lr`/`tuned` entries."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .. import record
from .. import tuning as protocol3
from ..protocol import lr_ladder
from ..registry import base_of, has_ap, pair_rank
from ..stats import mean_ci, selection
from .figures import _pyplot, _save_png
from .load import run_damping


def trial_key(row: dict) -> tuple:
    """A tuning trial: (lr, the optimizer's own hyperparameter): the damping for DoPr-X, the weight decay for X."""
    return (row["lr"], row["damping"] if row["damping"] is not None else row["weight_decay"])


ROUND_ONE_LRS = 3  # the tuning presets' first round: +lr_step -1,0,1 around each optimizer's centre


def extension_lrs(by_opt: dict, selections: dict, sign: int, metric: str) -> dict:
    """Per optimizer, the learning rate a second tuning round adds: one rung of the half-decade ladder beyond
    the grid, below it when the selected LR is the lowest or its lower neighbour scores at least as well as
    its upper one, else above it. Every optimizer gets one, so budgets stay equal."""
    out = {}
    for opt, trials in by_opt.items():
        lrs = sorted({t[0] for t in trials})
        if len(lrs) < 2:
            continue
        score = lambda x: max(sign * sum(r[f"final_{metric}"] for r in rs) / len(rs) for t, rs in trials.items() if t[0] == x)  # noqa: E731
        i = lrs.index(selections[opt]["by_metric"][0])
        down = i == 0 or (i < len(lrs) - 1 and score(lrs[i - 1]) >= score(lrs[i + 1]))
        out[opt] = lr_ladder(lrs[0], -1) if down else lr_ladder(lrs[-1], 1)
    return out


def tuning_section(rows: list[dict], metric: str, higher: bool, out: Path, title: str, lab: dict, task: str, scale: str, horizons: dict):
    """The tuning protocol's report: per optimizer the trial count, the grid, the trial selected by
    mean final validation loss and by mean final rollout metric, and the regret of selecting by
    validation loss; Observation 4.3 (DoPr-X's best LR over X's); the tuning surface; and the
    commands for the evaluation seeds at each selected setting. Returns (lines, selections)."""
    sign = 1 if higher else -1
    by_opt = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by_opt[r["optimizer"]][trial_key(r)].append(r)
    opts = sorted(by_opt, key=pair_rank)
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    selections = {}
    lines = ["## Selection", "",
             f"Every optimizer searched its learning rate and one hyperparameter of its own (DoPr-X: the AP damping; X: the "
             f"weight decay) over a grid of equal size, on tuning seeds disjoint from the evaluation seeds. Per optimizer: the "
             f"trial with the lowest mean final validation loss, the trial with the {'highest' if higher else 'lowest'} mean "
             f"final {metric}, and the regret of selecting by validation loss ({metric} given up, in its units).", "",
             f"| optimizer | trials | seeds per trial | LRs | damping (DoPr-X) or weight decay (X) | selected by val loss (lr, hp) | {metric} there | "
             f"selected by {metric} (lr, hp) | {metric} there | regret |", "|---|---|---|---|---|---|---|---|---|---|"]
    for opt in opts:
        trials = by_opt[opt]
        sel = selection([r for rs in trials.values() for r in rs], f"final_{metric}", higher, by=trial_key)
        by_loss, by_metric = sel["by_loss"], sel["by_metric"]
        m_loss, m_metric = sel["metric_at_loss_choice"], sel["metric_at_metric_choice"]
        selections[opt] = {"by_loss": by_loss, "by_metric": by_metric, "regret": sel["regret"], "trials": len(trials)}
        seeds = sorted({len(v) for v in trials.values()})
        lines.append(f"| {opt} | {len(trials)} | {'/'.join(map(str, seeds))} | {', '.join(f'{x:g}' for x in sorted({t[0] for t in trials}))} | "
                     f"{', '.join(f'{x:g}' for x in sorted({t[1] for t in trials if t[1] is not None}))} | "
                     f"{by_loss[0]:g}, {by_loss[1]:g} | {m_loss:.4g} | {by_metric[0]:g}, {by_metric[1]:g} | {m_metric:.4g} | {abs(m_metric - m_loss):.4g} |")
    edges, lr_edges = [], []
    for opt in opts:
        trials, (lr, hp) = by_opt[opt], selections[opt]["by_metric"]
        lrs, hps = sorted({t[0] for t in trials}), sorted({t[1] for t in trials if t[1] is not None})
        where = [f"LR {lr:g}"] if len(lrs) > 1 and lr in (lrs[0], lrs[-1]) else []
        lr_edges += [opt] if where else []
        where += [f"{'damping' if has_ap(opt) else 'weight decay'} {hp:g}"] if hp is not None and len(hps) > 1 and hp in (hps[0], hps[-1]) else []
        if where:
            edges.append(f"{opt} ({', '.join(where)})")
    if edges:
        lines += ["", "**At the edge of the grid** (selected by the metric): " + "; ".join(edges) + ". The best setting may lie "
                  "outside the grid; a wider grid would tell."]
    extend = extension_lrs(by_opt, selections, sign, metric)
    extended = all(len({t[0] for t in by_opt[o]}) > ROUND_ONE_LRS for o in opts)
    if lr_edges and extended:
        lines += ["", "**The second round is in** (every optimizer searched more than the first round's "
                  f"{ROUND_ONE_LRS} LRs); the protocol extends once, so these selections stand, at the edge for "
                  + ", ".join(lr_edges) + "."]
    elif lr_edges and extend:
        lines += ["", "**One more learning rate each** keeps the budgets equal: every optimizer gets one half-decade beyond its grid, "
                  "on the side of its best (beyond the selected LR where it is at an edge, else beyond its better neighbour), "
                  "crossed with the same hyperparameter values and seeds. As a sweep preset's grid centres with `+lr_step: 0` "
                  f"(as in `configs/sweep/{task}_tune_extend_*.yaml` where it exists):", "", "```yaml",
                  "lr_centre: {" + ", ".join(f"{opt}: {extend[opt]:g}" for opt in opts if opt in extend) + "}", "```"]
    horizon = [key for points in horizons.values() for _, key in points]
    if horizon:
        lines += ["", f"Per-horizon {metric} of each optimizer's trial selected by {metric}:", "",
                  "| optimizer | " + " | ".join(k.removeprefix(f"final_{metric}_") for k in horizon) + " |", "|---|" + "---|" * len(horizon)]
        for opt in opts:
            rs = by_opt[opt][selections[opt]["by_metric"]]
            lines.append(f"| {opt} | " + " | ".join(f"{mean(rs, k):.3g}" if all(k in r for r in rs) else "" for k in horizon) + " |")
    counts = {o: s_["trials"] for o, s_ in selections.items()}
    if len(set(counts.values())) > 1:
        lines += ["", "**Unequal budgets**: " + ", ".join(f"{o} {n}" for o, n in counts.items()) + " trials; the comparison is not fair "
                  "until every optimizer has the same number (finish or rerun the sweep)."]
    lines += ["", "## Observation 4.3: does X's learning rate carry over to DoPr-X?", "",
              "| optimizer | best LR (by metric) | X's best LR | ratio | best damping (by metric) | best LR by val loss | X's | ratio |", "|---|---|---|---|---|---|---|---|"]
    for opt in opts:
        base = base_of(opt)  # DoPr-X@10 too: its LR against X's
        if not has_ap(opt) or base not in selections:
            continue
        d, b = selections[opt], selections[base]
        lines.append(f"| {opt} | {d['by_metric'][0]:g} | {b['by_metric'][0]:g} | {d['by_metric'][0] / b['by_metric'][0]:g} | {d['by_metric'][1]:g} | "
                     f"{d['by_loss'][0]:g} | {b['by_loss'][0]:g} | {d['by_loss'][0] / b['by_loss'][0]:g} |")
    lines += ["", "The paper's Observation 4.3 holds where the ratio is 1 (DoPr-X tuned at X's learning rate).", ""]
    # The surface: the metric against LR, one line per value of the optimizer's own hyperparameter.
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(opts), figsize=(4.2 * len(opts), 3.6), dpi=120, squeeze=False)
    for ax, opt in zip(axes[0], opts):
        trials = by_opt[opt]
        for hp in sorted({t[1] for t in trials}, key=lambda x: -1 if x is None else x):
            pts = sorted((t[0], mean(rs, f"final_{metric}")) for t, rs in trials.items() if t[1] == hp)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=("damping " if has_ap(opt) else "wd ") + f"{hp:g}")
        ax.set_xscale("log")
        lrs = sorted({t[0] for t in trials})
        ax.set_xticks(lrs, [f"{x:g}" for x in lrs])  # the grid's LRs, no overlapping minor labels
        ax.set_xticks([], minor=True)
        ax.set_xlabel("learning rate")
        ax.set_ylabel(lab["metric_label"], fontsize=9)
        ax.set_title(opt, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title + f": final {metric}, mean over tuning seeds", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    _save_png(fig, out / "tuning.png")
    lines += ["![tuning surface](tuning.png)", "", "## Evaluation runs at the selected settings", "",
              f"Each optimizer at its setting selected by {metric} (the suite's question), on evaluation seeds 0-4:", "", "```bash"]
    for opt in opts:
        lr, hp = selections[opt]["by_metric"]
        own = f"optimizer.kwargs.damping={hp:g}" if has_ap(opt) else f"optimizer.weight_decay={hp:g}"
        lines.append(f"python -m experiments.train -m task={task} scale={scale} optimizer={opt} lr={lr:g} {own} seed=0,1,2,3,4")
    lines += ["```", "", f"or set these entries in `configs/task/{task}.yaml` (the other optimizers' entries of `lr` stay) and run "
              f"`make reproduce-{task.replace('_', '-')}`; `task.tuned` applies whenever `lr=` is not given:", "", "```yaml"]
    lines.append("lr: {" + ", ".join(f"{opt}: {selections[opt]['by_metric'][0]:g}" for opt in opts) + "}")
    lines.append("tuned:")
    for opt in opts:
        hp = selections[opt]["by_metric"][1]
        lines.append(f"  {opt}: " + (f"{{kwargs: {{damping: {hp:g}}}}}" if has_ap(opt) else f"{{weight_decay: {hp:g}}}"))
    lines += ["```", ""]
    return lines, selections


def evaluated_by(tuning_dir: Path) -> Path:
    """The experiment a tuning chose the settings of, whose pages it joins: results/<task>/cpu_tune -> .../cpu, and
    results/<task>/cpu_tune_comparators -> .../cpu too (the comparators' evaluation runs into the headline's records)."""
    name = tuning_dir.name
    return tuning_dir.with_name(name.removesuffix("_tune") if name.endswith("_tune") else name.split("_tune_", 1)[0])


def joined(tuning_dir: Path) -> list[Path]:
    """Every tuning experiment whose page goes where ``tuning_dir``'s does, ``tuning_dir`` included: beside
    results/<task>/cpu_tune, results/<task>/cpu_tune_<y> (the comparators'), each with its records; the primary
    (``<x>_tune``) first. One tuning.md renders them all, so no tuning's page overwrites another's."""
    tuning_dir = Path(tuning_dir)
    if not (tuning_dir / record.RECORDS).exists():
        return [tuning_dir]  # run folders (report.py runs/... --out ...): that source alone
    home = evaluated_by(tuning_dir)
    group = {p.parent for p in tuning_dir.parent.glob(f"{home.name}_tune*/{record.RECORDS}")
             if p.parent.name == f"{home.name}_tune" or p.parent.name.startswith(f"{home.name}_tune_")}
    return sorted(group | {tuning_dir}, key=lambda p: (p.name != f"{home.name}_tune", p.name))


def trial_counts(groups: list[tuple[str, list[dict]]]) -> list[str]:
    """The page's budget check over every tuning it renders ([(experiment name, its records)]): per optimizer the
    trials (a version-3 trial is a Sobol point, its label; a version-2 one a grid setting), trials per round, rounds
    and runs, and whether every optimizer had the same number."""
    lines = ["## Trial counts", "", "Every optimizer of every tuning on this page (failed trials count: they were part of the budget).", "",
             "| optimizer | tuning | protocol | trials | trials per round | rounds | runs |", "|---|---|---|---|---|---|---|"]
    counts, per_round = {}, {}
    for name, records in groups:
        for opt in sorted({r["optimizer"] for r in records}, key=pair_rank):
            runs = [r for r in records if r["optimizer"] == opt]
            labels = {(r["config"].get("tune") or {}).get("label") for r in runs}
            if None in labels:  # version 2: a trial is a grid setting (lr, the optimizer's own hyperparameter)
                trials = {trial_key({"lr": r["lr"], "damping": run_damping(r),
                                     "weight_decay": (r["config"].get("optimizer") or {}).get("weight_decay")}) for r in runs if r["status"] == "done"}
                counts[opt] = len(trials)
                lines.append(f"| {opt} | {name} | 2 | {len(trials)} | - | - | {len(runs)} |")
                continue
            by_round = defaultdict(set)
            for label in labels:
                by_round[label.split("t", 1)[0]].add(label)  # r1t03: round 1, trial 3
            sizes = sorted({len(v) for v in by_round.values()})
            counts[opt], per_round[opt] = len(labels), "/".join(map(str, sizes))
            lines.append(f"| {opt} | {name} | 3 | {len(labels)} | {per_round[opt]} | {len(by_round)} | {len(runs)} |")
    if len(set(counts.values())) == 1:
        lines += ["", f"Equal trial counts: every optimizer searched {next(iter(counts.values()))} trials."]
    elif per_round and len(per_round) == len(counts) and len(set(per_round.values())) == 1:
        lines += ["", f"Equal trials per round ({next(iter(per_round.values()))}) for every optimizer; the totals differ ("
                  + ", ".join(f"{o} {n}" for o, n in counts.items()) + "): a tuning is unfinished, or one ran before its "
                  "spec matched the primary's rounds (`rounds_of`, docs/protocol.md): run `python scripts/tune.py` on each to the end."]
    else:
        lines += ["", "**Unequal trial counts**: " + ", ".join(f"{o} {n}" for o, n in counts.items()) + " (docs/protocol.md asks for "
                  "equal budgets: run the tunings to the end, or rerun the one of another protocol version)."]
    return lines + [""]


def runs_at(rec: dict, values: dict, rel: float = 1e-3) -> bool:
    """Whether an evaluation run used a tuning selection's values (``values`` as tuning keys: lr,
    optimizer.weight_decay, optimizer.kwargs.beta2, ...; compared to the run's config within ``rel``). An evaluation
    folder can hold runs of an earlier task version at other settings: those are not this selection's evaluation."""
    for key, want in protocol3.overrides(values).items():
        node = rec["config"]
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(want, list):
            if not isinstance(node, (list, tuple)) or len(node) != len(want) or any(abs(float(a) - float(b)) > rel * abs(float(b)) for a, b in zip(node, want)):
                return False
        elif node is None or abs(float(node) - float(want)) > rel * abs(float(want)):
            return False
    return True


def protocol3_section(done: list[dict], experiment_dir: Path, metric: str) -> list[str]:
    """The page of a version-3 tuning (experiments/tuning.py), replayed from its records and the spec they carry:
    per optimizer the rounds, the trials and seeds, the selection and its score on the selection instances, beside
    its evaluation mean in the task's headline experiment (the winner's curse), and any edge left."""
    spec = done[0]["config"]["tune_spec"]
    higher = bool(spec.get("higher_is_better", True))
    plan = protocol3.plan(spec, done, metric, higher)
    headline = evaluated_by(experiment_dir)
    evaluation = record.read(headline, missing_ok=True)
    lines = ["## Selection (protocol version 3)", "",
             f"Every optimizer searched a {len(next(iter(spec['space'].values())))}-D space with {spec['trials']} scrambled-Sobol "
             f"trials per round on tuning seed {spec['seeds'][0]}; the best third of each round also ran on seeds "
             f"{', '.join(map(str, spec['seeds'][1:]))}; the selection is the best mean of `select_{metric}` (the selection "
             "instances, never the reported ones) over the three seeds, among the confirmed trials of every round; a selection in "
             "the outer sixth of its round's range starts another round; the final one is at an edge only in the outer sixth of "
             "everything searched (docs/protocol.md).", ""]
    if plan["phase"] != "done":
        lines += [f"**Unfinished**: round {plan['round']}, {plan['phase']} phase still to run (`python scripts/tune.py ...` resumes it).", ""]
    lines += [f"| optimizer | rounds | runs | selected trial | selected values | select_{metric} (tuning seeds) | "
              f"final {metric}, evaluation seeds at these settings (n) | at an edge ({'of everything searched' if plan['phase'] == 'done' else 'its round'}) |",
              "|---|---|---|---|---|---|---|---|"]
    sign = lambda d: chr(43) if d > 0 else chr(45)  # noqa: E731  an edge's side
    for opt in sorted(spec["optimizers"], key=pair_rank):
        runs = [r for r in done if r["optimizer"] == opt]
        sel = plan["selection"].get(opt)
        if sel is None:
            lines.append(f"| {opt} | - | {len(runs)} | | | | | |")
            continue
        at_opt = [r for r in evaluation if r["optimizer"] == opt and r["status"] == "done"]
        evals = [r["evals"][-1]["metrics"][metric] for r in at_opt if runs_at(r, sel["values"])]
        ev = (f"{mean_ci(evals)[0]:.4g} ({len(evals)})" if evals
              else f"not run at these settings ({len(at_opt)} runs at others)" if at_opt else "not run")
        # done: the final selection's place in the span of every round's range; while a round runs, its round's edges
        edges = sel["edges"] if "edges" in sel else (plan["history"][sel["round"] - 1].get("edges") or {}).get(opt) or {}
        lines.append(f"| {opt} | {len(plan['history'])} | {len(runs)} | {sel['label']} | " + ", ".join(f"{k.removeprefix('optimizer.')}={v:g}" for k, v in sel["values"].items())
                     + f" | {sel['score']:.4g} | {ev} | {', '.join(f'{k} ({sign(d)})' for k, d in edges.items()) or 'none'} |")
    lines += ["", "The gap between a selection's tuning score and its evaluation mean is the winner's curse (a best-of-many score is "
              "biased upwards) plus the difference between the selection and the reported instances.", ""]
    for h in plan["history"]:
        lines += [f"Round {h['round']} ranges: " + "; ".join(f"{o}: " + ", ".join(f"{k.removeprefix('optimizer.')} [{d['low']:g}, {d['high']:g}]"
                                                                             for k, d in sp.items()) for o, sp in h["spaces"].items())]
        if h.get("selection"):  # the round's own best and its edges: what started the next round
            lines += [f"Round {h['round']} selections (the round's best; at an edge of its ranges): " + "; ".join(
                f"{o} {sel['label']} {sel['score']:.4g}" + (" (" + ", ".join(f"{k.removeprefix('optimizer.')} {sign(d)}" for k, d in h["edges"][o].items()) + ")"
                                                             if h["edges"].get(o) else "") for o, sel in h["selection"].items())]
        lines += [""]
    return lines
