"""The tuning protocol, version 3 (docs/protocol.md): one mechanism for every task and optimizer.

- **Equal budgets over spaces of equal dimension.** Every optimizer gets the same number of trials per round, drawn
  from a scrambled Sobol sequence (scipy.stats.qmc) over its declared space: X searches LR x weight decay x one
  hyperparameter of its own (AdamW: 1 - beta2; Muon: 1 - momentum; the comparators, docs/comparators.md: SOAP's
  precondition frequency, a whole number, one-sided Shampoo's ridge, PSGD's preconditioner update probability),
  DoPr-X searches LR x weight decay x damping.
- **Successive seeds.** Every trial runs on the first tuning seed; the best third (by the selection score) runs on
  the other tuning seeds too, and the selection is the best mean over all of them (at least 3).
- **Selection on the selection instances.** The score is ``select_<metric>`` (problems, reference images, episodes
  disjoint from the reported ones); this module never reads a reported metric (``scores`` reads ``select`` only).
- **Edge extension.** A selection in the outer sixth of a searched log range, on a side not at its documented
  bound, starts another round for every optimizer (equal budgets): ranges at an edge move outward by half their
  width, the others narrow around their selection. At most ``max_rounds`` rounds, at least ``min_rounds`` (default
  1). A secondary tuning (the comparators) names its task's primary tuning in ``rounds_of``: scripts/tune.py then
  runs exactly as many rounds as the primary's finished tuning did (``min_rounds = max_rounds`` = that count, kept in
  every run's config), so every optimizer of the task gets the same number of trials.
- **The selection** is the best mean over all tuning seeds among the confirmed trials of every round (a narrowing
  round may score below the selection it narrows around: that one stays); it is "at an edge" only where it lies in
  the outer sixth of everything searched (the span of every round's range), short of a documented bound.
- **Selected settings written by the tool** into the task config (``write_selection``), never pasted by hand.

The plan of every round is a function of the spec and the records of the rounds before it, so a killed tuning
resumes by running the same command (scripts/tune.py): finished runs are skipped.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path

from .checkpoint import atomic_write_text

EDGE = 1 / 6  # a selection this close (in log units, as a share of the range) to an end of its range is "at the edge"


def _to_value(dim: dict, u: float) -> float | int:
    """A point u in [0, 1) of the unit cube to the dimension's value: log-uniform over [low, high]; for
    ``scale: log1m`` the range is of 1 - value (1 - beta2, 1 - momentum: log-uniform near 1); for ``type: int``
    (a precondition frequency in steps) rounded to the nearest whole number, within [low, high]."""
    lo, hi = math.log10(dim["low"]), math.log10(dim["high"])
    x = 10 ** (lo + u * (hi - lo))
    kind = dim.get("type", "float")
    if kind == "int":
        if dim.get("scale") == "log1m":
            raise ValueError(f"a tuning dimension cannot be both type: int and scale: log1m ({dim})")
        return min(max(int(round(x)), math.ceil(dim["low"])), math.floor(dim["high"]))
    if kind != "float":
        raise ValueError(f"tuning dimension type {kind!r}: choose float (the default) or int")
    return float(f"{(1 - x if dim.get('scale') == 'log1m' else x):.4g}")


def _to_unit(dim: dict, value: float) -> float:
    x = 1 - value if dim.get("scale") == "log1m" else value
    lo, hi = math.log10(dim["low"]), math.log10(dim["high"])
    return (math.log10(x) - lo) / (hi - lo)


FIRST_DIMENSIONS = ("lr", "optimizer.weight_decay")  # the Sobol sequence's first two dimensions, in every spec


def canonical_order(space: dict) -> list[str]:
    """The order of a space's keys along the Sobol dimensions: LR, weight decay, then the rest sorted. Not the dict's
    order: a run record stores its config with sorted keys, and a page replayed from it must draw the same points
    as the tool that ran the trials (every spec lists LR, weight decay, then its one own key, the same order)."""
    return [k for k in FIRST_DIMENSIONS if k in space] + sorted(k for k in space if k not in FIRST_DIMENSIONS)


def sobol_points(space: dict, n: int, seed: int) -> list[dict]:
    """``n`` points of a scrambled Sobol sequence over ``space`` ({key: {low, high, scale, type}}), as {key: value}."""
    from scipy.stats import qmc

    keys = canonical_order(space)
    unit = qmc.Sobol(d=len(keys), scramble=True, seed=seed).random(n)
    return [{k: _to_value(space[k], float(u[i])) for i, k in enumerate(keys)} for u in unit]


def scores(records: list[dict], metric: str, higher: bool) -> dict[tuple[str, str], dict[int, float]]:
    """{(optimizer, trial label): {seed: select_<metric> of the final weights}} over the tuning runs. A failed run
    (a non-finite loss at a large LR) scores the worst possible value, so it ranks last and is not run again.
    Reads the selection set only: a record's reported metrics are never looked at."""
    out = defaultdict(dict)
    for r in records:
        label = (r["config"].get("tune") or {}).get("label")
        if not label or r["status"] not in ("done", "failed"):
            continue
        if r["status"] == "failed":
            out[(r["optimizer"], label)][r["seed"]] = -math.inf if higher else math.inf
            continue
        value = r["evals"][-1]["select"].get(metric)
        if value is None:
            raise ValueError(f"run {r['run_id']} has no select_{metric}: the task must score its selection instances "
                             "(task.select_* settings) for the tuning protocol")
        out[(r["optimizer"], r["config"]["tune"]["label"])][r["seed"]] = value
    return out


def rank(trials: dict[str, dict[int, float]], higher: bool, seeds: list[int] | None = None,
         values: dict[str, tuple] | None = None) -> list[tuple[str, float]]:
    """Trial labels by mean score (best first) over ``seeds`` (all of each trial's seeds if None); ties go to the
    trial with the smaller values (``values`` {label: tuple}, the space's keys in order: the smaller LR first), then
    the smaller label, so the order is a function of the scores and the points alone."""
    sign = 1 if higher else -1
    means = {}
    for label, by_seed in trials.items():
        vals = [v for s, v in by_seed.items() if seeds is None or s in seeds]
        if vals:
            means[label] = sum(vals) / len(vals)
    return sorted(means.items(), key=lambda kv: (-sign * kv[1], (values or {}).get(kv[0], ()), kv[0]))


def top_count(trials: int) -> int:
    """How many trials go on to the other tuning seeds: the best third, at least one."""
    return max(1, math.ceil(trials / 3))


def at_edge(space: dict, bounds: dict, point: dict, edge: float = EDGE) -> dict[str, int]:
    """{key: -1 or +1} for the dimensions where ``point`` lies in the outer ``edge`` of its range, on a side that has
    not reached its bound (``bounds`` {key: [low, high]} in the dimension's own units: of the value, or of 1 - value)."""
    out = {}
    for key, dim in space.items():
        u = _to_unit(dim, point[key])
        lo_b, hi_b = (bounds.get(key) or [0, math.inf])
        if u < edge and dim["low"] > lo_b * (1 + 1e-9):
            out[key] = -1 if dim.get("scale") != "log1m" else +1  # log1m: a small 1 - x is a large x
        elif u > 1 - edge and dim["high"] < hi_b * (1 - 1e-9):
            out[key] = +1 if dim.get("scale") != "log1m" else -1
    return out


def next_space(space: dict, bounds: dict, point: dict, edges: dict) -> dict:
    """The next round's space for one optimizer: a range at an edge moves outward by half its width (within its
    bound); a range not at an edge narrows to half its width around the selection (within the old range)."""
    out = {}
    for key, dim in space.items():
        lo, hi = math.log10(dim["low"]), math.log10(dim["high"])
        width, x = hi - lo, lo + _to_unit(dim, point[key]) * (hi - lo)
        side = edges.get(key)
        if side is not None:
            grow_low = (side < 0) != (dim.get("scale") == "log1m")
            lo, hi = (lo - width / 2, hi - width / 2) if grow_low else (lo + width / 2, hi + width / 2)
            b_lo, b_hi = bounds.get(key) or [0, math.inf]
            lo, hi = max(lo, math.log10(b_lo) if b_lo > 0 else -math.inf), min(hi, math.log10(b_hi) if math.isfinite(b_hi) else math.inf)
        else:
            lo, hi = max(lo, x - width / 4), min(hi, x + width / 4)
        out[key] = {**dim, "low": float(f"{10 ** lo:.4g}"), "high": float(f"{10 ** hi:.4g}")}
    return out


def searched_hull(history: list[dict], opt: str) -> dict:
    """One optimizer's space spanning every round's range of each dimension (what the whole tuning searched)."""
    spaces = [h["spaces"][opt] for h in history]
    return {key: {**dim, "low": min(s[key]["low"] for s in spaces), "high": max(s[key]["high"] for s in spaces)}
            for key, dim in spaces[0].items()}


def final_selection(history: list[dict], got: dict, seeds: list[int], higher: bool, bounds: dict, edge: float = EDGE) -> dict:
    """The tuning's selection per optimizer: the best mean over all tuning seeds among every round's confirmed trials
    (a later round narrows around an earlier selection, and may score below it: the incumbent stays), with
    ``edges``: where it lies in the outer ``edge`` of everything searched (``searched_hull``) on a side short of its
    bound. Each round's own selection and edges (what started the next round) stay in ``history``."""
    out = {}
    for opt in history[0]["spaces"]:
        trials, where = {}, {}
        for h in history:
            for p in h["points"][opt]:
                by_seed = got.get((opt, p["label"]), {})
                if all(s in by_seed for s in seeds):  # confirmed: on every tuning seed
                    trials[p["label"]] = by_seed
                    where[p["label"]] = (h["round"], p["values"])
        order = {label: tuple(v[k] for k in history[0]["spaces"][opt]) for label, (_, v) in where.items()}
        label, score = rank(trials, higher, seeds, order)[0]
        rnd, values = where[label]
        out[opt] = {"label": label, "values": values, "score": score, "seeds": sorted(trials[label]), "round": rnd,
                    "edges": at_edge(searched_hull(history, opt), bounds, values, edge)}
    return out


def matched_rounds(primary: dict) -> int:
    """The number of rounds a secondary tuning runs (``rounds_of``): the round at which the primary's replayed plan
    (``plan``'s result) finished. Raises ValueError while the primary is still running."""
    if primary["phase"] != "done":
        raise ValueError(f"round {primary['round']}, {primary['phase']} phase still to run")
    return int(primary["round"])


def plan(spec: dict, records: list[dict], metric: str, higher: bool) -> dict:
    """Replay the protocol over the records so far. Returns {"round", "phase": "explore" | "confirm" | "done",
    "points": {optimizer: [{label, values}]}, "seeds", "selection": {optimizer: {label, values, score, seeds}},
    "spaces": {optimizer: space per round}, "history": [...]}. The points of the next phase to run are those whose
    runs are missing from ``records``; a phase is complete when every point has a record on every seed it needs."""
    seeds, n = list(spec["seeds"]), int(spec["trials"])
    spaces = {opt: dict(spec["space"][opt]) for opt in spec["optimizers"]}
    bounds = dict(spec.get("bounds") or {})
    got = scores(records, metric, higher)
    history, selection = [], {}
    for rnd in range(1, int(spec.get("max_rounds", 3)) + 1):
        points = {opt: [{"label": f"r{rnd}t{i:02d}", "values": p} for i, p in enumerate(sobol_points(spaces[opt], n, seed=rnd))]
                  for opt in spec["optimizers"]}
        history.append({"round": rnd, "spaces": {o: dict(s) for o, s in spaces.items()}, "points": points})
        missing = {opt: [p for p in pts if seeds[0] not in got.get((opt, p["label"]), {})] for opt, pts in points.items()}
        if any(missing.values()):
            return {"round": rnd, "phase": "explore", "points": missing, "seeds": seeds[:1], "history": history, "selection": selection}
        order = {opt: {p["label"]: tuple(p["values"][k] for k in spaces[opt]) for p in pts} for opt, pts in points.items()}
        top = {}
        for opt, pts in points.items():
            trials = {p["label"]: got[(opt, p["label"])] for p in pts}
            best = [label for label, _ in rank(trials, higher, seeds[:1], order[opt])[: top_count(n)]]
            top[opt] = [p for p in pts if p["label"] in best]
        missing = {opt: [p for p in pts if any(s not in got.get((opt, p["label"]), {}) for s in seeds[1:])] for opt, pts in top.items()}
        if len(seeds) > 1 and any(missing.values()):
            return {"round": rnd, "phase": "confirm", "points": missing, "seeds": seeds[1:], "history": history, "selection": selection}
        edges = {}
        for opt, pts in top.items():
            trials = {p["label"]: got[(opt, p["label"])] for p in pts}
            label, score = rank(trials, higher, seeds, order[opt])[0]
            values = next(p["values"] for p in pts if p["label"] == label)
            selection[opt] = {"label": label, "values": values, "score": score, "seeds": sorted(trials[label]), "round": rnd}
            edges[opt] = at_edge(spaces[opt], bounds, values, float(spec.get("edge", EDGE)))
        history[-1]["edges"] = edges
        history[-1]["selection"] = {opt: dict(sel) for opt, sel in selection.items()}
        if (not any(edges.values()) and rnd >= int(spec.get("min_rounds", 1))) or rnd == int(spec.get("max_rounds", 3)):
            return {"round": rnd, "phase": "done", "points": {}, "seeds": [], "history": history,
                    "selection": final_selection(history, got, seeds, higher, bounds, float(spec.get("edge", EDGE)))}
        spaces = {opt: next_space(spaces[opt], bounds, selection[opt]["values"], edges[opt]) for opt in spec["optimizers"]}
    raise AssertionError("unreachable")


def overrides(values: dict) -> dict:
    """A point's values as config keys: ``optimizer.kwargs.beta2`` (AdamW's, searched as 1 - beta2) becomes
    ``optimizer.kwargs.betas: [0.9, beta2]``; every other key is a config key already (lr, optimizer.weight_decay,
    optimizer.kwargs.damping, optimizer.kwargs.momentum)."""
    out = {}
    for key, value in values.items():
        if key.endswith(".beta2"):
            out[key.removesuffix(".beta2") + ".betas"] = [0.9, value]
        else:
            out[key] = value
    return out


def write_selection(task_yaml: Path, selection: dict, lr_key: str = "lr", source: str = "") -> None:
    """Write the selected settings into a task config: the ``lr`` mapping's entries and the ``tuned`` block
    (weight decay, AP damping and the optimizer's own hyperparameter), keeping every other line, comment and the
    other optimizers' entries. The tool does this; nobody pastes it by hand."""
    from omegaconf import OmegaConf

    text = Path(task_yaml).read_text()
    cfg = OmegaConf.create(text)
    lrs = dict(OmegaConf.to_container(cfg.get("lr") or {}))
    tuned = dict(OmegaConf.to_container(cfg.get("tuned") or {}))
    for opt, sel in selection.items():
        values = overrides(sel["values"])
        lrs[opt] = values.pop(lr_key)
        entry = {}
        for key, value in values.items():  # optimizer.weight_decay, optimizer.kwargs.damping, ...
            node = entry
            parts = key.removeprefix("optimizer.").split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
        tuned[opt] = entry

    def flow(d) -> str:
        if isinstance(d, list):
            return "[" + ", ".join(_num(v) for v in d) + "]"
        return "{" + ", ".join(f"{k}: {flow(v) if isinstance(v, (dict, list)) else _num(v)}" for k, v in d.items()) + "}"

    lr_line = "lr: " + flow(lrs) + (f"   # written by scripts/tune.py{source}" if source else "")
    tuned_block = "tuned:" + (f"   # written by scripts/tune.py{source}" if source else "") + "\n" + "".join(
        f"  {opt}: {flow(v)}\n" for opt, v in tuned.items())
    lr_pat = re.compile(r"^lr:[^\n]*(\n[ \t]+[^\n]*)*\n?", re.M)  # the mapping, with its continuation lines
    tuned_pat = re.compile(r"^tuned:[^\n]*\n(?:[ \t]+[^\n]*\n?)*", re.M)
    text = lr_pat.sub(lr_line + "\n", text, count=1) if lr_pat.search(text) else text.rstrip("\n") + "\n" + lr_line + "\n"
    text = tuned_pat.sub(tuned_block, text, count=1) if tuned_pat.search(text) else text.rstrip("\n") + "\n" + tuned_block
    check = OmegaConf.create(text)  # the file still parses and holds what was selected
    assert all(float(check.lr[o]) == float(lrs[o]) for o in selection), "write_selection: the lr entries did not land"
    atomic_write_text(Path(task_yaml), text)


def _num(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)
